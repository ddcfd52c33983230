"""The faces stage on a real raw shard: one row per image, real detections, exact hashes."""

from __future__ import annotations

import hashlib
import io

import imagehash
import pyarrow as pa
import pytest
from PIL import Image

from laionface.config import FacesSection
from laionface.io import schemas, storage, tars
from laionface.stages.faces import detect_shard
from tests.photos import readme_face_counts

# Face counts at score > 0.5, from shared/faces/README.md.
EXPECTED_FACES = readme_face_counts()


@pytest.fixture(scope="module")
def raw_shard(tmp_path_factory, shared_faces):
    """raw/00000.tar + .parquet as img2dataset writes them, plus two broken images."""
    folder = tmp_path_factory.mktemp("run") / "raw"
    folder.mkdir()
    images = {name: (shared_faces / name).read_bytes() for name in sorted(EXPECTED_FACES)}
    images["not_an_image.jpg"] = b"<html>not found</html>"
    huge = io.BytesIO()
    Image.new("L", (12_000, 10_000)).save(huge, "PNG")
    images["huge.png"] = huge.getvalue()
    rows, keys = [], {}
    with open(folder / "00000.tar", "wb") as handle:
        writer = tars.TarWriter(handle)
        for index, (name, data) in enumerate(images.items()):
            key = f"00000{index:04d}"
            keys[name] = key
            ext = name.rsplit(".", 1)[1]
            writer.add(f"{key}.{ext}", data)
            writer.add(f"{key}.txt", f"a photo {name}".encode())
            rows.append({"key": key, "SAMPLE_ID": 1000 + index, "status": "success"})
        writer.close()
    storage.write_parquet(pa.Table.from_pylist(rows), str(folder / "00000.parquet"))
    return folder, images, keys


def test_detect_shard_records_every_image(raw_shard, tmp_path):
    folder, images, keys = raw_shard
    out = str(tmp_path / "faces" / "00000.parquet")
    settings = FacesSection().model_dump()
    stats = detect_shard(str(folder / "00000.tar"), str(folder / "00000.parquet"), out, settings)

    table = storage.read_parquet(out)
    assert table.schema.equals(schemas.FACES)
    by_key = {row["key"]: row for row in table.to_pylist()}
    assert list(by_key) == list(keys.values())  # tar order, one row per image
    assert stats["items"] == len(images)

    for name, expected in EXPECTED_FACES.items():
        row = by_key[keys[name]]
        assert row["decode_error"] is None, name
        faces = [f for f in row["faces"] if f["score"] > 0.5]
        assert len(faces) == expected, name
        width, height = Image.open(io.BytesIO(images[name])).size
        assert (row["width"], row["height"]) == (width, height), name
        for f in faces:  # boxes in original pixels, inside the image (partial faces may touch)
            assert -0.05 * width <= f["x1"] < f["x2"] <= 1.05 * width, name
            assert -0.05 * height <= f["y1"] < f["y2"] <= 1.05 * height, name
        assert row["sha256"] == hashlib.sha256(images[name]).hexdigest()
        assert row["SAMPLE_ID"] == 1000 + list(keys).index(name)

    # Images not reduced by draft decoding hash exactly like imagehash.
    for name in ("astronaut.png", "grace_hopper.jpg", "fr_obama_small.jpg", "fr_two_people.jpg"):
        expected_hash = int(str(imagehash.phash(Image.open(io.BytesIO(images[name])))), 16)
        assert by_key[keys[name]]["phash"] == expected_hash, name

    broken = by_key[keys["not_an_image.jpg"]]
    assert broken["decode_error"].startswith("not_an_image") and broken["faces"] == []
    huge = by_key[keys["huge.png"]]
    assert huge["decode_error"].startswith("too_large")
    assert stats["decode_errors"] == 2
