"""Politeness to each host: a cap on requests in flight per host, and answers that ask to wait.

`HostGate` holds one slot per request in flight to a host (`max_per_host` slots per host); a
request takes one before it connects and gives it back when its response is closed, so the
host never sees more than that many requests from this process at once.

An answer 429 (Too Many Requests), or 503 (Service Unavailable) with a `Retry-After` header, asks
the client to come back later. `retry_delay` reads the delay it asks for (seconds, or an HTTP
date); `RateLimited` is the failure of a request the host kept refusing, or asked to retry too
late, or (429) without saying when: its message starts with `rate_limited:`, which
`categories.classify_error` maps to the `rate_limited` category (retried by `--retry-failed`).

`RateLimitCounts` counts 429 answers per host under the URL img2dataset asked for (a redirect's
429 is counted under the host that answered it), so a shard can take the counts of its own URLs.
"""

from __future__ import annotations

import email.utils
import threading
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone

RATE_LIMITED_PREFIX = "rate_limited:"
# Answers that may ask to come back later; 429 always means "too many requests".
RETRYABLE_STATUSES = (429, 503)


class RateLimited(OSError):
    """The host answered 429 (or 503 with Retry-After) and the request gave up."""


def retry_delay(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (0 for a date in the past); None when absent
    or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def give_up_reason(delay: float | None, attempt: int, retries: int, max_wait: float) -> str | None:
    """Why a request told to wait `delay` s (None: not told how long) on its attempt `attempt`
    (0 = the first) is not retried, or None when it is retried after `delay` seconds."""
    if delay is None:
        return "without a usable Retry-After"
    if delay > max_wait:
        return f"asking to retry after {delay:g} s, more than download.max_retry_after ({max_wait:g} s)"
    if attempt >= retries:
        return f"again after {retries} retries (download.rate_limit_retries)"
    return None


class HostGate:
    """At most `limit` requests in flight per host at once (`enter` blocks for a slot)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"download.max_per_host must be at least 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}

    def enter(self, host: str) -> None:
        with self._lock:
            slots = self._slots.get(host)
            if slots is None:
                slots = self._slots[host] = threading.BoundedSemaphore(self.limit)
        slots.acquire()

    def leave(self, host: str) -> None:
        self._slots[host].release()


class RateLimitCounts:
    """429 answers per host, kept under the URL whose request met them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_url: dict[str, Counter[str]] = {}

    def add(self, url: str, host: str) -> None:
        with self._lock:
            self._by_url.setdefault(url, Counter())[host] += 1

    def take(self, urls: Iterable[str]) -> dict[str, int]:
        """The counts per host of these URLs' requests, forgotten here once taken."""
        total: Counter[str] = Counter()
        with self._lock:
            if not self._by_url:
                return {}
            for url in urls:
                found = self._by_url.pop(url, None)
                if found:
                    total.update(found)
        return dict(sorted(total.items()))


def rate_limited(host: str, status: int, reason: str) -> RateLimited:
    return RateLimited(f"{RATE_LIMITED_PREFIX} {host} answered {status} {reason}; gave up")
