"""`laionface diff RUN_A RUN_B`: the settings that differ, the funnels side by side, and the keys
kept by one run only, on the demo run and a copy of it re-selected with stricter thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from laionface.audit import diff as diffing
from laionface.audit.funnel import funnel
from laionface.cli import main
from laionface.io import storage
from tests import datasetrun
from tests.test_sweep import rerun


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_corpus) -> tuple[Path, Path]:
    demo = datasetrun.demo_run(tmp_path_factory, demo_corpus)
    stricter = rerun(
        demo,
        demo_corpus,
        tmp_path_factory.mktemp("diff"),
        "select.min_score=0.95",
        "select.min_face_size=48",
    )
    return demo, stricter


def published(run: Path) -> dict[str, int]:
    """{key: SAMPLE_ID} of the run's published samples."""
    db = duckdb.connect()
    return dict(db.execute(f"select key, SAMPLE_ID from '{run}/dataset/0*.parquet'").fetchall())


def fates(run: Path) -> dict[str, str]:
    """Each image's fate in the run, read from select/ and the dedup decisions."""
    db = duckdb.connect()
    out = {
        key: "kept" if kept else f"select/{reason}"
        for key, kept, reason in db.execute(
            f"select key, kept, reason from '{run}/select/*.parquet'"
        ).fetchall()
    }
    for key, reason in db.execute(
        f"select key, reason from '{run}/dedup/decisions.parquet' where not kept"
    ).fetchall():
        out[key] = f"dedup/{reason}"
    return out


def test_the_settings_that_differ_are_listed(runs):
    a, b = runs
    rows = {(r["where"], r["key"]): (r["a"], r["b"]) for r in diffing.settings_diff(str(a), str(b))}
    assert rows[("stage select", "select.min_score")] == (0.9, 0.95)
    assert rows[("stage select", "select.min_face_size")] == (32, 48)
    assert rows[("config", "select.min_score")] == (0.9, 0.95)
    # Stages that ran with the same settings are not listed.
    assert not [key for key in rows if key[0] in ("stage faces", "stage download")]


def test_the_funnels_stand_side_by_side(runs):
    a, b = runs
    result = diffing.diff(str(a), str(b))
    counts = {side: {} for side in "ab"}
    for side, run in (("a", a), ("b", b)):
        for row in funnel(str(run)).rows():
            counts[side][(row["stage"], row["outcome"], row["reason"])] = row["count"]
    shown = {(r["stage"], r["outcome"], r["reason"]): (r["a"], r["b"]) for r in result.funnel}
    assert set(shown) == set(counts["a"]) | set(counts["b"])
    assert all(shown[k] == (counts["a"].get(k, 0), counts["b"].get(k, 0)) for k in shown)
    assert [r["stage"] for r in result.funnel][0] == "metadata"


def test_keys_kept_by_one_run_only_with_their_fate_in_the_other(
    runs, tmp_path, monkeypatch, capsys
):
    a, b = runs
    kept_a, kept_b = published(a), published(b)
    fate_a, fate_b = fates(a), fates(b)
    a_only = sorted(set(kept_a) - set(kept_b))
    b_only = sorted(set(kept_b) - set(kept_a))
    assert a_only  # the stricter run dropped some

    monkeypatch.setattr(diffing, "SHARDS_PER_BATCH", 1)  # several batches into one file
    out = tmp_path / "keys.parquet"
    assert main(["diff", str(a), str(b), "--json", "--out", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    keys = data["keys"]
    assert (keys["kept_by_a_only"], keys["kept_by_b_only"]) == (len(a_only), len(b_only))
    expected = {}
    for key in a_only:
        expected[fate_b[key]] = expected.get(fate_b[key], 0) + 1
    assert keys["a_only_fate_in_b"] == expected
    assert keys["examples"]["a_only"] == a_only[: diffing.EXAMPLES]

    written = storage.read_parquet(str(out)).to_pylist()
    assert [r["key"] for r in written] == sorted(a_only + b_only)
    for row in written:
        assert row["kept_by"] == ("A" if row["key"] in kept_a else "B")
        assert (row["fate_a"], row["fate_b"]) == (fate_a[row["key"]], fate_b[row["key"]])
        assert row["SAMPLE_ID"] == {**kept_a, **kept_b}[row["key"]]


def test_the_text_says_it_all_and_exits_0(runs, capsys):
    a, b = runs
    assert main(["diff", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "stage select  select.min_score" in text
    assert f"kept by A, not by B: {len(set(published(a)) - set(published(b)))}" in text
    # A run compared with itself: nothing differs.
    assert main(["diff", str(a), str(a)]) == 0
    same = capsys.readouterr().out
    assert "settings that differ:\n  none" in same
    assert "kept by A, not by B: 0" in same and "kept by B, not by A: 0" in same


def test_a_folder_that_is_no_run_is_an_error(runs, tmp_path, capsys):
    a, _ = runs
    assert main(["diff", str(a), str(tmp_path)]) == 1
    assert "not a laionface run folder" in capsys.readouterr().err
