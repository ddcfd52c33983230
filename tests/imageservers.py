"""The demo image server, counting the requests it gets: what the tests check was asked for.
Also the hostile images the tests serve with it."""

from __future__ import annotations

import collections
import struct
import threading
import time
import zlib
from pathlib import Path

from laionface.demo.imageserver import ImageServer, url_path


class CountingImageServer(ImageServer):
    """An ImageServer whose `request_count(path)`, `request_times(path)` and `requests` say what
    was asked for, and when."""

    def __init__(self, corpus_dir: str | Path, **kwargs) -> None:
        self._counts: collections.Counter[str] = collections.Counter()
        self._times: dict[str, list[float]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        super().__init__(corpus_dir, on_request=self._count, **kwargs)

    def _count(self, path: str) -> None:
        with self._lock:
            self._counts[path] += 1
            self._times[path].append(time.monotonic())

    def request_count(self, path_or_url: str) -> int:
        """How many requests (any method) this server answered or began for that path."""
        with self._lock:
            return self._counts[url_path(path_or_url)]

    def request_times(self, path_or_url: str) -> list[float]:
        """When (time.monotonic()) each request for that path arrived, in order."""
        with self._lock:
            return list(self._times[url_path(path_or_url)])

    @property
    def requests(self) -> dict[str, int]:
        """A snapshot of request counts per path."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        """Forget request counts and times, the `/flaky/` and `/busy/` attempts and the
        server's own counts."""
        super().reset()
        with self._lock:
            self._counts.clear()
            self._times.clear()


def png_bomb(width: int = 8000, height: int = 8000) -> bytes:
    """A valid RGBA PNG of `width` x `height` transparent pixels: a few hundred kilobytes that
    decode to width x height x 4 bytes (8000 x 8000: 256 MB, and several GB through
    img2dataset's alpha blending). Written row by row, never held decoded here."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 4 * width)  # filter byte 0, then transparent black pixels
    parts = [compressor.compress(row) for _ in range(height)]
    idat = b"".join(parts) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
