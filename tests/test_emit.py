"""Emit: the published dataset, read by the clients users train with, matches manifests/."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from laionface.config import ConfigError, load_config
from laionface.dataset import contract
from laionface.dataset.manifests import manifest_files
from laionface.dataset.verify import verify
from laionface.engine.runner import StageFailed
from laionface.io import storage
from laionface.io.tars import iter_members
from laionface.stages.emit.plan import EmitError, kept_keys, plan_samples
from tests import datasetrun

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
SHARDS = ["00000", "00001", "00002", "00003", "00004"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_faces):
    return datasetrun.built_run(tmp_path_factory, shared_faces)


def tar_samples(path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order, read with plain tarfile."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tar.extractfile(info).read()
    return out


def shard_rows(dataset) -> list[dict]:
    return [
        r for s in SHARDS for r in storage.read_parquet(str(dataset / f"{s}.parquet")).to_pylist()
    ]


def test_layout_counts_and_documented_order(built):
    dataset = built.dataset
    names = sorted(p.name for p in dataset.iterdir())
    assert names == sorted(
        [f"{s}.tar" for s in SHARDS]
        + [f"{s}.parquet" for s in SHARDS]
        + ["sizes.json", "shardindex.json", "manifest.parquet", "README.md", "dataset.json"]
    )
    # 24 rows: 1 missing URL, 1 broken image, 1 blank (no face), 1 tiny, 1 exact duplicate.
    assert json.loads((dataset / "sizes.json").read_text()) == {
        "00000.tar": 4,
        "00001.tar": 4,
        "00002.tar": 4,
        "00003.tar": 4,
        "00004.tar": 3,
    }
    keys = []
    for shard in SHARDS:
        samples = tar_samples(dataset / f"{shard}.tar")
        rows = storage.read_parquet(str(dataset / f"{shard}.parquet")).to_pylist()
        assert [k for k, _ in samples] == [r["key"] for r in rows]
        keys += [k for k, _ in samples]
        with tarfile.open(dataset / f"{shard}.tar") as tar:
            members = tar.getmembers()
        assert [m.name.split(".", 1)[1] for m in members] == ["jpg", "json", "txt"] * len(rows)
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
            (0, 0, 0, "", "", 0o644)
        }
    assert keys == built.published_keys == sorted(keys)
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    urls = [r["url"].rsplit("/", 1)[1] for r in shard_rows(dataset)]
    for dropped in ("blank.jpg", "tiny.jpg", "broken.jpg", "missing.jpg", "copy-astronaut.png"):
        assert dropped not in urls


def test_what_emit_writes_matches_manifests(built):
    dataset = built.dataset
    sample_schema = json.loads((MANIFESTS / "sample.schema.json").read_text())
    dataset_schema = json.loads((MANIFESTS / "dataset.schema.json").read_text())
    meta = json.loads((dataset / "dataset.json").read_text())
    jsonschema.validate(meta, dataset_schema)
    assert meta["counts"] == {"samples": 19, "shards": 5}
    funnel = {stage["stage"]: stage for stage in meta["funnel"]["stages"]}
    assert funnel["emit"]["kept"] == 19
    assert funnel["select"]["dropped"] == {"image_too_small": 1, "no_face": 1}
    assert funnel["dedup"]["dropped"] == {"exact_duplicate": 1}
    for name, entry in meta["files"].items():
        data = (dataset / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"])

    def contract_names(name):
        return [f["name"] for f in json.loads((MANIFESTS / name).read_text())["fields"]]

    # manifests/*.arrow.json are generated from these schemas (test below); parquet may name a
    # list's item field "element", which Schema.equals rightly ignores.
    manifest = storage.read_parquet(str(dataset / "manifest.parquet"))
    assert manifest.schema.equals(contract.MANIFEST)
    assert manifest.schema.names == contract_names("manifest.arrow.json")
    rows = {}
    for shard in SHARDS:
        table = storage.read_parquet(str(dataset / f"{shard}.parquet"))
        assert table.schema.equals(contract.DATASET_SHARD)
        assert table.schema.names == contract_names("dataset_shard.arrow.json")
        rows.update({r["key"]: r for r in table.to_pylist()})
        for key, members in tar_samples(dataset / f"{shard}.tar"):
            sample = json.loads(members["json"])
            jsonschema.validate(sample, sample_schema)
            row = rows[key]
            assert sample["sha256"] == hashlib.sha256(members["jpg"]).hexdigest() == row["sha256"]
            assert members["txt"].decode() == sample["caption"] == row["caption"]
            with Image.open(io.BytesIO(members["jpg"])) as image:
                assert image.size == (sample["width"], sample["height"])
            # The 0.61 detection is below min_score: not published. The 6 px one scores but is
            # under min_face_size: published, not counted.
            assert [f["score"] for f in sample["faces"]] == pytest.approx([0.998, 0.95])
            assert [f["counted"] for f in sample["faces"]] == [True, False]
            assert sample["n_faces"] == 1 and len(sample["faces"][0]["landmarks"]) == 5
            # One face record in both files, with the same float32 values.
            assert sample["faces"] == row["faces"]
            box = sample["faces"][0]["box"]
            assert np.array_equal(np.float32(box).astype(np.float64), np.array(box))
            assert key.startswith(sample["raw_shard"]) and sample["SAMPLE_ID"] == row["SAMPLE_ID"]


def test_manifests_folder_is_generated_from_the_code():
    on_disk = {p.name: p.read_text() for p in MANIFESTS.iterdir()}
    assert on_disk == manifest_files(), (
        "manifests/ is stale: regenerate it with python -m laionface.dataset.manifests manifests"
    )


def test_webdataset_reads_every_sample(built):
    import webdataset as wds

    urls = str(built.dataset / "{00000..00004}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == built.published_keys
    for sample in samples:
        assert isinstance(sample["jpg"], Image.Image)
        assert sample["jpg"].size == (sample["json"]["width"], sample["json"]["height"])
        assert set(sample["json"]) == set(contract.DATASET_SHARD.names)
        assert sample["txt"] == sample["json"]["caption"]


def _hf_load(folder, tmp_path, monkeypatch, *config):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    return datasets.load_dataset(
        str(folder), *config, split="train", cache_dir=str(tmp_path / "hf")
    )


def test_huggingface_datasets_loads_the_folder_by_its_card(built, tmp_path, monkeypatch):
    loaded = _hf_load(built.dataset, tmp_path, monkeypatch)
    assert loaded.num_rows == 19
    assert {"jpg", "json", "txt", "__key__"} <= set(loaded.column_names)
    assert sorted(loaded["__key__"]) == built.published_keys
    first = loaded[0]
    assert first["jpg"].size == (first["json"]["width"], first["json"]["height"])
    card = (built.dataset / "README.md").read_text()
    assert card.startswith(contract.card_configs("copy"))
    assert "| dedup | 20 | 19 | exact_duplicate: 1 |" in card
    assert "- `emit.samples_per_shard` = `4`" in card


def test_wids_random_access_through_shardindex(built, tmp_path):
    import wids

    dataset = wids.ShardListDataset(
        str(built.dataset / "shardindex.json"), cache_dir=str(tmp_path / "wids")
    )
    assert len(dataset) == 19
    assert dataset.dataset_name == "emit-test"  # shardindex.json names the dataset
    sample = dataset[6]
    assert sample["__key__"] == built.published_keys[6]
    assert sample[".json"]["key"] == built.published_keys[6]
    assert sample[".jpg"].size == (sample[".json"]["width"], sample[".json"]["height"])


def test_duckdb_queries_manifest_and_shard_parquet(built):
    import duckdb

    folder = built.dataset
    con = duckdb.connect()
    shards = f"read_parquet('{folder}/[0-9]*.parquet')"
    manifest = f"read_parquet('{folder}/manifest.parquet')"
    assert con.execute(f"select count(*) from {manifest}").fetchone()[0] == 19
    assert con.execute(f"select count(*) from {shards}").fetchone()[0] == 19
    joined = con.execute(
        f"select m.shard, count(*), sum(s.n_faces), max(s.faces[1].score) "
        f"from {manifest} m join {shards} s using (key) group by m.shard order by m.shard"
    ).fetchall()
    assert [(r[0], r[1], r[2]) for r in joined] == [
        ("00000", 4, 4),
        ("00001", 4, 4),
        ("00002", 4, 4),
        ("00003", 4, 4),
        ("00004", 3, 3),
    ]
    assert all(r[3] == pytest.approx(0.998) for r in joined)


def test_openclip_count_from_sizes_json_is_the_true_count(built):
    sizes = json.loads((built.dataset / "sizes.json").read_text())
    counted = sum(len(tar_samples(built.dataset / name)) for name in sizes)
    assert sum(sizes.values()) == counted == 19


def test_random_access_by_offset_from_the_manifest(built):
    rows = storage.read_parquet(str(built.dataset / "manifest.parquet")).to_pylist()
    shard_sha = {r["key"]: r["sha256"] for r in shard_rows(built.dataset)}
    assert [r["key"] for r in rows] == built.published_keys
    for row in rows:
        with open(built.dataset / row["tar"], "rb") as handle:
            handle.seek(row["image_offset"])
            image = handle.read(row["image_size"])
            handle.seek(row["json_offset"])
            sample = json.loads(handle.read(row["json_size"]))
            handle.seek(row["sample_offset"])
            whole = handle.read(row["sample_size"])
        assert hashlib.sha256(image).hexdigest() == shard_sha[row["key"]] == sample["sha256"]
        assert sample["key"] == row["key"]
        members = {m.name: d for m, d in iter_members(io.BytesIO(whole), source="range")}
        key = row["key"]
        assert list(members) == [f"{key}.jpg", f"{key}.json", f"{key}.txt"]
        assert members[f"{key}.jpg"] == image


def test_rerun_is_byte_identical_skips_done_shards_and_redoes_deleted_ones(built, tmp_path):
    run = datasetrun.copy_run(built, tmp_path)
    shutil.rmtree(run / "dataset")
    shutil.rmtree(run / "emit")
    config = datasetrun.emit_config()
    datasetrun.run_emit(run, config)
    for path in built.dataset.iterdir():
        if path.name != "dataset.json":
            assert (run / "dataset" / path.name).read_bytes() == path.read_bytes(), path.name

    (run / "dataset" / "00002.tar").unlink()
    before = (run / "dataset" / "00001.tar").stat().st_mtime_ns
    datasetrun.run_emit(run, config)
    status = json.loads((run / "run.json").read_text())["stages"]["emit"]
    assert status["shards_skipped"] == 4
    assert (run / "dataset" / "00001.tar").stat().st_mtime_ns == before
    assert (run / "dataset" / "00002.tar").read_bytes() == (
        built.dataset / "00002.tar"
    ).read_bytes()
    assert verify(str(run / "dataset")) == []


def test_manifest_mode_points_into_the_raw_tars(built, tmp_path, monkeypatch):
    run = datasetrun.copy_run(built, tmp_path)
    datasetrun.run_emit(run, datasetrun.emit_config("manifest"))
    dataset = run / "dataset"
    # No image is copied: the copy mode's tars and index files are gone.
    assert sorted(p.name for p in dataset.iterdir()) == sorted(
        [f"{s}.parquet" for s in SHARDS] + ["manifest.parquet", "README.md", "dataset.json"]
    )
    assert (dataset / "README.md").read_text().startswith(contract.card_configs("manifest"))
    meta = json.loads((dataset / "dataset.json").read_text())
    jsonschema.validate(meta, json.loads((MANIFESTS / "dataset.schema.json").read_text()))
    assert meta["mode"] == "manifest" and meta["source_root"] == str(run)
    assert shard_rows(dataset) == shard_rows(built.dataset)
    copy_rows = {
        r["key"]: r
        for r in storage.read_parquet(str(built.dataset / "manifest.parquet")).to_pylist()
    }
    for row in storage.read_parquet(str(dataset / "manifest.parquet")).to_pylist():
        assert row["tar"] == f"raw/{row['key'][:5]}.tar"
        with open(run / row["tar"], "rb") as handle:
            handle.seek(row["image_offset"])
            image = handle.read(row["image_size"])
            handle.seek(row["json_offset"])
            raw_json = json.loads(handle.read(row["json_size"]))
        assert raw_json["key"] == row["key"] and raw_json["SAMPLE_ID"] == row["SAMPLE_ID"]
        copied = (built.dataset / f"{row['shard']}.tar").read_bytes()
        start, size = copy_rows[row["key"]]["image_offset"], copy_rows[row["key"]]["image_size"]
        assert image == copied[start : start + size]
    assert verify(str(dataset)) == []
    # No tars: Hugging Face loads the shard parquets by default, the manifest as the other config.
    samples = _hf_load(dataset, tmp_path, monkeypatch)
    assert samples["key"] == [r["key"] for r in shard_rows(dataset)]
    assert samples.features["faces"].feature["box"].feature.dtype == "float32"
    assert (
        _hf_load(dataset, tmp_path, monkeypatch, "manifest").column_names == contract.MANIFEST.names
    )

    # A raw tar changed after emit: verify says so.
    with open(run / "raw" / "00001.tar", "ab") as raw:
        raw.write(b"\0" * 512)  # more end padding: the tar still parses, but it is not the same
    assert verify(str(dataset)) == [
        "raw/00001.tar: sha256 or size differs from dataset.json's sources (the raw tar changed)"
    ]


def test_emit_needs_current_dedup_decisions(built, tmp_path):
    run = datasetrun.copy_run(built, tmp_path)
    decisions = run / "dedup" / "decisions.parquet"
    table = storage.read_parquet(str(decisions))
    storage.write_parquet(table.slice(1), str(decisions))
    with pytest.raises(EmitError, match="stale; re-run the dedup and emit stages"):
        plan_samples(str(run), True, run_here)
    decisions.unlink()
    with pytest.raises(EmitError, match="run the dedup stage first"):
        plan_samples(str(run), True, run_here)
    # With dedup disabled, select's output is published: the duplicate comes back.
    assert plan_samples(str(run), False, run_here).total == 20


def test_emit_refuses_a_raw_shard_without_select_output(built, tmp_path):
    run = datasetrun.copy_run(built, tmp_path)
    (run / "select" / "00002.parquet").unlink()
    with pytest.raises(EmitError, match=r"select/00002\.parquet\): run the faces and select"):
        plan_samples(str(run), True, run_here)


def test_plan_orders_samples_by_raw_shard_then_key(built):
    plan = plan_samples(str(built.run), True, run_here)
    pairs = [
        (raw, key)
        for raw in plan.raws
        for key in kept_keys(str(built.run), raw, plan.dedup).to_pylist()
    ]
    assert pairs == sorted(pairs) and [k for _, k in pairs] == built.published_keys
    assert plan.counts == [sum(raw == r for raw, _ in pairs) for r in plan.raws]


def test_a_decision_for_a_key_of_no_select_shard_is_stale(built, tmp_path):
    run = datasetrun.copy_run(built, tmp_path)
    decisions = run / "dedup" / "decisions.parquet"
    table = storage.read_parquet(str(decisions))
    stray = table.slice(0, 1).set_column(0, "key", pa.array(["999990000"]))
    storage.write_parquet(pa.concat_tables([table, stray]), str(decisions))
    with pytest.raises(EmitError, match="1 decision\\(s\\) for keys of no select shard"):
        plan_samples(str(run), True, run_here)


def run_here(fn, kwargs: list[dict]) -> list:
    """plan_samples's per-raw-shard tasks, run in this process."""
    return [fn(**k) for k in kwargs]


def test_max_shard_bytes_cuts_shards_before_they_pass_the_size(built, tmp_path):
    by_count = storage.read_parquet(str(built.dataset / "manifest.parquet")).to_pylist()
    samples_bytes = [row["sample_size"] for row in by_count]
    # Room for about two typical samples: some shards are cut by size, some by count.
    limit = contract.tar_bytes(2 * sorted(samples_bytes)[len(samples_bytes) // 2])
    run = datasetrun.copy_run(built, tmp_path)
    config = datasetrun.emit_config()
    config.emit.max_shard_bytes = limit
    datasetrun.run_emit(run, config)
    dataset = run / "dataset"
    assert verify(str(dataset)) == []

    sizes = json.loads((dataset / "sizes.json").read_text())
    index = json.loads((dataset / "shardindex.json").read_text())["shardlist"]
    counts = [sizes[name] for name in sorted(sizes)]
    assert sum(counts) == 19 and len(counts) > len(SHARDS)
    assert max(counts) <= datasetrun.SAMPLES_PER_SHARD
    assert [e["nsamples"] for e in index] == counts
    keys = []
    for entry in index:
        tar = dataset / entry["url"]
        samples = tar_samples(tar)
        # sizes.json and the shard index are exact; no tar of several samples passes the limit.
        assert entry["filesize"] == tar.stat().st_size and entry["nsamples"] == len(samples)
        assert tar.stat().st_size <= limit or len(samples) == 1
        keys += [key for key, _ in samples]
    assert keys == built.published_keys  # the same order, cut at other places
    # Each cut is needed: a shorter shard could not have taken the next sample.
    start = 0
    for count in counts[:-1]:
        shard_bytes = sum(samples_bytes[start : start + count])
        if count < datasetrun.SAMPLES_PER_SHARD:
            assert contract.tar_bytes(shard_bytes + samples_bytes[start + count]) > limit
        start += count
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["max_shard_bytes"] == limit


def test_emit_refuses_select_output_made_with_other_settings(built, tmp_path):
    run = datasetrun.copy_run(built, tmp_path)
    config = datasetrun.emit_config()
    config.select.min_score = 0.999  # select counted the 0.998 faces; emit would drop them
    with pytest.raises(StageFailed, match="select ran with other settings; re-run the select"):
        datasetrun.run_emit(run, config)


def test_max_shard_bytes_needs_copy_mode(tmp_path):
    pipeline = tmp_path / "pipe.toml"
    pipeline.write_text('[emit]\nmode = "manifest"  # no tars\nmax_shard_bytes = 1000000  # cut\n')
    with pytest.raises(ConfigError, match="emit.max_shard_bytes cuts the tars copy mode writes"):
        load_config(pipeline)
