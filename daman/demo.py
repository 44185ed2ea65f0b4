"""A demo store on this machine, to try daman without a cloud account.

    import daman as dm
    demo = dm.demo.start()       # an S3 server on 127.0.0.1, a seeded bucket, daman set up

:func:`start` serves S3 from moto (the ``demo`` extra: ``pip install "daman[demo]"``) on
127.0.0.1, on a free port, in a thread of this process, so the server stops with the process
(the notebook's kernel); it is never reachable from another machine. It creates the bucket
``daman-demo``, puts a few example objects in it under ``examples/`` and ``team/``, and
configures daman for that bucket **in this process only** (``dm.configure(..., save=False)``)
with a cache folder of its own: a saved configuration (``~/.daman/config.json``) and its cache
are neither read nor changed. :func:`stop` (or the end of the process) undoes all of it.

When ``DAMAN_DEMO_ENDPOINT`` names a server on loopback (Binder's ``binder/start`` runs one for
the whole container with ``python -m daman.demo``), :func:`start` uses that one instead, so
that every notebook of the container shares one store, as a team shares a bucket.

The S3 SDK needs credentials even for a local server: while the demo runs, this process's
environment holds dummy ones (``AWS_ACCESS_KEY_ID=daman-demo``), so that no real key is ever
sent to it; :func:`stop` puts the environment back.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import Config
from .errors import (
    DamanError,
    InvalidArgumentError,
    KeyExistsError,
    MissingPackageError,
    StorageNotFoundError,
)
from .files import atomic_write
from .keys import validate_prefix

BUCKET = "daman-demo"
ENDPOINT_ENV = "DAMAN_DEMO_ENDPOINT"
"""A demo server already running (``binder/start`` exports it): :func:`start` uses it."""
INSTALL_HINT = 'pip install "daman[demo]"'
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "daman-demo",
    "AWS_SECRET_ACCESS_KEY": "daman-demo",
    "AWS_SESSION_TOKEN": None,  # None: unset while the demo runs
    "AWS_PROFILE": None,
}
MiB = 1024 * 1024


def _rows(seed: int, n: int = 30) -> dict[str, list[Any]]:
    rng = random.Random(seed)
    return {
        "day": list(range(1, n + 1)),
        "units": [rng.randint(20, 90) for _ in range(n)],
        "price": [round(rng.uniform(9.5, 12.5), 2) for _ in range(n)],
    }


def _weights(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


SEED: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "examples/greeting": (lambda: "hello from the daman demo", {"lang": "en"}),
    "examples/settings": (
        lambda: {"learning_rate": 0.01, "epochs": 20, "layers": [64, 32]},
        {"by": "the demo", "note": "a small dict"},
    ),
    "team/sales/2026-10": (lambda: _rows(10), {"rows": 30, "source": "demo shop"}),
    "team/sales/2026-11": (lambda: _rows(11), {"rows": 30, "source": "demo shop"}),
    "team/model/v1": (lambda: _weights(1, 3 * MiB), {"accuracy": 0.87}),
    "team/model/v2": (lambda: _weights(2, 5 * MiB), {"accuracy": 0.91}),
}
"""The example objects of a new demo bucket: key -> (how to make the object, its meta)."""


def _require_moto() -> tuple[Any, Any]:
    """moto's server pieces, or a one-line error naming the extra that brings them."""
    try:
        import moto.moto_server.threaded_moto_server as threaded_moto_server
        from werkzeug.serving import make_server
    except ImportError:
        raise MissingPackageError(
            f"the demo store runs moto's S3 server, which is not installed: {INSTALL_HINT}."
        ) from None
    return threaded_moto_server, make_server


class _OneRequestAtATime:
    """WSGI middleware serialising requests: moto checks a conditional write (``If-None-Match``)
    and stores the object in two steps, so two racing pushes of a new key could both win.
    One request at a time makes that check atomic, as on S3."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        with self.lock:  # the body is drained inside the lock: the answer is whole
            return list(self.app(environ, start_response))


class LoopbackS3:
    """moto's S3 server on 127.0.0.1 (a free port unless ``port`` is given), in a daemon
    thread of this process. ``endpoint`` is its URL. The tests use it too."""

    def __init__(self, port: int = 0) -> None:
        tms, make_server = _require_moto()

        class Quiet(tms.MotoRequestHandler):  # type: ignore[misc, name-defined]
            def log_request(self, *args: Any) -> None:
                pass  # a line per request would land in the notebook's cells

        class Server(tms.ThreadedMotoServer):  # type: ignore[misc, name-defined]
            def _server_entry(self) -> None:
                app = _OneRequestAtATime(tms.DomainDispatcherApplication(tms.create_backend_app))
                self._server = make_server(
                    self._ip_address, self._port, app, True, request_handler=Quiet
                )
                self._server_ready_event.set()
                self._server.serve_forever()

        self._server = Server(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        host, bound = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{bound}"

    def stop(self) -> None:
        self._server.stop()


@dataclasses.dataclass(frozen=True)
class Demo:
    """What :func:`start` set up; ``str(demo)`` (and a notebook) says it in one line."""

    endpoint: str
    bucket: str
    config: Config
    """The configuration daman uses in this process (not saved)."""
    own_server: bool
    """True: the server runs in this process; False: ``DAMAN_DEMO_ENDPOINT``'s."""
    work_dir: Path
    """Where the demo's cache folders are: removed by :func:`stop` and at exit."""

    def machine(self, name: str, **fields: Any) -> Config:
        """The same store seen from another machine: a configuration with a cache folder of
        its own (``name``), for a ``dm.Manager`` beside the default one; ``fields`` override
        (``signing_key=...``, ``allocated_space=...``)."""
        if not name.isidentifier():
            raise InvalidArgumentError(f"machine name {name!r}: use letters, digits and _.")
        return self.config.replace(local_dir=str(self.work_dir / name), **fields)

    def __str__(self) -> str:
        from .report import demo_line

        return demo_line(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


_lock = threading.RLock()
_server: LoopbackS3 | None = None
_saved_env: dict[str, str | None] | None = None
_work_dir: Path | None = None
_caches = 0


def start(
    *,
    scratch: str | None = None,
    allocated_space: int | str | None = "256MiB",
    progress: bool = True,
) -> Demo:
    """Serve the demo store (or use ``DAMAN_DEMO_ENDPOINT``'s), make sure its bucket holds
    the example objects, and configure daman for it in this process only, with a new, empty
    cache folder. Calling it again reuses the server.

    ``scratch``, a prefix ending with ``/``: its keys are deleted from the demo store first,
    so that a notebook writing under it runs again from the top (on a shared server too)."""
    from . import api

    if scratch is not None and (not scratch.endswith("/") or scratch == "/"):
        raise InvalidArgumentError(f"scratch {scratch!r} must be a prefix ending with '/'.")
    if scratch is not None:
        validate_prefix(scratch)
    global _caches
    with _lock:
        endpoint, own = _endpoint()
        _use_demo_credentials()
        work = _work()
        _caches += 1
        config = Config(
            storage_name=BUCKET,
            service="aws",
            endpoint_url=endpoint,
            region="us-east-1",
            local_dir=str(work / f"cache-{_caches}"),
            allocated_space=allocated_space,
            progress=progress,
            connect_timeout=2,
            max_attempts=2,
        )
        seed(config)
        if scratch:
            _empty(config, scratch)
        api.configure(**config.to_dict(), save=False)
    return Demo(endpoint, BUCKET, config, own, work)


def stop() -> None:
    """Stop the server this process runs (if any), forget the demo's configuration (daman
    goes back to the saved one), remove its cache folders and restore the environment."""
    from . import api

    global _server, _saved_env, _work_dir
    with _lock:
        current = api._process_config
        if current is not None and current.endpoint_url and current.storage_name == BUCKET:
            api.reset()
        if _server is not None:
            _server.stop()
            _server = None
        if _saved_env is not None:
            _set_env(_saved_env)
            _saved_env = None
        if _work_dir is not None:
            shutil.rmtree(_work_dir, ignore_errors=True)
            _work_dir = None


def seed(config: Config) -> list[str]:
    """Create the demo bucket if it is missing and push the example objects it lacks (none
    are overwritten); returns the keys pushed. Through a cache folder of its own, removed
    after, so that the examples show as stored only, not cached, on every machine."""
    from .manager import Manager

    _create_bucket(config)
    pushed = []
    with (
        tempfile.TemporaryDirectory(prefix="daman-demo-seed-") as tmp,
        Manager(config.replace(local_dir=tmp, progress=False)) as manager,
    ):
        there = {item.key for item in manager.ls()}
        for key, (make, meta) in SEED.items():
            if key in there:
                continue
            try:  # another process seeding at the same moment may come first
                manager.push(make(), key, meta=meta)
            except KeyExistsError:
                continue
            pushed.append(key)
    return pushed


def _create_bucket(config: Config) -> None:
    from .store import open_store

    store = open_store(config)
    try:
        try:
            store.check()
        except StorageNotFoundError:
            store.client.create_bucket(Bucket=config.storage_name)  # type: ignore[attr-defined]
    finally:
        store.close()


def _empty(config: Config, prefix: str) -> None:
    from .manager import Manager

    with Manager(config.replace(local_dir=str(_work() / "scratch"))) as manager:
        for item in manager.ls(prefix):
            manager.delete(item.key, remote=True)


def _endpoint() -> tuple[str, bool]:
    """The demo server's URL, and whether this process runs it."""
    global _server
    shared = os.environ.get(ENDPOINT_ENV)
    if shared:
        parts = urlsplit(shared)
        if parts.scheme != "http" or parts.hostname not in _LOOPBACK or not parts.port:
            raise InvalidArgumentError(
                f"{ENDPOINT_ENV}={shared!r}: the demo store is only ever served on this "
                "machine; give http://127.0.0.1:PORT, or unset it to start a server here."
            )
        return shared.rstrip("/"), False
    if _server is None:
        _server = LoopbackS3()
    return _server.endpoint, True


def _set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _use_demo_credentials() -> None:
    global _saved_env
    if _saved_env is None:
        _saved_env = {name: os.environ.get(name) for name in _CREDENTIALS}
    _set_env(_CREDENTIALS)


def _work() -> Path:
    global _work_dir
    if _work_dir is None:
        _work_dir = Path(tempfile.mkdtemp(prefix="daman-demo-"))
        atexit.register(shutil.rmtree, _work_dir, True)
    return _work_dir


# -- python -m daman.demo: the server of a whole container (binder/start) ----------------------


def serve(argv: list[str] | None = None) -> int:
    """Run the demo server until the parent process ends (or SIGTERM): for ``binder/start``,
    whose ``exec`` makes Jupyter that parent, so the server ends with it."""
    parser = argparse.ArgumentParser(
        prog="python -m daman.demo",
        description="Serve daman's demo store (moto's S3) on 127.0.0.1 until the parent "
        "process ends; seed its bucket; write its URL to --endpoint-file.",
    )
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--endpoint-file", type=Path, help="write the URL here once seeded")
    args = parser.parse_args(argv)
    parent = os.getppid()
    try:
        server = LoopbackS3(args.port)
        _use_demo_credentials()
        with tempfile.TemporaryDirectory(prefix="daman-demo-") as tmp:
            seed(Config(storage_name=BUCKET, service="aws", endpoint_url=server.endpoint,
                        region="us-east-1", local_dir=tmp, progress=False))  # fmt: skip
    except DamanError as exc:
        print(f"daman.demo: error: {exc}", file=sys.stderr)
        return 1
    if args.endpoint_file:
        with atomic_write(args.endpoint_file) as out:  # whole or absent: the script polls it
            out.file.write(server.endpoint.encode())
    print(f"daman demo store: s3://{BUCKET}/ at {server.endpoint}", flush=True)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: done.set())
    while not done.wait(0.5) and os.getppid() == parent:
        pass  # an orphan is re-parented: the parent is gone
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(serve())


__all__ = ["BUCKET", "ENDPOINT_ENV", "Demo", "LoopbackS3", "seed", "start", "stop"]
