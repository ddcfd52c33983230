"""glibc's heap as img2dataset's own processes have it, while download shards run in a Dask worker.

Dask's nanny starts its worker processes with `MALLOC_TRIM_THRESHOLD_=65536` in their
environment (the config key `distributed.nanny.pre-spawn-environ`), to hand freed memory back to
the system at once. An explicit trim threshold also switches glibc's dynamic mmap threshold off:
every allocation over 128 KiB (each response body, decoded image and re-encoded JPEG) becomes a
fresh mmap, faulted in page by page and unmapped again when freed. That costs a download shard
about 20% more CPU per image than the same code in img2dataset's processes (docs/benchmarks.md).

While at least one shard runs in the process, `roomy_heap()` sets the two thresholds where
glibc's dynamic ones settle (mmap 32 MiB, trim 64 MiB: freed buffers are reused, at most 64
MiB kept), and puts the started ones back when the last one ends, so the worker's other tasks
keep the heap they were started with. It acts only where glibc read the variable: the
environment the process started with (a LocalCluster worker forked from engine.cluster's fork
server does not have it, whatever `os.environ` says later; one spawned by a nanny does).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
from collections.abc import Callable, Iterator

# glibc's malloc.h parameter numbers, and its defaults (mmap threshold when not dynamic).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 128 * 1024
# Where glibc's dynamic thresholds end up on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX, 2x).
ROOMY_MMAP_THRESHOLD = 32 * 1024 * 1024
ROOMY_TRIM_THRESHOLD = 2 * ROOMY_MMAP_THRESHOLD

_lock = threading.Lock()
_holders = 0


def _startup_threshold(name: str) -> int | None:
    """The value of `name` in the environment the process started with (what glibc read)."""
    try:
        with open("/proc/self/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{name}=".encode()
    for entry in entries:
        if entry.startswith(prefix):
            value = entry[len(prefix) :].strip()
            return int(value) if value.isdigit() else None
    return None


def _mallopt() -> Callable[[int, int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def roomy_heap() -> Iterator[None]:
    """glibc's settled heap thresholds while the block runs (see the module's docstring)."""
    global _holders
    trim = _startup_threshold("MALLOC_TRIM_THRESHOLD_")
    mallopt = _mallopt() if trim is not None else None
    if mallopt is None:
        yield
        return
    with _lock:
        if _holders == 0:
            mallopt(M_MMAP_THRESHOLD, ROOMY_MMAP_THRESHOLD)
            mallopt(M_TRIM_THRESHOLD, ROOMY_TRIM_THRESHOLD)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                mmap = _startup_threshold("MALLOC_MMAP_THRESHOLD_") or DEFAULT_MMAP_THRESHOLD
                mallopt(M_MMAP_THRESHOLD, mmap)
                mallopt(M_TRIM_THRESHOLD, trim)
