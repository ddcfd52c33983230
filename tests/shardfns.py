"""Per-shard functions for the runner tests; a module of their own so worker processes import them."""

from __future__ import annotations

import ctypes
import os
import signal
import uuid

from laionface.io import storage


def write_value(out_url: str, value: int, fail_flag: str = "", count_dir: str = "") -> dict:
    """Write `value` to out_url; fail while the file `fail_flag` exists; count calls in count_dir."""
    if count_dir:
        storage.write_bytes(storage.join(count_dir, f"{value}-{uuid.uuid4().hex}"), b"")
    if fail_flag and storage.exists(fail_flag):
        raise RuntimeError(f"planted failure for value {value}")
    storage.write_json(out_url, {"value": value})
    return {"items": value}


def fail_first_then_write(out_url: str, attempts_dir: str) -> dict:
    """Fails on the first attempt (recorded as a file), succeeds on the next: a transient error."""
    marker = storage.join(attempts_dir, "attempted")
    if not storage.exists(marker):
        storage.write_bytes(marker, b"")
        raise ConnectionError("transient failure on the first attempt")
    storage.write_json(out_url, {"ok": True})
    return {"items": 1}


def write_then_crash(out_url: str) -> dict:
    """Crashes halfway through writing its output."""
    with storage.atomic_open(out_url, "wb") as handle:
        handle.write(b"half of the output")
        raise OSError("disk vanished mid-write")


def wedge_first_then_write(out_url: str, attempts_dir: str, how: str) -> dict:
    """On its first attempt wedges its worker: blocked in C with the GIL held ("gil": libc's
    sleep through ctypes.PyDLL, which keeps the GIL) or stopped by SIGSTOP ("stop"); the next
    attempt, on a restarted worker, writes out_url."""
    marker = storage.join(attempts_dir, "attempted")
    if not storage.exists(marker):
        storage.write_bytes(marker, b"")
        if how == "gil":
            ctypes.PyDLL(None).sleep(3600)
        else:
            os.kill(os.getpid(), signal.SIGSTOP)
    storage.write_json(out_url, {"ok": True})
    return {"items": 1}
