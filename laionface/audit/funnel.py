"""The audit: where every input row of a run ended up, and a check that nothing was lost.

The funnel follows the rows from the metadata inputs to the published dataset. Every row that
entered the first stage present has exactly one fate: kept to the end, or dropped by one stage for
one reason (how each stage is counted: counts.py).

Conservation is checked per shard (a stage's outcomes for a shard add up to the input measured
from the stage before it) and between stages (a stage's input is the kept count of the stage
before). A stage with no output at all is listed as missing (the stages after a gap are counted,
but can't be checked against the stage before it); a stage with some shards missing or with counts
that don't add up is a `ConservationError` that names the stage and the shards.

`write_audit` keeps the figures as `audit/funnel.parquet` (AUDIT_FUNNEL) and `audit/shards.parquet`
(AUDIT_SHARDS, per shard); the pipeline calls it once, after the stages of a command.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from laionface.audit import counts, shards
from laionface.audit.model import (
    KEPT,
    AuditError,
    ConservationError,
    DownloadDetail,
    Funnel,
    Problem,
    StageFigures,
    pct,
)
from laionface.audit.read import num_rows, recorded_settings, run_config, run_stages
from laionface.audit.shards import Mapper
from laionface.config import DedupSection, MetadataSection
from laionface.dataset import contract
from laionface.io import storage
from laionface.layout import STAGE_ORDER, RunLayout, shard_of_file

log = logging.getLogger("laionface")


def present_stages(run_url: str) -> dict[str, bool]:
    """Which stages have output in the run folder."""
    layout = RunLayout(run_url)

    def has(folder: str) -> bool:
        return bool(storage.list_files(folder, ".parquet"))

    return {
        "metadata": has(layout.metadata_shards) or has(layout.metadata_folder("drops")),
        "download": has(layout.raw),
        "faces": has(layout.faces_folder),
        "select": has(layout.select_folder),
        "dedup": storage.exists(layout.dedup_decisions),
        "emit": bool(counts.dataset_shards(run_url)),
    }


def _ran_on_nothing(name: str, finished: set[str], stages: list, present: dict) -> bool:
    """Whether stage `name`, without output, ran on nothing: run.json says it finished and the
    stage before it kept no row (for the first stage: no later stage has output either), as
    after an input of no rows. Then it counts, with 0 rows; otherwise its output is missing."""
    if name not in finished:
        return False
    return stages[-1].kept == 0 if stages else not any(present.values())


def _dedup_enabled(run_url: str) -> bool:
    """As emit decides (with the last command's settings): with every dedup setting off, emit
    publishes select's output."""
    return DedupSection.model_validate(run_config(run_url).get("dedup") or {}).enabled


def _rows_per_shard(run_url: str) -> int:
    """metadata.rows_per_shard as the download stage last ran with it."""
    recorded = recorded_settings(run_url, "download").get("metadata.rows_per_shard")
    if recorded is None:
        recorded = run_config(run_url).get("metadata", {}).get("rows_per_shard")
    return int(recorded or MetadataSection().rows_per_shard)


class _Counter:
    """Counts the stages in order, each checked against the one before when it is known.

    The reads are per shard (audit.shards), mapped by `mapper`: on the cluster in a run, on a
    thread pool for `laionface stats` and `report`."""

    def __init__(self, run_url: str, present: dict[str, bool], mapper: Mapper):
        self.run_url = run_url
        self.layout = RunLayout(run_url)
        self.present = present
        self.map = mapper
        self.tables: dict[str, pa.Table] = {}
        self.download: DownloadDetail | None = None
        self.fates: dict[str, dict] | None = None
        self.infos: dict[str, dict] = {}
        self.upstream: counts.Upstream | None = None

    def figures(self, name: str, first: bool) -> StageFigures:
        run_url, linked = self.run_url, self.upstream is not None
        if name == "metadata":
            return counts.metadata(run_url, self.map)
        if name == "download":
            figures, self.download = counts.download(
                run_url, _rows_per_shard(run_url), first, self.map
            )
            return figures
        if name == "faces":
            linked = linked and self.download is not None
            return counts.faces(run_url, self.download.successes if linked else None)
        if name == "select":
            return counts.select(self._fates(), self.upstream)
        if name == "dedup":
            return self._dedup(linked)
        fates = self._fates() if linked and self.present.get("select", False) else None
        manifest_url = storage.join(self.layout.dataset, contract.MANIFEST_PARQUET)
        manifest = None
        if storage.exists(manifest_url):
            manifest = self.map(shards.manifest_counts, [{"url": manifest_url}])[0]
        figures, self.tables["dataset_shards"] = counts.emit(
            run_url, self._dataset_infos(), fates, manifest
        )
        return figures

    def _dedup(self, linked: bool) -> StageFigures:
        url = self.layout.dedup_decisions
        rows = num_rows(url)
        if not (linked and self.present.get("select", False)):  # select's output is gone
            return counts.dedup_alone(self.map(shards.decision_counts, [{"url": url}])[0], rows)
        return counts.dedup(self._fates(), rows)

    def _dataset_infos(self) -> dict[str, dict]:
        if self.present.get("emit", False) and not self.infos:
            urls = counts.dataset_shards(self.run_url)
            found = self.map(shards.dataset_shard, [{"url": url} for url in urls])
            self.infos = dict(zip(map(shard_of_file, urls), found, strict=True))
        return self.infos

    def _fates(self) -> dict[str, dict]:
        """Every raw shard's fates from select on (shards.raw_shard_fates), read once."""
        if self.fates is None:
            holders: dict[str, list[str]] = {}
            for name, info in self._dataset_infos().items():
                for raw in info["raws"]:
                    holders.setdefault(raw, []).append(
                        storage.join(self.layout.dataset, contract.parquet_name(name))
                    )
            raws = [
                shard_of_file(u) for u in storage.list_files(self.layout.select_folder, ".parquet")
            ]
            kwargs = [
                dict(
                    run_url=self.run_url,
                    raw=raw,
                    dataset_urls=holders.get(raw, []),
                    decisions=self.present.get("dedup", False),
                    published=self.present.get("emit", False),
                )
                for raw in raws
            ]
            self.fates = dict(zip(raws, self.map(shards.raw_shard_fates, kwargs), strict=True))
        return self.fates

    def check_input(self, figures: StageFigures) -> None:
        upstream = self.upstream
        if upstream is not None and figures.input != upstream.kept_total:
            figures.problems.append(
                Problem(
                    figures.stage,
                    (),
                    f"{figures.input:,} rows entered {figures.stage} but {upstream.stage} kept"
                    f" {upstream.kept_total:,}",
                )
            )
        kept = {shard: n for shard, outcome, _, n in figures.shard_rows if outcome == KEPT}
        self.upstream = counts.Upstream(figures.stage, figures.kept, kept)


def _no_output(run_url: str) -> AuditError:
    if not storage.exists(RunLayout(run_url).run_json):
        return AuditError(f"{run_url}: not a laionface run folder (no run.json, no stage output)")
    return AuditError(
        f"{run_url}: no stage output yet: run the pipeline first (laionface run PIPELINE"
        f" --run-dir {run_url})"
    )


def funnel(run_url: str, upto: str | None = None, client: Any = None) -> Funnel:
    """The funnel of the stages present (up to and including `upto`), with conservation checked;
    the per-shard reads run on the cluster behind `client`, else on threads here.

    Inconsistencies are collected in `Funnel.problems`, not raised: see `check_conservation`.
    """
    run_url = run_url.rstrip("/")
    if upto is not None and upto not in STAGE_ORDER:
        raise ValueError(f"unknown stage {upto!r}; the stages are {', '.join(STAGE_ORDER)}")
    wanted = STAGE_ORDER[: STAGE_ORDER.index(upto) + 1] if upto else STAGE_ORDER
    present = {name: ok for name, ok in present_stages(run_url).items() if name in wanted}
    finished = {n for n, record in run_stages(run_url).items() if record.get("status") == "done"}
    if not any(present.values()) and not finished & set(wanted):
        raise _no_output(run_url)
    disabled = [] if _dedup_enabled(run_url) else ["dedup"]
    mapper = shards.local_mapper if client is None else shards.dask_mapper(client)
    counter = _Counter(run_url, present, mapper)
    stages: list[StageFigures] = []
    for name in wanted:
        present[name] = present[name] or _ran_on_nothing(name, finished, stages, present)
        if not present[name]:
            if name not in disabled:
                counter.upstream = None  # a gap: the next stage can't be checked against it
            continue
        figures = counter.figures(name, first=not stages)
        counter.check_input(figures)
        stages.append(figures)
    missing = [name for name in wanted if not present[name]]
    problems = [p for s in stages for p in s.problems]
    return Funnel(run_url, stages, missing, problems, disabled, counter.tables, counter.download)


def check_conservation(result: Funnel) -> None:
    """Raise ConservationError naming the stages and shards whose counts don't add up."""
    if result.problems:
        raise ConservationError(result.problems)


def write_audit(run_url: str, client: Any = None) -> Funnel:
    """Write audit/funnel.parquet and audit/shards.parquet; raise ConservationError if the
    funnel does not add up (the two files are then removed, never left disagreeing with the run).
    """
    result = funnel(run_url, client=client)
    layout = RunLayout(run_url)
    funnel_url, shards_url = layout.audit_funnel, layout.audit_shards
    if not result.ok:
        storage.remove(funnel_url)
        storage.remove(shards_url)
        check_conservation(result)
    storage.write_parquet(result.table(), funnel_url)
    storage.write_parquet(result.shards_table(), shards_url)
    log.info(
        "audit: %s input rows, %s kept (%.2f%%); funnel in %s",
        f"{result.input_rows:,}",
        f"{result.kept:,}",
        pct(result.kept, result.input_rows),
        funnel_url,
    )
    return result
