"""A threaded HTTP server on 127.0.0.1 that serves a demo corpus, broken cases included.

The tests, `laionface demo` and the benchmarks all download from this one server. It routes by
path only and ignores the Host header, so metadata can use the fixed, port-free host
`images.laionface-demo.test` and a downloader maps it here like `curl --resolve`
(`download.resolve = {"images.laionface-demo.test" = "127.0.0.1:PORT"}`; see `resolve_map`).

Routes (`<file>` is one file name in the corpus's `images/` folder; a query string is ignored):

    /img/<file>              200, the file (Content-Type from its extension)
    /slow/<file>             the file, after sleeping `slow_seconds` before the status line
    /noai/<file>             200, the file, with `X-Robots-Tag: noai`
    /flaky/<n>/<file>        500 for the first n requests of this path, then the file; counted
                             per server instance (`reset()` starts the count again)
    /truncated/<file>        200, only the first half of the file (`truncated_body`)
    /redirect/img/<file>     302 to the relative `/img/<file>`, so it stays on the requested host
    /redirect/private/<any>  302 to `PRIVATE_REDIRECT_TARGET` (link-local cloud metadata address),
                             which a downloader must refuse before connecting
    /error/<code>/<any>      that 5xx status (500-599) with a short text body
    /html/<any>              200 `text/html` (`HTML_PAGE`): a page where an image was expected
    /busy/<code>/<n>/<after>/<file>
                             429 or 503 (`code`) for the first n requests of this path, then the
                             file; `after` is the Retry-After sent: seconds (digits), `date` (an
                             HTTP date `BUSY_DATE_SECONDS` ahead) or `none` (no header); counted
                             per server instance like /flaky/
    /limited/<file>          the rate-limited host (`RateLimit`): 429 with `Retry-After:
                             retry_after` when `in_flight` /limited/ requests are in flight or
                             `per_second` were let through in this clock second already, else the
                             file after `hold_seconds` (so that requests overlap)
    anything else            404

GET and HEAD are answered alike (HEAD without the body), always with a Content-Length, over
HTTP/1.1 keep-alive. File bytes are read once and served from memory. Nothing is logged to stderr;
`on_request(path)`, when given, is called with the path of every request. The server counts the
most requests it had in flight at once (received, not yet answered: `max_in_flight`, every
route) and records each 429 / 503 it answers on /busy/ and /limited/ (`rate_limited_answers`).
"""

from __future__ import annotations

import argparse
import collections
import email.utils
import http.server
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

DEMO_HOST = "images.laionface-demo.test"

PRIVATE_REDIRECT_TARGET = "http://169.254.169.254/latest/meta-data/"

HTML_PAGE = (
    b'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Image not available</title>'
    b"</head>\n<body><h1>Hotlinking is not allowed</h1>\n<p>This image is only available on "
    b"our website.</p></body></html>\n"
)

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
}


# An answer: status, headers, body.
Answer = tuple[int, dict[str, str], bytes]
# How far ahead the HTTP date of `/busy/.../date/...` lies.
BUSY_DATE_SECONDS = 2


@dataclass(frozen=True)
class RateLimit:
    """The rules of `/limited/`: what the rate-limited host tolerates, and how long it holds a
    request it lets through."""

    in_flight: int = 4
    per_second: int = 20
    retry_after: int = 1
    hold_seconds: float = 0.05


@dataclass(frozen=True)
class RateLimitedAnswer:
    """A 429 or 503 the server answered on /busy/ or /limited/ (`at`: time.monotonic())."""

    at: float
    path: str
    status: int
    retry_after: str | None


def truncated_body(data: bytes) -> bytes:
    """What `/truncated/<file>` serves: the first half of the file's bytes."""
    return data[: len(data) // 2]


def url_path(url_or_path: str) -> str:
    """The path of a URL or path, without query or fragment: what the server routes on."""
    return urlsplit(url_or_path).path or "/"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a handler asleep in /slow/ must never keep a process alive
    request_queue_size = 1024  # the default of 5 drops connections under a 100-thread downloader

    def __init__(
        self,
        address: tuple[str, int],
        images_dir: Path,
        slow_seconds: float,
        on_request: Callable[[str], None] | None,
        rate_limit: RateLimit,
    ) -> None:
        self.files = {p.name: p for p in images_dir.iterdir() if p.is_file()}
        self.cache: dict[str, bytes] = {}
        self.slow_seconds = slow_seconds
        self.on_request = on_request
        self.rate_limit = rate_limit
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.flaky_served: collections.Counter[str] = collections.Counter()
        self.errors = 0
        self.in_flight = self.max_in_flight = 0
        self.limited_in_flight = 0
        self.limited_second, self.limited_let_through = -1, 0
        self.rate_limited_answers: list[RateLimitedAnswer] = []
        super().__init__(address, _Handler)

    def arrive(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def depart(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def admit_limited(self) -> bool:
        """Whether `/limited/` lets one more request through now (it then counts as in flight
        there until `leave_limited`)."""
        rule = self.rate_limit
        second = int(time.monotonic())
        with self.lock:
            if second != self.limited_second:
                self.limited_second, self.limited_let_through = second, 0
            if (
                self.limited_in_flight >= rule.in_flight
                or self.limited_let_through >= rule.per_second
            ):
                return False
            self.limited_in_flight += 1
            self.limited_let_through += 1
            return True

    def leave_limited(self) -> None:
        with self.lock:
            self.limited_in_flight -= 1

    def rate_limited(self, path: str, status: int, retry_after: str | None) -> Answer:
        """Answer `status` asking to come back after `retry_after` (None: no header); recorded."""
        with self.lock:
            answer = RateLimitedAnswer(time.monotonic(), path, status, retry_after)
            self.rate_limited_answers.append(answer)
        _, headers, body = _text(status, "slow down")
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return status, headers, body

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can hang offline.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def file_bytes(self, name: str) -> bytes | None:
        path = self.files.get(name)
        if path is None:
            return None
        data = self.cache.get(name)
        if data is None:
            data = path.read_bytes()
            self.cache[name] = data
        return data

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (its timeout, a refused redirect) is normal here, not news.
        with self.lock:
            self.errors += 1


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "laionface-demo/1"
    sys_version = ""
    timeout = 10  # an idle keep-alive connection frees its thread after this many seconds

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib's name)
        pass

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = url_path(self.path)
        if self.server.on_request is not None:
            self.server.on_request(path)
        # In flight: received and not answered yet. Counted until the answer starts, so a client
        # that holds a request from connecting to reading the last byte always holds it longer.
        self.server.arrive()
        try:
            status, headers, body = self._route(path)
        except _Abandon:
            self.close_connection = True
            return
        finally:
            self.server.depart()
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, path: str) -> Answer:
        parts = path.strip("/").split("/")
        head, rest = parts[0], parts[1:]
        if head == "img" and len(rest) == 1:
            return self._file(rest[0])
        if head == "slow" and len(rest) == 1:
            if self.server.stopping.wait(self.server.slow_seconds):
                raise _Abandon
            return self._file(rest[0])
        if head == "noai" and len(rest) == 1:
            status, headers, body = self._file(rest[0])
            if status == 200:
                headers["X-Robots-Tag"] = "noai"
            return status, headers, body
        if head == "flaky" and len(rest) == 2 and rest[0].isdigit():
            if self.server.file_bytes(rest[1]) is None:
                return _text(404, "not found")
            with self.server.lock:
                attempt = self.server.flaky_served[path]
                self.server.flaky_served[path] += 1
            if attempt < int(rest[0]):
                return _text(500, "temporary failure, try again")
            return self._file(rest[1])
        if head == "truncated" and len(rest) == 1:
            status, headers, body = self._file(rest[0])
            return status, headers, truncated_body(body) if status == 200 else body
        if head == "redirect" and len(rest) == 2 and rest[0] == "img":
            if self.server.file_bytes(rest[1]) is None:
                return _text(404, "not found")
            return 302, {"Location": f"/img/{rest[1]}"}, b""
        if head == "redirect" and len(rest) == 2 and rest[0] == "private":
            return 302, {"Location": PRIVATE_REDIRECT_TARGET}, b""
        if head == "error" and len(rest) == 2 and rest[0].isdigit() and 500 <= int(rest[0]) < 600:
            return _text(int(rest[0]), "server error")
        if head == "html" and len(rest) == 1:
            return 200, {"Content-Type": "text/html; charset=utf-8"}, HTML_PAGE
        if head == "busy" and len(rest) == 4:
            return self._busy(path, *rest)
        if head == "limited" and len(rest) == 1:
            return self._limited(path, rest[0])
        return _text(404, "not found")

    def _busy(self, path: str, code: str, times: str, after: str, name: str) -> Answer:
        valid = code in ("429", "503") and times.isdigit()
        valid = valid and (after.isdigit() or after in ("date", "none"))
        if not valid or self.server.file_bytes(name) is None:
            return _text(404, "not found")
        with self.server.lock:
            attempt = self.server.flaky_served[path]
            self.server.flaky_served[path] += 1
        if attempt >= int(times):
            return self._file(name)
        if after == "date":
            retry_after = email.utils.formatdate(time.time() + BUSY_DATE_SECONDS, usegmt=True)
        else:
            retry_after = None if after == "none" else after
        return self.server.rate_limited(path, int(code), retry_after)

    def _limited(self, path: str, name: str) -> Answer:
        if self.server.file_bytes(name) is None:
            return _text(404, "not found")
        if not self.server.admit_limited():
            return self.server.rate_limited(path, 429, str(self.server.rate_limit.retry_after))
        try:
            if self.server.stopping.wait(self.server.rate_limit.hold_seconds):
                raise _Abandon
            return self._file(name)
        finally:
            self.server.leave_limited()

    def _file(self, name: str) -> Answer:
        data = self.server.file_bytes(name)
        if data is None:
            return _text(404, "not found")
        content_type = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
        return 200, {"Content-Type": content_type}, data


class _Abandon(Exception):
    """The server is stopping while this request sleeps: close without answering."""


def _text(status: int, message: str) -> Answer:
    return status, {"Content-Type": "text/plain; charset=utf-8"}, f"{status} {message}\n".encode()


class ImageServer:
    """Serve `corpus_dir/images` on `host:port` (port 0 picks a free one) in a background thread.

    Use as a context manager or call `start()` and `stop()`. The folder is listed at `start()`;
    files added later are not served. `slow_seconds` is how long `/slow/` paths sleep: keep a
    test's download timeout well below it. `rate_limit`: the rules of `/limited/`.
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        *,
        slow_seconds: float = 3.0,
        host: str = "127.0.0.1",
        port: int = 0,
        on_request: Callable[[str], None] | None = None,
        rate_limit: RateLimit = RateLimit(),
    ) -> None:
        self.images_dir = Path(corpus_dir) / "images"
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"{self.images_dir} does not exist: pass a corpus folder written by "
                "laionface.corpus.build_corpus (it holds images/)"
            )
        if slow_seconds <= 0:
            raise ValueError(f"slow_seconds must be > 0, got {slow_seconds}")
        self.slow_seconds = slow_seconds
        self.on_request = on_request
        self.rate_limit = rate_limit
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ImageServer:
        if self._server is not None:
            raise RuntimeError("the image server is already running")
        self._server = _Server(
            self._address, self.images_dir, self.slow_seconds, self.on_request, self.rate_limit
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"laionface-imageserver-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; requests asleep in `/slow/` are dropped at once, not awaited."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _running(self) -> _Server:
        if self._server is None:
            raise RuntimeError("the image server is not running: call start() first")
        return self._server

    @property
    def port(self) -> int:
        return int(self._running().server_address[1])

    @property
    def host(self) -> str:
        return str(self._running().server_address[0])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def resolve_map(self) -> dict[str, str]:
        """The `download.resolve` setting that sends the demo host's requests here."""
        return {DEMO_HOST: f"{self.host}:{self.port}"}

    def url(self, path_or_url: str) -> str:
        """The live URL of a path or of a demo URL (its host replaced by this server's)."""
        parts = urlsplit(path_or_url)
        query = f"?{parts.query}" if parts.query else ""
        return f"{self.base_url}{parts.path or '/'}{query}"

    @property
    def max_in_flight(self) -> int:
        """The most requests this server had in flight at once (since start or `reset()`)."""
        return self._running().max_in_flight

    @property
    def rate_limited_answers(self) -> list[RateLimitedAnswer]:
        """The 429 / 503 answers of /busy/ and /limited/, in order (since start or `reset()`)."""
        server = self._running()
        with server.lock:
            return list(server.rate_limited_answers)

    def reset(self) -> None:
        """Forget the `/flaky/` and `/busy/` attempts and the counts, as a freshly started
        server."""
        server = self._running()
        with server.lock:
            server.flaky_served.clear()
            server.max_in_flight = server.in_flight
            server.rate_limited_answers.clear()


def serve_forever(corpus_dir: str | Path, port: int = 8000, slow_seconds: float = 3.0) -> None:
    """Serve a corpus until Ctrl-C, for trying the pipeline or a browser by hand."""
    with ImageServer(corpus_dir, port=port, slow_seconds=slow_seconds) as server:
        print(f"serving {server.images_dir} at {server.base_url}")
        print(f'download.resolve = {{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}')
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m laionface.demo.imageserver",
        description="Serve a demo corpus folder on 127.0.0.1.",
    )
    parser.add_argument("corpus_dir", help="a folder written by laionface.demo.corpus.build_corpus")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--slow-seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    serve_forever(args.corpus_dir, args.port, args.slow_seconds)


if __name__ == "__main__":
    main()
