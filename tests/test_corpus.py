"""The demo corpus generator: deterministic, LAION-shaped, and its truth matches its files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import imagehash
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laionface.demo.corpus import (
    DEMO_HOST,
    EXPECTED_STATUS,
    NEAR_KINDS,
    TRUTH_SCHEMA,
    CorpusError,
    build_corpus,
)
from laionface.io.storage import TEMP_PREFIX

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def truth(demo_corpus) -> list[dict]:
    return pq.read_table(demo_corpus.truth_path).to_pylist()


@pytest.fixture(scope="module")
def metadata(demo_corpus) -> list[dict]:
    return pq.read_table(demo_corpus.metadata_path).to_pylist()


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


def _build_in_subprocess(out: Path, seed: int, n_images: int | None = None) -> None:
    """Build in a fresh interpreter with another hash seed: nothing may depend on process state."""
    args = f"seed={seed}" + (f", n_images={n_images}" if n_images else "")
    code = f"from laionface.demo.corpus import build_corpus; build_corpus({str(out)!r}, {args})"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=300)


def test_same_seed_is_byte_identical(demo_corpus, tmp_path):
    _build_in_subprocess(tmp_path / "again", seed=0)
    first, second = _digests(demo_corpus.root), _digests(tmp_path / "again")
    assert len(first) > 300
    assert first == second
    manifest = json.loads(demo_corpus.manifest_path.read_text())
    listed = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    assert listed == {name: digest for name, digest in first.items() if name != "corpus.json"}


@pytest.fixture(scope="module")
def small_corpora(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("small-corpora")
    return [build_corpus(root / f"seed{seed}", seed=seed, n_images=100) for seed in (1, 2)]


def test_other_seed_differs_and_small_corpora_hold_every_case(small_corpora):
    a, b = small_corpora
    digests_a, digests_b = _digests(a.root), _digests(b.root)
    assert digests_a["metadata.parquet"] != digests_b["metadata.parquet"]
    images_a = {v for k, v in digests_a.items() if k.startswith("images/")}
    images_b = {v for k, v in digests_b.items() if k.startswith("images/")}
    assert len(images_a & images_b) == 0
    for corpus in (a, b):
        rows = pq.read_table(corpus.truth_path).to_pylist()
        assert len(rows) == 100
        assert {row["case"] for row in rows} == set(EXPECTED_STATUS)
        assert {row["dup_kind"] for row in rows} - {None} == {"original", "exact", *NEAR_KINDS}


def test_metadata_has_the_laion_400m_schema_and_values(metadata, demo_corpus):
    schema = pq.read_schema(demo_corpus.metadata_path)
    expected = pa.schema(
        [
            ("SAMPLE_ID", pa.int64()),
            ("URL", pa.string()),
            ("TEXT", pa.string()),
            ("HEIGHT", pa.int32()),
            ("WIDTH", pa.int32()),
            ("LICENSE", pa.string()),
            ("NSFW", pa.string()),
            ("similarity", pa.float64()),
        ]
    )
    assert schema.remove_metadata().equals(expected)
    assert 300 <= len(metadata) <= 400
    assert len({row["SAMPLE_ID"] for row in metadata}) == len(metadata)
    assert len({row["URL"] for row in metadata}) == len(metadata)
    for row in metadata:
        assert row["URL"].startswith(f"http://{DEMO_HOST}/"), row
        assert row["TEXT"].strip(), row
        assert row["NSFW"] in {"UNLIKELY", "UNSURE", "NSFW"}, row
        assert 0.3 <= row["similarity"] <= 0.5, row
        assert row["LICENSE"] == "?" or row["LICENSE"].startswith("https://creativecommons.org/")
        assert row["WIDTH"] > 0 and row["HEIGHT"] > 0
    assert {row["NSFW"] for row in metadata} == {"UNLIKELY", "UNSURE", "NSFW"}
    assert sum(row["LICENSE"] != "?" for row in metadata) >= 10
    assert sum(not row["TEXT"].isascii() for row in metadata) >= 3


def test_truth_rows_line_up_with_metadata(truth, metadata, demo_corpus):
    assert pq.read_schema(demo_corpus.truth_path).remove_metadata().equals(TRUTH_SCHEMA)
    assert [r["SAMPLE_ID"] for r in truth] == [r["SAMPLE_ID"] for r in metadata]
    assert [r["URL"] for r in truth] == [r["URL"] for r in metadata]
    for row in truth:
        assert urlsplit(row["URL"]).netloc == DEMO_HOST  # no port: runs are port-independent
        assert urlsplit(row["URL"]).path == row["path"]
        assert row["expected_status"] == EXPECTED_STATUS[row["case"]]
    assert sum("?" in row["URL"] for row in truth) >= 2


def test_every_case_and_face_count_is_present(truth, demo_corpus):
    cases = defaultdict(int)
    for row in truth:
        cases[row["case"]] += 1
    assert set(cases) == set(EXPECTED_STATUS)
    ok = [row for row in truth if row["case"] == "ok"]
    face_counts = {min(row["n_faces"], 4) for row in ok}
    assert face_counts == {0, 1, 2, 3, 4}
    assert sum(row["n_faces"] >= 4 for row in ok) >= 20
    assert sum(row["n_faces"] == 0 for row in ok) >= 50
    assert {row["layout"] for row in ok} == {"scene", "paste", "group", "photo"}
    assert {row["format"] for row in ok} == {"jpeg", "png"}
    assert demo_corpus.counts["cases"] == dict(sorted(cases.items()))


def test_truth_describes_the_served_files(truth, demo_corpus):
    for row in truth:
        if row["file"] is None:
            assert row["case"] in {"http_404", "http_5xx", "not_an_image", "redirect_private"}
            assert row["n_faces"] is None and row["faces"] == []
            continue
        data = (demo_corpus.images_dir / row["file"]).read_bytes()
        if row["case"] == "truncated":
            assert hashlib.sha256(data[: len(data) // 2]).hexdigest() == row["sha256"]
            assert row["width"] is None and row["n_faces"] is None
            continue
        assert hashlib.sha256(data).hexdigest() == row["sha256"], row["file"]
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (row["width"], row["height"]), row["file"]
            assert image.format.lower() == row["format"]
        assert row["n_faces"] == len(row["faces"])
    tiny = [row for row in truth if row["case"] == "too_small"]
    assert all(max(row["width"], row["height"]) <= 12 for row in tiny)


def test_metadata_sizes_match_the_images_except_swapped_rows(truth, metadata):
    swapped = 0
    for meta, row in zip(metadata, truth, strict=True):
        if row["case"] != "ok":
            continue
        size = (meta["WIDTH"], meta["HEIGHT"])
        if row["wh_swapped"]:
            swapped += 1
            assert size == (row["height"], row["width"]) != (row["width"], row["height"])
        else:
            assert size == (row["width"], row["height"])
    assert swapped >= 3


def test_face_boxes_lie_inside_and_span_16_px_to_most_of_the_frame(truth):
    sides, fractions = [], []
    for row in truth:
        for face in row["faces"]:
            assert 0 <= face["x1"] < face["x2"] <= row["width"], row["file"]
            assert 0 <= face["y1"] < face["y2"] <= row["height"], row["file"]
            side = min(face["x2"] - face["x1"], face["y2"] - face["y1"])
            sides.append(side)
            fractions.append(side / min(row["width"], row["height"]))
    assert min(sides) >= 16
    assert min(sides) < 20
    assert sum(side < 32 for side in sides) >= 20
    assert max(fractions) >= 0.6
    assert sum(side >= 200 for side in sides) >= 10


def _phash(path: Path) -> imagehash.ImageHash:
    with Image.open(path) as image:
        return imagehash.phash(image.convert("RGB"))


def test_duplicate_groups_are_what_phash_and_sha256_say(truth, demo_corpus):
    pictures = [row for row in truth if row["width"] is not None and row["case"] != "too_small"]
    hashes = {row["file"]: _phash(demo_corpus.images_dir / row["file"]) for row in pictures}
    groups = defaultdict(list)
    for row in pictures:
        if row["dup_group"] is not None:
            groups[row["dup_group"]].append(row)
    assert len(groups) >= 6
    assert {row["dup_kind"] for rows in groups.values() for row in rows} == {
        "original",
        "exact",
        *NEAR_KINDS,
    }
    for rows in groups.values():
        (original,) = [row for row in rows if row["dup_kind"] == "original"]
        for row in rows:
            if row["dup_kind"] == "exact":
                assert row["sha256"] == original["sha256"] and row["file"] != original["file"]
            elif row["dup_kind"] != "original":
                assert row["sha256"] != original["sha256"]
                assert hashes[row["file"]] - hashes[original["file"]] <= 4, row["dup_kind"]
    # Unrelated images are never near-duplicates (the tiny placeholders are left out).
    keys = {
        row["file"]: row["dup_group"] if row["dup_group"] is not None else row["file"]
        for row in pictures
    }
    files = sorted(hashes)
    for i, a in enumerate(files):
        for b in files[i + 1 :]:
            if keys[a] != keys[b]:
                assert hashes[a] - hashes[b] > 4, (a, b)


def test_rebuilding_is_a_no_op_and_an_incomplete_corpus_is_rebuilt(small_corpora, tmp_path):
    built = small_corpora[0]
    shutil.copytree(built.root, tmp_path / "c")
    stamp = (tmp_path / "c" / "corpus.json").stat().st_mtime_ns
    again = build_corpus(tmp_path / "c", seed=built.seed, n_images=100)
    assert again.counts == built.counts
    assert (tmp_path / "c" / "corpus.json").stat().st_mtime_ns == stamp
    victim = sorted((tmp_path / "c" / "images").iterdir())[0]
    victim.write_bytes(b"damaged")  # another size: the corpus no longer counts as complete
    (tmp_path / "c" / "images" / "stray.jpg").write_bytes(b"left over")
    build_corpus(tmp_path / "c", seed=built.seed, n_images=100)
    assert _digests(tmp_path / "c") == _digests(built.root)


def test_pictures_are_on_disk_as_they_are_rendered_and_a_killed_build_is_redone(
    demo_corpus, tmp_path
):
    """The builder writes each picture once encoded (its memory does not grow with the rows): a
    build killed halfway has pictures on disk, and the next build there writes the same corpus."""
    out = tmp_path / "interrupted"
    code = f"from laionface.demo.corpus import build_corpus; build_corpus({str(out)!r}, seed=0)"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        spooled = 0
        deadline = time.monotonic() + 240
        while process.poll() is None and spooled < 20 and time.monotonic() < deadline:
            spooled = len(list(out.glob(f"{TEMP_PREFIX}*/*")))
            time.sleep(0.05)
        assert process.poll() is None, "the build ended before its pictures were on disk"
        assert spooled >= 20
    finally:
        process.kill()
        process.wait()
    assert not (out / "corpus.json").exists()
    build_corpus(out, seed=0)
    assert _digests(out) == _digests(demo_corpus.root)
    assert [p.name for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)] == []


def test_bad_requests_fail_clearly(tmp_path):
    with pytest.raises(CorpusError, match="n_images"):
        build_corpus(tmp_path / "small", n_images=10)
    with pytest.raises(CorpusError, match="seed"):
        build_corpus(tmp_path / "neg", seed=-1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="notes.txt"):
        build_corpus(tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(CorpusError, match="local"):
        build_corpus("s3://bucket/corpus")
