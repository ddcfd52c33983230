"""`laionface demo`, the README's first command, end to end as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq


def test_demo_runs_every_stage_and_says_where_results_are(tmp_path, demo_corpus):
    run_dir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "laionface", "demo", "--run-dir", str(run_dir), "--no-progress"]
        + ["--corpus-dir", str(demo_corpus.root)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"dataset: {run_dir / 'dataset'}" in done.stdout
    assert f"report:  {run_dir / 'audit' / 'report.html'}" in done.stdout

    status = json.loads((run_dir / "run.json").read_text())["stages"]
    for stage in ("metadata", "download", "faces", "select", "dedup", "emit"):
        assert status[stage]["status"] == "done", stage
    assert (run_dir / "audit" / "report.html").stat().st_size > 10_000

    # The published samples are the ones the corpus says hold faces: no sample in the dataset
    # comes from a broken URL, and every published sample's SAMPLE_ID is in the metadata.
    truth = {r["SAMPLE_ID"]: r for r in pq.read_table(demo_corpus.truth_path).to_pylist()}
    published = pq.read_table(run_dir / "dataset" / "manifest.parquet").to_pylist()
    assert published
    shards = sorted((run_dir / "dataset").glob("*.parquet"))
    ids = [
        i
        for s in shards
        if s.name != "manifest.parquet"
        for i in pq.read_table(s).column("SAMPLE_ID").to_pylist()
    ]
    assert len(ids) == len(published)
    assert all(truth[i]["case"] in ("ok", "redirect", "flaky") for i in ids)
    assert sum(truth[i]["n_faces"] > 0 for i in ids) >= 0.9 * len(ids)

    verified = subprocess.run(
        [sys.executable, "-m", "laionface", "verify", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    stats = subprocess.run(
        [sys.executable, "-m", "laionface", "stats", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stats.returncode == 0, stats.stderr
    assert "360" in stats.stdout  # every corpus row is in the funnel
