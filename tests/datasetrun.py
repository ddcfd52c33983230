"""Real run folders for the dataset tests: a small one (emit, verify, publish, export) and the
demo's (the readers).

The small one: raw/ is real img2dataset output (its Downloader, as the download stage calls it) fetched from a
loopback HTTP server serving the public-domain face photos and images derived from them; faces/
holds hand-made detections for those images; select/ is the real select stage's output;
dedup/decisions.parquet marks byte-identical images as exact duplicates. Then the real emit
stage runs on a LocalCluster. Built once per test session (the result is cached by folder).

The demo's: the whole pipeline (pipelines/demo.toml) on the demo corpus served from 127.0.0.1,
as `laionface demo` runs it; also built once per test session.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import math
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import imagehash
import pyarrow as pa
from PIL import Image, ImageOps

from laionface.audit.funnel import funnel
from laionface.config import Config, SelectSection
from laionface.engine.cluster import open_client
from laionface.engine.pipeline import run_stage, stage_of
from laionface.engine.runfolder import RunFolder
from laionface.engine.runner import StageContext
from laionface.io import schemas, storage
from laionface.io.tars import iter_members
from laionface.stages.select import select_shard

ROWS_PER_SHARD = 6
SAMPLES_PER_SHARD = 4
MIN_SCORE = 0.9
MIN_FACE_SIZE = 8
# Two LAION-named parts, not 0 and 1, so part numbers are not confused with positions.
PARTS = (
    "/data/laion400m-meta/part-00003-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000.snappy.parquet",
    "/data/laion400m-meta/part-00017-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000.snappy.parquet",
)
EXTRA_COLUMNS = ["SAMPLE_ID", "NSFW", "similarity", "LICENSE"]


@dataclass(frozen=True)
class BuiltRun:
    run: Path
    dataset: Path
    published_keys: list[str]  # in the documented order
    part_of: dict[int, int]  # SAMPLE_ID -> LAION part number


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _corpus(faces_dir: Path, folder: Path) -> list[tuple[str, str]]:
    """Write the served images; [(file name, kind)] in row order (kind says what should happen)."""
    folder.mkdir(parents=True)
    originals = sorted(p for p in faces_dir.iterdir() if p.suffix in (".jpg", ".png"))
    rows = []
    for path in originals:
        shutil.copy(path, folder / path.name)
        rows.append((path.name, "face"))
    for i, path in enumerate(originals[:6]):
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            crop = image.crop((width // 10, height // 10, width - width // 10, height))
            (folder / f"crop{i}.jpg").write_bytes(_jpeg(crop))
            half = image.resize((max(64, width // 2), max(64, height // 2)))
            (folder / f"mirror{i}.jpg").write_bytes(_jpeg(ImageOps.mirror(half)))
        rows += [(f"crop{i}.jpg", "face"), (f"mirror{i}.jpg", "face")]
    rows = rows[:19]
    shutil.copy(originals[0], folder / f"copy-{originals[0].name}")
    rows.append((f"copy-{originals[0].name}", "duplicate"))
    (folder / "blank.jpg").write_bytes(_jpeg(Image.new("RGB", (300, 200), (128, 128, 128))))
    rows.append(("blank.jpg", "blank"))
    (folder / "tiny.jpg").write_bytes(_jpeg(Image.new("RGB", (40, 30), (200, 100, 50))))
    rows.append(("tiny.jpg", "tiny"))
    (folder / "broken.jpg").write_bytes(b"this is not an image at all")
    rows.append(("broken.jpg", "broken"))
    rows.append(("missing.jpg", "missing"))
    return rows


def _metadata(base_url: str, rows: list[tuple[str, str]]) -> list[dict]:
    out = []
    for i, (name, _) in enumerate(rows):
        out.append(
            {
                "SAMPLE_ID": 7_000_000 + 13 * i,
                "URL": f"{base_url}/{name}",
                "TEXT": f"a photo numéro {i}: {name}",
                "HEIGHT": 0,
                "WIDTH": 0,
                "LICENSE": "?" if i % 2 else "https://creativecommons.org/licenses/by/4.0/",
                "NSFW": "UNLIKELY",
                "similarity": 0.3 + i / 100,
                "source_file": PARTS[i * len(PARTS) // len(rows)],
                "source_row": i,
            }
        )
    return out


def _download(run: Path, shard_id: int, table: pa.Table) -> None:
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    raw = run / "raw"
    raw.mkdir(exist_ok=True)
    columns = [*EXTRA_COLUMNS, "caption", "url"]
    arrow = table.select([*EXTRA_COLUMNS, "TEXT", "URL"]).rename_columns(columns)
    feather = raw / f"{shard_id:05d}.feather"
    with pa.OSFile(str(feather), "wb") as sink, pa.ipc.new_file(sink, arrow.schema) as writer:
        writer.write_table(arrow)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=Resizer(image_size=256, resize_mode="no", resize_only_if_bigger=False),
        thread_count=4,
        save_caption=True,
        extract_exif=True,
        output_folder=str(raw),
        column_list=columns,
        timeout=5,
        number_sample_per_shard=ROWS_PER_SHARD,
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=0,
        user_agent_token=None,
        disallowed_header_directives=None,
    )
    ok, _ = downloader((shard_id, str(feather)))
    assert ok, f"img2dataset failed on shard {shard_id}"


def _detections(width: int, height: int) -> list[dict]:
    """A confident face in the middle, a weak one in a corner (below MIN_SCORE) and a confident
    one too small to count (under MIN_FACE_SIZE): published with counted false."""

    def face(x1: float, y1: float, x2: float, y2: float, score: float) -> dict:
        w, h = x2 - x1, y2 - y1
        marks = [(0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8)]
        flat = [v for mx, my in marks for v in (x1 + mx * w, y1 + my * h)]
        return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "landmarks": flat}

    return [
        face(0.3 * width, 0.2 * height, 0.7 * width, 0.7 * height, 0.998),
        face(0.0, 0.0, 0.1 * width, 0.1 * height, 0.61),
        face(0.8 * width, 0.8 * height, 0.8 * width + 6, 0.8 * height + 6, 0.95),
    ]


def _faces_shard(run: Path, shard: str) -> None:
    names = {}
    with open(run / "raw" / f"{shard}.tar", "rb") as handle:
        for member, data in iter_members(handle, source=shard):
            if member.ext == "jpg":
                names[member.key] = data
    raw = storage.read_parquet(str(run / "raw" / f"{shard}.parquet"))
    rows = []
    for row in raw.to_pylist():
        if row["status"] != "success":
            continue
        data = names[row["key"]]
        with Image.open(io.BytesIO(data)) as image:
            upright = ImageOps.exif_transpose(image)
            width, height = upright.size
            phash = int(str(imagehash.phash(upright)), 16)
            pixels = upright.convert("L").getextrema()
        blank = pixels[0] == pixels[1]
        rows.append(
            {
                "key": row["key"],
                "SAMPLE_ID": row["SAMPLE_ID"],
                "width": width,
                "height": height,
                "phash": phash,
                "sha256": hashlib.sha256(data).hexdigest(),
                "decode_error": None,
                "faces": [] if blank else _detections(width, height),
            }
        )
    storage.write_parquet(
        pa.Table.from_pylist(rows, schema=schemas.FACES), str(run / "faces" / f"{shard}.parquet")
    )


def _dedup(run: Path) -> list[str]:
    """Exact duplicates by sha256 (first key kept); returns the kept keys, sorted."""
    kept = []
    for url in storage.list_files(str(run / "select"), ".parquet"):
        shard = url.rsplit("/", 1)[1][: -len(".parquet")]
        select = storage.read_parquet(url).to_pylist()
        faces = {
            r["key"]: r
            for r in storage.read_parquet(str(run / "faces" / f"{shard}.parquet")).to_pylist()
        }
        kept += [(shard, r["key"], faces[r["key"]]["sha256"]) for r in select if r["kept"]]
    kept.sort()
    first: dict[str, int] = {}
    rows = []
    for index, (_, key, sha) in enumerate(kept):
        keeper = first.setdefault(sha, index)
        duplicate = keeper != index
        rows.append(
            {
                "key": key,
                "kept": not duplicate,
                "reason": "exact_duplicate" if duplicate else None,
                "duplicate_of": kept[keeper][1] if duplicate else None,
                "distance": 0 if duplicate else None,
                "cluster": keeper,
            }
        )
    storage.write_parquet(
        pa.Table.from_pylist(rows, schema=schemas.DEDUP), str(run / "dedup" / "decisions.parquet")
    )
    return [r["key"] for r in rows if r["kept"]]


def emit_config(mode: str = "copy") -> Config:
    config = Config()
    config.run.name = "emit-test"
    config.cluster.workers = 2
    config.cluster.retries = 0
    config.metadata.rows_per_shard = ROWS_PER_SHARD
    config.select = SelectSection(
        min_score=MIN_SCORE, min_face_size=MIN_FACE_SIZE, min_image_side=64
    )
    config.emit.samples_per_shard = SAMPLES_PER_SHARD
    config.emit.mode = mode
    return config


def run_emit(run: Path, config: Config) -> None:
    """The real emit stage on a LocalCluster, as the pipeline calls it. Its funnel is recorded
    unchecked: this run folder has no metadata counts or download markers (the pipeline's
    audit, which would refuse them, is tested in test_audit)."""
    stage = stage_of("emit")
    folder = RunFolder(str(run))
    folder.start(config)
    with open_client(config, str(run)) as client:
        ctx = StageContext(config, folder, client, progress=False, stage=stage)
        run_stage(ctx)
        stage.finish(ctx, funnel(str(run)).as_dict())


def build_run(folder: Path, faces_dir: Path) -> BuiltRun:
    run = folder / "run"
    for sub in ("metadata/shards", "faces", "select", "dedup"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    server, base_url = _serve(folder / "www")
    try:
        corpus = _corpus(faces_dir, folder / "www")
        rows = _metadata(base_url, corpus)
        n_shards = math.ceil(len(rows) / ROWS_PER_SHARD)
        for shard_id in range(n_shards):
            chunk = rows[shard_id * ROWS_PER_SHARD : (shard_id + 1) * ROWS_PER_SHARD]
            table = pa.Table.from_pylist(chunk, schema=schemas.DOWNLOAD_SHARD)
            storage.write_parquet(
                table, str(run / "metadata" / "shards" / f"{shard_id:05d}.parquet")
            )
            _download(run, shard_id, table)
    finally:
        server.shutdown()
    config = emit_config()
    rules = config.select.model_dump()
    for shard_id in range(n_shards):
        shard = f"{shard_id:05d}"
        _faces_shard(run, shard)
        select_shard(
            str(run / "faces" / f"{shard}.parquet"), str(run / "select" / f"{shard}.parquet"), rules
        )
    published = _dedup(run)
    run_emit(run, config)
    part_of = {r["SAMPLE_ID"]: int(r["source_file"].split("part-")[1][:5]) for r in rows}
    return BuiltRun(run, run / "dataset", published, part_of)


_BUILT: dict[Path, BuiltRun] = {}


def built_run(tmp_path_factory, faces_dir: Path) -> BuiltRun:
    """The session's run (built on first use). Tests must not change it: copy it first."""
    base = tmp_path_factory.getbasetemp()
    if base not in _BUILT:
        _BUILT[base] = build_run(tmp_path_factory.mktemp("emit-run"), faces_dir)
    return _BUILT[base]


def copy_run(built: BuiltRun, folder: Path) -> Path:
    target = folder / "run"
    shutil.copytree(built.run, target)
    return target


_DEMO: dict[Path, Path] = {}


def demo_run(tmp_path_factory, demo_corpus) -> Path:
    """The demo pipeline's run folder (built on first use). Tests must not change it."""
    from laionface.config import load_config
    from laionface.demo.corpus import DEMO_HOST
    from laionface.demo.imageserver import ImageServer
    from laionface.engine.pipeline import run_pipeline

    base = tmp_path_factory.getbasetemp()
    if base not in _DEMO:
        run = tmp_path_factory.mktemp("demo-run") / "run"
        with ImageServer(demo_corpus.root) as server:
            config = load_config(
                Path(__file__).resolve().parents[1] / "pipelines" / "demo.toml",
                [
                    f"metadata.input={json.dumps([str(demo_corpus.metadata_path)])}",
                    f'download.resolve={{"{DEMO_HOST}" = "{server.resolve_map[DEMO_HOST]}"}}',
                    "cluster.dashboard_address=''",
                ],
            )
            run_pipeline(config, run_dir=str(run), progress=False)
        _DEMO[base] = run
    return _DEMO[base]
