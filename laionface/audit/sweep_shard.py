"""The threshold sweep's work on one raw shard (audit.sweep maps it, on threads or the
cluster): each image's fate at every grid point from its recorded detections
(`selection.decide_table`), and, where the run's dedup decided, what the driver needs to decide
the clusters again (survivors alone in their cluster, and the members of clusters of two or
more images with their fate at each point)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laionface import selection
from laionface.audit.model import AuditError
from laionface.audit.read import read_columns
from laionface.config import SelectSection
from laionface.io import keyed
from laionface.io.schemas import DEDUP_SAMPLES
from laionface.layout import SELECT_REASONS, RunLayout, key_prefix


def shard_clusters(*, decisions_url: str, raw: str) -> dict:
    """A raw shard's rows in the decisions, and the clusters its duplicates belong to."""
    decided = keyed.read_prefix(decisions_url, key_prefix(raw), ["kept", "cluster"])
    duplicate = pc.and_(
        pc.invert(pc.fill_null(decided["kept"], False)), pc.is_valid(decided["cluster"])
    )
    clusters = decided["cluster"].filter(duplicate).to_numpy()
    return {"rows": decided.num_rows, "clusters": np.unique(clusters)}


def _fates(faces: pa.Table, rules: list[SelectSection]) -> tuple[np.ndarray, np.ndarray, list]:
    """(survives [image, point], counted faces of survivors [image, point], drop reasons per
    point)."""
    survive = np.zeros((faces.num_rows, len(rules)), bool)
    counted = np.zeros((faces.num_rows, len(rules)), np.int64)
    dropped: list[dict[str, int]] = []
    for j, section in enumerate(rules):
        decided = selection.decide_table(faces, section)
        survive[:, j] = decided.kept
        counted[:, j] = decided.n_faces * decided.kept
        codes = np.bincount(decided.reason[~decided.kept], minlength=len(SELECT_REASONS))
        dropped.append({r: int(n) for r, n in zip(SELECT_REASONS, codes, strict=True) if n})
    return survive, counted, dropped


def _decided_rows(layout: RunLayout, raw: str, keys: pa.ChunkedArray, first_row: int):
    """The shard's decisions, with the position of each in the faces shard (`keys`)."""
    url = layout.dedup_decisions
    decided = keyed.read_prefix(url, key_prefix(raw), ["key", "kept", "cluster"])
    at = pc.index_in(decided["key"], value_set=keys.combine_chunks())
    if at.null_count:
        key = decided["key"].filter(pc.is_null(at))[0].as_py()
        raise AuditError(
            f"{url}: key {key} is not in {layout.faces(raw)}: the decisions are older than the"
            " faces; re-run dedup (laionface run PIPELINE --stages dedup)"
        )
    kept = pc.fill_null(decided["kept"], False).to_numpy(zero_copy_only=False)
    cluster = pc.fill_null(decided["cluster"], -1).to_numpy(zero_copy_only=False)
    rows = first_row + np.arange(decided.num_rows)
    if (cluster[kept] != rows[kept]).any():
        raise AuditError(
            f"{url}: the rows of raw shard {raw} are not where the decisions' clusters say;"
            " re-run dedup (laionface run PIPELINE --stages dedup)"
        )
    return decided, at.to_numpy(zero_copy_only=False), kept, cluster


def _members(layout: RunLayout, raw: str, keys: pa.ChunkedArray) -> dict:
    """The dedup samples rows of `keys` (in key order, as the decisions list them)."""
    url = layout.dedup_samples(raw)
    samples = read_columns(url, DEDUP_SAMPLES.names)
    samples = samples.filter(pc.is_in(samples["key"], value_set=keys.combine_chunks()))
    if samples["key"].to_pylist() != keys.to_pylist():
        raise AuditError(
            f"{url} does not hold the samples dedup/decisions.parquet names for raw shard {raw};"
            " re-run dedup (laionface run PIPELINE --stages dedup)"
        )
    return {"samples": samples}


def _dedup_part(layout, raw, keys, survive, counted, first_row, shared) -> dict:
    decided, at, kept, cluster = _decided_rows(layout, raw, keys, first_row)
    seen = np.zeros(len(keys), bool)
    seen[at] = True
    fate, faces = survive[at], counted[at] * survive[at]
    member = (~kept & (cluster >= 0)) | (kept & np.isin(cluster, shared))
    alone = kept & ~member
    out = {
        "unhashed": (survive & ~seen[:, None]).sum(0),
        "alone": fate[alone].sum(0),
        "alone_faces": faces[alone].sum(0),
        "members": None,
    }
    if member.any():
        out["members"] = _members(layout, raw, decided["key"].filter(pa.array(member)))
        out["members"].update(
            cluster=cluster[member],
            keeper=kept[member],
            survive=fate[member],
            counted=faces[member],
        )
    return out


def sweep_shard(
    *, run_url: str, raw: str, rules: list[dict], first_row: int | None, shared: Any = None
) -> dict:
    """One raw shard's figures at every grid point (`rules`: the [select] section of each):
    images select keeps and their counted faces, drop reasons; with `first_row` (the shard's
    first row in dedup/decisions.parquet) the dedup parts: survivors alone in their cluster,
    survivors the run's dedup never saw (`unhashed`), and the members of the clusters `shared`
    (the shard's clusters of two or more images) with their fate at each point."""
    layout = RunLayout(run_url)
    sections = [SelectSection.model_validate(r) for r in rules]
    faces = read_columns(layout.faces(raw), ["key", "width", "height", "decode_error", "faces"])
    survive, counted, dropped = _fates(faces, sections)
    out: dict[str, Any] = {
        "images": faces.num_rows,
        "kept": survive.sum(0),
        "faces": (counted * survive).sum(0),
        "dropped": dropped,
    }
    if first_row is not None:
        shared = np.asarray(shared if shared is not None else [], np.int64)
        out["dedup"] = _dedup_part(layout, raw, faces["key"], survive, counted, first_row, shared)
    return out
