"""Safe fetching for img2dataset's downloader: address checks, `resolve`, and a size cap.

img2dataset fetches every image with `urllib.request.urlopen`, so while a download shard runs, a
process-wide opener (`urllib.request.install_opener`) sees every request and every redirect hop it
makes. This module's opener:

- refuses a host whose address is private, loopback, link-local, multicast, reserved, unspecified or
  otherwise not globally routable (`allow_loopback` permits loopback only), or a cloud metadata
  service (`METADATA_ADDRESSES`, some of them public addresses), also when an IPv6 address wraps
  such an IPv4 one (IPv4-mapped, 6to4, Teredo, NAT64), on every redirect hop, and connects to the
  very address it checked, so a second DNS answer (DNS rebinding) can't slip a private address in
  between the check and the connection;
- maps hosts like `curl --resolve` (`resolve = {"host": "ip:port"}`); the Host header, TLS server
  name and certificate check still use the URL's host;
- abandons a response larger than `max_bytes` (a Content-Length above it is refused before reading;
  a body without one is read in chunks and cut off), and one whose body is still arriving
  `request_deadline` seconds after the request began (a server that trickles bytes would otherwise
  hold a thread for as long as it likes, since the socket timeout applies per read);
- speaks http and https only (no file://, ftp:// or data:) and ignores proxy environment variables:
  a proxy would resolve the host itself, out of reach of the address check;
- is polite to each host (hostgate.py): at most `max_per_host` requests to one host are in flight
  at once in the process (a slot is taken before connecting and given back when the response is
  closed), and an answer 429, or 503 with a `Retry-After`, is retried after the delay it asks for
  (at most `max_retry_after` seconds, at most `rate_limit_retries` times), else the request fails
  as `rate_limited:`. Every 429 is counted per host under the URL img2dataset asked for, for the
  shard's stats (`take_429s`).

Refusals surface in img2dataset's `error_message` as text starting with `blocked_address:`,
`too_large:` or `rate_limited:`, and a late body as `timed out: ...`, which
`download.classify_error` maps to categories.

The opener is process-wide, but settings come per shard. `guarded(policy)` installs the opener for
its holders and restores the previous one when the last holder releases it; shards with equal
policies share it, and a shard with a different policy (two runs with different settings on one
worker) waits until the others are done, so settings are never mixed. While it is installed, any
other `urlopen` call in that process goes through the same checks too.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from laionface.layout import url_host
from laionface.stages.download import hostgate

BLOCKED_PREFIX = "blocked_address:"
TOO_LARGE_PREFIX = "too_large:"
RATE_LIMITED_PREFIX = hostgate.RATE_LIMITED_PREFIX
_READ_CHUNK = 1 << 16

# Cloud metadata services, refused whatever else allows: AWS, GCP, Azure, OpenStack and others at
# 169.254.169.254 (IPv6 fd00:ec2::254 on AWS), Azure's wire server 168.63.129.16 (a public
# address), Alibaba Cloud's 100.100.100.200.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "168.63.129.16", "100.100.100.200")
)
# NAT64's well-known prefix: 64:ff9b::a.b.c.d reaches the IPv4 address a.b.c.d.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddress(OSError):
    """The URL's host resolves to an address this policy refuses to connect to."""


class ResponseTooLarge(OSError):
    """The response is larger than `max_bytes`."""


class ResponseDeadline(TimeoutError):
    """The response body was still arriving `request_deadline` seconds after the request began."""


def parse_target(value: str, default_port: int | None = None) -> tuple[str, int | None]:
    """`"127.0.0.1:8080"`, `"[::1]:8080"` or a bare address -> (address, port or default_port)."""
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a bare IPv4 address, host name or IPv6 address
        host, port_text = text, ""
    if not host or (port_text and not port_text.isdigit()):
        raise ValueError(
            f"download.resolve value {value!r} is not ADDRESS, ADDRESS:PORT or [IPV6]:PORT "
            "(for example '127.0.0.1:8080')"
        )
    return host, int(port_text) if port_text else default_port


def _wrapped_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries traffic to, with how it wraps them."""
    if ip.ipv4_mapped is not None:
        return [("IPv4-mapped", ip.ipv4_mapped)]
    if ip.sixtofour is not None:
        return [("6to4", ip.sixtofour)]
    if ip.teredo is not None:
        server, client = ip.teredo
        return [("Teredo", server), ("Teredo", client)]
    if ip in _NAT64:
        return [("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))]
    return []


def _ip_refusal(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_loopback: bool
) -> str | None:
    if ip in METADATA_ADDRESSES:
        return "cloud metadata service"
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    for kind in ("link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


@functools.lru_cache(maxsize=4096)
def _refusal(address: str, allow_loopback: bool) -> str | None:
    """Why `address` must not be contacted, or None; cached: every request of a shard asks."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address):
        for how, inner in _wrapped_ipv4(ip):
            reason = _ip_refusal(inner, allow_loopback)
            if reason is not None:
                return f"{how} address of {inner}, {reason}"
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d, whatever the IPv6 rules say
            return None
    return _ip_refusal(ip, allow_loopback)


@dataclass(frozen=True)
class FetchPolicy:
    allow_loopback: bool = False
    # host -> "ip:port" (or "ip"), like curl --resolve; hosts compare case-insensitively.
    resolve: tuple[tuple[str, str], ...] = ()
    max_bytes: int = 50_000_000
    request_deadline: float = 30.0
    # Politeness (hostgate.py): requests in flight per host, and the answers asking to wait.
    max_per_host: int = 8
    rate_limit_retries: int = 2
    max_retry_after: float = 60.0
    _targets: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for host, target in self.resolve:
            parse_target(target)  # a bad value fails here, naming it, not on the first request
            self._targets[host.lower()] = target

    @classmethod
    def from_settings(cls, settings: dict[str, Any], request_deadline: float) -> FetchPolicy:
        """The policy of a `[download]` section (as `DownloadSection.model_dump()`)."""
        return cls(
            allow_loopback=bool(settings["allow_loopback"]),
            resolve=tuple(sorted((str(k), str(v)) for k, v in settings["resolve"].items())),
            max_bytes=int(settings["max_bytes"]),
            request_deadline=float(request_deadline),
            max_per_host=int(settings["max_per_host"]),
            rate_limit_retries=int(settings["rate_limit_retries"]),
            max_retry_after=float(settings["max_retry_after"]),
        )

    def target(self, host: str, port: int) -> tuple[str, int]:
        """Where a connection to (host, port) really goes: the `resolve` entry or the host."""
        mapped = self._targets.get(host.lower().rstrip("."))
        if mapped is None:
            return host, port
        address, mapped_port = parse_target(mapped, port)
        return address, mapped_port if mapped_port is not None else port

    def refusal(self, address: str) -> str | None:
        """Why `address` (an IP literal) must not be contacted, or None when it may."""
        return _refusal(address, self.allow_loopback)


def connect_checked(
    policy: FetchPolicy, host: str, port: int, timeout: float | None
) -> socket.socket:
    """Resolve `host`, refuse it if any of its addresses is refused, else connect to one of them.

    Refusing when any address is bad (not only the first) keeps a host that answers with one public
    and one private address from reaching the private one on a retry.
    """
    address, real_port = policy.target(host, port)
    infos = socket.getaddrinfo(address, real_port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        reason = policy.refusal(sockaddr[0])
        if reason is not None:
            raise BlockedAddress(
                f"{BLOCKED_PREFIX} {host} resolves to {sockaddr[0]} ({reason}); "
                "refused (download.allow_loopback permits loopback only, for demos and tests)"
            )
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            sock.connect(sockaddr)  # the checked address itself: no second lookup
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise last_error or OSError(f"no address to connect to for {host}")


class _CappedResponse(http.client.HTTPResponse):
    """An HTTP response whose body is refused past `max_bytes` or past the request deadline."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        self._policy: FetchPolicy = kwargs.pop("policy")
        self._started: float = kwargs.pop("started")
        self._body_read = 0
        # Gives the host's slot back (hostgate.HostGate), once, when the response is closed.
        self.release_slot: Callable[[], None] | None = None
        super().__init__(sock, *args, **kwargs)

    def close(self) -> None:
        try:
            super().close()
        finally:
            release, self.release_slot = self.release_slot, None
            if release is not None:
                release()

    def _refuse_size(self, size: int) -> None:
        self.close()
        raise ResponseTooLarge(
            f"{TOO_LARGE_PREFIX} response exceeds download.max_bytes "
            f"({size:,} > {self._policy.max_bytes:,} bytes); abandoned"
        )

    def _count(self, size: int) -> None:
        self._body_read += size
        if self._body_read > self._policy.max_bytes:
            self._refuse_size(self._body_read)
        # A body whose last byte has just arrived is complete, not "still arriving" (http.client
        # counts self.length down to 0); on a busy machine a small image can finish late.
        finished = self.length == 0
        if not finished and time.monotonic() - self._started > self._policy.request_deadline:
            self.close()
            raise ResponseDeadline(
                f"timed out: body still arriving after download.request_deadline "
                f"({self._policy.request_deadline:g} s); abandoned"
            )

    def read(self, amt: int | None = None) -> bytes:
        if amt is not None:
            data = super().read(amt)
            self._count(len(data))
            return data
        if self.length is not None and self.length > self._policy.max_bytes:
            self._refuse_size(self.length)
        expected = self.length
        chunks = []
        while True:
            # read1: one recv at a time, so the deadline is checked even while bytes trickle in
            # (read(n) would block until n bytes arrived, each recv within the socket timeout).
            chunk = super().read1(_READ_CHUNK)
            if not chunk:
                break
            self._count(len(chunk))
            chunks.append(chunk)
        body = b"".join(chunks)
        if expected is not None and len(body) < expected:
            # read1 can't tell a short body from the end; read() must, as http.client's does.
            raise http.client.IncompleteRead(body, expected - len(body))
        return body

    def readinto(self, buffer: Any) -> int:
        size = super().readinto(buffer)
        self._count(size)
        return size


def _checked_connection_class(base: type[http.client.HTTPConnection]) -> type:
    class Checked(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            policy = active_policy()
            started = time.monotonic()

            def open_socket(
                address: tuple[str, int], timeout: float | None = None, *_: Any
            ) -> socket.socket:
                return connect_checked(policy, address[0], address[1], timeout)

            def response_class(sock: socket.socket, *a: Any, **kw: Any) -> _CappedResponse:
                return _CappedResponse(sock, *a, policy=policy, started=started, **kw)

            # HTTPConnection.connect (which HTTPSConnection.connect calls before its TLS wrap)
            # opens its socket through this attribute, and getresponse builds response_class.
            self._create_connection = open_socket
            self.response_class = response_class

    Checked.__name__ = f"Checked{base.__name__}"
    return Checked


_CheckedHTTPConnection = _checked_connection_class(http.client.HTTPConnection)
_CheckedHTTPSConnection = _checked_connection_class(http.client.HTTPSConnection)


# The URL img2dataset asked for, in the thread fetching it (a redirect hop keeps it).
_request = threading.local()
# 429 answers per host, under the URL asked for; a shard takes its own (`take_429s`).
_rate_limits = hostgate.RateLimitCounts()


def _open_through_gate(
    handler: urllib.request.AbstractHTTPHandler,
    gate: hostgate.HostGate,
    connection_class: type,
    req: urllib.request.Request,
    **kwargs: Any,
) -> http.client.HTTPResponse:
    """`handler.do_open` holding one of the host's slots until the response is closed."""
    host = url_host(req.full_url) or req.host
    gate.enter(host)
    try:
        response = handler.do_open(connection_class, req, **kwargs)
    except BaseException:
        gate.leave(host)
        raise
    response.release_slot = lambda: gate.leave(host)
    if response.status == 429:
        _rate_limits.add(getattr(_request, "url", None) or req.full_url, host)
    return response


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, gate: hostgate.HostGate) -> None:
        super().__init__()
        self.gate = gate

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return _open_through_gate(self, self.gate, _CheckedHTTPConnection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, gate: hostgate.HostGate) -> None:
        super().__init__()
        self.gate = gate

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return _open_through_gate(
            self, self.gate, _CheckedHTTPSConnection, req, context=self._context
        )


class _PoliteOpener(urllib.request.OpenerDirector):
    """urllib's opener, retrying the answers that ask to come back later (see hostgate)."""

    def __init__(self, policy: FetchPolicy) -> None:
        super().__init__()
        self.policy = policy

    def open(self, fullurl: Any, data: Any = None, timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT):
        if getattr(_request, "url", None) is not None:  # a redirect hop of the request below
            return super().open(fullurl, data, timeout)
        _request.url = fullurl.full_url if isinstance(fullurl, urllib.request.Request) else fullurl
        try:
            return self._open_politely(fullurl, data, timeout)
        finally:
            _request.url = None

    def _open_politely(self, fullurl: Any, data: Any, timeout: Any) -> Any:
        policy = self.policy
        attempt = 0
        while True:
            try:
                return super().open(fullurl, data, timeout)
            except urllib.error.HTTPError as error:
                error.close()  # gives the host's slot back now, not when collected
                if error.code not in hostgate.RETRYABLE_STATUSES:
                    raise
                delay = hostgate.retry_delay(error.headers.get("Retry-After"))
                if error.code == 503 and delay is None:
                    raise  # a plain server error (http_5xx)
                reason = hostgate.give_up_reason(
                    delay, attempt, policy.rate_limit_retries, policy.max_retry_after
                )
                if reason is not None:
                    host = url_host(error.filename or "") or "the host"
                    raise hostgate.rate_limited(host, error.code, reason) from None
            time.sleep(delay)
            attempt += 1


def build_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """http and https through the checked connections, `policy.max_per_host` requests per host
    at once; redirects and HTTP errors as urllib does, 429 and 503 as hostgate says."""
    gate = hostgate.HostGate(policy.max_per_host)
    opener = _PoliteOpener(policy)
    for handler in (
        urllib.request.UnknownHandler(),  # any other scheme: "unknown url type"
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
        _CheckedHTTPHandler(gate),
        _CheckedHTTPSHandler(gate),
    ):
        opener.add_handler(handler)
    return opener


def take_429s(urls: Iterable[str]) -> dict[str, int]:
    """The 429 answers met by these URLs' requests in this process, per host; forgotten once
    taken (a shard takes its own when it ends)."""
    return _rate_limits.take(urls)


_state = threading.Condition()
_active: FetchPolicy | None = None
_holders = 0
_previous_opener: urllib.request.OpenerDirector | None = None


def active_policy() -> FetchPolicy:
    """The policy in force; the strict default when none is (never looser than the default)."""
    return _active if _active is not None else FetchPolicy()


def acquire(policy: FetchPolicy) -> None:
    """Put `policy` in force for this process (waiting while a different one is held)."""
    global _active, _holders, _previous_opener
    with _state:
        while _holders and _active != policy:
            _state.wait()
        if _holders == 0:
            _previous_opener = urllib.request._opener  # whatever was installed before us
            urllib.request.install_opener(build_opener(policy))
            _active = policy
        _holders += 1


def release() -> None:
    """Drop one hold; the last one restores the opener that was installed before."""
    global _active, _holders, _previous_opener
    with _state:
        if _holders == 0:
            raise RuntimeError("fetchguard.release() without a matching acquire()")
        _holders -= 1
        if _holders == 0:
            urllib.request.install_opener(_previous_opener)
            _active = _previous_opener = None
            _state.notify_all()
