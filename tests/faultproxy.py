"""A small fault-injecting HTTP/1.1 proxy on loopback, for putting in front of moto.

Every request the client sends is read whole (``Expect: 100-continue`` is answered at once,
chunked bodies are de-chunked), numbered, and shown to a *plan*: a callable that returns
``None`` (forward it untouched) or the name of a fault:

``"500"``, ``"503"``
    answer with that status and an S3-style XML error; the request never reaches the store.
``"drop"``
    close the connection without answering; the request never reaches the store.
``"reset"``
    the same, with a TCP reset (``SO_LINGER`` 0) instead of an orderly close.
``"lost"``
    forward the request (the store acts on it), then close without answering: the client
    cannot tell whether its request happened.
``"cut"``
    forward, then send the status line, the headers and half of the body (half of the
    headers when there is no body) and close: a connection that breaks mid-response.
``"flip"``
    forward, then answer with one bit flipped in the middle of the body (corruption in
    transit that TCP did not catch).
``"short"``
    forward a ranged GET, then answer with only the first half of the range, as a complete
    and well-formed 206 whose Content-Range says so (servers may send less than asked).
``"nosuchupload"``
    answer 404 ``NoSuchUpload`` without forwarding, as some servers answer a retried
    CompleteMultipartUpload whose first attempt completed.
``"unconditional"``
    forward without ``If-None-Match`` and ``If-Match``: a server that ignores conditions
    (some S3-compatible ones do on CompleteMultipartUpload).

``FaultProxy.faults`` counts the faults injected by kind; ``FaultProxy.log`` lists every
request as ``(number, method, target, range, fault)``. Plans are built with :func:`nth`,
:func:`fraction`, :func:`first` and :func:`at_most`, or written by hand.

:func:`black_hole` is a listener that accepts connections and never answers; :func:`trickle`
one that answers a byte at a time, for ever.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO
from urllib.parse import urlsplit

FAULTS = (
    "500", "503", "drop", "reset", "lost", "cut", "flip", "short", "nosuchupload", "unconditional"
)  # fmt: skip
_CONDITIONS = ("if-none-match", "if-match")
NOT_FORWARDED = ("500", "503", "drop", "reset", "nosuchupload")

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>injected by faultproxy</Message><RequestId>faultproxy</RequestId></Error>"
)
_STATUS = {
    "500": (500, "Internal Server Error", "InternalError"),
    "503": (503, "Service Unavailable", "ServiceUnavailable"),
    "nosuchupload": (404, "Not Found", "NoSuchUpload"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te"}


@dataclasses.dataclass(frozen=True)
class Request:
    """What a plan sees of one request."""

    number: int
    """1-based, in the order requests finished arriving."""
    method: str
    target: str
    headers: dict[str, str]
    """Lower-cased names."""
    body_size: int

    @property
    def query(self) -> str:
        return urlsplit(self.target).query


Plan = Callable[[Request], "str | None"]
Match = Callable[[Request], bool]


def _any(_: Request) -> bool:
    return True


def nth(numbers: Iterable[int], kind: str, match: Match = _any) -> Plan:
    """``kind`` on the n-th request that ``match`` accepts (1-based), for each n given."""
    wanted, seen, lock = set(numbers), [0], threading.Lock()

    def plan(request: Request) -> str | None:
        if not match(request):
            return None
        with lock:
            seen[0] += 1
            return kind if seen[0] in wanted else None

    return plan


def first(count: int, kind: str, match: Match = _any) -> Plan:
    """``kind`` on the first ``count`` requests that ``match`` accepts."""
    return nth(range(1, count + 1), kind, match)


def fraction(rate: float, kinds: Iterable[str], seed: int = 0, match: Match = _any) -> Plan:
    """On each request ``match`` accepts, a fault with probability ``rate``, its kind drawn
    from ``kinds`` (a seeded generator: the same requests get the same faults)."""
    rng, choices, lock = random.Random(seed), list(kinds), threading.Lock()

    def plan(request: Request) -> str | None:
        if not match(request):
            return None
        with lock:
            return rng.choice(choices) if rng.random() < rate else None

    return plan


def _same_request(request: Request) -> object:
    return request.method, request.target, request.headers.get("range", "")


def at_most(times: int, plan: Plan, same: Callable[[Request], object] = _same_request) -> Plan:
    """``plan``, but never more than ``times`` faults for one request (by default: the same
    method, target and Range; ``same`` says otherwise): its retries eventually go through, so
    a test of retries cannot flake."""
    counts: collections.Counter[object] = collections.Counter()
    lock = threading.Lock()

    def limited(request: Request) -> str | None:
        fault = plan(request)
        if fault is None:
            return None
        same_as = same(request)
        with lock:
            if counts[same_as] >= times:
                return None
            counts[same_as] += 1
        return fault

    return limited


def method_is(*methods: str) -> Match:
    return lambda request: request.method in methods


def _read_line(f: BinaryIO) -> bytes:
    line = f.readline(65537)
    if not line:
        raise EOFError
    return line


def _read_body(f: BinaryIO, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int(_read_line(f).split(b";")[0].strip(), 16)
            if size == 0:
                while _read_line(f) not in (b"\r\n", b"\n"):  # trailers
                    pass
                return b"".join(parts)
            parts.append(f.read(size))
            _read_line(f)
    length = int(headers.get("content-length", "0") or 0)
    data = f.read(length) if length else b""
    if len(data) != length:
        raise EOFError
    return data


class FaultProxy:
    """A proxy in front of ``upstream`` (``http://host:port``) on 127.0.0.1; see the module
    docstring. Use as a context manager; ``url`` is the endpoint to give the client."""

    def __init__(self, upstream: str, plan: Plan | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"faultproxy forwards to http:// endpoints only, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.plan: Plan = plan or (lambda _: None)
        self.faults: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[int, str, str, str, str | None]] = []
        self.connection_of: dict[int, int] = {}
        """Request number -> the client connection (numbered from 0 as accepted) it came on."""
        self._lock = threading.Lock()
        self._count = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    @property
    def requests(self) -> int:
        return self._count

    def __enter__(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()
        for thread in self._threads:
            thread.join(5)

    # -- plumbing ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._clients.add(client)
            serial = len(self._threads)
            thread = threading.Thread(target=self._serve, args=(client, serial), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, serial: int) -> None:
        upstream = http.client.HTTPConnection(*self.upstream, timeout=120)
        reader = client.makefile("rb")
        try:
            while not self._stop.is_set():
                if not self._one_request(client, reader, upstream, serial):
                    return
        except (EOFError, OSError, ValueError, http.client.HTTPException):
            return
        finally:
            upstream.close()
            reader.close()
            with self._lock:
                self._clients.discard(client)
            with contextlib.suppress(OSError):
                client.close()

    def _one_request(
        self,
        client: socket.socket,
        reader: BinaryIO,
        upstream: http.client.HTTPConnection,
        serial: int,
    ) -> bool:
        """Serve one request; False when the connection is to be closed."""
        method, target, _version = _read_line(reader).decode("latin-1").split(" ", 2)
        raw_headers: list[tuple[str, str]] = []
        while (line := _read_line(reader)) not in (b"\r\n", b"\n"):
            name, _, value = line.decode("latin-1").partition(":")
            raw_headers.append((name.strip(), value.strip()))
        headers = {name.lower(): value for name, value in raw_headers}
        if headers.get("expect", "").lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = _read_body(reader, headers)
        with self._lock:
            self._count += 1
            number = self._count
        fault = self.plan(Request(number, method, target, headers, len(body)))
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self.log.append((number, method, target, headers.get("range", ""), fault))
            self.connection_of[number] = serial
            if fault:
                self.faults[fault] += 1
        if fault in _STATUS:
            status, reason, code = _STATUS[fault]
            payload = _ERROR_BODY.format(code=code).encode()
            client.sendall(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            return True
        if fault == "drop":
            client.shutdown(socket.SHUT_RDWR)
            return False
        if fault == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False

        upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in raw_headers:
            if fault == "unconditional" and name.lower() in _CONDITIONS:
                continue
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                upstream.putheader(name, value)
        if body or method in ("PUT", "POST"):
            upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body or None)
        response = upstream.getresponse()
        data = response.read()
        if response.will_close:
            upstream.close()

        if fault == "lost":
            client.shutdown(socket.SHUT_RDWR)
            return False
        if fault == "flip" and data:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0x10
            data = bytes(flipped)
        content_range = response.getheader("Content-Range")
        if fault == "short" and response.status == 206 and content_range and len(data) > 1:
            first, _, rest = content_range.removeprefix("bytes ").partition("-")
            total = rest.partition("/")[2]
            data = data[: len(data) // 2]
            content_range = f"bytes {first}-{int(first) + len(data) - 1}/{total}"
        head = [f"HTTP/1.1 {response.status} {response.reason}"]
        for name, value in response.getheaders():
            if name.lower() in _HOP_BY_HOP:
                continue
            if name.lower() == "content-range":
                value = content_range or value
            if name.lower() == "content-length" and method != "HEAD":
                continue
            head.append(f"{name}: {value}")
        if method != "HEAD" and response.status not in (204, 304):
            head.append(f"Content-Length: {len(data)}")
        head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if fault == "cut":
            if data:
                client.sendall(head_bytes + data[: len(data) // 2])
            else:
                client.sendall(head_bytes[: len(head_bytes) // 2])
            client.shutdown(socket.SHUT_RDWR)
            return False
        client.sendall(head_bytes + data)
        return True


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """An endpoint that completes TCP handshakes (the kernel's backlog does) and never reads
    or answers: a store that hangs. Yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@contextlib.contextmanager
def trickle(interval: float = 0.1) -> Iterator[str]:
    """An endpoint that answers every connection with a status line and then one more byte
    of a header that never ends every ``interval`` seconds: each read gets data before any
    read timeout, so only a deadline on the whole call can end it. Yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def drip(conn: socket.socket) -> None:
        with conn:
            data = b"HTTP/1.1 200 OK\r\nX-Slow: "
            while not stop.is_set():
                try:
                    conn.sendall(data)
                except OSError:
                    return
                data = b"z"
                stop.wait(interval)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=drip, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for thread in threads:
            thread.join(5)


def closed_port() -> str:
    """The URL of a loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
