"""export: SAMPLE_ID lists, URL lists and detections in the layouts LAION-Face users know."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from laionface.dataset.export import ExportError, export
from laionface.io import schemas, storage
from tests import datasetrun

SHARDS = ["00000", "00001", "00002", "00003", "00004"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_faces):
    return datasetrun.built_run(tmp_path_factory, shared_faces)


@pytest.fixture(scope="module")
def rows(built):
    return [
        r
        for s in SHARDS
        for r in storage.read_parquet(str(built.dataset / f"{s}.parquet")).to_pylist()
    ]


def test_sample_id_list_as_parquet(built, rows, tmp_path):
    written = export(str(built.run), "ids-parquet", str(tmp_path))
    assert written == [str(tmp_path / "sample_ids.parquet")]
    table = storage.read_parquet(written[0])
    assert table.column_names == ["SAMPLE_ID"]
    assert table.column("SAMPLE_ID").to_pylist() == sorted(r["SAMPLE_ID"] for r in rows)


def test_url_and_caption_list_is_laion_metadata(built, rows, tmp_path):
    (url,) = export(str(built.dataset), "urls", str(tmp_path))
    table = storage.read_parquet(url)
    assert table.schema.equals(schemas.LAION_METADATA)
    assert [
        (r["SAMPLE_ID"], r["URL"], r["TEXT"], r["WIDTH"], r["HEIGHT"]) for r in table.to_pylist()
    ] == [(r["SAMPLE_ID"], r["url"], r["caption"], r["width"], r["height"]) for r in rows]


def test_laion_face_ids_pth_layout(built, rows, tmp_path):
    (path,) = export(str(built.run), "laion-face-pth", str(tmp_path))
    assert path.endswith("/laion_face_ids.pth")
    ids = torch.load(path, weights_only=True)
    # One collection per LAION-400M part, indexed by part number, as convert_parquet.py reads it.
    assert isinstance(ids, list) and len(ids) == 32
    expected = {3: [], 17: []}
    for row in rows:
        expected[built.part_of[row["SAMPLE_ID"]]].append(row["SAMPLE_ID"])
    assert expected[3] and expected[17]
    for part in range(32):
        assert ids[part] == sorted(expected.get(part, []))
    samples = set(ids[17])
    assert all(isinstance(i, int) for i in samples) and rows[-1]["SAMPLE_ID"] in samples


def test_sample2detect_pth_layout(built, rows, tmp_path):
    written = export(str(built.run), "sample2detect", str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in written] == ["sample2detect_3.pth", "sample2detect_17.pth"]
    detections = {}
    for path in written:
        detections.update(torch.load(path, weights_only=True))
    assert sorted(detections) == sorted(r["SAMPLE_ID"] for r in rows)
    for row in rows:
        faces = detections[int(row["SAMPLE_ID"])]
        # The counted faces only (the 6 px one is listed in the dataset with counted false).
        assert len(faces) == row["n_faces"] == 1 and len(row["faces"]) == 2
        box, landmarks, score = faces[0]  # LAION-Face's README unpacks it this way
        face = row["faces"][0]
        assert face["counted"] and box.dtype == landmarks.dtype == torch.float32
        assert box.tolist() == face["box"]
        assert landmarks.shape == (5, 2) and landmarks.tolist() == face["landmarks"]
        assert score == face["score"]


def test_export_errors_say_what_is_missing(built, tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'csv'"):
        export(str(built.run), "csv", str(tmp_path))
    with pytest.raises(ExportError, match="the .pth formats need the metadata stage's shards"):
        export(str(built.dataset), "laion-face-pth", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run the emit stage first"):
        export(str(tmp_path), "urls", str(tmp_path / "out"))


def test_samples_sharing_a_sample_id_are_all_exported_or_refused_by_name(built, tmp_path):
    """Three images under one SAMPLE_ID (metadata that repeats an ID): the ID lists and URL
    list keep all three; sample2detect, one entry per ID, refuses and names the ID."""
    run = datasetrun.copy_run(built, tmp_path)
    shared_id = 6_999_999  # no row has it yet
    chosen = [r["key"] for r in _dataset_rows(run) if built.part_of[r["SAMPLE_ID"]] == 3][:3]
    originals = {}
    for url in storage.list_files(str(run / "raw"), ".parquet"):
        table = storage.read_parquet(url)
        ids = table.column("SAMPLE_ID").to_pylist()
        keys = table.column("key").to_pylist()
        originals.update({k: i for k, i in zip(keys, ids, strict=True) if k in chosen})
        ids = [shared_id if k in chosen else i for k, i in zip(keys, ids, strict=True)]
        column = table.schema.get_field_index("SAMPLE_ID")
        storage.write_parquet(table.set_column(column, "SAMPLE_ID", pa.array(ids, pa.int64())), url)
    for url in storage.list_files(str(run / "metadata" / "shards"), ".parquet"):
        table = storage.read_parquet(url)
        ids = [shared_id if i in originals.values() else i for i in table["SAMPLE_ID"].to_pylist()]
        column = table.schema.get_field_index("SAMPLE_ID")
        storage.write_parquet(table.set_column(column, "SAMPLE_ID", pa.array(ids, pa.int64())), url)
    datasetrun.run_emit(run, datasetrun.emit_config())
    rows = _dataset_rows(run)
    assert sorted(r["key"] for r in rows if r["SAMPLE_ID"] == shared_id) == sorted(chosen)

    (ids,) = export(str(run), "ids-parquet", str(tmp_path / "ids"))
    assert storage.read_parquet(ids)["SAMPLE_ID"].to_pylist().count(shared_id) == 3
    (urls,) = export(str(run), "urls", str(tmp_path / "urls"))
    table = storage.read_parquet(urls)
    shared_urls = [r["URL"] for r in table.to_pylist() if r["SAMPLE_ID"] == shared_id]
    assert sorted(shared_urls) == sorted(r["url"] for r in rows if r["key"] in chosen)
    (pth,) = export(str(run), "laion-face-pth", str(tmp_path / "pth"))
    assert torch.load(pth, weights_only=True)[3].count(shared_id) == 3
    with pytest.raises(
        ExportError, match=r"1 SAMPLE_ID\(s\) belong to several published images \(6999999\)"
    ):
        export(str(run), "sample2detect", str(tmp_path / "detect"))
    assert not (tmp_path / "detect").exists()


def _dataset_rows(run) -> list[dict]:
    return [
        r
        for s in SHARDS
        for r in storage.read_parquet(str(run / "dataset" / f"{s}.parquet")).to_pylist()
    ]
