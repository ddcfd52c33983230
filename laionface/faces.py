"""Faces stage: one pass over each raw shard gives every image's detections, pHash and sha256.

Per raw shard `raw/NNNNN.tar`, the tar is streamed once; each image is decoded once
(`imagedecode.decode_image`: upright, longest side <= `faces.max_size`, JPEG draft mode for large
images, refused by its header when over `faces.max_image_pixels`), and from those pixels come the
RetinaFace detections and the pHash; the sha256 is of the stored bytes. Decoding runs on a thread
pool while the detector works on the previous batch (PIL releases the GIL while decoding).

Output `faces/NNNNN.parquet` (schemas.FACES): one row per image in the tar, in tar order, with every
detection scoring at least `faces.record_threshold`, boxes and landmarks in the upright image's
original pixel coordinates. An image that can't be decoded is a row with `decode_error` set,
never a failed shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from laionface import schemas, storage, tarindex
from laionface.config import FacesSection, fingerprint
from laionface.detector import FaceDetector
from laionface.imagedecode import Decoded, decode_image
from laionface.runner import ShardTask, StageContext

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
DECODE_THREADS = 2

_detectors: dict[tuple, FaceDetector] = {}


def detector_for(section: FacesSection) -> FaceDetector:
    """One detector per process and settings, so a Dask worker loads the model once."""
    key = (
        section.network,
        section.weights,
        section.device,
        section.engine,
        section.max_size,
        section.batch_size,
        section.record_threshold,
        section.nms_threshold,
    )
    if key not in _detectors:
        _detectors[key] = FaceDetector(
            network=section.network,
            weights=section.weights,
            device=section.device,
            engine=section.engine,
            max_size=section.max_size,
            batch_size=section.batch_size,
            record_threshold=section.record_threshold,
            nms_threshold=section.nms_threshold,
        )
    return _detectors[key]


def _images(tar_url: str) -> Iterator[tuple[str, bytes]]:
    fs, path = storage.fs_for(tar_url)
    with fs.open(path, "rb") as handle:
        for member, data in tarindex.iter_members(
            handle, source=tar_url, wanted=lambda m: m.ext in IMAGE_EXTENSIONS
        ):
            if data is not None:
                yield member.key, data


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _face_rows(found: np.ndarray) -> list[dict]:
    return [
        {
            "x1": float(f[0]),
            "y1": float(f[1]),
            "x2": float(f[2]),
            "y2": float(f[3]),
            "score": float(f[4]),
            "landmarks": [float(v) for v in f[5:15]],
        }
        for f in found
    ]


def _decode_batch(batch: list[tuple[str, bytes]], section: FacesSection) -> list:
    out = []
    for key, data in batch:
        decoded = decode_image(data, section.max_size, section.max_image_pixels)
        out.append((key, hashlib.sha256(data).hexdigest(), decoded))
    return out


def detect_shard(tar_url: str, raw_parquet_url: str, out_url: str, settings: dict) -> dict:
    """Detections, pHash and sha256 for every image of one raw shard."""
    section = FacesSection.model_validate(settings)
    detector = detector_for(section)
    raw = storage.read_parquet(raw_parquet_url, columns=["key", "SAMPLE_ID"])
    sample_ids = dict(
        zip(raw.column("key").to_pylist(), raw.column("SAMPLE_ID").to_pylist(), strict=True)
    )

    rows: list[dict] = []
    faces_found = 0
    errors = 0

    def finish(decoded_batch: list[tuple[str, str, Decoded]]) -> None:
        nonlocal faces_found, errors
        good = [d for _, _, d in decoded_batch if d.ok]
        found = iter(
            detector.detect_resized([d.pixels for d in good], [(d.width, d.height) for d in good])
        )
        for key, sha256, decoded in decoded_batch:
            faces = _face_rows(next(found)) if decoded.ok else []
            faces_found += len(faces)
            errors += not decoded.ok
            rows.append(
                {
                    "key": key,
                    "SAMPLE_ID": sample_ids.get(key),
                    "width": decoded.width,
                    "height": decoded.height,
                    "phash": decoded.phash,
                    "sha256": sha256,
                    "decode_error": decoded.error,
                    "faces": faces,
                }
            )

    # Decode batch i+1 on the pool while the detector runs on batch i.
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        pending = None
        for batch in _chunks(_images(tar_url), section.batch_size):
            halves = [batch[i::DECODE_THREADS] for i in range(DECODE_THREADS)]
            futures = [pool.submit(_decode_batch, half, section) for half in halves if half]
            if pending is not None:
                finish(pending)
            # Restore tar order: the halves interleave.
            decoded = [f.result() for f in futures]
            pending = [None] * len(batch)
            for i, part in enumerate(decoded):
                pending[i::DECODE_THREADS] = part
        if pending is not None:
            finish(pending)

    storage.write_parquet(pa.Table.from_pylist(rows, schema=schemas.FACES), out_url)
    return {"items": len(rows), "faces": faces_found, "decode_errors": errors}


def run(ctx: StageContext) -> None:
    section = ctx.config.faces
    tasks = []
    for tar_url in storage.list_files(ctx.path("raw"), ".tar"):
        shard = tar_url.rsplit("/", 1)[1][: -len(".tar")]
        tasks.append(
            ShardTask(
                shard,
                dict(
                    tar_url=tar_url,
                    raw_parquet_url=ctx.path("raw", f"{shard}.parquet"),
                    out_url=ctx.path("faces", f"{shard}.parquet"),
                    settings=section.model_dump(),
                ),
            )
        )
    ctx.map_shards(
        "faces",
        detect_shard,
        tasks,
        fingerprint=fingerprint(ctx.config, "faces"),
        resources=section.task_resources(),
        unit="images",
    )
