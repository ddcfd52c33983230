"""takedown: a new version of the demo's dataset without the samples each selector chooses.

The samples expected to go are computed here from the dataset's own parquet files and images
(imagehash for pHashes), not by laionface's matching; each new version must verify, keep every
untouched shard byte for byte, leave the old version alone, and name it in dataset.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from laionface.cli import main
from laionface.config import load_config
from laionface.dataset import contract
from laionface.dataset.phashmatch import ReferenceHashes
from laionface.dataset.takedown import Selectors, TakedownError, takedown
from laionface.dataset.verify import verify
from laionface.demo.corpus import DEMO_HOST
from laionface.demo.imageserver import ImageServer
from laionface.engine.pipeline import run_pipeline
from tests import datasetrun

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_corpus) -> Path:
    return datasetrun.demo_run(tmp_path_factory, demo_corpus)


@pytest.fixture(scope="module")
def dataset(run) -> Path:
    return run / "dataset"


def shard_rows(folder: Path) -> dict[str, list[dict]]:
    """{shard: its NNNNN.parquet rows} of a dataset folder, read with pyarrow alone."""
    meta = json.loads((folder / "dataset.json").read_text())
    return {
        name: pq.read_table(folder / contract.parquet_name(name)).to_pylist()
        for name in contract.shard_names(meta["counts"]["shards"])
    }


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def image_bytes(folder: Path, key: str) -> bytes:
    """A sample's image, read by its manifest row's byte range."""
    rows = pq.read_table(folder / "manifest.parquet").to_pylist()
    row = next(r for r in rows if r["key"] == key)
    with open(folder / row["tar"], "rb") as handle:
        handle.seek(row["image_offset"])
        return handle.read(row["image_size"])


def check_new_version(old: Path, new: Path, removed: set[str], reason: str) -> None:
    """What every takedown must give: exactly `removed` gone, untouched shards byte-identical,
    rewritten ones in the old order, a version that verifies and names the old one."""
    before, after = shard_rows(old), shard_rows(new)
    assert sorted(before) == sorted(after)  # every shard keeps its name
    rewritten = []
    for name, rows in before.items():
        kept = [r for r in rows if r["key"] not in removed]
        assert after[name] == kept  # same rows, same order, nothing else changed
        files = [
            f for f in (contract.parquet_name(name), contract.tar_name(name)) if (old / f).exists()
        ]
        if len(kept) == len(rows):
            for file in files:
                assert (new / file).read_bytes() == (old / file).read_bytes(), file
        else:
            rewritten.append(name)
    assert verify(str(new)) == []
    meta = json.loads((new / "dataset.json").read_text())
    old_meta_bytes = (old / "dataset.json").read_bytes()
    assert meta["previous"]["sha256"] == hashlib.sha256(old_meta_bytes).hexdigest()
    assert meta["previous"]["samples"] == json.loads(old_meta_bytes)["counts"]["samples"]
    assert meta["changes"]["removed"][reason] == len(removed)
    assert meta["changes"]["rewritten"] == rewritten
    assert meta["counts"]["samples"] == sum(len(r) for r in after.values())
    card = (new / "README.md").read_text()
    assert "## Changes" in card and meta["previous"]["sha256"] in card
    left = {m.split(".")[0] for t in new.glob("*.tar") for m in tarfile.open(t).getnames()}
    assert not removed & left  # nothing of a removed sample is left in any tar


def pick(rows: dict[str, list[dict]], count: int, start: int = 0) -> list[dict]:
    """`count` samples from shards 1 and 2 (shards 0 and 3 stay untouched)."""
    pool = rows["00001"] + rows["00002"]
    return pool[start : start + count * 7 : 7][:count]


def _selector(kind: str, dataset: Path, lists: Path) -> tuple[Selectors, set[str]]:
    """The selector of `kind` and the keys it must remove, computed from the dataset's rows."""
    rows = shard_rows(dataset)
    every = [r for shard in rows.values() for r in shard]
    chosen = pick(rows, 4)
    if kind == "ids":  # .npy of int64 IDs
        ids = [r["SAMPLE_ID"] for r in chosen]
        np.save(lists / "ids.npy", np.array(ids, dtype=np.int64))
        return Selectors(ids=str(lists / "ids.npy")), {
            r["key"] for r in every if r["SAMPLE_ID"] in ids
        }
    if kind == "urls":  # .txt, one per line, with a comment and a URL in no sample
        urls = [r["url"] for r in chosen]
        text = "# opt-outs\n" + "\n".join(urls) + "\nhttp://nowhere.example/x.jpg\n"
        (lists / "urls.txt").write_text(text)
        return Selectors(urls=str(lists / "urls.txt")), {
            r["key"] for r in every if r["url"] in urls
        }
    if kind == "sha256":  # .parquet, one digest in upper case
        digests_ = [r["sha256"] for r in chosen]
        listed = [digests_[0].upper(), *digests_[1:]]
        pq.write_table(pa.table({"sha256": listed}), lists / "sha.parquet")
        return Selectors(sha256=str(lists / "sha.parquet")), {
            r["key"] for r in every if r["sha256"] in digests_
        }
    if kind == "keep_only":  # .parquet allow-list: IDs for some samples, URLs for the others
        gone = {r["key"] for r in chosen}
        allowed = [r for r in every if r["key"] not in gone]
        table = pa.table(
            {
                "SAMPLE_ID": [r["SAMPLE_ID"] if i % 2 else None for i, r in enumerate(allowed)],
                "url": [None if i % 2 else r["url"] for i, r in enumerate(allowed)],
            },
            schema=pa.schema([("SAMPLE_ID", pa.int64()), ("url", pa.string())]),
        )
        pq.write_table(table, lists / "allow.parquet")
        return Selectors(keep_only=str(lists / "allow.parquet")), gone
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["ids", "urls", "sha256", "keep_only"])
def test_each_list_selector_removes_exactly_its_samples(kind, dataset, tmp_path):
    before = digests(dataset)
    selectors, expected = _selector(kind, dataset, tmp_path)
    assert expected
    result = takedown(str(dataset), str(tmp_path / "v2"), selectors)
    assert result.removed == {kind: len(expected)}
    check_new_version(dataset, tmp_path / "v2", expected, kind)
    assert digests(dataset) == before  # the old version is untouched


def test_images_removes_the_near_duplicates_of_given_images(dataset, tmp_path):
    rows = shard_rows(dataset)
    every = [r for shard in rows.values() for r in shard]
    exact, near = pick(rows, 2, start=3)
    folder = tmp_path / "requests"
    folder.mkdir()
    (folder / "exact.jpg").write_bytes(image_bytes(dataset, exact["key"]))
    (folder / "broken.jpg").write_bytes(b"not an image")  # reported, the others still used
    with Image.open(io.BytesIO(image_bytes(dataset, near["key"]))) as image:
        copy = io.BytesIO()
        image.convert("RGB").save(copy, "JPEG", quality=60)  # a re-encoded copy: not the bytes
    with tarfile.open(tmp_path / "more.tar", "w") as tar:
        info = tarfile.TarInfo("near.jpg")
        info.size = len(copy.getvalue())
        tar.addfile(info, io.BytesIO(copy.getvalue()))
    given = [
        int(str(imagehash.phash(Image.open(path))), 16)
        for path in (folder / "exact.jpg", io.BytesIO(copy.getvalue()))
    ]
    expected = {
        r["key"]
        for r in every
        if r["phash"] and min((int(r["phash"], 16) ^ g).bit_count() for g in given) <= 4
    }
    assert {exact["key"], near["key"]} <= expected
    selectors = Selectors(images=(str(folder), str(tmp_path / "more.tar")), max_distance=4)
    result = takedown(str(dataset), str(tmp_path / "v2"), selectors)
    assert result.listed["images"] == 2
    assert len(result.unreadable_images) == 1 and "broken.jpg" in result.unreadable_images[0]
    check_new_version(dataset, tmp_path / "v2", expected, "images")


def test_a_sample_is_counted_under_its_first_reason_and_the_command_line(dataset, tmp_path):
    rows = shard_rows(dataset)
    chosen = pick(rows, 3)
    # One torch.save'd list of IDs and URLs, given to both --ids and --urls (as exclude_list
    # reads a mixed list); the second sample is listed by ID and by URL.
    torch.save([chosen[0]["SAMPLE_ID"], chosen[1]["SAMPLE_ID"]], tmp_path / "ids.pth")
    (tmp_path / "urls.txt").write_text(f"{chosen[1]['url']}\n{chosen[2]['url']}\n")
    out = tmp_path / "v2"
    args = ["takedown", str(dataset), "--out", str(out), "--ids", str(tmp_path / "ids.pth")]
    assert main([*args, "--urls", str(tmp_path / "urls.txt"), "--dry-run"]) == 0
    assert not out.exists()
    assert main([*args, "--urls", str(tmp_path / "urls.txt"), "--name", "demo-v2"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["changes"]["removed"] == {"ids": 2, "urls": 1}
    assert meta["name"] == "demo-v2"
    assert json.loads((out / "shardindex.json").read_text())["name"] == "demo-v2"
    assert verify(str(out)) == []
    # A takedown of the takedown names the version it was made from.
    takedown(str(out), str(tmp_path / "v3"), Selectors(ids=str(tmp_path / "ids.pth")))
    v3 = json.loads((tmp_path / "v3" / "dataset.json").read_text())
    assert (
        v3["previous"]["sha256"] == hashlib.sha256((out / "dataset.json").read_bytes()).hexdigest()
    )
    assert v3["changes"]["removed"] == {"ids": 0} and v3["changes"]["rewritten"] == []
    assert verify(str(tmp_path / "v3")) == []


def test_bad_requests_and_a_damaged_source_are_refused(dataset, tmp_path, capsys):
    rows = shard_rows(dataset)
    chosen = pick(rows, 2)
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{chosen[0]['SAMPLE_ID']}\n{chosen[1]['url']}\n")
    with pytest.raises(TakedownError, match=r"--ids .*mixed.txt: the list also holds 1 URLs"):
        takedown(str(dataset), str(tmp_path / "v2"), Selectors(ids=str(mixed)))
    with pytest.raises(TakedownError, match="is the dataset itself or inside it"):
        takedown(str(dataset), str(dataset / "v2"), Selectors(urls=str(mixed), ids=str(mixed)))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TakedownError, match=r"not a dataset's \(notes.txt\)"):
        takedown(str(dataset), str(tmp_path / "other"), Selectors(ids=str(mixed), urls=str(mixed)))
    assert main(["takedown", str(dataset), "--out", str(tmp_path / "v2")]) == 1
    assert "no selector given" in capsys.readouterr().err
    # A flipped byte in a shard the takedown copies: refused, and no dataset.json written.
    damaged = shutil.copytree(dataset, tmp_path / "damaged")
    tar = damaged / "00000.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 1
    tar.write_bytes(bytes(data))
    with pytest.raises(TakedownError, match=r"00000.tar: sha256 differs from dataset.json"):
        takedown(str(damaged), str(tmp_path / "v4"), Selectors(ids=str(mixed), urls=str(mixed)))
    assert not (tmp_path / "v4" / "dataset.json").exists()


def test_an_interrupted_takedown_resumes_into_the_same_folder(dataset, tmp_path):
    selectors, expected = _selector("urls", dataset, tmp_path)
    out = tmp_path / "v2"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"half a shard from an interrupted run")
    (out / "00009.parquet").write_bytes(b"a stray of an earlier attempt")
    takedown(str(dataset), str(out), selectors)
    check_new_version(dataset, out, expected, "urls")
    assert not (out / "00009.parquet").exists()


def test_a_manifest_mode_dataset_is_taken_down_too(tmp_path_factory, shared_faces, tmp_path):
    run = datasetrun.copy_run(datasetrun.built_run(tmp_path_factory, shared_faces), tmp_path)
    datasetrun.run_emit(run, datasetrun.emit_config("manifest"))
    dataset = run / "dataset"
    rows = shard_rows(dataset)
    chosen = [rows["00001"][0], rows["00001"][2], rows["00003"][1]]
    (tmp_path / "urls.txt").write_text("".join(r["url"] + "\n" for r in chosen))
    out = tmp_path / "v2"
    takedown(str(dataset), str(out), Selectors(urls=str(tmp_path / "urls.txt")))
    check_new_version(dataset, out, {r["key"] for r in chosen}, "urls")
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["index"] for r in manifest if r["shard"] == "00001"] == [0, 1]
    meta = json.loads((out / "dataset.json").read_text())
    assert set(meta["sources"]) == {r["tar"] for r in manifest}  # only tars still pointed into


def test_a_shard_may_lose_every_sample(tmp_path_factory, shared_faces, tmp_path):
    dataset = datasetrun.built_run(tmp_path_factory, shared_faces).dataset
    rows = shard_rows(dataset)
    gone = {r["key"] for r in rows["00002"]}
    allowed = [r["url"] for name, shard in rows.items() if name != "00002" for r in shard]
    (tmp_path / "allow.txt").write_text("\n".join(allowed) + "\n")
    out = tmp_path / "v2"
    takedown(str(dataset), str(out), Selectors(keep_only=str(tmp_path / "allow.txt")))
    check_new_version(dataset, out, gone, "keep_only")
    assert json.loads((out / "sizes.json").read_text())["00002.tar"] == 0
    with tarfile.open(out / "00002.tar") as tar:
        assert tar.getnames() == []


def test_reference_hashes_find_every_hash_within_the_distance():
    rng = np.random.default_rng(7)
    references = rng.integers(0, 2**63, 300, dtype=np.int64).view(np.uint64)
    queries = rng.integers(0, 2**63, 4000, dtype=np.int64).view(np.uint64)
    for i in range(600):  # plant hashes 0..6 bits away from a reference
        value = int(references[i % 300])
        for bit in rng.choice(64, i % 7, replace=False):
            value ^= 1 << int(bit)
        queries[i] = value
    for radius in (0, 4, 6):
        nearest = np.bitwise_count(queries[:, None] ^ references[None, :]).min(axis=1)
        found = ReferenceHashes(references, radius).near(queries)
        assert np.array_equal(found, nearest <= radius)
        assert found.sum() >= 600 * min(radius + 1, 7) // 7


# ---------------------------------------------------------------------------------------------
# Item 2: a run's metadata.exclude_list and a takedown give the same dataset.


def _excludable(run: Path, rows: dict[str, list[dict]], count: int) -> list[dict]:
    """Published samples of shards 1 and 2 that no other row depends on: no duplicate was
    dropped in their favour (dedup would keep it instead), and their SAMPLE_ID and URL appear
    once in the input."""
    decisions = pq.read_table(run / "dedup" / "decisions.parquet").to_pylist()
    keepers = {d["duplicate_of"] for d in decisions if d["duplicate_of"]}
    config = json.loads((run / "config.json").read_text())
    inputs = pq.read_table(config["metadata"]["input"][0]).to_pylist()
    ids = [r["SAMPLE_ID"] for r in inputs]
    urls = [r["URL"] for r in inputs]
    pool = [
        r
        for r in rows["00001"] + rows["00002"]
        if r["key"] not in keepers and ids.count(r["SAMPLE_ID"]) == 1 and urls.count(r["url"]) == 1
    ]
    return pool[::9][:count]


def _samples(folder: Path) -> list[tuple]:
    """Every sample in dataset order, as a user compares them: its fields but the run's own
    numbering (key, raw_shard), and the bytes of its image and caption."""
    out = []
    for name, rows in shard_rows(folder).items():
        with tarfile.open(folder / contract.tar_name(name)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for row in rows:
            fields = {k: v for k, v in row.items() if k not in ("key", "raw_shard")}
            own = {
                n.split(".", 1)[1]: data
                for n, data in members.items()
                if n.split(".")[0] == row["key"]
            }
            image = [data for ext, data in own.items() if ext not in ("json", "txt")]
            out.append((json.dumps(fields, sort_keys=True), image, own["txt"]))
    return out


def test_exclude_list_run_and_takedown_give_the_same_dataset(run, dataset, demo_corpus, tmp_path):
    chosen = _excludable(run, shard_rows(dataset), 5)
    assert len(chosen) == 5
    listed = tmp_path / "optout.txt"
    listed.write_text("\n".join(str(r["SAMPLE_ID"]) for r in chosen) + "\n")
    excluded_run = tmp_path / "excluded"
    with ImageServer(demo_corpus.root) as server:
        config = load_config(
            REPO / "pipelines" / "demo.toml",
            [
                f"metadata.input={json.dumps([str(demo_corpus.metadata_path)])}",
                f'download.resolve={{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}',
                "cluster.dashboard_address=''",
                f"metadata.exclude_list={json.dumps(str(listed))}",
            ],
        )
        run_pipeline(config, run_dir=str(excluded_run), progress=False)
    taken = tmp_path / "taken-down"
    takedown(str(dataset), str(taken), Selectors(ids=str(listed)))
    by_run, by_takedown = excluded_run / "dataset", taken
    assert _samples(by_run) == _samples(by_takedown)
    # Shards before the first removal are the same files in both; after it the run re-cuts
    # its shards to samples_per_shard while the takedown keeps the old cut (ORDER_RULE).
    meta = json.loads((taken / "dataset.json").read_text())
    first = min(meta["changes"]["rewritten"])
    for name in contract.shard_names(int(first)):
        for file in (contract.tar_name(name), contract.parquet_name(name)):
            assert (by_run / file).read_bytes() == (by_takedown / file).read_bytes()
    assert verify(str(by_run)) == [] and verify(str(by_takedown)) == []
