"""Emit's plan: which samples each dataset shard holds, known on the driver by counts only.

A raw shard's published samples are the keys select kept there that dedup kept too, in key
order (`kept_keys`); every key of raw shard NNNNN starts with NNNNN (layout.key_prefix), so its
dedup decisions are one run of the key-sorted decisions file (io.keyed). The dataset is those
samples raw shard by raw shard, cut by contract.ORDER_RULE. So the driver holds, per raw shard,
how many samples it publishes and a digest of their keys (`kept_summary`, one task per raw shard
on the cluster), and each dataset shard is a list of `Span`s (a raw shard, a start and a stop in
its kept keys): the plan grows with the number of shards, not of samples. A dataset shard's task
recomputes its spans' keys and checks their digest against the plan's.

Only with emit.max_shard_bytes does the driver hold one integer per sample (the bytes each takes
in a tar, step emit/sizes), which the cut needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.io import keyed, storage
from laionface.layout import RunLayout, key_prefix, shard_of_file

WEBDATASET_KEY = r"^[0-9A-Za-z_-]+$"


class EmitError(RuntimeError):
    """The stage outputs emit reads are missing or disagree with each other; the message says
    which files and what to re-run."""


@dataclass(frozen=True)
class Span:
    """Samples `start` to `stop` (exclusive) of raw shard `raw`'s kept keys."""

    raw: str
    start: int
    stop: int


def _select_kept(layout: RunLayout, raw: str) -> pa.Array:
    """The keys select kept in raw shard `raw`, sorted, checked to be its own webdataset keys."""
    url = layout.select(raw)
    table = storage.read_parquet(url, columns=["key", "kept"])
    keys = table.filter(pc.fill_null(table["kept"], False))["key"].combine_chunks()
    bad = pc.invert(pc.match_substring_regex(keys, WEBDATASET_KEY))
    if pc.any(bad).as_py():
        raise EmitError(
            f"{url}: key {keys.filter(bad)[0].as_py()!r} is not a webdataset key (letters, "
            "digits, '_' and '-' only; no dots): the raw shards were not written by the download "
            "stage"
        )
    foreign = pc.invert(pc.starts_with(keys, key_prefix(raw)))
    if pc.any(foreign).as_py():
        raise EmitError(
            f"{url}: key {keys.filter(foreign)[0].as_py()} does not start with its raw shard's "
            f"name {key_prefix(raw)}: the raw shards were not written by the download stage, or "
            "were renamed"
        )
    if pc.count_distinct(keys).as_py() != len(keys):
        raise EmitError(f"{url}: a key appears twice; re-run the faces and select stages")
    return keys.take(pc.array_sort_indices(keys))


def _dedup_kept(layout: RunLayout, raw: str, selected: pa.Array) -> pa.Array:
    """Of `selected` (sorted), the keys dedup kept; the raw shard's decisions checked to be for
    exactly those keys."""
    url = layout.dedup_decisions
    decided = keyed.read_prefix(url, key_prefix(raw), ["key", "kept"])
    unknown = pc.invert(pc.is_in(decided["key"], value_set=selected))
    undecided = pc.invert(pc.is_in(selected, value_set=decided["key"].combine_chunks()))
    if pc.any(unknown).as_py() or pc.any(undecided).as_py():
        raise EmitError(
            f"{url} does not match select/{raw}.parquet ({pc.sum(undecided).as_py() or 0} kept "
            f"samples without a decision, {pc.sum(unknown).as_py() or 0} decisions for samples "
            "select did not keep): it is stale; re-run the dedup and emit stages"
        )
    kept = decided.filter(pc.fill_null(decided["kept"], False))["key"].combine_chunks()
    return kept.take(pc.array_sort_indices(kept))


def kept_keys(run_url: str, raw: str, dedup: bool) -> pa.Array:
    """Raw shard `raw`'s published keys in order: select kept them and, with `dedup` (the run
    has dedup decisions), dedup kept them too."""
    layout = RunLayout(run_url)
    selected = _select_kept(layout, raw)
    return _dedup_kept(layout, raw, selected) if dedup else selected


def keys_digest(keys: pa.Array) -> str:
    return hashlib.sha256("\n".join(keys.to_pylist()).encode()).hexdigest()[:16]


def kept_summary(*, run_url: str, raw: str, dedup: bool) -> dict:
    """A per-raw-shard task: how many samples raw shard `raw` publishes, the digest of their
    keys, and how many dedup decisions its key range holds (the driver checks their sum against
    the decisions file, so no decision is for a key of no shard)."""
    keys = kept_keys(run_url, raw, dedup)
    decided = 0
    if dedup:
        layout = RunLayout(run_url)
        decided = len(keyed.read_prefix(layout.dedup_decisions, key_prefix(raw), ["key"]))
    return {"count": len(keys), "digest": keys_digest(keys), "decided": decided}


def decisions_rows(run_url: str) -> int:
    fs, path = storage.fs_for(RunLayout(run_url).dedup_decisions)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def shard_spans(raws: list[str], counts: list[int], cut: list[int]) -> Iterator[list[Span]]:
    """The spans of each dataset shard, for raw shards `raws` publishing `counts` samples, in
    order, cut into shards of `cut` samples (sum(cut) == sum(counts))."""
    raw, used = 0, 0  # the raw shard being consumed, and its samples already placed
    for size in cut:
        spans, need = [], size
        while need:
            while counts[raw] == used:
                raw, used = raw + 1, 0
            take = min(need, counts[raw] - used)
            spans.append(Span(raws[raw], used, used + take))
            used, need = used + take, need - take
        yield spans


def count_cut(total: int, samples_per_shard: int) -> list[int]:
    """ORDER_RULE's cut by count alone (emit.max_shard_bytes unset): shards of samples_per_shard
    samples, the last one shorter."""
    full, rest = divmod(total, samples_per_shard)
    return [samples_per_shard] * full + ([rest] if rest else [])


def spans_token(spans: list[Span], digests: dict[str, str]) -> str:
    """What a dataset shard's contents depend on besides its input files: its spans and the
    digest of each spanned raw shard's kept keys."""
    text = "\n".join(f"{s.raw}:{s.start}:{s.stop}:{digests[s.raw]}" for s in spans)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Plan:
    """What the driver knows of the published samples: per raw shard (in order), how many it
    publishes and the digest of their keys; `dedup`: whether dedup decisions filter them."""

    raws: list[str]
    counts: list[int]
    digests: dict[str, str]
    dedup: bool

    @property
    def total(self) -> int:
        return sum(self.counts)


Mapper = Callable[[Callable[..., Any], list[dict]], list[Any]]


def _raw_shards(layout: RunLayout, empty_ok: bool) -> list[str]:
    """The raw shards, each checked to have select output, sorted. `empty_ok`: the metadata
    stage kept no row, so no select output is no error."""
    raw_ids = {shard_of_file(u) for u in storage.list_files(layout.raw, ".parquet")}
    select_ids = sorted(
        shard_of_file(u) for u in storage.list_files(layout.select_folder, ".parquet")
    )
    missing = sorted(raw_ids - set(select_ids))
    if missing:
        raise EmitError(
            f"{len(missing)} raw shard(s) have no select output (e.g. {layout.select(missing[0])})"
            ": run the faces and select stages first"
        )
    if not select_ids and not empty_ok:
        raise EmitError(f"{layout.select_folder} has no shards: run the earlier stages first")
    return select_ids


def plan_samples(
    run_url: str, dedup_required: bool, mapper: Mapper, empty_ok: bool = False
) -> Plan:
    """The published samples, by counts per raw shard (one `kept_summary` task per raw shard,
    run by `mapper`). Raises EmitError when an input is missing or the stage outputs disagree."""
    layout = RunLayout(run_url)
    raws = _raw_shards(layout, empty_ok)
    dedup = storage.exists(layout.dedup_decisions)
    if not dedup and dedup_required:
        raise EmitError(
            f"{layout.dedup_decisions} is missing: run the dedup stage first (or disable it: "
            "dedup.exact = false, dedup.near = false, dedup.reference = [])"
        )
    tasks = [dict(run_url=run_url, raw=raw, dedup=dedup) for raw in raws]
    summaries = mapper(kept_summary, tasks)
    if dedup:
        decided, rows = sum(s["decided"] for s in summaries), decisions_rows(run_url)
        if decided != rows:
            raise EmitError(
                f"{layout.dedup_decisions} holds {rows - decided} decision(s) for keys of no "
                "select shard: it is stale; re-run the dedup and emit stages"
            )
    return Plan(
        raws=raws,
        counts=[s["count"] for s in summaries],
        digests={raw: s["digest"] for raw, s in zip(raws, summaries, strict=True)},
        dedup=dedup,
    )
