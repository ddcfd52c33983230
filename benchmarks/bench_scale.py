"""The driver steps at scale: a synthetic run folder of N images, then select, dedup, emit, the
audit, the report and verify through the CLI, each measured.

    python benchmarks/bench_scale.py --images 200000          # the smoke size (< 10 min here)
    python benchmarks/bench_scale.py --images 1000000 --workdir /data/scale-1m
    python benchmarks/bench_scale.py --images 10000000 --copy-limit 0   # emit in manifest mode

The run folder has the real data's shape, written shard by shard on a process pool (memory
bounded whatever N): metadata inputs in LAION-400M's schema (about 8 input rows per image, the
dropped ones with the values that drop them), metadata outputs (shards, drops, inputs.parquet),
download outputs in 10,000-row shards with about 1/3 failed (img2dataset's columns, tars of
tiny real JPEGs, stats, completion markers), and faces parquet with 0-20 detections per image
drawn from a demo run's detections (scores, box sizes, landmarks), pHashes and sha256 with
planted exact duplicates, near duplicates at every distance 0-6 and chains.

Each step is a `laionface` command in a child process; a sampler follows its process tree and
records wall and CPU time, the peak RSS of the driver and of each other process (the workers
and their fork server), and the files and bytes it wrote. `run --stages X` includes the audit
that ends every run; `stats` is the audit alone.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_SHARD = 10_000
SUCCESS_RATE = 2 / 3
KEPT_STRIDE = 5  # one input row in 5 is kept (plus the dropped rows at each file's end)
INPUT_FILE_ROWS = 2_500_000
DROP_CYCLE = ("nsfw", "min_similarity", "min_side", "duplicate_url", "null_caption")
FAILURES = {
    "http_404": 0.3,
    "timeout": 0.2,
    "not_an_image": 0.15,
    "http_5xx": 0.1,
    "connection": 0.1,
    "dns": 0.1,
    "opted_out": 0.05,
}
MESSAGES = {
    "http_404": "HTTP Error 404: Not Found",
    "timeout": "timed out",
    "not_an_image": "Image decoding error",
    "http_5xx": "HTTP Error 503: Service Unavailable",
    "connection": "Connection refused",
    "dns": "[Errno -2] Name or service not known",
    "opted_out": "X-Robots-Tag: noai",
}
# raw/NNNNN.parquet as the download stage writes it: img2dataset's columns, then ours.
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
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("error_category", pa.string()),
        ("retry_of", pa.string()),
    ]
)
JPEG_POOL = 256
MAX_DETECTIONS = 20
SETTINGS = {
    "run": {"name": "scale", "seed": 0},
    "cluster": {"workers": 2, "threads_per_worker": 1, "dashboard_address": ""},
    "metadata": {"rows_per_shard": ROWS_PER_SHARD, "nsfw": ["UNLIKELY", "UNSURE"]},
    "select": {"min_score": 0.9, "min_faces": 1, "max_faces": 8, "min_face_size": 32},
    "emit": {"samples_per_shard": 10_000},
}
SETTINGS["metadata"].update(min_similarity=0.3, min_side=64)


# ---------------------------------------------------------------------------------------------
# Deterministic pseudo-random values of indices (any process draws the same)


def mix(values: np.ndarray, salt: int = 0) -> np.ndarray:
    """splitmix64 of uint64 values (vectorised)."""
    x = values.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (salt + 1)) % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(values: np.ndarray, salt: int) -> np.ndarray:
    return (mix(values, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ---------------------------------------------------------------------------------------------
# The plan: input files, metadata shards, download outcomes


class Plan:
    """How N images spread over input files, metadata shards and download outcomes."""

    def __init__(self, images: int, inputs_dir: Path):
        self.images = images
        self.rows = math.ceil(images / SUCCESS_RATE)  # rows of the metadata shards
        self.shards = math.ceil(self.rows / ROWS_PER_SHARD)
        n_files = max(1, math.ceil(self.rows * KEPT_STRIDE / INPUT_FILE_ROWS))
        base, extra = divmod(self.rows, n_files)
        self.kept = [base + (1 if f < extra else 0) for f in range(n_files)]
        self.offsets = np.concatenate([[0], np.cumsum(self.kept)]).astype(np.int64)
        # Every kept row has KEPT_STRIDE - 1 dropped rows after it, plus NSFW rows at the end.
        self.totals = [k * KEPT_STRIDE + k // 2 for k in self.kept]
        self.files = [str(inputs_dir / f"part-{f:05d}.parquet") for f in range(n_files)]

    def locate(self, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input file, row in it) of global kept row indices."""
        files = np.searchsorted(self.offsets, kept, side="right") - 1
        return files, (kept - self.offsets[files]) * KEPT_STRIDE

    def reasons(self, f: int, rows: np.ndarray) -> np.ndarray:
        """The drop reason of input rows (index into DROP_CYCLE), -1 where kept."""
        reason = np.where(rows % KEPT_STRIDE == 0, -1, rows % KEPT_STRIDE).astype(np.int64)
        return np.where(rows >= self.kept[f] * KEPT_STRIDE, 0, reason)


def _urls(f: np.ndarray, rows: np.ndarray) -> pa.Array:
    host = (mix(f.astype(np.uint64) * 1_000_003 + rows.astype(np.uint64)) % 997).astype(str)
    text = np.char.add(np.char.add("http://img", host), ".example.com/")
    text = np.char.add(np.char.add(np.char.add(text, f.astype(str)), "/"), rows.astype(str))
    return pa.array(np.char.add(text, ".jpg"))


def input_rows(plan: Plan, f: int, rows: np.ndarray) -> pa.Table:
    """LAION-400M's columns for rows `rows` of input file f, each with what its fate needs."""
    reason = plan.reasons(f, rows)
    files = np.full(rows.size, f, np.int64)
    url_rows = np.where(
        reason == DROP_CYCLE.index("duplicate_url"), rows - rows % KEPT_STRIDE, rows
    )
    ids = f * 1_000_000_000 + rows
    text = np.char.add("a portrait of a person, sample ", ids.astype(str))
    small = reason == DROP_CYCLE.index("min_side")
    return pa.table(
        {
            "SAMPLE_ID": pa.array(ids, pa.int64()),
            "URL": _urls(files, url_rows),
            "TEXT": pa.array(text, mask=reason == DROP_CYCLE.index("null_caption")),
            "HEIGHT": pa.array(np.where(small, 32, 480), pa.int32()),
            "WIDTH": pa.array(np.where(small, 40, 640), pa.int32()),
            "LICENSE": pa.array(np.full(rows.size, "?")),
            "NSFW": pa.array(np.where(reason == 0, "NSFW", "UNLIKELY")),
            "similarity": pa.array(
                np.where(reason == DROP_CYCLE.index("min_similarity"), 0.1, 0.35)
            ),
        }
    )


# ---------------------------------------------------------------------------------------------
# Images, hashes, detections


def jpeg_pool(seed: int = 0) -> list[bytes]:
    """Tiny real JPEGs (24x24, smooth colour fields): what a tar member holds."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(JPEG_POOL):
        corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float32)
        t = np.linspace(0, 1, 24, dtype=np.float32)[:, None, None]
        s = np.linspace(0, 1, 24, dtype=np.float32)[None, :, None]
        top = corners[0, 0] * (1 - s) + corners[0, 1] * s
        bottom = corners[1, 0] * (1 - s) + corners[1, 1] * s
        pixels = (top * (1 - t) + bottom * t).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
        out.append(buffer.getvalue())
    return out


def image_bytes(pool: list[bytes], g: int, key: str) -> bytes:
    """Image g of the pool made unique by a JPEG comment naming its key (decodes the same)."""
    data = pool[g % len(pool)]
    comment = key.encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def _flips(g: np.ndarray, bits: np.ndarray, salt: int) -> np.ndarray:
    """A mask of `bits[i]` distinct bit positions (0-6) per image g[i], drawn from g."""
    positions = np.argsort(mix(g[:, None] * np.uint64(64) + np.arange(64, dtype=np.uint64), salt))
    mask = np.zeros(g.size, np.uint64)
    for j in range(int(bits.max(initial=0))):
        mask |= np.where(j < bits, np.uint64(1) << positions[:, j].astype(np.uint64), 0)
    return mask


def planted(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the image each of g copies exactly, -1 if none; its pHash): in each hundred of rows, 82
    are images of their own, 4 exact copies of an earlier image, 8 near copies at distance 0-6
    and 4 a chain of near copies 3 bits apart, link by link; 2 more of their own."""
    g = g.astype(np.uint64)
    r, block = g % np.uint64(100), g - g % np.uint64(100)
    back = np.uint64(100) * (np.uint64(1) + (g // np.uint64(100)) % np.uint64(5))
    source = np.where(block > back, block - back, 0).astype(np.uint64) + r % np.uint64(80)
    phash = mix(g, 3)
    exact = (r >= 82) & (r <= 85)
    phash = np.where(exact, mix(source, 3), phash)
    near = (r >= 86) & (r <= 93)
    bits = np.where(near, (r - np.uint64(86)) % np.uint64(7), 0).astype(np.int64)
    phash = np.where(near, mix(source, 3) ^ _flips(g, bits, 10), phash)
    chain = mix(source, 3)
    for link in range(94, 98):
        chain = np.where(
            r >= link, chain ^ _flips(block + np.uint64(link), np.full(g.size, 3), 20), chain
        )
    phash = np.where((r >= 94) & (r <= 97), chain, phash)
    return np.where(exact, source.astype(np.int64), -1), phash


class Detections:
    """A demo run's image sizes and detections (relative to the image), drawn with replacement:
    0-8 faces an image as often as in the demo, 9-20 in 2% of images."""

    def __init__(self, demo_run: Path):
        tables = [pq.read_table(p) for p in sorted((demo_run / "faces").glob("*.parquet"))]
        table = pa.concat_tables(tables)
        table = table.filter(pa.compute.is_null(table["decode_error"]))
        self.sizes = np.stack([table["width"].to_numpy(), table["height"].to_numpy()], axis=1)
        counts = np.bincount(pa.compute.list_value_length(table["faces"]).to_numpy(), minlength=9)
        weights = np.concatenate([counts / counts.sum() * 0.98, np.full(12, 0.02 / 12)])
        self.count_cdf = np.cumsum(weights / weights.sum())
        image_of = np.repeat(np.arange(table.num_rows), counts_of(table["faces"]))
        faces = pa.compute.list_flatten(table["faces"]).combine_chunks()
        wh = self.sizes[image_of].astype(np.float64)
        self.boxes = np.stack(
            [
                faces.field(n).to_numpy() / wh[:, i % 2]
                for i, n in enumerate(("x1", "y1", "x2", "y2"))
            ],
            axis=1,
        )
        marks = faces.field("landmarks").flatten().to_numpy().reshape(-1, 10)
        self.marks = marks / np.tile(wh, 5)
        self.scores = faces.field("score").to_numpy()

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, pa.Array]:
        """(width and height of n images, their detections as schemas.FACES' faces column)."""
        from laionface.io.schemas import FACE

        wh = self.sizes[rng.integers(len(self.sizes), size=n)]
        k = np.searchsorted(self.count_cdf, rng.random(n) * self.count_cdf[-1])
        pick = rng.integers(len(self.scores), size=int(k.sum()))
        scale = np.repeat(wh, k, axis=0).astype(np.float64)
        boxes = (self.boxes[pick] * np.tile(scale, 2)).astype(np.float32)
        marks = (self.marks[pick] * np.tile(scale, 5)).astype(np.float32)
        struct = pa.StructArray.from_arrays(
            [*(pa.array(boxes[:, c]) for c in range(4)), pa.array(self.scores[pick])]
            + [pa.FixedSizeListArray.from_arrays(pa.array(marks.ravel()), 10)],
            fields=list(FACE),
        )
        offsets = pa.array(np.concatenate([[0], np.cumsum(k)]).astype(np.int32))
        return wh, pa.ListArray.from_arrays(offsets, struct)


def counts_of(faces: pa.ChunkedArray) -> np.ndarray:
    return pa.compute.list_value_length(faces).to_numpy()


# ---------------------------------------------------------------------------------------------
# Writing the run folder, shard by shard


def write_input_file(plan: Plan, f: int) -> None:
    """Input file f, in chunks of 250,000 rows (row groups), as LAION's parts are."""
    with pq.ParquetWriter(plan.files[f], input_rows(plan, f, np.arange(1)).schema) as writer:
        for start in range(0, plan.totals[f], 250_000):
            rows = np.arange(start, min(start + 250_000, plan.totals[f]), dtype=np.int64)
            writer.write_table(input_rows(plan, f, rows))


def _metadata_shard(plan: Plan, s: int):
    from laionface.io.schemas import DOWNLOAD_SHARD

    kept = np.arange(s * ROWS_PER_SHARD, min((s + 1) * ROWS_PER_SHARD, plan.rows), dtype=np.int64)
    files, rows = plan.locate(kept)
    parts = []
    for f in np.unique(files):
        mine = rows[files == f]
        table = input_rows(plan, int(f), mine)
        table = table.append_column("source_file", pa.array([plan.files[f]] * len(mine)))
        parts.append(table.append_column("source_row", pa.array(mine, pa.int64())))
    return pa.concat_tables(parts).cast(DOWNLOAD_SHARD), kept


def _outcomes(kept: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    success = uniform(kept.astype(np.uint64), 1) < SUCCESS_RATE
    edges = np.cumsum(list(FAILURES.values()))
    pick = np.searchsorted(edges, uniform(kept.astype(np.uint64), 2) * edges[-1])
    names = list(FAILURES)
    return success, [None if ok else names[p] for ok, p in zip(success, pick, strict=True)]


@functools.lru_cache(maxsize=1)
def _sources(demo_run: str) -> tuple[list[bytes], Detections]:
    """The JPEG pool and the detections, once per generating process."""
    return jpeg_pool(), Detections(Path(demo_run))


def key_of(g: int) -> str:
    """The download key of metadata row g (img2dataset's: shard name, then row in the shard)."""
    from laionface.layout import shard_name

    return f"{shard_name(g // ROWS_PER_SHARD)}{g % ROWS_PER_SHARD:04d}"


def write_download_shard(run: str, plan: Plan, demo_run: Path, s: int) -> dict:
    """Metadata shard s, its raw shard (tar, parquet, stats) and its faces parquet."""
    from laionface.io import storage
    from laionface.io.tars import TarWriter
    from laionface.layout import RunLayout, shard_name

    layout, name = RunLayout(run), shard_name(s)
    shard, kept = _metadata_shard(plan, s)
    storage.write_parquet(shard, layout.metadata_shard(name))
    success, categories = _outcomes(kept)
    pool, draws = _sources(str(demo_run))
    images = np.flatnonzero(success)
    sources, phashes = planted(kept[images])
    sizes, faces = draws.draw(np.random.default_rng(s), images.size)
    raw_rows = [
        _raw_row(row, f"{name}{i:04d}", categories[i]) for i, row in enumerate(shard.to_pylist())
    ]
    with storage.atomic_open(layout.raw_tar(name)) as handle:
        tar = TarWriter(handle)
        for n, i in enumerate(images):
            raw, g, source = raw_rows[i], int(kept[i]), int(sources[n])
            # An exact copy holds its source's bytes, comment (the source's key) included.
            data = (
                image_bytes(pool, g, raw["key"])
                if source < 0
                else image_bytes(pool, source, key_of(source))
            )
            raw.update(width=int(sizes[n, 0]), height=int(sizes[n, 1]))
            raw["sha256"] = hashlib.sha256(data).hexdigest()
            tar.add(f"{raw['key']}.jpg", data)
            tar.add(f"{raw['key']}.txt", (raw["caption"] or "").encode())
            tar.add(f"{raw['key']}.json", json.dumps(raw, sort_keys=True).encode())
        tar.close()
    raw_table = pa.Table.from_pylist(raw_rows, schema=RAW)
    storage.write_parquet(raw_table, layout.raw_parquet(name))
    storage.write_parquet(
        _faces_table(raw_table.take(images), sizes, phashes, faces), layout.faces(name)
    )
    stats = {"count": len(raw_rows), "successes": int(images.size)}
    stats.update(failed_to_download=len(raw_rows) - int(images.size), failed_to_resize=0)
    storage.write_json(layout.raw_stats(name), stats)
    return {"shard": name, "rows": len(raw_rows), "images": int(images.size)}


def _faces_table(raw: pa.Table, sizes: np.ndarray, phashes: np.ndarray, faces: pa.Array):
    from laionface.io.schemas import FACES

    n = raw.num_rows
    columns = {
        "key": raw["key"],
        "SAMPLE_ID": raw["SAMPLE_ID"],
        "width": pa.array(sizes[:, 0], pa.int32()),
        "height": pa.array(sizes[:, 1], pa.int32()),
        "phash": pa.array(phashes, pa.uint64()),
        "sha256": raw["sha256"],
        "decode_error": pa.nulls(n, pa.string()),
        "faces": faces,
    }
    return pa.table(columns).cast(FACES)


def _raw_row(row: dict, key: str, category: str | None) -> dict:
    return {
        "SAMPLE_ID": row["SAMPLE_ID"],
        "NSFW": row["NSFW"],
        "similarity": row["similarity"],
        "LICENSE": row["LICENSE"],
        "caption": row["TEXT"],
        "url": row["URL"],
        "key": key,
        "status": "success" if category is None else "failed_to_download",
        "error_message": None if category is None else MESSAGES[category],
        "width": None,
        "height": None,
        "original_width": None,
        "original_height": None,
        "exif": None,
        "sha256": None,
        "error_category": category,
        "retry_of": None,
    }


def metadata_tables(run: str, plan: Plan) -> None:
    """metadata/inputs.parquet, drops/ and summary.json, as the metadata stage leaves them."""
    from laionface.io import schemas, storage
    from laionface.layout import METADATA_REASONS, RunLayout

    layout = RunLayout(run)
    inputs, drops = [], []
    for f, kept in enumerate(plan.kept):
        dropped = {reason: kept for reason in DROP_CYCLE[1:]}
        dropped["nsfw"] = kept // 2
        source = plan.files[f]
        inputs.append(
            dict(
                source=source,
                input_rows=plan.totals[f],
                kept_rows=kept,
                dropped_rows=sum(dropped.values()),
            )
        )
        drops += [
            dict(stage="metadata", source=source, reason=reason, count=count)
            for reason, count in dropped.items()
        ]
    storage.write_parquet(
        pa.Table.from_pylist(inputs, schema=schemas.METADATA_INPUTS), layout.metadata_inputs
    )
    storage.write_parquet(
        pa.Table.from_pylist(drops, schema=schemas.DROP_COUNTS),
        layout.metadata_part("drops", "00000-00000"),
    )
    totals = {r: sum(d["count"] for d in drops if d["reason"] == r) for r in DROP_CYCLE}
    summary = {
        "input_files": len(plan.files),
        "input_rows": sum(plan.totals),
        "kept_rows": plan.rows,
        "dropped": {r: totals[r] for r in METADATA_REASONS if totals.get(r)},
        "shards": plan.shards,
        "rows_per_shard": ROWS_PER_SHARD,
        "reasons": list(METADATA_REASONS),
        "shared_sample_ids": {"ids": 0, "rows": 0, "examples": []},
    }
    storage.write_json(layout.metadata_summary, summary)


def run_records(run: str, config, shards: list[dict]) -> None:
    """run.json with the upstream stages recorded, and the download and faces markers the
    runner would have written (the audit counts raw shards by them)."""
    from laionface.engine import markers
    from laionface.engine.pipeline import stage_of
    from laionface.engine.runfolder import RunFolder
    from laionface.io import storage

    folder = RunFolder(run)
    folder.start(config)
    layout = folder.layout
    for name in ("metadata", "download", "faces"):
        folder.record_stage(stage_of(name), config)
        folder.stage(name).update(status="done", finished=markers.now_iso())
    steps = {
        "download": (
            lambda n: [layout.metadata_shard(n)],
            lambda n: [layout.raw_tar(n), layout.raw_parquet(n), layout.raw_stats(n)],
        ),
        "faces": (
            lambda n: [layout.raw_tar(n), layout.raw_parquet(n)],
            lambda n: [layout.faces(n)],
        ),
    }
    for step, (reads, writes) in steps.items():
        settings_fp = stage_of(step).fingerprint(config)
        versions = storage.file_versions(
            url for shard in shards for url in (*reads(shard["shard"]), *writes(shard["shard"]))
        )
        for shard in shards:
            name = shard["shard"]
            inputs = markers.named_versions(layout, reads(name), versions)
            markers.write_marker(
                layout.marker(step, name),
                fingerprint=markers.fingerprint(settings_fp, inputs),
                settings_fp=settings_fp,
                inputs=inputs,
                outputs=markers.named_versions(layout, writes(name), versions),
                stats={"items": shard["images"] if step == "faces" else shard["rows"]},
            )
    folder.save()


def pipeline_toml(workdir: Path, plan: Plan) -> Path:
    """The pipeline the steps run: SETTINGS, the synthetic inputs, the run folder."""
    from laionface.config import config_toml, parse_config

    data = json.loads(json.dumps(SETTINGS))
    data["run"]["run_dir"] = str(workdir / "run")
    data["metadata"]["input"] = plan.files
    path = workdir / "scale.toml"
    path.write_text(config_toml(parse_config(data, "bench_scale")))
    return path


def generate(workdir: Path, images: int, demo_run: Path, processes: int) -> tuple[Path, dict]:
    """The synthetic run folder for about `images` images; returns (pipeline, what it holds)."""
    from laionface.config import load_config

    inputs = workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    plan = Plan(images, inputs)
    pipeline = pipeline_toml(workdir, plan)
    run = str(workdir / "run")
    started = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        files = [pool.submit(write_input_file, plan, f) for f in range(len(plan.files))]
        n = plan.shards
        shards = list(
            pool.map(write_download_shard, [run] * n, [plan] * n, [demo_run] * n, range(n))
        )
        for future in files:
            future.result()
    metadata_tables(run, plan)
    run_records(run, load_config(pipeline), shards)
    written = {
        "images": sum(s["images"] for s in shards),
        "download_rows": plan.rows,
        "input_rows": sum(plan.totals),
        "input_files": len(plan.files),
        "shards": plan.shards,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return pipeline, written


# ---------------------------------------------------------------------------------------------
# Measuring a command


class TreeSampler(threading.Thread):
    """Samples a process and its descendants: peak RSS per process, CPU seconds of each."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.roles: dict[int, str] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in tree:
                try:
                    with proc.oneshot():
                        rss = proc.memory_info().rss
                        times = proc.cpu_times()
                        if proc.pid not in self.roles:
                            self.roles[proc.pid] = _role(proc)
                except psutil.Error:
                    continue
                self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)
                self.cpu[proc.pid] = times.user + times.system
            self.stopped.wait(self.interval)

    def figures(self) -> dict:
        others = {pid: rss for pid, rss in self.peak.items() if pid != self.root.pid}
        worst = max(others, key=others.__getitem__, default=None)
        return {
            "driver_peak_mb": round(self.peak.get(self.root.pid, 0) / 2**20),
            "other_peak_mb": round(others[worst] / 2**20) if worst else 0,
            "other_peak_role": self.roles.get(worst, "") if worst else "",
            "processes": len(self.peak),
            "cpu_s_sampled": round(sum(self.cpu.values()), 1),
        }


def _role(proc: psutil.Process) -> str:
    """worker (a process the fork server forked), fork server, or the program's name."""
    if "forkserver" not in " ".join(proc.cmdline()):
        return proc.name()
    parent = proc.parent()
    forked = parent is not None and "forkserver" in " ".join(parent.cmdline())
    return "worker" if forked else "fork server"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """{file: (size, mtime)} of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            out[path] = (stat.st_size, stat.st_mtime_ns)
    return out


def measure(name: str, argv: list[str], workdir: Path, log: Path) -> dict:
    """Run `laionface ARGV` and measure it; exits if it fails."""
    before = snapshot(workdir / "run")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("ab") as out:
        out.write(f"\n$ laionface {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "laionface", *argv], stdout=out, stderr=out, cwd=REPO
        )
        sampler = TreeSampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.stopped.set()
        sampler.join()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if code != 0:
        raise SystemExit(f"step {name} failed (exit {code}); see {log}")
    now = snapshot(workdir / "run")
    changed = [p for p, v in now.items() if before.get(p) != v]
    figures = sampler.figures()
    return {
        "step": name,
        "command": "laionface " + " ".join(argv),
        "wall_s": round(wall, 1),
        "cpu_s": max(round(reaped, 1), figures.pop("cpu_s_sampled")),
        **figures,
        "files_written": len(changed),
        "mb_written": round(sum(now[p][0] for p in changed) / 2**20, 1),
    }


def steps(pipeline: Path, run: Path, copy: bool) -> list[tuple[str, list[str]]]:
    """The measured commands: each stage (with the audit that ends every run), then the audit,
    the report and verify alone; emit in copy mode (when `copy`) and in manifest mode."""
    common = [str(pipeline), "--no-progress"]
    dataset = str(run / "dataset")
    out = [
        ("select", ["run", *common, "--stages", "select"]),
        ("dedup", ["run", *common, "--stages", "dedup"]),
    ]
    for mode in ["copy", "manifest"] if copy else ["manifest"]:
        out += [
            (f"emit ({mode})", ["run", *common, "--stages", "emit", "--set", f"emit.mode={mode}"]),
            (f"verify ({mode})", ["verify", dataset]),
        ]
    return out + [("audit (stats)", ["stats", str(run)]), ("report", ["report", str(run)])]


def table(rows: list[dict]) -> str:
    head = (
        "| step | wall s | CPU s | driver peak MB | other peak MB (role) | processes"
        " | files written | MB written |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['wall_s']} | {r['cpu_s']} | {r['driver_peak_mb']}"
            f" | {r['other_peak_mb']} ({r['other_peak_role']}) | {r['processes']}"
            f" | {r['files_written']} | {r['mb_written']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200_000, help="about this many images")
    parser.add_argument("--workdir", type=Path, help="kept when given (default: a temp folder)")
    parser.add_argument("--demo-run", type=Path, help="a demo run folder (default: run one)")
    parser.add_argument("--copy-limit", type=int, default=1_000_000, help="emit copy mode up to")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--generate-only", action="store_true", help="write the run folder, measure nothing"
    )
    parser.add_argument(
        "--steps-only",
        action="store_true",
        help="measure the steps on the run folder --generate-only left in --workdir",
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    pipeline, written = _generated(workdir, args)
    if args.generate_only:
        return
    rows = []
    for name, argv in steps(pipeline, workdir / "run", args.images <= args.copy_limit):
        rows.append(measure(name, argv, workdir, workdir / "bench.log"))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        result = {"images": args.images, "generated": written, "load_before": load, "steps": rows}
        args.json.write_text(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(workdir)


def _generated(workdir: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """(pipeline, what the run folder holds): generated now, or by an earlier --generate-only
    (so that a long generation need not run on the quiet machine the steps are measured on)."""
    record = workdir / "generated.json"
    if args.steps_only:
        if not record.exists():
            raise SystemExit(f"{record} is missing: run with --generate-only first")
        done = json.loads(record.read_text())
        if done["requested"] != args.images:
            raise SystemExit(f"{workdir} holds {done['requested']:,} images, not {args.images:,}")
        return Path(done["pipeline"]), done["written"]
    demo_run = args.demo_run or _demo_run(workdir, workdir / "bench.log")
    for old in ("run", "inputs"):
        shutil.rmtree(workdir / old, ignore_errors=True)
    pipeline, written = generate(workdir, args.images, demo_run, args.processes)
    print(f"generated: {json.dumps(written)}", flush=True)
    done = {"requested": args.images, "pipeline": str(pipeline), "written": written}
    record.write_text(json.dumps(done))
    return pipeline, written


def _demo_run(workdir: Path, log: Path) -> Path:
    """A demo run to draw detections from (its faces/), made once per workdir."""
    run = workdir / "demo"
    if not (run / "faces").exists():
        with log.open("ab") as out:
            subprocess.run(
                [sys.executable, "-m", "laionface", "demo", "--run-dir", str(run)],
                stdout=out,
                stderr=out,
                cwd=REPO,
                check=True,
            )
    return run


if __name__ == "__main__":
    main()
