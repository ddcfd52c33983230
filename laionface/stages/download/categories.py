"""The failure category of each img2dataset outcome (layout.DOWNLOAD_CATEGORIES).

img2dataset records a failure as an `error_message` string; the category is read from it: our
own refusals first (their messages start with a prefix of ours, kept in the message when urllib
wraps it), then the HTTP status when there is one, else the first rule below whose text the
message contains. What each category means for a user is in the README's troubleshooting section.
"""

from __future__ import annotations

import re

from laionface.stages.download import fetchguard, pixelcap

WORKER_DIED_PREFIX = "worker_died:"

_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")
# (category, prefix) of the failures laionface itself records, checked before HTTP errors.
_OWN_RULES: tuple[tuple[str, str], ...] = (
    ("blocked_address", fetchguard.BLOCKED_PREFIX),
    ("too_large", fetchguard.TOO_LARGE_PREFIX),
    ("rate_limited", fetchguard.RATE_LIMITED_PREFIX),
    ("too_many_pixels", pixelcap.TOO_MANY_PIXELS_PREFIX),
    ("worker_died", WORKER_DIED_PREFIX),
)
# (category, substrings of img2dataset's error_message), checked in order after HTTP errors.
_MESSAGE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("too_large", ("image area too large",)),
    ("opted_out", ("X-Robots-Tag",)),
    ("timeout", ("timed out", "timeout")),
    (
        "dns",
        (
            "Name or service not known",
            "Temporary failure in name resolution",
            "No address associated with hostname",
            "nodename nor servname",
            "getaddrinfo failed",
            "[Errno -2]",
            "[Errno -3]",
            "[Errno -5]",
        ),
    ),
    (
        "connection",
        (
            "Connection refused",
            "Connection reset",
            "Connection aborted",
            "Remote end closed connection",
            "IncompleteRead",
            "Network is unreachable",
            "No route to host",
            "Broken pipe",
            "EOF occurred in violation of protocol",
            "[Errno 104]",
            "[Errno 111]",
        ),
    ),
    ("too_small", ("image too small",)),
    ("bad_aspect_ratio", ("aspect ratio too large",)),
    ("not_an_image", (pixelcap.NOT_AN_IMAGE,)),
)


def classify_error(status: str | None, message: str | None) -> str | None:
    """The category of one img2dataset outcome: None for a success, else one of
    layout.DOWNLOAD_CATEGORIES."""
    if status == "success":
        return None
    text = message or ""
    for category, prefix in _OWN_RULES:
        if prefix in text:
            return category
    http = _HTTP_ERROR.search(text)
    if http:
        code = int(http.group(1))
        if code == 404:
            return "http_404"
        if 400 <= code < 500:
            return "http_4xx"
        if 500 <= code < 600:
            return "http_5xx"
        return "other"  # e.g. a redirect loop ("HTTP Error 302: ... infinite loop")
    for category, needles in _MESSAGE_RULES:
        if any(needle in text for needle in needles):
            return category
    return "other"
