"""The demo's published dataset, read by the readers training engineers use, as they use them.

webdataset (decode, resize, batch), wids and OpenCLIP's own training reader run in their own
environment (.venv-readers: `make readers`; OpenCLIP needs torchvision, whose PyPI build needs a
CUDA torch that must not replace .venv's CPU one), on the files alone (tests/trainer_readers.py).
Hugging Face datasets and DuckDB run here. The commands that only read a run or a dataset are
checked to import no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from laionface.dataset import contract
from tests import datasetrun

REPO = Path(__file__).resolve().parents[1]
READERS_PYTHON = Path(
    os.environ.get("LAIONFACE_READERS_PYTHON", REPO / ".venv-readers" / "bin" / "python")
)


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_corpus) -> Path:
    return datasetrun.demo_run(tmp_path_factory, demo_corpus)


@pytest.fixture(scope="module")
def dataset(run) -> Path:
    return run / "dataset"


@pytest.fixture(scope="module")
def meta(dataset) -> dict:
    return json.loads((dataset / "dataset.json").read_text())


@pytest.fixture(scope="module")
def rows(dataset, meta) -> list[dict]:
    """Every sample's NNNNN.parquet row, in dataset order."""
    return [
        row
        for name in contract.shard_names(meta["counts"]["shards"])
        for row in pq.read_table(dataset / contract.parquet_name(name)).to_pylist()
    ]


def trainer_read(reader: str, dataset: Path) -> dict:
    if not READERS_PYTHON.exists():
        pytest.fail(
            f"{READERS_PYTHON} is missing: `make readers` creates the readers' environment "
            "(or set LAIONFACE_READERS_PYTHON to a Python with tests/readers-requirements.txt)"
        )
    done = subprocess.run(
        [str(READERS_PYTHON), str(REPO / "tests" / "trainer_readers.py"), reader, str(dataset)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_sample_counts_exactly_its_counted_faces(rows):
    with_small = 0
    for row in rows:
        assert len([f for f in row["faces"] if f["counted"]]) == row["n_faces"], row["key"]
        with_small += any(not f["counted"] for f in row["faces"])
    # The demo has faces that score but are under select.min_face_size: listed, not counted.
    assert with_small > 0
    assert len(rows) == 177


def test_json_and_parquet_hold_the_same_face_record(dataset, meta, rows):
    by_key = {row["key"]: row for row in rows}
    table = pq.read_table(dataset / "00000.parquet")
    face_type = table.schema.field("faces").type.value_type
    assert [face_type.field(i).name for i in range(face_type.num_fields)] == [
        "box",
        "landmarks",
        "score",
        "counted",
    ]
    with tarfile.open(dataset / "00000.tar") as tar:
        for info in tar:
            if not info.name.endswith(".json"):
                continue
            sample = json.loads(tar.extractfile(info).read())
            row = by_key[sample["key"]]
            assert sample == contract.sample_json(row)
            for face in sample["faces"]:
                numbers = np.array([*face["box"], *np.ravel(face["landmarks"]), face["score"]])
                # float32 values, exactly: the json's numbers survive a float32 round trip.
                assert np.array_equal(numbers.astype(np.float32).astype(np.float64), numbers)
            assert isinstance(sample["phash"], str) and len(sample["phash"]) == 16


def test_webdataset_pipeline_decodes_resizes_and_batches(dataset, rows):
    read = trainer_read("webdataset", dataset)
    assert read["keys"] == [row["key"] for row in rows]
    assert read["batch_shapes"] == [[3, 224, 224]]
    assert read["counted_ok"] and read["captions_ok"]


def test_wids_reads_by_index_through_the_named_shard_index(dataset, meta, rows):
    read = trainer_read("wids", dataset)
    assert read["length"] == len(rows) == meta["counts"]["samples"]
    assert read["dataset_name"] == meta["name"] == "demo"
    for index, sample in read["picked"].items():
        key = rows[int(index)]["key"]
        assert sample["key"] == sample["json_key"] == key
        assert sample["image_size"] == sample["json_size"]
        assert sample["counted_ok"]


def test_openclip_training_reader_counts_from_sizes_json(dataset, rows):
    read = trainer_read("openclip", dataset)
    assert read["dataset_size"] == len(rows) == 177
    assert read["shards"] == 4
    # OpenCLIP rounds an epoch up to whole batches of 8 (repeating a few samples): 23 batches.
    assert read["train_num_batches"] == 23 and read["train_num_samples"] == 184
    assert read["train_batches"] == [[8, 3, 224, 224]] * 23
    assert read["eval_samples"] == 177
    assert read["text_shapes"] == [[77]]


def _load(path: Path | str, tmp_path: Path, *args, **kwargs):
    import datasets

    return datasets.load_dataset(str(path), *args, cache_dir=str(tmp_path / "hf"), **kwargs)


def test_huggingface_loads_the_folder_by_its_card(dataset, rows, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    card = (dataset / "README.md").read_text()
    assert card.startswith(contract.card_configs("copy"))
    assert "## How it was made" in card and "| select | 327 | 186 |" in card
    assert "- `select.min_face_size` = `32`" in card

    loaded = _load(dataset, tmp_path, split="train")  # the default config: the shards
    assert loaded.num_rows == len(rows)
    assert {"jpg", "json", "txt", "__key__"} <= set(loaded.column_names)
    assert sorted(loaded["__key__"]) == sorted(row["key"] for row in rows)
    first = loaded[0]
    assert first["jpg"].size == (first["json"]["width"], first["json"]["height"])
    assert sum(f["counted"] for f in first["json"]["faces"]) == first["json"]["n_faces"]
    # The card types the json as the parquet is typed: float32 faces, not float64 guesses.
    assert loaded.features["json"] == dict(
        datasets.Features.from_arrow_schema(contract.DATASET_SHARD)
    )
    by_key = {row["key"]: row for row in rows}
    assert all(sample["json"] == by_key[sample["__key__"]] for sample in loaded)

    streamed = _load(dataset, tmp_path, split="train", streaming=True)
    keys = [sample["__key__"] for sample in streamed]
    assert sorted(keys) == sorted(row["key"] for row in rows)
    assert streamed.features["json"]["faces"].feature["score"].dtype == "float32"

    # The parquet files, as the card says (its configs all share the tars' builder).
    assert 'load_dataset("parquet", data_files=FOLDER + "/manifest.parquet")' in card
    manifest = _load("parquet", tmp_path, data_files=f"{dataset}/manifest.parquet", split="train")
    assert manifest.num_rows == len(rows)
    assert manifest.column_names == contract.MANIFEST.names
    samples = _load("parquet", tmp_path, data_files=f"{dataset}/[0-9]*.parquet", split="train")
    assert samples.column_names == contract.DATASET_SHARD.names
    assert samples.features["faces"].feature["score"].dtype == "float32"
    assert samples[5]["faces"] == rows[5]["faces"]


def test_duckdb_over_the_manifest(dataset, rows):
    import duckdb

    con = duckdb.connect()
    manifest = f"read_parquet('{dataset}/manifest.parquet')"
    shards = f"read_parquet('{dataset}/[0-9]*.parquet')"
    per_shard = con.execute(
        f"select m.shard, count(*), sum(s.n_faces), "
        f"sum(len(list_filter(s.faces, lambda f: f.counted))) "
        f"from {manifest} m join {shards} s using (key) group by m.shard order by m.shard"
    ).fetchall()
    sizes = json.loads((dataset / "sizes.json").read_text())
    assert [(shard, count) for shard, count, _, _ in per_shard] == [
        (name[:-4], count) for name, count in sorted(sizes.items())
    ]
    assert all(n_faces == counted for _, _, n_faces, counted in per_shard)
    row = con.execute(
        f"select tar, image_offset, image_size from {manifest} where key = ?", [rows[10]["key"]]
    ).fetchone()
    with open(dataset / row[0], "rb") as handle:
        handle.seek(row[1])
        assert hashlib.sha256(handle.read(row[2])).hexdigest() == rows[10]["sha256"]


TORCH_CHECK = """
import sys
from laionface.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in ("torch", "torchvision", "onnxruntime") if m in sys.modules)
print("LOADED", ",".join(loaded))
sys.exit(code)
"""


@pytest.mark.parametrize(
    "command",
    [
        ["verify", "{dataset}"],
        ["stats", "{run}"],
        ["report", "{run}", "--out", "{tmp}/report.html"],
        ["publish", "{run}", "{tmp}/published"],
        ["export", "{run}", "--format", "urls", "{tmp}/urls"],
        ["export", "{run}", "--format", "ids-parquet", "{tmp}/ids"],
    ],
    ids=lambda c: " ".join(c[:1] + [a for a in c[1:] if not a.startswith("{")]),
)
def test_commands_that_read_a_run_import_no_torch(command, run, dataset, tmp_path):
    args = [a.format(run=run, dataset=dataset, tmp=tmp_path) for a in command]
    done = subprocess.run(
        [sys.executable, "-c", TORCH_CHECK, *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "LOADED", done.stdout


def test_importing_laionface_imports_no_torch():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, laionface, laionface.cli; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "False", done.stderr
