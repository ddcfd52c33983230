"""How a run was made, for the report: each stage's settings and software versions and each step's
timings (run.json), with the seconds of each shard (the completion markers under
STEP/_done/, which record what the shard function returned, its seconds included)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from laionface.engine.markers import read_markers
from laionface.io import storage
from laionface.layout import STAGE_ORDER, RunLayout


@dataclass
class StepTiming:
    """One stage or step (`dedup/samples`) as run.json records its last run."""

    step: str
    status: str
    started: str
    finished: str
    seconds: float | None
    shards: str  # "done/total (skipped)" or ""
    shard_seconds: dict[str, Any] | None  # median, max, slowest: over the markers' seconds


@dataclass
class Provenance:
    created: str
    config: dict[str, Any]
    versions: dict[str, str]  # of the last command
    # {stage: {"settings": {...}, "versions": {...}, "finished": ...}} of the stages that ran
    stages: dict[str, dict[str, Any]]
    timings: list[StepTiming]


def _order(name: str) -> tuple[int, int, str]:
    stage = name.split("/", 1)[0]
    rank = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
    return rank, "/" in name, name


def _shard_seconds(layout: RunLayout, step: str) -> dict[str, Any] | None:
    found = {
        shard: marker["stats"]["seconds"]
        for shard, marker in read_markers(layout.markers(step)).items()
        if isinstance((marker.get("stats") or {}).get("seconds"), int | float)
    }
    if not found:
        return None
    values = np.array(list(found.values()), dtype=np.float64)
    slowest = max(sorted(found), key=lambda shard: found[shard])
    return {
        "shards": len(found),
        "median": float(np.median(values)),
        "max": float(values.max()),
        "slowest": slowest,
    }


def _timing(layout: RunLayout, step: str, record: dict[str, Any]) -> StepTiming:
    shards = ""
    if "shards_total" in record:
        shards = f"{record.get('shards_done', 0):,}/{record['shards_total']:,}"
        if record.get("shards_skipped"):
            shards += f" ({record['shards_skipped']:,} skipped as done)"
    return StepTiming(
        step,
        str(record.get("status", "")),
        str(record.get("started", "")),
        str(record.get("finished", "")),
        record.get("seconds"),
        shards,
        _shard_seconds(layout, step),
    )


def provenance(run_url: str) -> Provenance | None:
    """The run's record; None when it has no run.json."""
    layout = RunLayout(run_url)
    if not storage.exists(layout.run_json):
        return None
    state = storage.read_json(layout.run_json)
    records = state.get("stages") or {}
    stages = {
        name: records[name]
        for name in STAGE_ORDER
        if name in records and "settings" in records[name]
    }
    timings = [_timing(layout, step, records[step]) for step in sorted(records, key=_order)]
    return Provenance(
        str(state.get("created", "")),
        state.get("config") or {},
        state.get("versions") or {},
        stages,
        timings,
    )
