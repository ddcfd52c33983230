"""`laionface sweep`: what select and dedup would keep at each grid point, from the recorded
detections, equal to what `laionface run --stages select,dedup,emit` gives there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from laionface.audit import sweep as sweeping
from laionface.audit.funnel import funnel
from laionface.cli import main
from laionface.config import ConfigError, SelectSection
from laionface.io import storage
from tests import datasetrun

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "demo.toml"
GRID = ["select.min_score=0.8,0.9,0.95", "select.min_face_size=32,64,96"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_corpus) -> Path:
    return datasetrun.demo_run(tmp_path_factory, demo_corpus)


@pytest.fixture(scope="module")
def swept(demo) -> sweeping.Sweep:
    return sweeping.sweep(str(demo), GRID)


def rerun(run: Path, corpus, folder: Path, *settings: str) -> Path:
    """A copy of `run` with select, dedup and emit run again by the command, at `settings`."""
    copy = folder / "rerun"
    shutil.copytree(run, copy)  # copy2 keeps the files' times, so markers stay current
    code = main(
        [
            "run",
            str(DEMO),
            "--run-dir",
            str(copy),
            "--stages",
            "select,dedup,emit",
            "--no-progress",
            "--set",
            f"metadata.input={json.dumps([str(corpus.metadata_path)])}",
            "--set",
            "cluster.dashboard_address=''",
            *[arg for setting in settings for arg in ("--set", setting)],
        ]
    )
    assert code == 0
    return copy


def figures_of(run: Path) -> tuple[int, int, int, int]:
    """(images select kept, their counted faces, samples published, their counted faces), read
    from the run's files."""
    db = duckdb.connect()
    select = db.execute(
        f"select count(*), coalesce(sum(n_faces), 0) from '{run}/select/*.parquet' where kept"
    ).fetchone()
    published = db.execute(
        f"select count(*), coalesce(sum(n_faces), 0) from '{run}/dataset/0*.parquet'"
    ).fetchone()
    return (*select, *published)


def point(result: sweeping.Sweep, **settings) -> sweeping.SweepPoint:
    return next(p for p in result.points if p.settings == settings)


@pytest.mark.parametrize(
    "min_score, min_face_size",
    [(0.9, 32), (0.95, 64), (0.9, 96), (0.95, 32)],
)
def test_figures_equal_a_rerun_of_select_dedup_emit(
    demo, demo_corpus, swept, tmp_path, min_score, min_face_size
):
    shown = point(swept, min_score=min_score, min_face_size=min_face_size)
    again = rerun(
        demo,
        demo_corpus,
        tmp_path,
        f"select.min_score={min_score}",
        f"select.min_face_size={min_face_size}",
    )
    figures = (shown.select_kept, shown.select_faces, shown.dedup_kept, shown.dedup_faces)
    assert figures == figures_of(again)
    result = funnel(str(again))
    assert (shown.select_kept, shown.dedup_kept) == (
        result.stage("select").kept,
        result.stage("dedup").kept,
    )
    assert shown.is_run == ((min_score, min_face_size) == (0.9, 32))


def test_a_looser_point_is_marked_and_bounded(demo, demo_corpus, swept, tmp_path):
    shown = point(swept, min_score=0.8, min_face_size=32)
    again = rerun(demo, demo_corpus, tmp_path, "select.min_score=0.8", "select.min_face_size=32")
    kept, faces, published, _ = figures_of(again)
    assert (shown.select_kept, shown.select_faces) == (kept, faces)
    # Images the run's select dropped were never compared by dedup: no exact figure, a bound.
    assert shown.unhashed > 0 and shown.dedup_kept is None and shown.dedup_faces is None
    assert published <= shown.dedup_kept_at_most
    assert shown.as_dict()["exact"] is False
    assert any(line.startswith("* some images kept there") for line in sweeping.notes(swept))
    assert "<= " in sweeping.format_table(swept)


def _chain(run: Path) -> dict[str, str]:
    """Make three images the run kept alone a chain A - B - C: pHash distances 3 (A-B) and 3
    (B-C), 6 (A-C), so A and C are linked only through B; B, with the most pixels, is the keeper,
    and its scores are cut to 0.92 at most (kept at select.min_score 0.9, dropped at 0.95).
    Rewrites the faces files; returns {"A": key, "B": key, "C": key}."""
    db = duckdb.connect()
    decisions = f"'{run}/dedup/decisions.parquet'"
    alone = db.execute(
        f"""select f.key, f.phash from '{run}/faces/*.parquet' f join {decisions} d using (key)
            where d.kept and (select count(*) from {decisions} o where o.cluster = d.cluster) = 1
              and list_min(list_transform(f.faces, lambda x: x.score)) > 0.96
            order by f.width * f.height desc, f.key"""
    ).fetchall()
    hashes = dict(db.execute(f"select key, phash from '{run}/faces/*.parquet'").fetchall())
    a_key, c_key = alone[-1][0], alone[-2][0]
    for b_key, b_hash in alone[:-2]:
        phash = {a_key: b_hash ^ 0b111, b_key: b_hash, c_key: b_hash ^ 0b111000}
        others = [h for k, h in hashes.items() if k not in phash]
        if all(bin(h ^ v).count("1") > 4 for h in others for v in phash.values()):
            break
    else:
        pytest.fail("no image of the demo run can be made the middle of a chain")
    for url in storage.list_files(f"{run}/faces", ".parquet"):
        table = storage.read_parquet(url)
        if not set(phash) & set(table["key"].to_pylist()):
            continue
        rows = table.to_pylist()
        for row in rows:
            row["phash"] = phash.get(row["key"], row["phash"])
            if row["key"] == b_key:
                for face in row["faces"]:
                    face["score"] = min(face["score"], 0.92)
        storage.write_parquet(pa.Table.from_pylist(rows, schema=table.schema), url)
    return {"A": a_key, "B": b_key, "C": c_key}


def test_a_cluster_that_loses_its_middle_splits_as_a_rerun_splits_it(demo, demo_corpus, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    chained = base / "run"
    shutil.copytree(demo, chained)
    chain = _chain(chained)
    run = rerun(chained, demo_corpus, base)  # select, dedup and emit see the chain
    decisions = storage.read_parquet(f"{run}/dedup/decisions.parquet").to_pylist()
    fate = {row["key"]: row for row in decisions}
    assert {fate[k]["duplicate_of"] for k in (chain["A"], chain["C"])} == {chain["B"]}

    result = sweeping.sweep(str(run), ["select.min_score=0.9,0.95"])
    shown = point(result, min_score=0.95)
    again = rerun(run, demo_corpus, tmp_path, "select.min_score=0.95")
    assert (shown.select_kept, shown.select_faces, shown.dedup_kept, shown.dedup_faces) == (
        figures_of(again)
    )
    # B is gone; A and C, no longer linked, are both kept (the recorded cluster kept one).
    kept = storage.read_parquet(f"{again}/dedup/decisions.parquet", columns=["key", "kept"])
    kept = set(kept.filter(pc.field("kept"))["key"].to_pylist())
    assert {chain["A"], chain["C"]} <= kept and chain["B"] not in kept
    assert point(result, min_score=0.9).dedup_kept == funnel(str(run)).stage("dedup").kept


def test_the_command_prints_a_table_and_json(demo, capsys):
    assert main(["sweep", str(demo), *[a for g in GRID for a in ("--grid", g)]]) == 0
    text = capsys.readouterr().out
    assert "(the run's)" in text and "select.min_face_size" in text
    assert main(["sweep", str(demo), "--grid", GRID[0], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["select.min_score"] for p in data["points"]] == [0.8, 0.9, 0.95]
    assert data["run_select"]["select.min_score"] == 0.9 and data["dedup"] == "recorded"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("select.min_score=0.8,1.5", "--grid select.min_score"),
        ("select.min_scor=0.8", "expected select.KEY=V1,V2"),
        ("faces.max_size=640", "expected select.KEY=V1,V2"),
        ("select.min_faces=1,[2", "not a TOML value"),
    ],
)
def test_a_bad_grid_is_an_error_naming_it(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        sweeping.parse_grid([spec], SelectSection().model_dump())


def test_a_key_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="given twice"):
        sweeping.parse_grid(
            ["select.min_score=0.8", "select.min_score=0.9"], SelectSection().model_dump()
        )


def test_with_dedup_off_what_select_keeps_is_published(demo, demo_corpus, tmp_path):
    off = ("dedup.exact=false", "dedup.near=false")
    again = rerun(demo, demo_corpus, tmp_path, "select.min_score=0.95", *off)
    result = sweeping.sweep(str(again), ["select.min_score=0.9,0.95"])
    assert result.dedup == sweeping.OFF
    assert all(
        (p.dedup_kept, p.dedup_faces) == (p.select_kept, p.select_faces) for p in result.points
    )
    shown = point(result, min_score=0.95)
    assert shown.is_run
    assert (shown.select_kept, shown.select_faces) * 2 == figures_of(again)
    assert any("dedup is off" in line for line in sweeping.notes(result))
