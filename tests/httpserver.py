"""A tiny HTTP server on 127.0.0.1 for tests that download things.

Serves given bytes at given paths, redirects, and misbehaves on request: drops the connection
after N body bytes (politely with FIN, or with a TCP reset), declares a Content-Length that
does not match the body, or waits before answering.  Counts every request it receives, so a
test can assert that code which must stay offline really did.

    with LocalHTTPServer() as server:
        server.serve("/a.bin", b"data")
        server.serve("/broken.bin", b"x" * 1000, drop_after=100)
        server.redirect("/old", "/a.bin")
        fetch(server.url("/a.bin"))
        assert server.count("/a.bin") == 1

Only ever binds to the loopback address; the port is picked by the OS.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass(frozen=True)
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    #: Extra response headers.
    headers: tuple[tuple[str, str], ...] = ()
    #: The Content-Length to declare: None → the true length; -1 → send no Content-Length
    #: (the body then ends when the connection closes).
    content_length: int | None = None
    #: Close the connection after sending this many body bytes.
    drop_after: int | None = None
    #: Drop with a TCP reset (the client sees ECONNRESET) instead of an orderly close.
    reset: bool = False
    #: Seconds to wait before sending the status line (for timeout tests).
    delay_s: float = 0.0
    #: Seconds to wait after the headers, before the body.
    body_delay_s: float = 0.0
    #: Bytes per write, so a client's progress bar sees several updates.
    chunk_size: int = 64 * 1024


@dataclass
class _State:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        with state.lock:
            state.requests.append((self.command, self.path))
            route = state.routes.get(path)
        # Every response closes the connection: one request per connection keeps the
        # misbehaving routes simple and the request count exact.
        self.close_connection = True
        if route is None:
            route = Route(body=b"not found\n", status=404, content_type="text/plain")
        if route.delay_s:
            time.sleep(route.delay_s)

        self.send_response(route.status)
        self.send_header("Content-Type", route.content_type)
        declared = len(route.body) if route.content_length is None else route.content_length
        if declared >= 0:
            self.send_header("Content-Length", str(declared))
        for name, value in route.headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if not send_body:
            return
        if route.body_delay_s:
            self.wfile.flush()
            time.sleep(route.body_delay_s)

        body = route.body if route.drop_after is None else route.body[: route.drop_after]
        for start in range(0, len(body), max(1, route.chunk_size)):
            self.wfile.write(body[start : start + route.chunk_size])
        self.wfile.flush()
        if route.drop_after is not None:
            self._drop(reset=route.reset)

    def _drop(self, *, reset: bool) -> None:
        if reset:
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.connection.close()
        else:
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep test output clean; the request list is the log


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: _State) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # Broken pipes and resets are what several routes are for; not worth a traceback.
        pass


class LocalHTTPServer:
    """A threaded HTTP server on 127.0.0.1; use as a context manager (or start()/stop())."""

    def __init__(self) -> None:
        self._state = _State()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> LocalHTTPServer:
        if self._server is not None:
            return self
        self._server = _Server(self._state)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    # --- routes ----------------------------------------------------------------------------
    def serve(self, path: str, body: bytes, **options: object) -> str:
        """Serve `body` at `path` (options: the fields of `Route`); returns the full URL."""
        route = Route(body=body, **options)  # type: ignore[arg-type]
        with self._state.lock:
            self._state.routes[path] = route
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        """Answer `path` with a redirect to `location` (absolute URL or path on this server)."""
        with self._state.lock:
            self._state.routes[path] = Route(
                body=b"", status=status, headers=(("Location", location),)
            )
        return self.url(path)

    def remove(self, path: str) -> None:
        with self._state.lock:
            self._state.routes.pop(path, None)

    # --- what happened ---------------------------------------------------------------------
    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received, in order."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def request_count(self) -> int:
        with self._state.lock:
            return len(self._state.requests)

    def count(self, path: str) -> int:
        with self._state.lock:
            return sum(1 for _, p in self._state.requests if p.split("?", 1)[0] == path)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released; the OS won't reuse it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
