"""The audit: every input row has exactly one fate, `stats` agrees with the files, and a planted
inconsistency is named by stage and shard.

The run folder is built the way the stages lay it out: metadata inputs, drops, inputs.parquet and
shards; img2dataset-format raw shards holding real JPEGs of the faces in shared/faces, with a
--retry-failed round; detections from the real RetinaFace; then the real select, dedup and emit
stages. The expected figures are counted independently with duckdb."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from laionface.audit import funnel as audit
from laionface.audit import stats
from laionface.config import Config
from laionface.engine.pipeline import run_stages, stage_of
from laionface.engine.runfolder import RunFolder
from laionface.io import schemas, storage
from laionface.io.imagedecode import decode_image
from laionface.stages.select import select_shard
from tests.photos import PHOTOS

HOSTILE_CAPTION = "<script>document.title='pwned'</script><b>bold?</b> & \"quotes\""
HOSTILE_URL = "http://evil.example/x\"><script>document.title='pwned'</script>.jpg"
# What happens to each row the metadata stage keeps, in order (cycled).
KINDS = [
    "face",
    "face",
    "http_404",
    "face",
    "no_face",
    "timeout_recovers",
    "face",
    "corrupt",
    "face",
    "not_an_image",
    "exact_copy",
    "timeout_fails",
    "tiny",
    "near_copy",
]
# img2dataset's shard parquet with the download stage's two columns.
RAW = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
        ("LICENSE", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("error_category", pa.string()),
        ("retry_of", pa.string()),
    ]
)
ROWS_PER_SHARD = 15
SAMPLES = 10_000  # download.samples_per_shard_for(15): keys are 5 + 4 digits
# (file name, rows, {row: metadata drop reason})
INPUTS = [
    (
        "part-0.parquet",
        30,
        {0: "nsfw", 1: "nsfw", 2: "nsfw", 3: "min_similarity", 4: "min_similarity"},
    ),
    ("part-1.parquet", 20, {0: "nsfw", 1: "duplicate_url", 2: "duplicate_url"}),
]


def make_config() -> Config:
    config = Config()
    config.run.name = "audit <b>test</b>"
    config.run.seed = 7
    config.metadata.rows_per_shard = ROWS_PER_SHARD
    config.select.min_score = 0.9
    config.select.min_face_size = 45
    config.select.max_faces = 1
    config.select.min_image_side = 64
    return config


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _picture(faces_dir: Path, photo: str | None, seed: int) -> bytes:
    """A photo pasted on a coloured canvas of its own size and place (distinct pHashes)."""
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(300, 480)), int(rng.integers(280, 420))
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    canvas = Image.new("RGB", (width, height), color)
    noise = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    canvas = Image.fromarray(np.clip(np.asarray(canvas, np.int16) + noise, 0, 255).astype(np.uint8))
    if photo is not None:
        image = Image.open(faces_dir / photo).convert("RGB")
        image.thumbnail((int(width * 0.8), int(height * 0.9)))
        x = int(rng.integers(0, width - image.width + 1))
        y = int(rng.integers(0, height - image.height + 1))
        canvas.paste(image, (x, y))
    return _jpeg(canvas)


def _detect(images: dict[str, bytes], config: Config) -> dict[str, dict]:
    """FACES rows from the real RetinaFace, as the faces stage records them."""
    import torch

    from laionface.detect.detector import FaceDetector

    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine more threads contend and run 10x slower.
    detector = FaceDetector(engine="torch", device="cpu", record_threshold=0.5, threads=1)
    try:
        return {key: _detect_one(detector, data, config) for key, data in images.items()}
    finally:
        torch.set_num_threads(threads)


def _detect_one(detector, data: bytes, config: Config) -> dict:
    decoded = decode_image(data, 640, config.faces.max_image_pixels, draft=False)
    faces = []
    if decoded.pixels is not None:
        sx, sy = decoded.scale  # the detector's pixels -> the upright full-size frame
        for row in detector.detect([decoded.pixels])[0]:
            x1, y1, x2, y2, score = (float(v) for v in row[:5])
            marks = [float(v) / (sx if i % 2 == 0 else sy) for i, v in enumerate(row[5:15])]
            faces.append(
                {"x1": x1 / sx, "y1": y1 / sy, "x2": x2 / sx, "y2": y2 / sy, "score": score}
                | {"landmarks": marks}
            )
    return {
        "width": decoded.width,
        "height": decoded.height,
        "phash": decoded.phash,
        "decode_error": decoded.error,
        "faces": faces,
    }


def _raw_row(key: str, meta: dict, status: str, category: str | None, data: bytes | None) -> dict:
    messages = {
        None: None,
        "http_404": "HTTP Error 404: Not Found",
        "timeout": "The read operation timed out",
        "not_an_image": "Image decoding error: cannot identify image file",
    }
    size = Image.open(io.BytesIO(data)).size if data and status == "success" else (None, None)
    return {
        "SAMPLE_ID": meta["SAMPLE_ID"],
        "NSFW": meta["NSFW"],
        "similarity": meta["similarity"],
        "LICENSE": meta["LICENSE"],
        "caption": meta["TEXT"],
        "url": meta["URL"],
        "key": key,
        "status": status,
        "error_message": messages[category],
        "width": size[0],
        "height": size[1],
        "original_width": size[0],
        "original_height": size[1],
        "exif": None,
        "sha256": hashlib.sha256(data).hexdigest() if data else None,
        "error_category": category,
        "retry_of": meta.get("retry_of"),
    }


def _write_raw(run: str, shard: str, rows: list[dict], images: dict[str, bytes]) -> None:
    rows = sorted(rows, key=lambda r: r["key"])
    storage.write_parquet(pa.Table.from_pylist(rows, schema=RAW), f"{run}/raw/{shard}.parquet")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for row in rows:
            if row["status"] != "success":
                continue
            meta = json.dumps({"url": row["url"], "key": row["key"]}).encode()
            for ext, data in (
                ("jpg", images[row["key"]]),
                ("txt", row["caption"].encode()),
                ("json", meta),
            ):
                info = tarfile.TarInfo(f"{row['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    storage.write_bytes(f"{run}/raw/{shard}.tar", buffer.getvalue())
    successes = sum(r["status"] == "success" for r in rows)
    storage.write_json(
        f"{run}/raw/{shard}_stats.json",
        {"count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes},
    )


def build_run(root: Path, faces_dir: Path) -> str:
    """A complete run folder (every stage's output) under root/run; returns its URL."""
    config = make_config()
    run = str(root / "run")
    folder = RunFolder(run)
    folder.start(config)
    download_fp = stage_of("download").fingerprint(config)
    folder.stage("download")["fingerprint"] = download_fp
    folder.save()

    # metadata: two input files; drops counted per file; the kept rows cut into shards.
    kept_rows = []
    sample_id = 1000
    for index, (name, n_rows, drops) in enumerate(INPUTS):
        source = str(root / "inputs" / name)
        rows = []
        for i in range(n_rows):
            sample_id += 1
            rows.append(
                {
                    "SAMPLE_ID": sample_id,
                    "URL": f"http://img{sample_id % 3}.example.com/{sample_id}.jpg",
                    "TEXT": f"a photo, sample {sample_id}",
                    "HEIGHT": 300,
                    "WIDTH": 400,
                    "LICENSE": "?",
                    "NSFW": "NSFW" if drops.get(i) == "nsfw" else "UNLIKELY",
                    "similarity": 0.1 if drops.get(i) == "min_similarity" else 0.33,
                }
            )
        storage.write_parquet(pa.Table.from_pylist(rows, schema=schemas.LAION_METADATA), source)
        counts: dict[str, int] = {}
        for i, row in enumerate(rows):
            if i in drops:
                counts[drops[i]] = counts.get(drops[i], 0) + 1
            else:
                kept_rows.append({**row, "source_file": source, "source_row": i})
        part = [
            {"stage": "metadata", "source": source, "reason": r, "count": n}
            for r, n in counts.items()
            if r != "duplicate_url"
        ]
        storage.write_parquet(
            pa.Table.from_pylist(part, schema=schemas.DROP_COUNTS),
            f"{run}/metadata/drops/{index:05d}-00000.parquet",
        )
        if "duplicate_url" in counts:
            dup = [{"stage": "metadata", "source": source, "reason": "duplicate_url", "count": 2}]
            storage.write_parquet(
                pa.Table.from_pylist(dup, schema=schemas.DROP_COUNTS),
                f"{run}/metadata/drops/duplicate_url.parquet",
            )
    inputs = [
        {
            "source": str(root / "inputs" / name),
            "input_rows": n,
            "kept_rows": n - len(drops),
            "dropped_rows": len(drops),
        }
        for name, n, drops in INPUTS
    ]
    storage.write_parquet(
        pa.Table.from_pylist(inputs, schema=schemas.METADATA_INPUTS),
        f"{run}/metadata/inputs.parquet",
    )
    # Captions and URLs a hostile page could carry.
    kept_rows[16]["URL"] = HOSTILE_URL  # a 404: shown among the failure examples
    kept_rows[3]["TEXT"] = HOSTILE_CAPTION  # a face select keeps
    kept_rows[7]["TEXT"] = HOSTILE_CAPTION  # a decode error: shown among the dropped samples
    for position in (2, 30):  # 404s from one dead domain
        kept_rows[position]["URL"] = f"https://dead.example.org/{position}.jpg"
    shards = [kept_rows[i : i + ROWS_PER_SHARD] for i in range(0, len(kept_rows), ROWS_PER_SHARD)]
    for number, rows in enumerate(shards):
        storage.write_parquet(
            pa.Table.from_pylist(rows, schema=schemas.DOWNLOAD_SHARD),
            f"{run}/metadata/shards/{number:05d}.parquet",
        )

    # download: first attempts, then a retry shard for the timeouts.
    images: dict[str, bytes] = {}
    raw: dict[str, list[dict]] = {}
    retry_rows = []
    last_face: bytes | None = None
    for number, rows in enumerate(shards):
        shard = f"{number:05d}"
        raw[shard] = []
        for index, meta in enumerate(rows):
            key = f"{shard}{index:04d}"
            position = number * ROWS_PER_SHARD + index
            kind = KINDS[position % len(KINDS)]
            data = None
            if kind == "face":
                data = _picture(faces_dir, PHOTOS[position % len(PHOTOS)], position)
                last_face = data
            elif kind == "no_face":
                data = _picture(faces_dir, None, position)
            elif kind == "corrupt":
                whole = _picture(faces_dir, PHOTOS[0], position)
                data = whole[: len(whole) // 2]  # the header reads, the pixels don't
            elif kind == "tiny":
                data = _jpeg(Image.new("RGB", (40, 30), (200, 120, 90)))
            elif kind == "exact_copy":
                data = last_face
            elif kind == "near_copy":
                data = _jpeg(Image.open(io.BytesIO(last_face)), quality=70)
            if data is not None:
                images[key] = data
                raw[shard].append(_raw_row(key, meta, "success", None, data))
            elif kind.startswith("timeout"):
                raw[shard].append(_raw_row(key, meta, "failed_to_download", "timeout", None))
                retry_rows.append((key, meta, kind))
            elif kind == "http_404":
                raw[shard].append(_raw_row(key, meta, "failed_to_download", "http_404", None))
            else:
                raw[shard].append(_raw_row(key, meta, "failed_to_resize", "not_an_image", None))
    retry_shard = f"{len(shards):05d}"
    raw[retry_shard] = []
    for index, (first_key, meta, kind) in enumerate(retry_rows):
        key = f"{retry_shard}{index:04d}"
        meta = {**meta, "retry_of": first_key}
        if kind == "timeout_recovers":
            images[key] = _picture(faces_dir, PHOTOS[(index + 3) % len(PHOTOS)], 100 + index)
            raw[retry_shard].append(_raw_row(key, meta, "success", None, images[key]))
        else:
            raw[retry_shard].append(_raw_row(key, meta, "failed_to_download", "timeout", None))
    for shard, rows in raw.items():
        _write_raw(run, shard, rows, images)
        step = "download/retry" if shard == retry_shard else "download"
        storage.write_json(
            f"{run}/{step}/_done/{shard}.json", {"settings": download_fp, "stats": {}}
        )

    # faces (the real detector) and select (the real select stage).
    detections = _detect(images, config)
    for shard, rows in raw.items():
        faces_rows = []
        for row in rows:
            if row["status"] != "success":
                continue
            found = detections[row["key"]]
            faces_rows.append(
                {
                    "key": row["key"],
                    "SAMPLE_ID": row["SAMPLE_ID"],
                    "width": found["width"],
                    "height": found["height"],
                    "phash": found["phash"],
                    "sha256": row["sha256"],
                    "decode_error": found["decode_error"],
                    "faces": found["faces"],
                }
            )
        faces_url = f"{run}/faces/{shard}.parquet"
        storage.write_parquet(pa.Table.from_pylist(faces_rows, schema=schemas.FACES), faces_url)
        select_shard(faces_url, f"{run}/select/{shard}.parquet", config.select.model_dump())

    # dedup and emit: the real stages. One kept image is also in an "evaluation set".
    selected = pa.concat_tables(
        storage.read_parquet(u) for u in storage.list_files(f"{run}/select", ".parquet")
    )
    kept_keys = sorted(selected.filter(selected["kept"])["key"].to_pylist())
    evaluation = root / "evaluation"
    evaluation.mkdir()
    (evaluation / "in-the-test-set.jpg").write_bytes(images[kept_keys[-1]])
    config.dedup.reference = [str(evaluation)]
    config.emit.samples_per_shard = 8
    folder.start(config)
    _run_stages(config, folder, ["dedup", "emit"])
    return run


def _run_stages(config: Config, folder: RunFolder, names: list[str]) -> None:
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        run_stages(config, folder, c, names, progress=False)


@pytest.fixture(scope="session")
def audit_run(tmp_path_factory, shared_faces) -> str:
    return build_run(tmp_path_factory.mktemp("audit"), shared_faces)


@pytest.fixture()
def run_copy(audit_run, tmp_path) -> str:
    """A copy of the run to damage."""
    target = tmp_path / "run"
    shutil.copytree(audit_run, target)
    return str(target)


# ---------------------------------------------------------------------------------------------
# Independent counts (duckdb over the files)


def expected_rows(run: str) -> list[tuple[str, str, str | None, int]]:
    """(stage, outcome, reason, count) of the whole funnel, counted with SQL from the files."""
    db = duckdb.connect()

    def q(sql: str) -> list[tuple]:
        return db.execute(sql).fetchall()

    out = []

    def stage(name: str, total: int, dropped: list[tuple[str, int]], kept: int) -> None:
        out.append((name, "input", None, total))
        out.extend((name, "dropped", r, n) for r, n in dropped)
        out.append((name, "kept", None, kept))

    total = q(f"select sum(input_rows) from '{run}/metadata/inputs.parquet'")[0][0]
    drops = q(f"select reason, sum(count) from '{run}/metadata/drops/*.parquet' group by reason")
    meta_kept = q(f"select count(*) from '{run}/metadata/shards/*.parquet'")[0][0]
    stage("metadata", total, drops, meta_kept)

    # The latest attempt of every input row: retry rows supersede the rows they retry.
    latest = f"""
        with attempts as (
            select coalesce(retry_of, key) as input_key, key, status, error_category,
                   regexp_extract(filename, '([0-9]+)\\.parquet$', 1) as shard
            from read_parquet('{run}/raw/*.parquet', filename=true)
        )
        select * from attempts qualify row_number() over
            (partition by input_key order by shard desc) = 1
    """
    failures = q(
        f"select error_category, count(*) from ({latest}) where status <> 'success' group by 1"
    )
    successes = q(f"select count(*) from ({latest}) where status = 'success'")[0][0]
    stage("download", meta_kept, failures, successes)
    faces = q(f"select count(*) from '{run}/faces/*.parquet'")[0][0]
    stage("faces", successes, [], faces)
    select_drops = q(
        f"select reason, count(*) from '{run}/select/*.parquet' where not kept group by reason"
    )
    select_kept = q(f"select count(*) from '{run}/select/*.parquet' where kept")[0][0]
    stage("select", faces, select_drops, select_kept)
    dedup = f"'{run}/dedup/decisions.parquet'"
    dedup_drops = q(f"select reason, count(*) from {dedup} where not kept group by reason")
    dedup_kept = q(f"select count(*) from {dedup} where kept")[0][0]
    stage("dedup", select_kept, dedup_drops, dedup_kept)
    published = q(
        f"""select count(*) from read_parquet('{run}/dataset/*.parquet', filename=true)
            where not ends_with(filename, 'manifest.parquet')"""
    )[0][0]
    stage("emit", dedup_kept, [], published)
    return out


def _key(row: tuple) -> tuple:
    return (row[0], row[1], row[2] or "")


def parse_stats(text: str) -> list[tuple[str, str, str | None, int, float, float]]:
    """The table `laionface stats` printed, back as (stage, outcome, reason, count, %, %)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    rows = []
    for line in lines[start + 1 :]:
        parts = line.split()
        if len(parts) != 5 or not parts[3].endswith("%"):
            break
        stage, reason, count, pct, pct_stage = parts
        outcome = {"(in)": "input", "(kept)": "kept"}.get(reason, "dropped")
        rows.append(
            (
                stage,
                outcome,
                None if outcome != "dropped" else reason,
                int(count.replace(",", "")),
                float(pct[:-1]),
                float(pct_stage[:-1]),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Tests


def test_stats_matches_counts_from_the_files(audit_run, capsys):
    assert stats.stats_command(audit_run) == 0
    printed = capsys.readouterr().out
    assert "conservation: ok" in printed
    rows = parse_stats(printed)
    expected = expected_rows(audit_run)
    assert sorted(_key(r) + (r[3],) for r in rows) == sorted(_key(r) + (r[3],) for r in expected)
    # Each stage's rows are in funnel order: input, its reasons, kept.
    assert [r[0] for r in rows] == [
        r[0] for r in sorted(rows, key=lambda r: audit.STAGE_ORDER.index(r[0]))
    ]

    total = rows[0][3]
    assert total == 50
    stage_input = {r[0]: r[3] for r in rows if r[1] == "input"}
    for stage, _, _, count, pct, pct_stage in rows:
        assert pct == pytest.approx(100 * count / total, abs=0.006)
        assert pct_stage == pytest.approx(100 * count / stage_input[stage], abs=0.006)
    # Conservation: input = every drop + what the last stage kept.
    drops = sum(r[3] for r in rows if r[1] == "dropped")
    assert total == drops + rows[-1][3]


def test_retried_rows_are_counted_once(audit_run):
    result = audit.funnel(audit_run)
    download = result.stage("download")
    # 42 rows went to download; 6 timed out first, 3 of them came back in the retry round.
    assert download.input == 42
    assert download.dropped["timeout"] == 3
    assert download.kept + download.dropped_total == 42
    # Faces and select count the retry shard as a raw shard of its own.
    faces_shards = {s for s, o, _, n in result.stage("faces").shard_rows if o == "kept" and n}
    assert "00003" in faces_shards


def test_write_audit_keeps_the_figures_as_parquet(audit_run, capsys):
    result = audit.write_audit(audit_run)
    funnel_table = storage.read_parquet(f"{audit_run}/audit/funnel.parquet")
    assert funnel_table.schema.equals(schemas.AUDIT_FUNNEL)
    assert stats.stats_command(audit_run) == 0
    printed = parse_stats(capsys.readouterr().out)
    stored = [(r["stage"], r["outcome"], r["reason"], r["count"]) for r in funnel_table.to_pylist()]
    assert stored == [r[:4] for r in printed]

    shards = storage.read_parquet(f"{audit_run}/audit/shards.parquet")
    assert shards.schema.equals(schemas.AUDIT_SHARDS)
    # Per shard, input = kept + dropped; and the shard figures sum to the funnel's.
    db = duckdb.connect()
    db.register("shards", shards)
    unbalanced = db.execute(
        """select stage, shard from shards where stage <> 'emit' group by stage, shard
           having sum(count) filter (where outcome = 'input')
               <> sum(count) filter (where outcome <> 'input')"""
    ).fetchall()
    assert unbalanced == []
    for stage in result.stages:
        per_shard = db.execute(
            "select outcome, coalesce(reason, ''), sum(count) from shards where stage = ?"
            " group by 1, 2",
            [stage.stage],
        ).fetchall()
        totals = {(o, r): n for o, r, n in per_shard}
        assert totals[("kept", "")] == stage.kept
        for reason, count in stage.dropped.items():
            assert totals[("dropped", reason)] == count
    # Select figures per shard, counted from each select file.
    select_counts = db.execute(
        f"""select regexp_extract(filename, '([0-9]+)\\.parquet$', 1), count(*) filter (where kept)
            from read_parquet('{audit_run}/select/*.parquet', filename=true) group by 1"""
    ).fetchall()
    stored_kept = {
        r["shard"]: r["count"]
        for r in shards.to_pylist()
        if r["stage"] == "select" and r["outcome"] == "kept"
    }
    assert stored_kept == dict(select_counts)


def test_a_row_missing_from_a_select_shard_is_named(run_copy, capsys):
    url = f"{run_copy}/select/00001.parquet"
    table = storage.read_parquet(url)
    storage.write_parquet(table.slice(1), url)
    assert stats.stats_command(run_copy) == 1
    error = capsys.readouterr().err
    assert "select: raw shards 00001 don't add up" in error
    assert "select/00001.parquet" in error

    storage.write_json(f"{run_copy}/audit/funnel.parquet", {"stale": True})
    with pytest.raises(audit.ConservationError) as caught:
        audit.write_audit(run_copy)
    problems = caught.value.problems
    assert {(p.stage, p.shards) for p in problems} >= {("select", ("00001",))}
    assert not storage.exists(f"{run_copy}/audit/funnel.parquet")  # never left stale


def test_an_unfinished_faces_shard_is_named(run_copy):
    storage.remove(f"{run_copy}/faces/00002.parquet")
    result = audit.funnel(run_copy)
    named = {(p.stage, p.shards) for p in result.problems}
    assert ("faces", ("00002",)) in named
    message = str(audit.ConservationError(result.problems))
    assert "no faces/00002.parquet yet" in message
    assert "--stages faces" in message


def test_a_download_shard_without_outcomes_is_named(run_copy):
    # A raw shard whose completion marker is gone is not a complete shard.
    storage.remove(f"{run_copy}/download/_done/00001.json")
    problems = audit.funnel(run_copy).problems
    download = [p for p in problems if p.stage == "download"]
    assert download and download[0].shards == ("00001",)
    # Only the rows its retry shard holds are left (2 timeouts of shard 00001).
    assert "15 rows in metadata/shards/00001.parquet, 2 download outcomes" in download[0].message
    assert "no complete raw shard" in download[0].message


def test_dedup_and_emit_inconsistencies_are_named(run_copy):
    decisions = storage.read_parquet(f"{run_copy}/dedup/decisions.parquet")
    lost = decisions["key"][0].as_py()
    storage.write_parquet(decisions.slice(1), f"{run_copy}/dedup/decisions.parquet")
    sizes = storage.read_json(f"{run_copy}/dataset/sizes.json")
    sizes["00001.tar"] += 1
    storage.write_json(f"{run_copy}/dataset/sizes.json", sizes)
    problems = audit.funnel(run_copy).problems
    dedup = [p for p in problems if p.stage == "dedup"]
    assert [p.shards for p in dedup] == [(lost[:5],)]
    assert "1 without a decision" in dedup[0].message
    emit = [p for p in problems if p.stage == "emit"]
    assert ("00001",) in [p.shards for p in emit]
    assert "sizes.json says" in str(audit.ConservationError(emit))


def test_a_sample_missing_from_the_dataset_is_named(run_copy):
    url = f"{run_copy}/dataset/00001.parquet"
    table = storage.read_parquet(url)
    lost = table["raw_shard"][0].as_py()
    storage.write_parquet(table.slice(1), url)
    problems = [p for p in audit.funnel(run_copy).problems if p.stage == "emit"]
    named = {p.shards for p in problems}
    assert ("00001",) in named  # the dataset shard, against sizes.json and manifest.parquet
    assert (lost,) in named  # the raw shard whose kept sample was not published
    message = str(audit.ConservationError(problems))
    assert "sizes.json says" in message and "in the dataset" in message


def test_metadata_counts_are_checked_per_input_file(run_copy):
    url = f"{run_copy}/metadata/drops/00001-00000.parquet"
    table = storage.read_parquet(url)
    counts = pc.add(table["count"], 1)
    storage.write_parquet(table.set_column(3, "count", counts), url)
    problems = audit.funnel(run_copy).problems
    assert [p.stage for p in problems] == ["metadata"]
    assert problems[0].shards[0].endswith("part-1.parquet")


def test_a_partial_run_covers_the_stages_present(run_copy, capsys):
    shutil.rmtree(f"{run_copy}/dedup")
    shutil.rmtree(f"{run_copy}/dataset")
    result = audit.funnel(run_copy)
    assert result.ok
    assert result.missing == ["dedup", "emit"]
    assert [s.stage for s in result.stages] == ["metadata", "download", "faces", "select"]
    drops = sum(s.dropped_total for s in result.stages)
    assert result.input_rows == drops + result.stage("select").kept
    assert stats.stats_command(run_copy) == 0
    assert "stages without output: dedup, emit" in capsys.readouterr().out


def test_with_dedup_turned_off_emit_is_checked_against_select(run_copy, capsys):
    shutil.rmtree(f"{run_copy}/dedup")
    state = storage.read_json(f"{run_copy}/run.json")
    state["config"]["dedup"].update(exact=False, near=False, reference=[])
    storage.write_json(f"{run_copy}/run.json", state)
    result = audit.funnel(run_copy)
    assert result.disabled == ["dedup"] and result.not_run == []
    # The dataset still holds what dedup kept, not everything select kept: named per raw shard.
    emit = [p for p in result.problems if p.stage == "emit"]
    assert emit and "samples kept from raw shard" in emit[-1].message
    select_kept = result.stage("select").kept
    assert result.stage("emit").input == select_kept
    assert stats.stats_command(run_copy) == 1
    assert "stages turned off in the config: dedup" in capsys.readouterr().out


def test_funnel_summary_is_plain_data(audit_run):
    summary = audit.funnel(audit_run, upto="dedup").as_dict()
    assert json.loads(json.dumps(summary)) == summary
    assert [s["stage"] for s in summary["stages"]][-1] == "dedup"
    assert summary["conservation"] == "ok"
    assert summary["input_rows"] == 50


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert stats.stats_command(str(tmp_path / "nothing")) == 1
    assert "not a laionface run folder" in capsys.readouterr().err
