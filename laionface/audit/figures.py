"""The figures the report plots, read from the stage outputs shard by shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from laionface.audit.read import parallel_map, read_columns
from laionface.io import storage
from laionface.layout import RunLayout

TOP_DOMAINS = 20


FACE_COUNT_BINS = 16  # 0..15 faces, then "16+"


SIDE_EDGES = np.geomspace(1, 2**16, 65)


BOX_EDGES = np.geomspace(1, 2**13, 53)


SCORE_EDGES = np.linspace(0.0, 1.0, 101)


@dataclass
class FaceStats:
    """Histograms over every image of faces/*.parquet (accumulated shard by shard)."""

    images: int = 0
    decoded: int = 0
    detections: int = 0
    min_side: np.ndarray = field(default_factory=lambda: np.zeros(len(SIDE_EDGES) - 1, np.int64))
    max_side: np.ndarray = field(default_factory=lambda: np.zeros(len(SIDE_EDGES) - 1, np.int64))
    faces_all: np.ndarray = field(default_factory=lambda: np.zeros(FACE_COUNT_BINS + 1, np.int64))
    faces_scoring: np.ndarray = field(
        default_factory=lambda: np.zeros(FACE_COUNT_BINS + 1, np.int64)
    )
    box_scoring: np.ndarray = field(default_factory=lambda: np.zeros(len(BOX_EDGES) - 1, np.int64))
    box_low: np.ndarray = field(default_factory=lambda: np.zeros(len(BOX_EDGES) - 1, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_EDGES) - 1, np.int64))

    def merge(self, other: FaceStats) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


def _clipped_hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]


def _face_stats(url: str, min_score: float) -> FaceStats:
    table = read_columns(url, ["width", "height", "decode_error", "faces"])
    stats = FaceStats(images=table.num_rows)
    ok = pc.is_null(table["decode_error"]).to_numpy(zero_copy_only=False)
    width = table["width"].to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    height = table["height"].to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    stats.decoded = int(ok.sum())
    stats.min_side = _clipped_hist(np.minimum(width, height), SIDE_EDGES)
    stats.max_side = _clipped_hist(np.maximum(width, height), SIDE_EDGES)

    faces = table["faces"].combine_chunks()
    counts = pc.fill_null(pc.list_value_length(faces), 0).to_numpy(zero_copy_only=False)
    flat = faces.flatten()
    parents = pc.list_parent_indices(faces).to_numpy(zero_copy_only=False)
    scores = flat.field("score").to_numpy(zero_copy_only=False).astype(np.float64)
    sides = np.minimum(
        flat.field("x2").to_numpy(zero_copy_only=False) - flat.field("x1").to_numpy(),
        flat.field("y2").to_numpy(zero_copy_only=False) - flat.field("y1").to_numpy(),
    ).astype(np.float64)
    scoring = scores >= min_score
    stats.detections = len(scores)
    stats.faces_all = np.bincount(
        np.minimum(counts, FACE_COUNT_BINS), minlength=FACE_COUNT_BINS + 1
    )
    per_image = np.bincount(parents[scoring], minlength=table.num_rows)
    stats.faces_scoring = np.bincount(
        np.minimum(per_image, FACE_COUNT_BINS), minlength=FACE_COUNT_BINS + 1
    )
    stats.box_scoring = _clipped_hist(sides[scoring], BOX_EDGES)
    stats.box_low = _clipped_hist(sides[~scoring], BOX_EDGES)
    stats.scores = _clipped_hist(scores, SCORE_EDGES)
    return stats


def face_stats(run_url: str, min_score: float) -> FaceStats | None:
    urls = storage.list_files(RunLayout(run_url).faces_folder, ".parquet")
    if not urls:
        return None
    total = FaceStats()
    for part in parallel_map(lambda url: _face_stats(url, min_score), urls):
        total.merge(part)
    return total


def domain_failures(domains: dict[str, list[int]], top: int = TOP_DOMAINS) -> list[dict[str, Any]]:
    """The `top` domains with the most failed downloads (from DownloadDetail.domains): domain,
    rows, failed, failure rate."""
    rows = [
        {"domain": domain, "rows": rows, "failed": failed, "rate": failed / rows}
        for domain, (rows, failed) in domains.items()
        if failed
    ]
    rows.sort(key=lambda r: (-r["failed"], r["domain"]))
    return rows[:top]
