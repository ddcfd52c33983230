"""The `[select]` rules in one place: which detections count as faces, and why an image is dropped.

Used by the select stage (the decisions, and which detections count), emit (the faces it
publishes) and the report (the box colours of its contact sheets), so all three read a
detection the same way.

A detection is one of:
- `low`: its score is below `min_score`;
- `small`: it scores, but its box's shorter side is below `min_face_size` px or its area is
  below `min_face_fraction` of the image's;
- `counted`: it passes both; `n_faces` is the number of counted faces.

The dataset publishes every detection that scores (`small` and `counted` ones), each with its
`counted` flag, which select records per detection (`classes`), so emit needs no size rule.

An image is dropped for the first of these reasons that applies (layout.SELECT_REASONS):
1. `decode_error`: the image could not be decoded (the faces stage recorded why).
2. `image_too_small`: min(width, height) < `min_image_side`.
3. `no_face`: fewer detections than `min_faces` at all (at `faces.record_threshold`).
4. `low_score`: fewer than `min_faces` detections score at least `min_score`.
5. `too_many_faces`: more than `max_faces` detections score at least `min_score`.
6. `face_too_small`: fewer than `min_faces` faces are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laionface.config import SelectSection
from laionface.layout import SELECT_REASONS

COUNTED, SMALL, LOW = "counted", "small", "low"


def scores(face: dict[str, Any], min_score: float) -> bool:
    """Whether a detection (a FACE record) scores at least `min_score`: not `low`."""
    return face["score"] >= min_score


def face_class(face: dict[str, Any], rules: SelectSection, area: float) -> str:
    """How select sees one detection (a FACE record) in an image of `area` pixels."""
    if not scores(face, rules.min_score):
        return LOW
    width, height = face["x2"] - face["x1"], face["y2"] - face["y1"]
    if min(width, height) >= rules.min_face_size and width * height / max(area, 1) >= (
        rules.min_face_fraction
    ):
        return COUNTED
    return SMALL


def classes(row: dict[str, Any], rules: SelectSection) -> list[str]:
    """The class of each detection of one row of a faces parquet, in its order."""
    area = (row["width"] or 0) * (row["height"] or 0)
    return [face_class(f, rules, area) for f in row["faces"] or []]


def decide(row: dict[str, Any], rules: SelectSection) -> tuple[str | None, int]:
    """(drop reason or None, number of counted faces) for one row of a faces parquet."""
    if row["decode_error"]:
        return "decode_error", 0
    width, height = row["width"] or 0, row["height"] or 0
    if min(width, height) < rules.min_image_side:
        return "image_too_small", 0
    faces = row["faces"] or []
    if len(faces) < rules.min_faces:
        return "no_face", 0
    found = classes(row, rules)
    scoring = sum(c != LOW for c in found)
    if scoring < rules.min_faces:
        return "low_score", 0
    if rules.max_faces is not None and scoring > rules.max_faces:
        return "too_many_faces", 0
    counted = found.count(COUNTED)
    if counted < rules.min_faces:
        return "face_too_small", counted
    return None, counted


@dataclass(frozen=True)
class TableDecisions:
    """`decide` and `classes` over a whole faces table: `reason` indexes SELECT_REASONS (-1:
    kept), `n_faces` as `decide` gives it, `counted` the COUNTED flag of every detection."""

    reason: np.ndarray
    n_faces: np.ndarray
    counted: pa.ListArray

    @property
    def kept(self) -> np.ndarray:
        return self.reason < 0


def _float64(values: pa.Array) -> np.ndarray:
    # float32 widened to float64 before any arithmetic, as Python's floats see them in `decide`.
    return np.asarray(values.to_numpy(zero_copy_only=False), np.float64)


def decide_table(table: pa.Table, rules: SelectSection) -> TableDecisions:
    """`decide` and `classes` for every row of a faces table (columns width, height,
    decode_error, faces) at once, with the same results row for row (tests/test_select.py)."""
    faces = pc.fill_null(table["faces"].combine_chunks(), pa.scalar([], type=table["faces"].type))
    flat = faces.flatten()
    parent = pc.list_parent_indices(faces).to_numpy(zero_copy_only=False)
    width = pc.fill_null(table["width"], 0).to_numpy().astype(np.int64)
    height = pc.fill_null(table["height"], 0).to_numpy().astype(np.int64)
    x1, y1, x2, y2, score = (_float64(flat.field(n)) for n in ("x1", "y1", "x2", "y2", "score"))
    box_w, box_h = x2 - x1, y2 - y1
    area = np.maximum(width * height, 1).astype(np.float64)[parent]
    scoring = score >= rules.min_score
    counted = (
        scoring
        & (np.minimum(box_w, box_h) >= rules.min_face_size)
        & (box_w * box_h / area >= rules.min_face_fraction)
    )
    rows = table.num_rows
    n_scoring = np.bincount(parent, weights=scoring, minlength=rows).astype(np.int64)
    n_counted = np.bincount(parent, weights=counted, minlength=rows).astype(np.int64)
    detections = pc.list_value_length(faces).to_numpy(zero_copy_only=False)
    broken = pc.fill_null(pc.not_equal(table["decode_error"], ""), False).to_numpy(
        zero_copy_only=False
    )
    too_many = rules.max_faces is not None and n_scoring > rules.max_faces
    reasons = [
        broken,
        np.minimum(width, height) < rules.min_image_side,
        detections < rules.min_faces,
        n_scoring < rules.min_faces,
        np.asarray(too_many, bool) & np.ones(rows, bool),
        n_counted < rules.min_faces,
    ]
    reason = np.full(rows, -1, np.int8)
    for code in reversed(range(len(SELECT_REASONS))):  # the first reason that applies wins
        reason[reasons[code]] = code
    n_faces = np.where(
        (reason < 0) | (reason == SELECT_REASONS.index("face_too_small")), n_counted, 0
    )
    offsets = pc.subtract(faces.offsets, faces.offsets[0])  # a sliced array's start at 0
    flags = pa.ListArray.from_arrays(offsets, pa.array(counted, pa.bool_()))
    return TableDecisions(reason, n_faces, flags)
