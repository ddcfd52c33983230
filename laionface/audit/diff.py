"""`laionface diff RUN_A RUN_B`: what differs between two runs.

- Settings: run.json's `config` (the last command's resolved config) and each stage's recorded
  `settings` (those it last ran with), compared key by key.
- The funnel of each (audit.funnel), side by side per stage, outcome and reason.
- The keys kept by one run and not the other. "Kept" is kept after the last of select and dedup
  the run has (what emit publishes); each such key comes with its fate in the other run
  (`select/REASON`, `dedup/REASON`, or ABSENT: not among its images at all, e.g. not
  downloaded). Keys are compared as they are: two runs that downloaded the same metadata
  shards give the same keys.

The keys are read per raw shard (audit.diff_shard, mapped like the funnel's reads) and the driver
holds counts and a few example keys; `--out` streams the keys of a batch of shards at a time
into one parquet file, so memory does not grow with the number of keys.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import pyarrow.parquet as pq

from laionface.audit.diff_shard import DIFF_KEYS, EXAMPLES, diff_shard
from laionface.audit.funnel import funnel
from laionface.audit.model import AuditError, Funnel
from laionface.audit.shards import Mapper, dask_mapper, local_mapper
from laionface.io import storage
from laionface.layout import STAGE_ORDER, RunLayout, shard_of_file

# Raw shards whose keys the driver holds at once when writing --out.
SHARDS_PER_BATCH = 32


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"select.min_score": 0.9, ...} of nested dicts (lists and values are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _run_json(run_url: str) -> dict[str, Any]:
    url = RunLayout(run_url).run_json
    if not storage.exists(url):
        raise AuditError(f"{run_url}: not a laionface run folder (no run.json)")
    return storage.read_json(url)


def settings_diff(run_a: str, run_b: str) -> list[dict[str, Any]]:
    """[{"where": "config" or "stage NAME", "key", "a", "b"}] for every setting that differs;
    a missing value is None (a stage that ran in one run only: key "(ran)")."""
    a, b = _run_json(run_a), _run_json(run_b)
    rows = _differ("config", flatten(a.get("config") or {}), flatten(b.get("config") or {}))
    for stage in STAGE_ORDER:
        rec_a = (a.get("stages") or {}).get(stage) or {}
        rec_b = (b.get("stages") or {}).get(stage) or {}
        if ("settings" in rec_a) != ("settings" in rec_b):
            rows.append(
                {
                    "where": f"stage {stage}",
                    "key": "(ran)",
                    "a": "settings" in rec_a,
                    "b": "settings" in rec_b,
                }
            )
            continue
        rows += _differ(
            f"stage {stage}",
            flatten(rec_a.get("settings") or {}),
            flatten(rec_b.get("settings") or {}),
        )
    return rows


def _differ(where: str, a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"where": where, "key": key, "a": a.get(key), "b": b.get(key)}
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def funnel_side_by_side(a: Funnel, b: Funnel) -> list[dict[str, Any]]:
    """One row per (stage, outcome, reason) of either funnel: its count in each (0 if absent)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for side, result in (("a", a), ("b", b)):
        for row in result.rows():
            slot = (
                STAGE_ORDER.index(row["stage"]),
                row["outcome"] != "input",
                row["outcome"] == "kept",
            )
            entry = rows.setdefault(
                (*slot, row["reason"] or ""),
                {
                    "stage": row["stage"],
                    "outcome": row["outcome"],
                    "reason": row["reason"],
                    "a": 0,
                    "b": 0,
                },
            )
            entry[side] = row["count"]
    out = [rows[k] for k in sorted(rows)]
    for row in out:
        row["change"] = row["b"] - row["a"]
    return out


@dataclass
class KeyDiff:
    """Keys kept by one run only, per side ("A", "B")."""

    counts: dict[str, int] = field(default_factory=lambda: {"A": 0, "B": 0})
    by_fate: dict[str, Counter] = field(default_factory=lambda: {"A": Counter(), "B": Counter()})
    examples: dict[str, list[str]] = field(default_factory=lambda: {"A": [], "B": []})
    note: str = ""  # why keys were not compared

    def add(self, part: dict[str, Any]) -> None:
        for side in ("A", "B"):
            self.counts[side] += part["counts"][side]
            self.by_fate[side].update(part["by_fate"][side])
            shown = self.examples[side]
            shown += part["examples"][side][: EXAMPLES - len(shown)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kept_by_a_only": self.counts["A"],
            "kept_by_b_only": self.counts["B"],
            "a_only_fate_in_b": dict(self.by_fate["A"].most_common()),
            "b_only_fate_in_a": dict(self.by_fate["B"].most_common()),
            "examples": {"a_only": self.examples["A"], "b_only": self.examples["B"]},
            "note": self.note,
        }


@dataclass
class RunDiff:
    run_a: str
    run_b: str
    settings: list[dict[str, Any]]
    funnel: list[dict[str, Any]]
    keys: KeyDiff
    funnel_a: Funnel
    funnel_b: Funnel
    out: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.run_a,
            "b": self.run_b,
            "settings": self.settings,
            "funnel": self.funnel,
            "conservation": {"a": self.funnel_a.ok, "b": self.funnel_b.ok},
            "keys": self.keys.as_dict(),
            "out": self.out,
        }


def _decided(run_url: str) -> bool:
    return storage.exists(RunLayout(run_url).dedup_decisions)


def _raw_shards(*runs: str) -> list[str]:
    found: set[str] = set()
    for run in runs:
        found.update(
            shard_of_file(u) for u in storage.list_files(RunLayout(run).select_folder, ".parquet")
        )
    return sorted(found)


def key_diff(a: str, b: str, mapper: Mapper, out: str | None = None) -> KeyDiff:
    """Keys kept by run `a` only and by run `b` only (see the module doc); with `out`, all of
    them written there (DIFF_KEYS, key order), SHARDS_PER_BATCH raw shards at a time."""
    result = KeyDiff()
    missing = [run for run in (a, b) if not _raw_shards(run)]
    if missing:
        result.note = f"no select output in {', '.join(missing)}: keys not compared"
        return result
    raws = _raw_shards(a, b)
    common = dict(run_a=a, run_b=b, decided_a=_decided(a), decided_b=_decided(b))
    if out is None:
        for part in mapper(diff_shard, [dict(common, raw=raw, rows=False) for raw in raws]):
            result.add(part)
        return result
    with (
        storage.atomic_open(out, "wb") as handle,
        pq.ParquetWriter(handle, DIFF_KEYS, compression="zstd") as writer,
    ):
        for start in range(0, len(raws), SHARDS_PER_BATCH):
            batch = raws[start : start + SHARDS_PER_BATCH]
            for part in mapper(diff_shard, [dict(common, raw=raw, rows=True) for raw in batch]):
                result.add(part)
                if part["table"].num_rows:
                    writer.write_table(part["table"])
    return result


def diff(run_a: str, run_b: str, out: str | None = None, client: Any = None) -> RunDiff:
    """The differences between two runs (`out`: write every key kept by one run only there)."""
    run_a, run_b = run_a.rstrip("/"), run_b.rstrip("/")
    settings = settings_diff(run_a, run_b)
    mapper = local_mapper if client is None else dask_mapper(client)
    a, b = funnel(run_a, client=client), funnel(run_b, client=client)
    keys = key_diff(run_a, run_b, mapper, out)
    return RunDiff(run_a, run_b, settings, funnel_side_by_side(a, b), keys, a, b, out)


def _show(value: Any) -> str:
    """A setting as JSON: strings quoted, so "" and a missing value (null) read apart."""
    return json.dumps(value, default=str)


def _aligned(lines: list[list[str]], numeric_from: int) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i >= numeric_from else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]


def format_text(result: RunDiff) -> str:
    lines = [f"A: {result.run_a}", f"B: {result.run_b}", "", "settings that differ:"]
    if result.settings:
        rows = [["where", "key", "A", "B"]]
        rows += [[s["where"], s["key"], _show(s["a"]), _show(s["b"])] for s in result.settings]
        lines += ["  " + line for line in _aligned(rows, numeric_from=4)]
    else:
        lines.append("  none")
    lines += ["", "funnel:"]
    rows = [["stage", "reason", "A", "B", "B - A"]]
    for row in result.funnel:
        reason = row["reason"] or f"({'in' if row['outcome'] == 'input' else row['outcome']})"
        rows.append([row["stage"], reason, f"{row['a']:,}", f"{row['b']:,}", f"{row['change']:+,}"])
    lines += ["  " + line for line in _aligned(rows, numeric_from=2)]
    lines += ["", *_keys_text(result.keys)]
    if result.out:
        lines.append(f"every key kept by one run only: {result.out}")
    return "\n".join(lines)


def _keys_text(keys: KeyDiff) -> list[str]:
    if keys.note:
        return [f"keys: {keys.note}"]
    lines = []
    for side, other in (("A", "B"), ("B", "A")):
        fates = ", ".join(f"{fate} {n:,}" for fate, n in keys.by_fate[side].most_common())
        lines.append(
            f"kept by {side}, not by {other}: {keys.counts[side]:,}"
            + (f" (in {other}: {fates})" if fates else "")
        )
        if keys.examples[side]:
            lines.append(f"  e.g. {', '.join(keys.examples[side])}")
    return lines


def diff_command(
    run_a: str,
    run_b: str,
    as_json: bool = False,
    out: str | None = None,
    stream: TextIO | None = None,
) -> int:
    """`laionface diff RUN_A RUN_B [--json] [--out FILE.parquet]`: 0, or 1 when a run can't be
    read (the error printed)."""
    stream = stream or sys.stdout
    try:
        result = diff(run_a, run_b, out)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result.as_dict(), indent=2, default=str), file=stream)
    else:
        print(format_text(result), file=stream)
    for side, res in (("A", result.funnel_a), ("B", result.funnel_b)):
        if not res.ok:
            print(
                f"warning: run {side}'s funnel does not add up: {'; '.join(map(str, res.problems))}",
                file=sys.stderr,
            )
    return 0
