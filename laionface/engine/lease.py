"""One writer per folder: the lease a command holds on the run folder (or publish target) it writes.

`laionface run`, `demo` and `publish` take the lease before writing anything and give it back
when they end. The lease is a file, `lease.json` in the folder (layout.RunLayout.lease), on any
fsspec URL:

    {"token": random id, "host", "pid", "command", "started", "heartbeat": epoch seconds}

A second command on the same folder stops with an error naming the holder. The holder rewrites
the heartbeat every HEARTBEAT_SECONDS from a thread; a lease whose heartbeat is older than
STALE_SECONDS is stale (its holder died without giving it back) and `--force` takes it over. A
lease held by a process of this host that no longer exists is taken over without `--force`.

Taking the lease is atomic on a local folder (a hard link that fails when the file exists). On
an object store, where a write can't be conditional here, the taker writes, waits
SETTLE_SECONDS and reads back: of two commands started together, the one whose write was
overwritten sees another token and stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from laionface.engine.markers import now_iso
from laionface.io import storage
from laionface.layout import RunLayout

log = logging.getLogger("laionface")

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
SETTLE_SECONDS = 1.0


class LeaseHeld(RuntimeError):
    """Another command holds the folder's lease; the message names it and what to do."""


def _describe(lease: dict, age: float) -> str:
    return (
        f"{lease.get('command', 'a laionface command')} on {lease.get('host')} (pid "
        f"{lease.get('pid')}, started {lease.get('started')}, last heartbeat {age:.0f} s ago)"
    )


def _read(url: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # a damaged lease counts as stale


def _dead_here(lease: dict) -> bool:
    """Whether the lease's holder was a process of this host that no longer runs."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _create(url: str, lease: dict) -> bool:
    """Write the lease if no lease file exists (atomically where the filesystem allows)."""
    fs, path = storage.fs_for(url)
    if not isinstance(fs, LocalFileSystem):
        storage.write_json(url, lease)
        time.sleep(SETTLE_SECONDS)
        return (_read(url) or {}).get("token") == lease["token"]
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temp = f"{path}.{lease['token']}"
    with open(temp, "w") as handle:
        json.dump(lease, handle)
    try:
        os.link(temp, path)  # fails when a lease file exists: no two takers both win
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(temp)


class Lease:
    """The lease on one folder, held by this process (see the module docstring)."""

    def __init__(self, folder: str, command: str):
        self.url = RunLayout(folder).lease
        self.state = {
            "token": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command,
            "started": now_iso(),
            "heartbeat": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self, force: bool = False) -> None:
        """Take the lease, or raise LeaseHeld naming the holder."""
        held = _read(self.url)
        if held is not None:
            age = time.time() - float(held.get("heartbeat") or 0)
            if held and not _dead_here(held):
                self._refuse(held, age, force)
            log.warning("taking over the lease of %s from %s", self.url, _describe(held, age))
            storage.remove(self.url)
        if not _create(self.url, self.state):
            held = _read(self.url) or {}
            raise LeaseHeld(
                f"{self.url}: {_describe(held, 0)} took this folder's lease at the same time; "
                "only one command may write a folder at once"
            )
        self._thread = threading.Thread(target=self._beat, name="laionface-lease", daemon=True)
        self._thread.start()

    def _refuse(self, held: dict, age: float, force: bool) -> None:
        if age > STALE_SECONDS and force:
            return
        if age > STALE_SECONDS:
            raise LeaseHeld(
                f"{self.url}: the folder's lease is held by {_describe(held, age)}, and it is "
                f"stale (no heartbeat for {STALE_SECONDS:.0f} s): if that command is gone, pass "
                "--force to take it over"
            )
        raise LeaseHeld(
            f"{self.url}: the folder is being written by {_describe(held, age)}; wait for it "
            "to finish (only one command may write a folder at once)"
        )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            current = _read(self.url) or {}
            if current.get("token") != self.state["token"]:
                self.lost = True
                log.error("%s: this command's lease was taken over by another; stop it", self.url)
                return
            self.state["heartbeat"] = time.time()
            with contextlib.suppress(OSError):
                storage.write_json(self.url, self.state)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (_read(self.url) or {}).get("token") == self.state["token"]:
            storage.remove(self.url)


@contextlib.contextmanager
def holding(folder: str, command: str, force: bool = False) -> Iterator[Any]:
    """Hold the lease on `folder` for the block (see Lease)."""
    lease = Lease(folder, command)
    lease.acquire(force)
    try:
        yield lease
    finally:
        lease.release()
