"""The demo image server, counting the requests it gets: what the tests check was asked for."""

from __future__ import annotations

import collections
import threading
from pathlib import Path

from laionface.demo.imageserver import ImageServer, url_path


class CountingImageServer(ImageServer):
    """An ImageServer whose `request_count(path)` and `requests` say what was asked for."""

    def __init__(self, corpus_dir: str | Path, **kwargs) -> None:
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        super().__init__(corpus_dir, on_request=self._count, **kwargs)

    def _count(self, path: str) -> None:
        with self._lock:
            self._counts[path] += 1

    def request_count(self, path_or_url: str) -> int:
        """How many requests (any method) this server answered or began for that path."""
        with self._lock:
            return self._counts[url_path(path_or_url)]

    @property
    def requests(self) -> dict[str, int]:
        """A snapshot of request counts per path."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        """Forget request counts and the `/flaky/` attempts."""
        super().reset()
        with self._lock:
            self._counts.clear()
