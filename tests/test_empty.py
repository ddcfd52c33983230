"""Empty results are results: a run that keeps no row, for want of input rows or because a stage
dropped them all, completes every stage with an empty dataset that verifies, a funnel, exit 0,
and a warning naming the stage that kept nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionface.config import load_config
from laionface.dataset import contract
from laionface.dataset.verify import verify
from laionface.demo.corpus import DEMO_HOST
from laionface.demo.imageserver import ImageServer
from laionface.engine.pipeline import run_pipeline
from laionface.layout import STAGE_ORDER

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "demo.toml"


@pytest.fixture(scope="module")
def server(demo_corpus):
    with ImageServer(demo_corpus.root) as running:
        yield running


def demo_settings(metadata: Path, server, *overrides: str) -> list[str]:
    return [
        f"metadata.input={json.dumps([str(metadata)])}",
        f'download.resolve={{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}',
        "cluster.dashboard_address=''",
        *overrides,
    ]


def check_empty_dataset(run: Path) -> dict:
    """What a user checks of an empty result; returns dataset.json."""
    dataset = run / "dataset"
    meta = json.loads((dataset / contract.DATASET_JSON).read_text())
    assert meta["counts"] == {"samples": 0, "shards": 0}
    assert json.loads((dataset / contract.SIZES_JSON).read_text()) == {}
    assert json.loads((dataset / contract.SHARD_INDEX_JSON).read_text())["shardlist"] == []
    manifest = pq.read_table(dataset / contract.MANIFEST_PARQUET)
    assert manifest.num_rows == 0 and manifest.schema.equals(contract.MANIFEST)
    card = (dataset / contract.DATASET_CARD).read_text()
    assert "0 samples in 0 shards" in card and "This dataset is empty" in card
    assert verify(str(dataset)) == []
    assert meta["funnel"]["conservation"] == "ok" and meta["funnel"]["kept"] == 0
    # Every stage ran, on nothing: each is in the funnel, none is "without output".
    assert [s["stage"] for s in meta["funnel"]["stages"]] == list(STAGE_ORDER)
    assert meta["funnel"]["missing_stages"] == []
    assert (run / "audit" / "funnel.parquet").exists()
    state = json.loads((run / "run.json").read_text())
    assert {name: state["stages"][name]["status"] for name in STAGE_ORDER} == dict.fromkeys(
        STAGE_ORDER, "done"
    )
    return meta


def run_log(run: Path) -> str:
    return "\n".join(path.read_text() for path in sorted((run / "logs").iterdir()))


def test_an_input_of_no_rows_gives_an_empty_dataset(tmp_path, demo_corpus, server):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(demo_corpus.metadata_path).slice(0, 0), empty)
    run = tmp_path / "run"
    config = load_config(DEMO, demo_settings(empty, server))
    run_pipeline(config, run_dir=str(run), progress=False)
    meta = check_empty_dataset(run)
    assert meta["funnel"]["input_rows"] == 0
    assert "WARNING metadata: the input has no rows" in run_log(run)


def test_metadata_filters_that_drop_every_row_exit_0_with_a_warning(tmp_path, demo_corpus, server):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "laionface", "run", str(DEMO), "--run-dir", str(run)]
    for setting in demo_settings(demo_corpus.metadata_path, server, 'metadata.nsfw=["NONE"]'):
        command += ["--set", setting]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    warning = "metadata kept none of its 360 rows (dropped: nsfw 360)"
    assert warning in done.stderr and "the published dataset is empty (0 samples)" in done.stderr
    meta = check_empty_dataset(run)
    assert meta["funnel"]["input_rows"] == 360
    assert warning in run_log(run)


def test_select_dropping_every_image_gives_an_empty_dataset(tmp_path, demo_corpus, server):
    # A few rows (the most similar captions), so that download and faces have little to do.
    settings = demo_settings(
        demo_corpus.metadata_path,
        server,
        "metadata.min_similarity=0.42",
        "metadata.rows_per_shard=5",
        "select.min_faces=1000",
        "select.max_faces=none",
    )
    run = tmp_path / "run"
    run_pipeline(load_config(DEMO, settings), run_dir=str(run), progress=False)
    meta = check_empty_dataset(run)
    select = next(s for s in meta["funnel"]["stages"] if s["stage"] == "select")
    assert select["input"] > 0 and select["kept"] == 0
    assert f"select kept none of its {select['input']:,} rows" in run_log(run)
