"""`laionface run --dry-run`: it writes nothing, and the shards it says a run would make are the
ones the run makes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionface.cli import main
from laionface.config import ConfigError, load_config
from laionface.demo.corpus import DEMO_HOST
from laionface.demo.imageserver import ImageServer
from laionface.engine.dryrun import NEVER_MADE, dry_run
from laionface.engine.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "demo.toml"


@pytest.fixture(scope="module")
def server(demo_corpus):
    with ImageServer(demo_corpus.root) as running:
        yield running


def split_inputs(corpus, folder: Path) -> list[Path]:
    """The demo corpus's metadata as two input files of 180 rows."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(corpus.metadata_path)
    half = table.num_rows // 2
    paths = [folder / "a.parquet", folder / "b.parquet"]
    pq.write_table(table.slice(0, half), paths[0])
    pq.write_table(table.slice(half), paths[1])
    return paths


def small_settings(inputs: list[Path], server, *overrides: str) -> list[str]:
    """The demo on a few rows (the most similar captions) in shards of 5 rows."""
    return [
        f"metadata.input={json.dumps([str(p) for p in inputs])}",
        f'download.resolve={{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}',
        "cluster.dashboard_address=''",
        "metadata.min_similarity=0.42",
        "metadata.rows_per_shard=5",
        "emit.samples_per_shard=2",
        *overrides,
    ]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, demo_corpus, server):
    """Every stage of the small demo, once; tests copy the folder before changing it."""
    base = tmp_path_factory.mktemp("dry-run")
    inputs = split_inputs(demo_corpus, base / "inputs")
    run = base / "run"
    run_pipeline(
        load_config(DEMO, small_settings(inputs, server)), run_dir=str(run), progress=False
    )
    return run, inputs


@pytest.fixture()
def run_copy(small_run, tmp_path) -> tuple[Path, list[Path]]:
    run, inputs = small_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)  # copy2 keeps the files' times, so markers stay current
    return copy, inputs


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def marker_times(run: Path) -> dict[str, dict[str, int]]:
    """{step: {shard: mtime_ns of its completion marker}}."""
    out: dict[str, dict[str, int]] = {}
    for marker in run.rglob("_done/*.json"):
        step = marker.parent.parent.relative_to(run).as_posix()
        out.setdefault(step, {})[marker.stem] = marker.stat().st_mtime_ns
    return out


def test_a_dry_run_of_a_new_run_folder_plans_the_parts_and_writes_nothing(
    tmp_path, demo_corpus, server, capsys
):
    inputs = split_inputs(demo_corpus, tmp_path / "inputs")
    run = tmp_path / "run"
    argv = ["run", str(DEMO), "--run-dir", str(run), "--dry-run"]
    for setting in small_settings(inputs, server):
        argv += ["--set", setting]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert not run.exists()
    assert "inputs (metadata.input): 2 file(s), 360 rows" in out
    assert f"{inputs[0]}: 180 rows in 1 row group(s)" in out
    assert "planned: 2 metadata part(s)" in out and "at most 72 download shard(s)" in out
    assert "a LocalCluster on this machine: 2 worker processes" in out
    plan = dry_run(load_config(DEMO, small_settings(inputs, server)), run_dir=str(run))
    parts = plan.step("metadata/parts")
    assert parts.exact and set(parts.make) == set(parts.shards) == {"00000-00000", "00001-00000"}
    assert {reason for reason, _ in parts.make.values()} == {NEVER_MADE}
    assert not run.exists()


def test_a_complete_run_has_nothing_to_make_and_the_dry_run_changes_nothing(run_copy, server):
    run, inputs = run_copy
    before = files_of(run)
    plan = dry_run(load_config(DEMO, small_settings(inputs, server)), run_dir=str(run))
    assert files_of(run) == before
    assert [s.stage for s in plan.stages if s.would_make] == []
    assert plan.step("select").complete == len(plan.step("select").shards) == 3
    assert "select: runs: every shard is complete, nothing to make" in plan.text()


@pytest.mark.parametrize("change", ["deleted output", "changed setting"])
def test_the_shards_a_dry_run_names_are_the_ones_the_run_makes(run_copy, server, change):
    run, inputs = run_copy
    overrides = []
    if change == "deleted output":
        (run / "select" / "00001.parquet").unlink()
    else:
        overrides = ["select.min_image_side=63"]  # decides nothing differently here
    config = load_config(DEMO, small_settings(inputs, server, *overrides))
    # The stages after faces: the metadata stage's shards task records the run folder's path in
    # its token, so in a copied run folder it (and all after it) would run again.
    stages = "select,dedup,emit"
    plan = dry_run(config, run_dir=str(run), stages=stages)
    predicted = {
        step.step: set(step.make)
        for stage in plan.stages
        if stage.runs
        for step in stage.steps
        if step.make
    }
    before = marker_times(run)
    run_pipeline(config, run_dir=str(run), stages=stages, progress=False)
    after = marker_times(run)
    made = {
        step: {s for s, t in shards.items() if before.get(step, {}).get(s) != t}
        for step, shards in after.items()
    }
    assert predicted == {step: shards for step, shards in made.items() if shards}
    assert set(predicted) == {"select", "dedup/samples", "dedup/decisions", "emit"}
    if change == "changed setting":
        assert plan.stage("select").changed == {"select.min_image_side": (64, 63)}
        assert "settings changed since its last run: select.min_image_side 64 -> 63" in plan.text()
    else:
        assert plan.step("select").make == {"00001": ("output missing", "select/00001.parquet")}


def test_the_metadata_parts_it_names_are_exactly_those_the_run_redoes(
    tmp_path, demo_corpus, server
):
    inputs = split_inputs(demo_corpus, tmp_path / "inputs")
    run = tmp_path / "run"
    config = load_config(DEMO, small_settings(inputs, server))
    run_pipeline(config, run_dir=str(run), stages="metadata", progress=False)
    stamp = inputs[1].stat()
    os.utime(inputs[1], ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 5_000_000_000))
    plan = dry_run(config, run_dir=str(run), stages="metadata")
    parts = plan.step("metadata/parts")
    assert parts.make == {"00001-00000": ("input changed", str(inputs[1]))}
    before = marker_times(run)
    run_pipeline(config, run_dir=str(run), stages="metadata", progress=False)
    after = marker_times(run)
    for step in plan.stage("metadata").steps:
        remade = {s for s, t in after[step.step].items() if before[step.step].get(s) != t}
        assert set(step.make) == remade, step.step
    assert [s.stage for s in plan.stages if s.runs] == ["metadata"]
    assert plan.stage("download").follows == ""  # not run: nothing of it follows


def test_a_dry_run_stops_where_the_run_would(tmp_path):
    config = load_config(DEMO, ["metadata.input=[]"])
    with pytest.raises(ConfigError, match="metadata.input is empty"):
        dry_run(config, run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
