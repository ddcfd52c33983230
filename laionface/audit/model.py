"""The audit's figures: one stage's counts (StageFigures), the whole funnel (Funnel), and the
problems found when they don't add up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from laionface.io import schemas

INPUT, DROPPED, KEPT = "input", "dropped", "kept"


class AuditError(ValueError):
    """A run folder that can't be audited (nothing in it, or an unreadable file)."""


@dataclass(frozen=True)
class Problem:
    """A conservation failure: `stage`'s figures for `shards` don't add up."""

    stage: str
    shards: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.message}"


class ConservationError(ValueError):
    """The funnel does not add up; the message names each stage and its shards."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        stages = ",".join(dict.fromkeys(p.stage for p in problems))
        super().__init__(
            f"the funnel does not add up ({len(problems)} problem(s)): some rows have no fate or"
            f" more than one:\n{lines}\nRe-run the stage(s) named (laionface run PIPELINE"
            f" --stages {stages}) to redo incomplete shards, then check again."
        )


@dataclass
class StageFigures:
    """One stage's figures: totals, and the same per shard (or per input file)."""

    stage: str
    shard_kind: str  # what a shard is here: "input file", "metadata shard", "raw shard", ...
    input: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # (shard, outcome, reason, count) rows of audit/shards.parquet
    shard_rows: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


# Failed rows the report shows per download failure category.
EXAMPLES_PER_CATEGORY = 3


@dataclass
class DownloadDetail:
    """What the report shows of the download beyond the funnel, summed over metadata shards
    (audit.shards.download_fates)."""

    successes: dict[str, int] = field(default_factory=dict)  # raw shard: latest successes
    examples: dict[str, list[dict]] = field(default_factory=dict)  # category: failed rows
    domains: dict[str, list[int]] = field(default_factory=dict)  # host: [rows, failed]
    # 429 answers per host, over the complete raw shards (their markers' stats).
    http_429_by_host: dict[str, int] = field(default_factory=dict)

    def add(self, part: dict) -> None:
        for shard, n in part["successes"].items():
            self.successes[shard] = self.successes.get(shard, 0) + n
        for category, rows in part["examples"].items():
            shown = self.examples.setdefault(category, [])
            shown += rows[: EXAMPLES_PER_CATEGORY - len(shown)]
        for host, (rows, failed) in part["domains"].items():
            total = self.domains.setdefault(host, [0, 0])
            total[0] += rows
            total[1] += failed


@dataclass
class Funnel:
    """Where the rows of a run went; `rows()` is the table `laionface stats` prints."""

    run_url: str
    stages: list[StageFigures]
    missing: list[str]  # stages with no output, in pipeline order
    problems: list[Problem]
    disabled: list[str] = field(default_factory=list)  # stages the config turns off ("dedup")
    # Read on the way, reused by the report: "dataset_shards" (shard, samples), and the
    # download's detail when the download stage was counted.
    tables: dict[str, pa.Table] = field(default_factory=dict, repr=False)
    download: DownloadDetail | None = field(default=None, repr=False)

    @property
    def input_rows(self) -> int:
        return self.stages[0].input if self.stages else 0

    @property
    def kept(self) -> int:
        return self.stages[-1].kept if self.stages else 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def not_run(self) -> list[str]:
        """The stages without output that the config does not turn off."""
        return [name for name in self.missing if name not in self.disabled]

    def stage(self, name: str) -> StageFigures | None:
        return next((s for s in self.stages if s.stage == name), None)

    def rows(self) -> list[dict[str, Any]]:
        """One row per stage input, drop reason and stage output (the AUDIT_FUNNEL rows)."""
        total = self.input_rows
        out = []

        def add(stage: StageFigures, outcome: str, reason: str | None, count: int) -> None:
            out.append(
                {
                    "stage": stage.stage,
                    "outcome": outcome,
                    "reason": reason,
                    "count": count,
                    "pct_of_input": pct(count, total),
                    "pct_of_stage_input": pct(count, stage.input),
                }
            )

        for stage in self.stages:
            add(stage, INPUT, None, stage.input)
            for reason, count in stage.dropped.items():
                add(stage, DROPPED, reason, count)
            add(stage, KEPT, None, stage.kept)
        return out

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows(), schema=schemas.AUDIT_FUNNEL)

    def shards_table(self) -> pa.Table:
        rows = [
            {"stage": s.stage, "shard": shard, "outcome": outcome, "reason": reason, "count": n}
            for s in self.stages
            for shard, outcome, reason, n in s.shard_rows
        ]
        return pa.Table.from_pylist(rows, schema=schemas.AUDIT_SHARDS)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: totals per stage, the missing stages and any problems."""
        return {
            "input_rows": self.input_rows,
            "kept": self.kept,
            "conservation": "ok" if self.ok else "failed",
            "problems": [str(p) for p in self.problems],
            "missing_stages": list(self.missing),
            "disabled_stages": list(self.disabled),
            "stages": [
                {
                    "stage": s.stage,
                    "input": s.input,
                    "kept": s.kept,
                    "dropped": dict(s.dropped),
                }
                for s in self.stages
            ],
        }


def pct(count: int, of: int) -> float:
    return round(100.0 * count / of, 4) if of else 0.0
