"""Completion markers, and the one rule that decides whether a finished shard is still valid.

A shard of a step is complete when its marker `STEP/_done/SHARD.json` (layout.RunLayout.marker)
exists, written on the worker after the shard's outputs are in place. The marker records:

    fingerprint  hash of the settings that shape the shard, of the version of every file it read
                 and of its token (what else it read, e.g. its slice of a plan)
    settings     hash of the settings alone (which settings a raw shard was downloaded under)
    inputs       {file: version} of the files it read
    outputs      {file: version} of the files it wrote, as it left them
    stats        what the shard function returned

A file's version is its size plus its ETag, digest or modification time, whichever the
filesystem gives (`storage.file_versions`). A marker is current when its fingerprint equals the
one computed now and every output still has the version the marker recorded. So a changed
setting, a replaced upstream file (a retried download, a re-run faces shard) or a deleted or
edited output redoes exactly the shards concerned, and nothing else.

Files are named relative to the run folder when they lie inside it, so a run folder copied
elsewhere with its files' times keeps its markers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
from collections.abc import Iterable
from typing import Any

from laionface.io import storage
from laionface.layout import RunLayout

MARKER_FORMAT = 2


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def digest(value: Any) -> str:
    """A short hash of JSON-able data (keys sorted, so dict order does not matter)."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint(settings_fp: str, inputs: dict[str, str | None], token: str = "") -> str:
    """The fingerprint a shard's marker must carry: settings, input versions and token."""
    return digest([MARKER_FORMAT, settings_fp, sorted(inputs.items()), token])


def named_versions(layout: RunLayout, urls: Iterable[str], versions: dict) -> dict:
    """{file relative to the run folder: version} of `urls`, from a `file_versions` result."""
    return {layout.relative(url): versions.get(url) for url in urls}


def write_marker(
    url: str,
    *,
    fingerprint: str,
    settings_fp: str,
    inputs: dict[str, str | None],
    outputs: dict[str, str | None],
    stats: dict,
) -> None:
    storage.write_json(
        url,
        {
            "format": MARKER_FORMAT,
            "fingerprint": fingerprint,
            "settings": settings_fp,
            "inputs": inputs,
            "outputs": outputs,
            "stats": stats,
            "finished": now_iso(),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        },
    )


def read_markers(folder: str) -> dict[str, dict]:
    """{shard: marker} of the markers in a step's marker folder (empty if none)."""
    fs, path = storage.fs_for(folder)
    if not fs.exists(path):
        return {}
    names = [p for p in fs.ls(path, detail=False) if p.endswith(".json")]
    names = [p for p in names if not os.path.basename(p).startswith(storage.TEMP_PREFIX)]
    if not names:
        return {}
    out = {}
    for name, blob in fs.cat(names).items():
        with contextlib.suppress(ValueError):
            out[os.path.basename(name)[: -len(".json")]] = json.loads(blob)
    return out


def is_current(marker: dict | None, fingerprint: str, outputs: dict[str, str | None]) -> bool:
    """Whether `marker` says its shard is complete under `fingerprint`, outputs untouched."""
    if not marker or marker.get("format") != MARKER_FORMAT:
        return False
    if marker.get("fingerprint") != fingerprint:
        return False
    recorded = marker.get("outputs") or {}
    return all(
        version is not None and recorded.get(name) == version for name, version in outputs.items()
    )


def complete_shards(layout: RunLayout, steps: Iterable[str], settings_fp: str | None) -> dict:
    """{shard: marker} of the shards of `steps` finished under settings `settings_fp` (any when
    None), without checking their inputs: what the audit counts as made by the current settings."""
    out: dict[str, dict] = {}
    for step in steps:
        for shard, marker in read_markers(layout.markers(step)).items():
            if settings_fp is None or marker.get("settings") == settings_fp:
                out[shard] = marker
    return out
