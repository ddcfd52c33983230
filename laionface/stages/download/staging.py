"""Atomic raw shards: files are made in a staging folder and moved into place once complete.

A local run folder stages under `raw/`, in `.tmp-NAME/<attempt>/` (the temporary prefix of
io.storage, so listings skip it): one attempt's folder, beside any left by earlier attempts at
the same shard, which the new attempt removes (an attempt killed midway leaves its folder;
listing only the shard's own parent keeps that cheap in a raw/ of many thousands of files).
A remote run folder stages in a local temporary folder and uploads each file atomically.
`publish` moves the finished files in order; each appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from fsspec.implementations.local import LocalFileSystem

from laionface.io import storage


@contextlib.contextmanager
def staging(raw_url: str, name: str) -> Iterator[tuple[str, bool]]:
    """A fresh local folder for one attempt at file set `name`; (path, inside raw_url)."""
    fs, raw_path = storage.fs_for(raw_url)
    local = isinstance(fs, LocalFileSystem)
    if local:
        parent = os.path.join(raw_path, f"{storage.TEMP_PREFIX}{name}")
        os.makedirs(parent, exist_ok=True)
        for stale in os.listdir(parent):  # left by an attempt that was killed
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
        folder = os.path.join(parent, uuid.uuid4().hex[:12])
        os.makedirs(folder)
    else:
        parent = folder = tempfile.mkdtemp(prefix=f"laionface-download-{name}-")
    try:
        yield folder, local
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # another attempt may be using it
            os.rmdir(parent)


def publish(folder: str, raw_url: str, names: list[str], local: bool) -> None:
    """Move finished files from `folder` into `raw_url` in order; each appears whole or not at all."""
    for name in names:
        source = os.path.join(folder, name)
        if local:
            os.replace(source, os.path.join(storage.fs_for(raw_url)[1], name))
        else:
            with open(source, "rb") as src, storage.atomic_open(storage.join(raw_url, name)) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
