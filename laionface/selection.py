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

from typing import Any

from laionface.config import SelectSection

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
