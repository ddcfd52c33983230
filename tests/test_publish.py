"""publish: copy, verify, dataset.json last; an interrupted publish to S3 resumes without re-uploads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import fsspec
import pytest

from laionface.dataset.publish import PublishError, publish
from laionface.dataset.takedown import Selectors, takedown
from laionface.dataset.verify import verify
from laionface.io import storage
from tests import datasetrun
from tests.conftest import S3_BUCKET as BUCKET


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_faces):
    return datasetrun.built_run(tmp_path_factory, shared_faces)


class Interrupted(Exception):
    """Stands for the publish process dying midway."""


def test_publish_to_a_local_folder(built, tmp_path):
    target = tmp_path / "published"
    assert publish(str(built.run), str(target)) == 0
    assert verify(str(target)) == []
    source = sorted(p.name for p in built.dataset.iterdir())
    assert sorted(p.name for p in target.iterdir()) == source
    for name in source:
        assert (target / name).read_bytes() == (built.dataset / name).read_bytes()
    # The dataset card is published with the rest: Hugging Face loads the target by it.
    assert "README.md" in json.loads((target / "dataset.json").read_text())["files"]
    actions = []
    assert publish(str(built.dataset), str(target), on_file=lambda *a: actions.append(a)) == 0
    assert actions == []  # already published: nothing copied, nothing checked again


def test_publish_refuses_a_target_holding_something_else(built, tmp_path):
    target = tmp_path / "published"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(PublishError, match=r"not part of this dataset \(notes.txt\)"):
        publish(str(built.run), str(target))

    other = tmp_path / "other"
    publish(str(built.run), str(other))
    meta = json.loads((other / "dataset.json").read_text())
    meta["created"] = "2020-01-01T00:00:00+00:00"  # another version of the dataset
    (other / "dataset.json").write_text(json.dumps(meta))
    (other / "00009.tar").write_bytes(b"a shard of the old version")
    with pytest.raises(PublishError, match="already holds another published dataset"):
        publish(str(built.run), str(other))
    assert publish(str(built.run), str(other), replace=True) == 0
    assert not (other / "00009.tar").exists()
    assert (other / "dataset.json").read_bytes() == (built.dataset / "dataset.json").read_bytes()


def test_publish_refuses_a_corrupt_source_or_a_copy_that_does_not_verify(built, tmp_path):
    def flip(path, at: int = 5000) -> None:
        data = bytearray(path.read_bytes())
        data[at] ^= 0x01
        path.write_bytes(bytes(data))

    source = tmp_path / "source"
    source.mkdir()
    for path in built.dataset.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    flip(source / "00001.tar")
    target = tmp_path / "published"
    with pytest.raises(PublishError, match=r"00001.tar: sha256 differs from dataset.json"):
        publish(str(source), str(target))
    assert not (target / "dataset.json").exists()
    assert not [p for p in target.iterdir() if p.name.startswith(".tmp-")]

    # The bytes change on the way (the target's storage corrupts them): verify catches it.
    def corrupt_target(name: str, action: str) -> None:
        if name == "00002.tar":
            flip(target / name)

    with pytest.raises(PublishError, match=r"does not verify(.|\n)*00002.tar: sha256 differs"):
        publish(str(built.run), str(target), on_file=corrupt_target)
    assert not (target / "dataset.json").exists()


def _objects(client) -> dict[str, object]:
    listing = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {item["Key"].rsplit("/", 1)[1]: item["LastModified"] for item in listing}


def test_publish_to_s3_interrupted_then_resumed(built, s3_server):
    endpoint, client = s3_server
    target = f"s3://{BUCKET}/laion-face-test"
    seen = []

    def die_after_three(name: str, action: str) -> None:
        seen.append((name, action))
        if len(seen) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        publish(str(built.run), target, workers=1, on_file=die_after_three)
    first = _objects(client)
    assert 3 <= len(first) < len(json.loads((built.dataset / "dataset.json").read_text())["files"])
    assert "dataset.json" not in first
    # A reader of the half-published folder is told it is not a dataset.
    assert verify(target)[0].endswith(
        "dataset.json: missing, so this is not a complete dataset "
        "(emit or publish did not finish, or the path is wrong)"
    )
    # A killed upload leaves a temporary object behind; the resumed publish removes it.
    client.put_object(Bucket=BUCKET, Key="laion-face-test/.tmp-0123abcd-00004.tar", Body=b"x")

    time.sleep(1.1)  # LastModified has one-second resolution: a re-upload would show
    resume = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from laionface.dataset.publish import publish; "
            "sys.exit(publish(sys.argv[1], sys.argv[2]))",
            str(built.run),
            target,
        ],
        env={**os.environ, "FSSPEC_S3_ENDPOINT_URL": endpoint},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resume.returncode == 0, resume.stderr
    after = _objects(client)
    for name, modified in first.items():
        assert after[name] == modified, f"{name} was uploaded again"
    expected = sorted(p.name for p in built.dataset.iterdir())
    assert sorted(after) == expected

    fsspec.filesystem("s3").invalidate_cache()
    assert verify(target) == []
    assert (
        storage.read_bytes(f"{target}/dataset.json")
        == (built.dataset / "dataset.json").read_bytes()
    )
    manifest = storage.read_parquet(f"{target}/manifest.parquet").to_pylist()
    row = manifest[7]
    fs, path = storage.fs_for(f"{target}/{row['tar']}")
    image = fs.cat_file(
        path, start=row["image_offset"], end=row["image_offset"] + row["image_size"]
    )
    with open(built.dataset / row["tar"], "rb") as handle:
        handle.seek(row["image_offset"])
        assert image == handle.read(row["image_size"])


def test_publish_replace_swaps_in_a_takedown_version_with_dataset_json_last(built, tmp_path):
    target = tmp_path / "published"
    publish(str(built.run), str(target))
    row = storage.read_parquet(str(built.dataset / "00002.parquet")).to_pylist()[1]
    (tmp_path / "urls.txt").write_text(row["url"] + "\n")
    new = tmp_path / "v2"
    takedown(str(built.dataset), str(new), Selectors(urls=str(tmp_path / "urls.txt")))
    old_files = json.loads((built.dataset / "dataset.json").read_text())["files"]
    new_files = json.loads((new / "dataset.json").read_text())["files"]
    changed = {name for name, entry in new_files.items() if old_files.get(name) != entry}
    assert {"00002.tar", "00002.parquet", "manifest.parquet", "README.md"} <= changed
    with pytest.raises(PublishError, match="already holds another published dataset"):
        publish(str(new), str(target))

    seen = []

    def watch(name: str, action: str) -> None:
        seen.append((name, action, (target / "dataset.json").exists()))

    assert publish(str(new), str(target), replace=True, on_file=watch) == 0
    assert not any(had_meta for _, _, had_meta in seen)  # no reader sees a mix of versions
    assert {name for name, action, _ in seen if action == "copied"} == changed
    assert {name for name, action, _ in seen if action == "skipped"} == set(new_files) - changed
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in new.iterdir())
    for path in new.iterdir():
        assert (target / path.name).read_bytes() == path.read_bytes()
    assert verify(str(target)) == []
