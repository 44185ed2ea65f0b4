"""Upgrading from daman 0.2: ``dm.migrate`` / ``dm_migrate`` on both backends (conditional
rewrites, concurrent changes, interruptions, dry runs), and importing a machine's 0.2 setup."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest
from legacy_helpers import (
    HookedStore,
    Tripwire,
    put_02,
    registry_entry,
    run,
    tripped,
    write_setup_02,
)

import daman
from daman import (
    ConcurrentChangeError,
    Config,
    ConfigError,
    DeserializationError,
    KeyNotFoundError,
    Manager,
    NotConfiguredError,
    UntrustedObjectError,
)
from daman.migrate import choose_local_dir, import_setup, migrate_store, read_legacy_setup

KEY = "signing-key-of-the-team"


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    """daman 0.2 wrote to S3 only (copies may sit in a folder): not the cloud backends."""
    return request.param


def formats(manager: Manager, prefix: str = "") -> dict[str, bool | None]:
    return {item.key: item.legacy for item in manager.ls(prefix, legacy=True)}


def etags(manager: Manager) -> dict[str, str]:
    return {info.key: info.etag for info in manager.store.list()}


# -- objects in the store ----------------------------------------------------------------------


def test_migrate_converts_every_02_object_keeping_its_meta(
    manager: Manager, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_02(config, "team/a", {"x": 1}, meta={"source": "a"})
    put_02(config, "team/b", [1, 2, 3], meta=None)
    manager.push("today", "team/c", meta="new")
    seen: list[tuple[str, str]] = []
    result = migrate_store(manager, on_key=lambda key, outcome, _: seen.append((key, outcome)))
    assert (result.converted, result.skipped, result.refused) == (
        ["team/a", "team/b"],
        ["team/c"],
        {},
    )
    assert seen == [("team/a", "converted"), ("team/b", "converted"), ("team/c", "skipped")]
    assert formats(manager) == {"team/a": False, "team/b": False, "team/c": False}
    monkeypatch.setitem(sys.modules, "joblib", None)  # today's format needs no joblib
    with Manager(config.replace(local_dir=str(config.cache_dir) + "-fresh")) as fresh:
        assert fresh.pull("team/a") == ({"x": 1}, {"source": "a"})
        assert fresh.pull("team/b") == ([1, 2, 3], None)
        details = fresh.info("team/a")
    assert not details.legacy and details.meta == {"source": "a"}
    assert "converted from daman 0.2" in details.pushed_by and details.pushed_at
    # Idempotent: nothing left to do.
    again = migrate_store(manager)
    assert (again.converted, sorted(again.skipped)) == ([], ["team/a", "team/b", "team/c"])


def test_a_cached_copy_of_a_02_object_is_refreshed_after_migration(
    manager: Manager, config: Config
) -> None:
    put_02(config, "k", "v", meta="m")
    manager.pull("k")
    old = manager.cache.get("k").etag
    migrate_store(manager)
    pulled = manager.load("k")
    assert (pulled.obj, pulled.meta, pulled.source) == ("v", "m", "store")
    assert manager.cache.get("k").etag != old


def test_with_a_signing_key_migrate_signs_what_it_converts(config: Config) -> None:
    put_02(config, "old", {"w": 1}, meta="m")
    with Manager(config.replace(signing_key=KEY)) as signed:
        with pytest.raises(UntrustedObjectError):
            signed.pull("old")
        assert migrate_store(signed).converted == ["old"]
        assert signed.pull("old") == ({"w": 1}, "m")
    with (
        Manager(
            config.replace(signing_key="another-key", local_dir=str(config.cache_dir) + "2")
        ) as other,
        pytest.raises(UntrustedObjectError),
    ):
        other.pull("old")


def test_a_large_02_object_is_migrated_in_parts(manager: Manager, config: Config) -> None:
    import numpy as np

    array = np.arange(9 * 1024 * 1024 // 8, dtype=np.float64)  # over 8 MiB: multipart on S3
    put_02(config, "big", {"x": array}, meta="large")
    result = migrate_store(manager)
    assert result.converted == ["big"] and formats(manager) == {"big": False}
    with Manager(config.replace(local_dir=str(config.cache_dir) + "-check")) as check:
        obj, meta = check.pull("big")
    assert np.array_equal(obj["x"], array) and meta == "large"


def test_a_prefix_limits_the_migration(manager: Manager, config: Config) -> None:
    put_02(config, "team/a", 1)
    put_02(config, "other/b", 2)
    assert migrate_store(manager, "team/").converted == ["team/a"]
    assert formats(manager) == {"other/b": True, "team/a": False}


def test_a_dry_run_changes_nothing_and_needs_no_joblib(
    manager: Manager, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_02(config, "a", 1)
    manager.push(2, "b")
    before = etags(manager)
    monkeypatch.setitem(sys.modules, "joblib", None)
    result = migrate_store(manager, dry_run=True)
    assert result.dry_run and (result.converted, result.skipped) == (["a"], ["b"])
    assert etags(manager) == before and formats(manager) == {"a": True, "b": False}
    with pytest.raises(DeserializationError, match=r"daman\[legacy\]"):
        migrate_store(manager)  # a real run stops at once, converting nothing
    assert etags(manager) == before


def test_a_concurrent_change_during_migration_is_never_overwritten(
    manager: Manager, config: Config
) -> None:
    put_02(config, "a", "old a")
    put_02(config, "b", "old b")
    put_02(config, "c", "old c")
    hooked = HookedStore(manager.store)
    teammate = Manager(config.replace(local_dir=str(config.cache_dir) + "-teammate"))

    def push_new_b(key: str) -> None:
        if key == "b":  # after the migration read b, before it writes it back
            teammate.push("new b", "b", meta="pushed meanwhile", force=True)

    hooked.hooks["after_get"] = push_new_b
    migrating = Manager(config, store=hooked, cache=manager.cache)  # shares them: not closed
    result = migrate_store(migrating)
    assert result.converted == ["a", "c"] and list(result.refused) == ["b"]
    assert "changed" in result.refused["b"] and "left as it is" in result.refused["b"]
    with Manager(config.replace(local_dir=str(config.cache_dir) + "-check")) as check:
        assert check.pull("b") == ("new b", "pushed meanwhile")
        assert check.pull("a")[0] == "old a"
    teammate.close()
    assert migrate_store(manager).skipped == ["a", "b", "c"]


def test_a_02_object_pushed_again_by_02_meanwhile_is_left_for_the_next_run(
    manager: Manager, config: Config
) -> None:
    put_02(config, "k", "first")
    hooked = HookedStore(manager.store)
    hooked.hooks["after_get"] = lambda key: put_02(config, key, "second, by a 0.2 client")
    migrating = Manager(config, store=hooked, cache=manager.cache)  # shares them: not closed
    assert list(migrate_store(migrating).refused) == ["k"]
    assert formats(manager) == {"k": True}
    assert migrate_store(manager).converted == ["k"]
    assert manager.pull("k")[0] == "second, by a 0.2 client"


def test_an_interrupted_migration_is_resumed_by_running_it_again(
    manager: Manager, config: Config
) -> None:
    for i in range(5):
        put_02(config, f"k{i}", i, meta=f"meta {i}")
    hooked = HookedStore(manager.store)
    writes: list[str] = []

    def interrupt_third(key: str) -> None:
        writes.append(key)
        if len(writes) == 3:
            raise KeyboardInterrupt

    hooked.hooks["put_if_match"] = interrupt_third
    migrating = Manager(config, store=hooked, cache=manager.cache)  # shares them: not closed
    with pytest.raises(KeyboardInterrupt):
        migrate_store(migrating)
    assert formats(manager) == {"k0": False, "k1": False, "k2": True, "k3": True, "k4": True}
    assert list((config.cache_dir / "tmp").iterdir()) == []
    result = migrate_store(manager)
    assert (result.converted, result.skipped) == (["k2", "k3", "k4"], ["k0", "k1"])
    with Manager(config.replace(local_dir=str(config.cache_dir) + "-check")) as check:
        assert [check.pull(f"k{i}") for i in range(5)] == [(i, f"meta {i}") for i in range(5)]


@pytest.mark.parametrize("backend", ["local"])  # S3 replaces an object in one request
def test_a_migration_killed_between_its_two_renames_is_repaired(
    manager: Manager, config: Config
) -> None:
    put_02(config, "team/k", "value", meta="m")
    stored = Path(config.storage_name, "team", "k.daman")
    aside = stored.with_name(f".k.daman.{'ab' * 16}.aside")  # as put_if_match names it
    stored.rename(aside)  # killed after setting the old version aside, before the new one
    assert manager.ls() == []
    result = migrate_store(manager)
    assert result.recovered == 1 and result.converted == ["team/k"]
    assert not aside.exists() and manager.pull("team/k") == ("value", "m")


@pytest.mark.parametrize("backend", ["s3"])  # a folder keeps no md5 to check against
def test_a_02_object_with_a_wrong_md5_is_refused_and_left_alone(
    manager: Manager, config: Config, tmp_path: Path
) -> None:
    log = tmp_path / "unpickled.log"
    put_02(config, "bad", Tripwire(log), md5="0" * 32)
    put_02(config, "good", "fine")
    before = etags(manager)["bad"]
    result = migrate_store(manager)
    assert result.converted == ["good"] and "md5" in result.refused["bad"]
    assert tripped(log) == 0 and etags(manager)["bad"] == before


# -- the conditional replace, on both backends ---------------------------------------------


def test_put_if_match_replaces_only_the_version_it_names(manager: Manager, tmp_path: Path) -> None:
    store = manager.store
    manager.push("v1", "k")
    first = store.head("k").etag
    replacement = tmp_path / "replacement"
    replacement.write_bytes(daman.serialize.dump_to_bytes("v2"))
    store.put_if_match("k", replacement, first)
    second = store.head("k").etag
    assert second != first
    replacement.write_bytes(daman.serialize.dump_to_bytes("v3"))
    with pytest.raises(ConcurrentChangeError):
        store.put_if_match("k", replacement, first)  # k is no longer at that version
    assert store.head("k").etag == second
    with pytest.raises(KeyNotFoundError):
        store.put_if_match("missing/key", replacement, first)
    assert store.recover_interrupted() == 0


# -- importing a machine's 0.2 setup ---------------------------------------------------------


@pytest.fixture
def aws_02(
    s3_endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Config:
    """A 0.2 machine's view of the bucket: no endpoint in its config, so boto3 is pointed at
    the test server through the environment, as AWS_ENDPOINT_URL would for a real user."""
    if "/" in bucket:
        pytest.skip("0.2 used whole buckets")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return Config(storage_name=bucket, service="aws", endpoint_url=s3_endpoint,
                  local_dir=str(tmp_path / "writer"), progress=False)  # fmt: skip


def test_a_02_setup_is_imported_with_its_pins(
    aws_02: Config, daman_home: Path, tmp_path: Path
) -> None:
    home = daman_home.parent
    old_cache = home / ".daman" / "data"  # 0.2's default, also today's: not reused when full
    old_cache.mkdir(parents=True)
    (old_cache / "team_model").write_bytes(b"a 0.2 cached copy")
    put_02(aws_02, "team_model", {"w": [1.0]}, meta="model")
    put_02(aws_02, "team_data", [1, 2], meta="data")
    put_02(aws_02, "scratch", "x")
    registry = {
        "team_model": registry_entry(old_cache, "team_model", True),
        "team_data": registry_entry(old_cache, "team_data", True),
        "scratch": registry_entry(old_cache, "scratch", False),
    }
    write_setup_02(home, bucket=aws_02.storage_name, data_dir=old_cache, allocated_mib="512",
                   registry=registry)  # fmt: skip
    with pytest.raises(NotConfiguredError, match="dm_migrate --local") as caught:
        daman.pull("team_model")  # first use offers the import, in one line
    assert "\n" not in str(caught.value)

    result = daman.migrate_local()
    assert not result.existed and result.ok and result.pinned == ["team_data", "team_model"]
    saved = json.loads((daman_home / "config.json").read_text())
    assert saved["storage_name"] == aws_02.storage_name and saved["service"] == "aws"
    assert saved["allocated_space"] == 512 * 2**20
    assert saved["local_dir"] == str(daman_home / "cache")  # the old folder was not empty
    usage = daman.usage()
    assert sorted(e.key for e in usage.persisted) == ["team_data", "team_model"]
    assert [e.key for e in usage.entries if not e.persist] == []
    assert daman.pull("team_model") == ({"w": [1.0]}, "model")
    assert (old_cache / "team_model").read_bytes() == b"a 0.2 cached copy"  # untouched
    # Repeatable: the configuration is kept, the pins are there already.
    again = daman.migrate_local()
    assert again.existed and again.pinned == ["team_data", "team_model"]


def test_an_empty_02_cache_folder_becomes_the_new_one(
    aws_02: Config, daman_home: Path, tmp_path: Path
) -> None:
    old_cache = tmp_path / "old-cache"
    old_cache.mkdir()
    write_setup_02(daman_home.parent, bucket=aws_02.storage_name, data_dir=old_cache)
    result = import_setup(dry_run=True)
    assert result.dry_run and result.config.cache_dir == old_cache
    assert not (daman_home / "config.json").exists()  # a dry run writes nothing
    result = import_setup()
    assert result.config.cache_dir == old_cache and result.config.allocated_space is None
    assert (daman_home / "config.json").exists() and result.pinned == []


def test_a_pin_that_cannot_be_pulled_is_reported(aws_02: Config, daman_home: Path) -> None:
    old_cache = daman_home.parent / "old"
    registry = {"gone": registry_entry(old_cache, "gone", True)}
    write_setup_02(daman_home.parent, bucket=aws_02.storage_name, data_dir=old_cache,
                   registry=registry)  # fmt: skip
    result = import_setup()
    assert not result.ok and "not found" in result.failed["gone"]


def test_a_setup_for_another_bucket_is_not_imported_over_a_configuration(
    aws_02: Config, daman_home: Path, tmp_path: Path
) -> None:
    daman.configure(storage_name=str(tmp_path / "store"), service="local")
    write_setup_02(daman_home.parent, bucket=aws_02.storage_name, data_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match="already configured"):
        import_setup()


def test_the_02_registry_named_in_the_config_is_read_when_the_default_is_missing(
    daman_home: Path, tmp_path: Path
) -> None:
    home = daman_home.parent
    named = tmp_path / "elsewhere.json"
    named.write_text(json.dumps({"k": registry_entry(tmp_path, "k", True)}))
    text = (
        f"[service]\nservice = aws\nname = b\n[local]\ndata_dir = {tmp_path}\nregistery = {named}\n"
    )
    write_setup_02(home, bucket="b", data_dir=tmp_path, config_text=text)
    setup = read_legacy_setup()
    assert setup.registry == named and setup.persisted == ("k",)


def test_no_02_setup_means_no_offer(daman_home: Path) -> None:
    assert read_legacy_setup() is None
    with pytest.raises(NotConfiguredError) as caught:
        daman.pull("k")
    assert "dm_migrate" not in str(caught.value)
    with pytest.raises(NotConfiguredError, match=r"no daman 0\.2 setup"):
        import_setup()


@pytest.mark.parametrize(
    ("config_text", "registry_text", "message"),
    [
        ("service = aws\n", None, "not a readable INI file"),
        ("[service]\nservice = aws\n[local]\ndata_dir = /d\n", None, "no \\[service\\]"),
        ("[service]\nservice = gcp\nname = b\n[local]\ndata_dir = /d\n", None, "'gcp'"),
        ("[service]\nservice = aws\nname = b\n", None, "no \\[local\\]"),
        (
            "[service]\nservice = aws\nname = b\n[local]\ndata_dir = /d\nallocated_space = lots\n",
            None,
            "allocated_space",
        ),
        (
            "[service]\nservice = aws\nname = b\n[local]\ndata_dir = /d\nallocated_space = -5\n",
            None,
            "allocated_space",
        ),
        ("[service]\nservice = aws\nname = b\nname = c\n", None, "not a readable INI file"),
        (None, "{not json", "not a readable JSON registry"),
        (None, "[1, 2]", "does not hold a registry"),
        (None, '{"k": 3}', "not a JSON object"),
        (None, '{"k": {"persist": "yes"}}', "persist = 'yes'"),
        ("\udcff", None, "not a readable INI file"),
    ],
)
def test_bad_02_files_are_one_line_config_errors(
    daman_home: Path, config_text: str | None, registry_text: str | None, message: str
) -> None:
    folder = daman_home.parent / ".daman"
    folder.mkdir(parents=True, exist_ok=True)
    good = "[service]\nservice = aws\nname = b\n[local]\ndata_dir = /d\n"
    text = good if config_text is None else config_text
    (folder / "config").write_bytes(text.encode("utf-8", "surrogateescape"))
    if registry_text is not None:
        (folder / "data_registery.json").write_text(registry_text)
    with pytest.raises(ConfigError, match=message) as caught:
        import_setup()
    assert "\n" not in str(caught.value) and "dm_configure" in str(caught.value)


def test_choose_local_dir(daman_home: Path, tmp_path: Path) -> None:
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "x").write_bytes(b"")
    assert choose_local_dir(empty) == empty
    assert choose_local_dir(tmp_path / "missing") == tmp_path / "missing"
    assert choose_local_dir(full) == daman_home / "data"
    (daman_home / "data").mkdir(parents=True)
    (daman_home / "data" / "old").write_bytes(b"")
    assert choose_local_dir(daman_home / "data") == daman_home / "cache"


# -- the console script ----------------------------------------------------------------------


def configure_cli(config: Config) -> None:
    args = ["dm_configure", "--storage_name", config.storage_name, "--service", config.service,
            "--local_dir", str(config.cache_dir)]  # fmt: skip
    if config.endpoint_url:
        args += ["--endpoint_url", config.endpoint_url]
    result = run(*args)
    assert result.returncode == 0, result.stderr


def test_version_is_above_02_everywhere() -> None:
    version = metadata.version("daman")
    assert tuple(int(p) for p in version.split(".")[:2]) > (0, 2)
    assert daman.__version__ == version
    for args in (("-m", "daman", "--version"), ("dm_migrate", "--version"), ("dm_ls", "--version")):
        result = run(*args)
        assert result.returncode == 0 and result.stdout.strip() == f"daman {version}", args


def test_dm_migrate_help_has_examples() -> None:
    result = run("dm_migrate", "--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout and "--local" in result.stdout
    assert "examples:" in result.stdout and "dm_migrate --local" in result.stdout
    assert run("dm_migrate", "--local", "team/").returncode == 2


def test_dm_migrate_converts_and_dry_run_changes_nothing(manager: Manager, config: Config) -> None:
    configure_cli(config)
    put_02(config, "team/old", {"a": 1}, meta="m")
    manager.push("new", "team/new")
    result = run("dm_ls", "team/", "--long", "--legacy")
    assert result.returncode == 0, result.stderr
    [old_line] = [line for line in result.stdout.splitlines() if "team/old" in line]
    assert "daman 0.2" in old_line
    before = etags(manager)
    result = run("-m", "daman", "migrate", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert (
        "would convert team/old" in result.stdout
        and "would convert 1 daman 0.2 object" in result.stdout
    )
    assert etags(manager) == before
    result = run("dm_info", "--key", "team/old")
    assert result.returncode == 0 and "daman 0.2" in result.stdout
    result = run("dm_pull", "--key", "team/old")  # into the cache, converted on the way
    assert result.returncode == 0 and "team/old" in result.stdout, result.stderr
    with Manager(config) as here:
        assert here.load("team/old").source == "cache"

    result = run("dm_migrate", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (
        "converted team/old" in result.stdout and "1 key already in today's format" in result.stdout
    )
    assert formats(manager, "team/") == {"team/new": False, "team/old": False}
    result = run("dm_migrate")
    assert result.returncode == 0 and "converted 0 daman 0.2 objects" in result.stdout


@pytest.mark.parametrize("backend", ["s3"])  # a folder keeps no md5 to check against
def test_dm_migrate_exits_1_when_an_object_is_refused(manager: Manager, config: Config) -> None:
    configure_cli(config)
    put_02(config, "bad", "x", md5="0" * 32)
    result = run("dm_migrate")
    assert result.returncode == 1 and "refused bad" in result.stdout
    assert result.stderr.count("\n") == 1 and "dm_migrate: error:" in result.stderr


def test_dm_migrate_local_imports_the_02_setup(aws_02: Config, daman_home: Path) -> None:
    home = daman_home.parent
    old_cache = home / "old-cache"
    old_cache.mkdir()
    (old_cache / "pinned").write_bytes(b"old copy")
    put_02(aws_02, "pinned", [1], meta="p")
    write_setup_02(home, bucket=aws_02.storage_name, data_dir=old_cache, allocated_mib="100",
                   registry={"pinned": registry_entry(old_cache, "pinned", True)})  # fmt: skip
    result = run("dm_pull", "--key", "pinned")
    assert result.returncode == 1 and "dm_migrate --local" in result.stderr
    assert result.stderr.count("\n") == 1
    result = run("dm_migrate", "--local", "--dry-run")
    assert result.returncode == 0 and "would import" in result.stdout
    assert not (daman_home / "config.json").exists()
    result = run("dm_migrate", "--local")
    assert result.returncode == 0, result.stderr
    assert "pulled again and persisted: pinned" in result.stdout
    assert str(old_cache) in result.stdout and "100.0 MiB" in result.stdout
    result = run("dm_status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert [p["key"] for p in status["persisted"]] == ["pinned"]
    assert (old_cache / "pinned").read_bytes() == b"old copy"


def test_dm_migrate_local_on_a_bad_02_config_is_one_line(daman_home: Path) -> None:
    folder = daman_home.parent / ".daman"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config").write_text("[service]\nservice = aws\n")
    result = run("dm_migrate", "--local")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "daman 0.2" in result.stderr and "Traceback" not in result.stderr


def test_a_store_without_conditional_replace_stops_the_migration_at_once(
    manager: Manager, config: Config
) -> None:
    from counting_store import CountingStore  # a Store that does not offer put_if_match

    put_02(config, "k", 1)
    plain = Manager(config, store=CountingStore(manager.store), cache=manager.cache)
    with pytest.raises(daman.DamanError, match="cannot replace an object only if"):
        migrate_store(plain)
    assert migrate_store(plain, dry_run=True).converted == ["k"]
