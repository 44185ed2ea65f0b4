"""moto's S3 server for the benchmarks, in its own process (its CPU never shares the client's GIL).

    python bench/moto_server.py PORT [--plain]

Prints ``ready`` once it listens on 127.0.0.1:PORT, then answers commands read from stdin, one
per line, with one line on stdout:

    fill BUCKET PREFIX COUNT SIZE   create COUNT keys PREFIX000000.. of SIZE random bytes in
                                    BUCKET, through moto's backend in this process (no HTTP:
                                    100,000 keys in seconds rather than minutes); answers
                                    ``filled COUNT SECONDS``
    rss                             the server's current and peak RSS in bytes

One change to moto 5.x unless ``--plain``: its ``FakeKey.value`` re-reads the whole object from
its spool file on every access, so each ranged GET of an N-byte object copies N bytes and a
parallel download of it costs O(N^2) in the server (8 threads x 1 GiB of copies in flight for a
1 GiB object). The server here keeps each object's bytes once read, so a ranged GET costs its
range, as on S3. The change is server-side only and the same for daman and the baselines.
"""

from __future__ import annotations

import os
import resource
import sys
import time


def _memoise_values() -> None:
    from moto.s3.models import FakeKey

    prop = FakeKey.value
    original_get, original_set = prop.fget, prop.fset

    def get(self):  # type: ignore[no-untyped-def]
        value = self.__dict__.get("_bench_value")
        if value is None:
            value = original_get(self)
            self.__dict__["_bench_value"] = value
        return value

    def set_(self, new_value):  # type: ignore[no-untyped-def]
        self.__dict__.pop("_bench_value", None)
        original_set(self, new_value)

    FakeKey.value = property(get, set_)
    original_dispose = FakeKey.dispose

    def dispose(self, garbage: bool = False) -> None:
        self.__dict__.pop("_bench_value", None)
        original_dispose(self, garbage)

    FakeKey.dispose = dispose


def _fill(bucket: str, prefix: str, count: int, size: int) -> float:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    start = time.perf_counter()
    for i in range(count):
        backend.put_object(bucket, f"{prefix}{i:06d}", os.urandom(size))
    return time.perf_counter() - start


def _rss() -> tuple[int, int]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return fields.get("VmRSS", 0), peak


def main() -> None:
    from moto.server import ThreadedMotoServer

    if "--plain" not in sys.argv:
        _memoise_values()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
    server.start()
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "fill":
                bucket, prefix, count, size = words[1], words[2], int(words[3]), int(words[4])
                print(f"filled {count} {_fill(bucket, prefix, count, size):.3f}", flush=True)
            elif words[0] == "rss":
                print("rss {} {}".format(*_rss()), flush=True)
            else:
                print(f"error unknown command {words[0]}", flush=True)
        except Exception as exc:  # report, keep serving
            print(f"error {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
