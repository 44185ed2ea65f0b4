"""The listing cache (daman/listing.py): pages kept a TTL, stamped when they arrive, dropped
when the store changed while they were on their way, and levels derived from full listings."""

from __future__ import annotations

from daman import listing
from daman.listing import LISTING_TTL, ListingCache
from daman.store import Level, ObjectInfo


def level(prefix: str, *names: str, token: str | None = None) -> Level:
    prefixes = [n for n in names if n.endswith("/")]
    objects = [ObjectInfo(n, 1, f'"{n}"') for n in names if not n.endswith("/")]
    return Level(prefix, prefixes, objects, token)


def test_a_page_answers_for_the_ttl_then_not() -> None:
    now = [100.0]
    cache = ListingCache(clock=lambda: now[0])
    since = cache.generation
    cache.put(level("a/", "a/x"), token=None, limit=1000, since=since)
    assert cache.get("a/", None, 1000).objects[0].key == "a/x"
    assert cache.get("a/", None, 10) is None  # another page size is another page
    assert cache.get("a/", "tok", 1000) is None
    now[0] += LISTING_TTL - 0.01
    assert cache.get("a/", None, 1000) is not None
    now[0] += 0.01
    assert cache.get("a/", None, 1000) is None


def test_a_slow_listing_is_fresh_when_it_arrives() -> None:
    """Stamped at the request, a listing slower than the TTL would be stale when stored and
    every keystroke would list again: it is stamped when it arrives."""
    now = [100.0]
    cache = ListingCache(clock=lambda: now[0])
    since = cache.generation  # the request leaves...
    now[0] += 3 * LISTING_TTL  # ...and the answer takes three TTLs
    cache.put(level("", "k"), token=None, limit=1000, since=since)
    assert cache.get("", None, 1000) is not None
    now[0] += LISTING_TTL / 2
    assert cache.get("", None, 1000) is not None


def test_a_listing_in_flight_across_a_change_is_not_kept() -> None:
    cache = ListingCache()
    since = cache.generation
    cache.forget()  # a push or a delete while the listing was on its way
    cache.put(level("", "old"), token=None, limit=1000, since=since)
    assert cache.get("", None, 1000) is None
    cache.put(level("", "new"), token=None, limit=1000, since=cache.generation)
    assert cache.get("", None, 1000) is not None
    cache.forget()
    assert cache.get("", None, 1000) is None


def test_a_full_listing_reveals_every_level_under_it() -> None:
    cache = ListingCache()
    infos = [ObjectInfo(k, 1, '"e"') for k in ("a", "b/c", "b/d/e", "b/d/f", "z/y/x")]
    cache.put_keys("", infos, limit=1000, since=cache.generation)
    root = cache.get("", None, 1000)
    assert (root.prefixes, [o.key for o in root.objects], root.token) == (["b/", "z/"], ["a"], None)
    b = cache.get("b/", None, 1000)
    assert (b.prefixes, [o.key for o in b.objects]) == (["b/d/"], ["b/c"])
    assert [o.key for o in cache.get("b/d/", None, 1000).objects] == ["b/d/e", "b/d/f"]
    assert cache.get("z/", None, 1000).prefixes == ["z/y/"]
    # A level with more names than a page is not kept as one page.
    small = ListingCache()
    small.put_keys("", infos, limit=2, since=small.generation)
    assert small.get("", None, 2) is None  # 3 names
    assert small.get("b/d/", None, 2) is not None  # 2 names
    # A partial name's listing does not hold its level whole.
    partial = ListingCache()
    partial.put_keys("b/d", infos[2:4], limit=1000, since=partial.generation)
    assert partial.get("b/", None, 1000) is None and partial.get("b/d", None, 1000) is None


def test_the_cache_keeps_a_bounded_number_of_pages(monkeypatch) -> None:
    monkeypatch.setattr(listing, "MAX_LISTINGS", 3)
    now = [0.0]
    cache = ListingCache(clock=lambda: now[0])
    for n in range(5):
        now[0] += 0.001
        cache.put(level(f"p{n}/"), token=None, limit=1000, since=cache.generation)
    kept = [n for n in range(5) if cache.get(f"p{n}/", None, 1000) is not None]
    assert kept == [2, 3, 4]  # the newest
