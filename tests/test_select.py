"""Select: each dropped image gets exactly the documented reason; re-runs need no detector."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from laionface.config import SelectSection
from laionface.io import schemas, storage
from laionface.layout import SELECT_REASONS
from laionface.selection import COUNTED, classes, decide, decide_table
from laionface.stages.select import select_shard


def face(x1, y1, x2, y2, score):
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "landmarks": [0.0] * 10}


def row(faces, width=1000, height=800, error=None, key="000000000"):
    return {
        "key": key,
        "SAMPLE_ID": 1,
        "width": width,
        "height": height,
        "phash": 0,
        "sha256": "0" * 64,
        "decode_error": error,
        "faces": faces,
    }


RULES = SelectSection(min_score=0.9, min_faces=1, max_faces=3, min_face_size=64, min_image_side=100)
BIG = face(100, 100, 300, 340, 0.99)


@pytest.mark.parametrize(
    ("sample", "reason", "n_faces"),
    [
        (row([BIG]), None, 1),
        (row([BIG], error="cannot identify image file"), "decode_error", 0),
        (row([BIG], width=90), "image_too_small", 0),
        (row([]), "no_face", 0),
        (row([face(100, 100, 300, 340, 0.6)]), "low_score", 0),
        (row([BIG] * 4), "too_many_faces", 0),
        (row([face(10, 10, 50, 200, 0.99)]), "face_too_small", 0),
        # A small scoring face beside a big one: kept, one usable face.
        (row([BIG, face(10, 10, 40, 40, 0.95)]), None, 1),
        # Low-scoring detections do not count towards max_faces.
        (row([BIG, BIG, BIG, face(0, 0, 99, 99, 0.5)]), None, 3),
    ],
)
def test_each_reason(sample, reason, n_faces):
    assert decide(sample, RULES) == (reason, n_faces)


def test_boundaries_are_inclusive():
    exact = face(0, 0, 64, 64, 0.9)
    assert decide(row([exact]), RULES) == (None, 1)
    just_under = face(0, 0, 63.9, 64, 0.9)
    assert decide(row([just_under]), RULES)[0] == "face_too_small"


def test_face_fraction():
    rules = RULES.model_copy(update={"min_face_fraction": 0.1})
    assert decide(row([BIG]), rules)[0] == "face_too_small"  # 200x240 of 1000x800 = 6%
    assert decide(row([face(0, 0, 400, 400, 0.99)]), rules) == (None, 1)


def test_select_shard_writes_one_decision_per_image(tmp_path):
    small, weak = face(10, 10, 40, 40, 0.95), face(0, 0, 99, 99, 0.5)
    rows = [
        row([BIG, small, weak], key="000000000"),
        row([], key="000000001"),
        row([BIG], error="x", key="000000002"),
    ]
    faces_url = str(tmp_path / "faces" / "00000.parquet")
    storage.write_parquet(pa.Table.from_pylist(rows, schema=schemas.FACES), faces_url)
    out_url = str(tmp_path / "select" / "00000.parquet")
    stats = select_shard(faces_url, out_url, RULES.model_dump())
    table = storage.read_parquet(out_url)
    assert table.schema.equals(schemas.SELECT)
    assert table.column("kept").to_pylist() == [True, False, False]
    assert table.column("reason").to_pylist() == [None, "no_face", "decode_error"]
    # Which detections count, in the faces row's order: emit publishes the flag with each face.
    assert table.column("counted").to_pylist() == [[True, False, False], [], [True]]
    assert table.column("n_faces").to_pylist() == [1, 0, 0]
    assert stats == {"items": 3, "kept": 1, "dropped": {"no_face": 1, "decode_error": 1}}


def _random_faces_table(rng: np.random.Generator, rows: int) -> pa.Table:
    """Rows of a faces parquet with values on and around every threshold of RULES_GRID."""
    edges = np.array([0.5, 0.8, 0.9, 0.95, 0.99, 0.899999, 0.900001], np.float32)
    sides = np.array([20, 32, 63.9, 64, 64.1, 96, 128, 300], np.float32)
    out = []
    for i in range(rows):
        n = int(rng.integers(0, 6))
        faces = []
        for _ in range(n):
            x1, y1 = rng.integers(0, 400, 2).astype(np.float32)
            w, h = rng.choice(sides, 2)
            faces.append(face(x1, y1, x1 + w, y1 + h, float(rng.choice(edges))))
        sample = row(
            faces if (n or i % 7) else None,
            width=int(rng.choice([64, 99, 100, 640, 1000])),
            height=int(rng.choice([100, 480, 800])),
            error=("broken" if i % 29 == 0 else "" if i % 31 == 0 else None),
            key=f"{i:09d}",
        )
        out.append(sample)
    return pa.Table.from_pylist(out, schema=schemas.FACES)


RULES_GRID = [
    RULES,
    SelectSection(min_score=0.9, min_faces=2, max_faces=None, min_face_size=32),
    SelectSection(min_score=0.95, min_faces=1, min_face_size=96, min_face_fraction=0.01),
    SelectSection(min_score=0.8, min_faces=1, max_faces=1, min_image_side=100),
]


def test_the_table_decisions_equal_the_row_decisions():
    table = _random_faces_table(np.random.default_rng(7), 3000)
    samples = table.to_pylist()
    seen = set()
    for rules in RULES_GRID:
        decided = decide_table(table, rules)
        counted = decided.counted.to_pylist()
        for i, sample in enumerate(samples):
            reason, n_faces = decide(sample, rules)
            code = -1 if reason is None else SELECT_REASONS.index(reason)
            assert (decided.reason[i], decided.n_faces[i]) == (code, n_faces), (rules, sample)
            assert counted[i] == [c == COUNTED for c in classes(sample, rules)], (rules, sample)
        seen |= set(decided.reason.tolist())
    assert seen == set(range(-1, len(SELECT_REASONS))), "kept and every reason compared"
