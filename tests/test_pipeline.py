"""The pipeline's bookkeeping on the demo corpus: what a changed input redoes, and what run.json
and dataset.json record about the settings each stage ran with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionface.config import load_config
from laionface.dataset.verify import verify
from laionface.demo.corpus import DEMO_HOST
from laionface.demo.imageserver import ImageServer
from laionface.engine.pipeline import run_pipeline
from laionface.io import schemas

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(demo_corpus):
    with ImageServer(demo_corpus.root) as running:
        yield running


def demo_config(corpus, server, *overrides: str):
    return load_config(
        REPO / "pipelines" / "demo.toml",
        [
            f"metadata.input={json.dumps([str(corpus.metadata_path)])}",
            f'download.resolve={{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}',
            "cluster.dashboard_address=''",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_corpus, server) -> Path:
    """The whole demo pipeline, once; tests copy the folder before changing it."""
    run = tmp_path_factory.mktemp("pipeline") / "run"
    run_pipeline(demo_config(demo_corpus, server), run_dir=str(run), progress=False)
    return run


@pytest.fixture()
def run_copy(demo_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(demo_run, copy)  # copy2 keeps the files' times, so markers stay current
    return copy


def marker_times(run: Path, step: str) -> dict[str, int]:
    """{shard: mtime_ns of its completion marker}: a redone shard rewrites its marker."""
    return {p.stem: p.stat().st_mtime_ns for p in (run / step / "_done").glob("*.json")}


def dataset_raw_shards(run: Path) -> dict[str, set[str]]:
    """{dataset shard: the raw shards its samples came from}."""
    return {
        p.stem: set(pq.read_table(p, columns=["raw_shard"]).column(0).to_pylist())
        for p in sorted((run / "dataset").glob("[0-9]*.parquet"))
    }


def test_a_replaced_faces_shard_redoes_only_what_read_it(run_copy, demo_corpus, server):
    raw_shards = sorted(p.stem for p in (run_copy / "faces").glob("*.parquet"))
    last = raw_shards[-1]
    # The faces stage re-run on one shard: a detection score moves, the decisions do not.
    faces_url = run_copy / "faces" / f"{last}.parquet"
    rows = pq.read_table(faces_url).to_pylist()
    changed = next(r for r in rows if r["faces"])
    changed["faces"][0]["score"] = min(1.0, changed["faces"][0]["score"] + 1e-3)
    pq.write_table(pa.Table.from_pylist(rows, schema=schemas.FACES), faces_url)

    before = {
        step: marker_times(run_copy, step)
        for step in ("select", "dedup/samples", "dedup/decisions", "emit")
    }
    tars = {p.name: p.stat().st_mtime_ns for p in (run_copy / "dataset").glob("*.tar")}
    reads_last = {shard for shard, raws in dataset_raw_shards(run_copy).items() if last in raws}
    assert reads_last and reads_last != set(tars), "the check needs shards on both sides"

    config = demo_config(demo_corpus, server)
    run_pipeline(config, run_dir=str(run_copy), stages="select,dedup,emit", progress=False)

    after = {step: marker_times(run_copy, step) for step in before}
    redone = {step: {s for s in after[step] if after[step][s] != before[step][s]} for step in after}
    assert redone["select"] == {last}
    assert redone["dedup/samples"] == {last}
    assert redone["dedup/decisions"] == {"decisions"}
    assert redone["emit"] == reads_last
    # The other dataset shards were not rewritten at all.
    for name, stamp in tars.items():
        if name[: -len(".tar")] not in reads_last:
            assert (run_copy / "dataset" / name).stat().st_mtime_ns == stamp
    assert verify(str(run_copy / "dataset")) == []


def test_a_deleted_output_is_made_again(run_copy, demo_corpus, server):
    (run_copy / "select" / "00001.parquet").unlink()
    before = marker_times(run_copy, "select")
    run_pipeline(
        demo_config(demo_corpus, server), run_dir=str(run_copy), stages="select", progress=False
    )
    after = marker_times(run_copy, "select")
    assert {s for s in after if after[s] != before[s]} == {"00001"}
    assert (run_copy / "select" / "00001.parquet").exists()


def test_each_stage_records_the_settings_it_ran_with(run_copy, demo_corpus, server):
    state = json.loads((run_copy / "run.json").read_text())
    download_record = state["stages"]["download"]
    assert download_record["settings"]["download"]["timeout"] == 2.0
    assert download_record["settings"]["metadata.rows_per_shard"] == 100

    # A later command with other download settings that runs only select, dedup and emit.
    config = demo_config(demo_corpus, server, "download.timeout=9.0", "select.min_score=0.95")
    run_pipeline(config, run_dir=str(run_copy), stages="select,dedup,emit", progress=False)

    state = json.loads((run_copy / "run.json").read_text())
    assert state["config"]["download"]["timeout"] == 9.0  # the last command's config
    assert state["stages"]["download"]["settings"] == download_record["settings"]
    assert state["stages"]["download"]["versions"] == download_record["versions"]
    assert state["stages"]["select"]["settings"]["select"]["min_score"] == 0.95
    meta = json.loads((run_copy / "dataset" / "dataset.json").read_text())
    assert meta["stages"]["download"]["settings"]["download"]["timeout"] == 2.0
    assert meta["stages"]["select"]["settings"]["select"]["min_score"] == 0.95
    assert meta["stages"]["emit"]["settings"]["select.min_score"] == 0.95
    assert set(meta["stages"]) == {"metadata", "download", "faces", "select", "dedup", "emit"}
    assert meta["funnel"]["conservation"] == "ok"
    assert verify(str(run_copy / "dataset")) == []
