"""verify: an intact dataset passes; each planted defect is found and named."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import fsspec
import pyarrow as pa
import pytest
from PIL import Image

from laionface.dataset import contract
from laionface.dataset.takedown import Selectors, takedown
from laionface.dataset.verify import verify
from laionface.dataset.verify_shard import image_problem, sample_json_problems, schema_problems
from laionface.io import storage
from laionface.io.tars import TarWriter, UnsafeTar, iter_members
from tests import datasetrun


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_faces):
    return datasetrun.built_run(tmp_path_factory, shared_faces)


@pytest.fixture
def dataset(built, tmp_path):
    """A copy of the dataset folder to damage."""
    return shutil.copytree(built.dataset, tmp_path / "dataset")


def manifest_rows(dataset) -> list[dict]:
    return storage.read_parquet(str(dataset / "manifest.parquet")).to_pylist()


def members_of(path) -> list[tuple[str, bytes]]:
    with open(path, "rb") as handle:
        return [(m.name, data) for m, data in iter_members(handle, source=str(path))]


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with open(path, "wb") as handle:
        writer = TarWriter(handle)
        for name, data in members:
            writer.add(name, data)
        writer.close()


def test_intact_dataset_passes(built):
    assert verify(str(built.dataset)) == []


def test_intact_dataset_passes_on_an_fsspec_url(built):
    url = "memory://verify-test/dataset"
    fs = fsspec.filesystem("memory")
    try:
        fs.put(str(built.dataset) + "/", url.split("://")[1], recursive=True)
        assert verify(url) == []
        fs.rm("/verify-test/dataset/00003.parquet")
        assert verify(url)[0] == "00003.parquet: listed in dataset.json but missing"
    finally:
        fs.rm("/verify-test", recursive=True)


def test_flipped_byte(dataset):
    row = manifest_rows(dataset)[5]
    tar = dataset / row["tar"]
    data = bytearray(tar.read_bytes())
    data[row["image_offset"] + row["image_size"] // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    problems = verify(str(dataset))
    key = row["key"]
    assert f"{row['tar']}: sha256 differs from dataset.json (the file is corrupt or changed)" in (
        problems
    )
    assert f"{row['tar']}: {key}.jpg: sha256 differs from the one in {key}.json" in problems


def test_missing_shard(dataset):
    (dataset / "00002.tar").unlink()
    problems = verify(str(dataset))
    assert "00002.tar: listed in dataset.json but missing" in problems
    assert "sizes.json: 00002.tar: says 4, the tar has None" in problems


def test_duplicate_key_across_shards(dataset):
    first = members_of(dataset / "00000.tar")[:3]  # one whole sample of shard 00000
    rest = members_of(dataset / "00001.tar")[3:]
    write_tar(dataset / "00001.tar", first + rest)
    key = first[0][0].split(".")[0]
    problems = verify(str(dataset))
    assert (
        f"keys: key {key} appears in 00000.tar and 00001.tar; keys must be unique across the "
        "dataset"
    ) in problems


def test_parquet_and_tar_counts_differ(dataset):
    table = storage.read_parquet(str(dataset / "00003.parquet"))
    storage.write_parquet(table.slice(0, 3), str(dataset / "00003.parquet"))
    problems = verify(str(dataset))
    assert "00003.parquet: 3 rows but 00003.tar has 4 samples" in problems


def test_key_rules(dataset):
    members = members_of(dataset / "00004.tar")  # 3 samples: a.jpg a.json a.txt b.jpg ...
    a, b = members[0][0].split(".")[0], members[3][0].split(".")[0]
    shuffled = [members[0], members[3], members[1], members[2], members[2]] + members[4:]
    with open(dataset / "00004.tar", "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in [*shuffled, ("odd.key.jpg", b"x"), ("UPPER.JPG", b"x")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    problems = verify(str(dataset))
    assert f"00004.tar: key {a}: its members are not adjacent" in problems
    assert f"00004.tar: key {a}: two .txt members" in problems
    assert (
        "00004.tar: member 'odd.key.jpg': a key must not contain dots (webdataset splits at the "
        "first)"
    ) in problems
    assert (
        "00004.tar: member 'UPPER.JPG': extension 'JPG' must be lower-case letters or digits"
        in (problems)
    )
    assert any(p.startswith(f"00004.tar: key {b}: no .json, .txt member") for p in problems)


def test_unsafe_member_stops_the_read(dataset):
    with open(dataset / "00004.tar", "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w") as tar:
            info = tarfile.TarInfo("../../etc/passwd.txt")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    problems = verify(str(dataset))
    assert (
        "00004.tar: member '../../etc/passwd.txt' has a path, not a plain name; "
        "stopped reading this tar"
    ) in problems
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    buffer.seek(0)
    with pytest.raises(UnsafeTar, match="member 'link.jpg' is not a regular file"):
        list(iter_members(buffer, source="t.tar", wanted=lambda m: False))


def test_oversized_member_is_refused_unread(dataset):
    with open(dataset / "00000.tar", "rb") as handle, pytest.raises(UnsafeTar, match="byte cap"):
        list(iter_members(handle, source="00000.tar", max_member_bytes=1000))


def test_manifest_offsets_must_point_at_the_members(dataset):
    table = storage.read_parquet(str(dataset / "manifest.parquet"))
    offsets = table.column("image_offset").to_pylist()
    offsets[2] += 512
    table = table.set_column(
        table.schema.get_field_index("image_offset"), "image_offset", pa.array(offsets, pa.int64())
    )
    storage.write_parquet(table, str(dataset / "manifest.parquet"))
    key = table.column("key")[2].as_py()
    problems = verify(str(dataset))
    assert f"manifest.parquet: key {key}: image_offset do not match its tar" in problems


def test_a_manifest_row_for_no_shard_of_the_dataset_is_named(dataset):
    table = storage.read_parquet(str(dataset / "manifest.parquet"))
    stray = table.slice(0, 1).set_column(
        table.schema.get_field_index("shard"), "shard", pa.array(["00099"])
    )
    storage.write_parquet(pa.concat_tables([table, stray]), str(dataset / "manifest.parquet"))
    problems = verify(str(dataset))
    assert "manifest.parquet: 1 row(s) for shards that are not in the dataset" in problems


def test_the_fast_sample_check_agrees_with_the_full_schema(built):
    with open(built.dataset / "00000.tar", "rb") as handle:
        samples = [
            json.loads(data)
            for m, data in iter_members(handle, source="00000.tar")
            if m.ext == "json"
        ]
    broken = [
        dict(samples[0], n_faces="2"),
        dict(samples[0], faces=[{"box": [0, 0, 1]}]),
        dict(samples[0], key="a.b"),
        {k: v for k, v in samples[0].items() if k != "url"},
        dict(samples[0], extra=1),
        dict(samples[0], similarity="high"),
    ]
    for sample in samples + broken:
        full = schema_problems(sample, contract.SAMPLE_JSON_SCHEMA, "s.json")
        assert sample_json_problems(sample, "s.json") == full
    assert all(schema_problems(s, contract.SAMPLE_JSON_SCHEMA, "s.json") for s in broken)


def test_sizes_and_shardindex_must_match_the_tars(dataset):
    (dataset / "sizes.json").write_text(json.dumps({"00000.tar": 5, "00001.tar": 4}))
    index = json.loads((dataset / "shardindex.json").read_text())
    index["shardlist"][1]["md5sum"] = "0" * 32
    (dataset / "shardindex.json").write_text(json.dumps(index))
    problems = verify(str(dataset))
    assert "sizes.json: 00000.tar: says 5, the tar has 4" in problems
    assert "sizes.json: 00002.tar: says None, the tar has 4" in problems
    assert any(p.startswith("shardindex.json: 00001.tar: md5sum is '000") for p in problems)


def test_incomplete_or_unknown_folders(dataset, tmp_path):
    (dataset / "notes.txt").write_text("hello")
    (dataset / ".tmp-0123-00000.tar").write_bytes(b"partial")
    problems = verify(str(dataset))
    assert problems == [
        ".tmp-0123-00000.tar: a leftover partial write; delete it",
        "notes.txt: not listed in dataset.json",
    ]
    (dataset / "dataset.json").unlink()
    assert verify(str(dataset)) == [
        f"{dataset}/dataset.json: missing, so this is not a complete dataset (emit or publish did "
        "not finish, or the path is wrong)"
    ]
    assert verify(str(tmp_path / "nowhere"))[0].endswith("or the path is wrong)")


def test_image_checks():
    assert image_problem(b"\xff\xd8 not really a jpeg", 10**6).startswith("does not decode")
    big = io.BytesIO()
    Image.new("L", (4000, 3000)).save(big, "PNG")
    assert image_problem(big.getvalue(), 10**6) == "4000x3000 pixels, over the 1,000,000 pixel cap"
    assert image_problem(big.getvalue(), 10**8) is None


def test_n_faces_must_be_the_number_of_counted_faces(dataset):
    table = storage.read_parquet(str(dataset / "00001.parquet"))
    rows = table.to_pylist()
    rows[2]["n_faces"] = 2
    storage.write_parquet(
        pa.Table.from_pylist(rows, schema=table.schema), str(dataset / "00001.parquet")
    )
    key = rows[2]["key"]
    problems = verify(str(dataset))
    assert f"00001.parquet: row 2 (key {key}): n_faces is 2 but 1 of its faces are counted" in (
        problems
    )
    assert f"00001.parquet: row 2 (key {key}) differs from {key}.json in n_faces" in problems


def test_dataset_card_and_shard_index_name(dataset):
    card = dataset / "README.md"
    size = card.stat().st_size
    card.write_text(card.read_text().replace('path: "*.tar"', 'path: "*.parquet"'))
    index = json.loads((dataset / "shardindex.json").read_text())
    index["name"] = "another"
    (dataset / "shardindex.json").write_text(json.dumps(index))
    problems = verify(str(dataset))
    assert f"README.md: size {size + 4:,} bytes, dataset.json says {size:,}" in problems
    assert any(
        p.startswith("README.md: its front matter is not the copy mode's configs") for p in problems
    )
    assert (
        "shardindex.json: name is 'another', the dataset's is 'emit-test' (wids names its cache "
        "after it)"
    ) in problems


def test_shards_must_be_cut_by_the_order_rule(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    sizes = [r["sample_size"] for r in manifest_rows(dataset)]
    # A size limit that the shards as written pass: the rule would have cut shard 00000 earlier.
    meta["max_shard_bytes"] = contract.tar_bytes(sizes[0] + sizes[1])
    (dataset / "dataset.json").write_text(json.dumps(meta))
    problems = verify(str(dataset))
    rule = f"samples_per_shard = 4, max_shard_bytes = {meta['max_shard_bytes']:,}"
    cut = [
        p for p in problems if p.startswith(f"00000.tar: 4 samples; the order rule ({rule}) puts ")
    ]
    assert len(cut) == 1 and int(cut[0].split(" puts ")[1].split()[0]) in (2, 3)
    assert any(
        p.startswith("00000.tar: ")
        and p.endswith(f"over max_shard_bytes = {meta['max_shard_bytes']:,}")
        for p in problems
    )


def test_a_takedown_version_keeps_the_previous_cut(built, tmp_path):
    row = storage.read_parquet(str(built.dataset / "00001.parquet")).to_pylist()[2]
    (tmp_path / "urls.txt").write_text(row["url"] + "\n")
    out = tmp_path / "v2"
    takedown(str(built.dataset), str(out), Selectors(urls=str(tmp_path / "urls.txt")))
    assert verify(str(out)) == []
    meta = json.loads((out / "dataset.json").read_text())
    # The same shards as a dataset emit wrote: shard 00001 is one short of the order rule's cut.
    emitted = {k: v for k, v in meta.items() if k not in ("previous", "changes")}
    (out / "dataset.json").write_text(json.dumps(emitted))
    assert "00001.tar: 3 samples; the order rule (samples_per_shard = 4) puts 4 in it" in (
        verify(str(out))
    )
    # A takedown version's shards hold at most samples_per_shard samples.
    (out / "dataset.json").write_text(json.dumps({**meta, "samples_per_shard": 3}))
    problems = verify(str(out))
    assert "00000.tar: 4 samples, more than samples_per_shard = 3" in problems
    assert not any("puts" in p for p in problems)


def test_samples_must_be_in_the_order_rules_order(dataset):
    table = storage.read_parquet(str(dataset / "00001.parquet"))
    rows = table.to_pylist()[::-1]
    storage.write_parquet(
        pa.Table.from_pylist(rows, schema=table.schema), str(dataset / "00001.parquet")
    )
    problems = verify(str(dataset))
    assert (
        f"00001.parquet: row 1 (key {rows[1]['key']}, raw shard {rows[1]['raw_shard']}) comes "
        f"after key {rows[0]['key']} (raw shard {rows[0]['raw_shard']}): the order rule sorts "
        "samples by raw shard, then key"
    ) in problems
