"""A real store with every call counted, to prove what an operation asks of the store."""

from __future__ import annotations

import collections

from daman.store import Store


class CountingStore(Store):
    """A real store, with every call counted (to prove what an operation asks the store)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()

    def _call(self, name: str, *args, **kwargs):
        self.calls[name] += 1
        return getattr(self.inner, name)(*args, **kwargs)

    def describe(self):
        return self.inner.describe()

    def check(self):
        return self._call("check")

    def head(self, key, **kw):
        return self._call("head", key, **kw)

    def head_current(self, key):
        return self._call("head", key)

    def put(self, key, path, **kw):
        return self._call("put", key, path, **kw)

    def get(self, key, dest, **kw):
        return self._call("get", key, dest, **kw)

    def read_tail(self, key, length, **kw):
        return self._call("read_tail", key, length, **kw)

    def read_range(self, key, offset, length, **kw):
        return self._call("read_range", key, offset, length, **kw)

    def put_copy(self, key, path, **kw):
        return self._call("put_copy", key, path, **kw)

    def copies(self, size, **kw):
        return self.inner.copies(size, **kw)

    def keeps_versions(self):
        return self._call("keeps_versions")

    def versions(self, key):
        return self._call("versions", key)

    def delete_version(self, key, version):
        return self._call("delete_version", key, version)

    def delete(self, key):
        return self._call("delete", key)

    def list(self, prefix=""):
        return self._call("list", prefix)

    def list_level(self, prefix="", *, token=None, limit=1000):
        return self._call("list_level", prefix, token=token, limit=limit)

    def close(self) -> None:
        self.inner.close()
