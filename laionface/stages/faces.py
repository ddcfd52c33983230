"""Faces stage: one pass over each raw shard gives every image's detections, pHash and sha256.

Per raw shard `raw/NNNNN.tar`, the tar is streamed once; each image is decoded once
(`imagedecode.decode_image`: upright, longest side <= `faces.max_size`, JPEG draft mode for large
images, refused by its header when over `faces.max_image_pixels`), and from those pixels come the
RetinaFace detections and the pHash; the sha256 is of the stored bytes. The tar is cut into
windows of images; decoding runs ahead on a thread pool while the detector works on earlier
windows (PIL, torch and ONNX Runtime release the GIL).

Output `faces/NNNNN.parquet` (schemas.FACES): one row per image in the tar, in tar order, with every
detection scoring at least `faces.record_threshold`, boxes and landmarks in the upright image's
original pixel coordinates. An image that can't be decoded is a row with `decode_error` set,
never a failed shard.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from laionface.config import Config, FacesSection
from laionface.detect.detector import FaceDetector, resolve_device, resolve_engine
from laionface.detect.weights import resolve_weights
from laionface.engine.runner import ShardTask, StageContext
from laionface.engine.stage import Stage
from laionface.io import schemas, storage, tars
from laionface.io.imagedecode import Decoded, decode_image
from laionface.layout import FACES, IMAGE_EXTENSIONS, RAW, shard_of_file

DECODE_THREADS = 2
# On a GPU a window holds several batches: the detector batches only images of one canvas shape,
# and with mixed sizes one batch of images splits into many small forward passes. On CPU, where
# ONNX Runtime costs no less per image at batch 16 than at batch 1, one batch a window pipelines
# in finer steps (5-8 % faster than 4 on the benchmark).
GPU_BATCHES_PER_WINDOW = 4
# Canvas sides on CPU with ONNX Runtime: multiples of 32 px, not the detector's 128 (its default
# keeps few canvas shapes, which batching on a GPU needs). Small batches cost nothing there, and
# the smaller padding saves ~12 % of the stage's CPU time on the benchmark's images.
CPU_ONNX_BUCKET = 32

_detectors: dict[tuple, tuple[FaceDetector, int]] = {}


def detector_for(section: FacesSection) -> tuple[FaceDetector, int]:
    """(detector, how many threads call it at once), one per process and settings, so a Dask
    worker loads the model once.

    On CPU with ONNX Runtime, a single-threaded session called from as many threads as torch
    would use (torch.get_num_threads(): 1 in a Dask worker, whose nanny sets OMP_NUM_THREADS=1)
    uses 25 % less CPU per image than one session spreading each forward pass over them, and
    it takes CPU_ONNX_BUCKET canvases (benchmarks/bench_faces.py). The torch engine runs one
    forward pass at a time and parallelises inside it; so does any engine on a GPU.
    """
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
        device = resolve_device(section.device)
        engine = resolve_engine(section.engine, device)
        parallel_sessions = engine == "onnx" and device.type == "cpu"
        detector = FaceDetector(
            network=section.network,
            weights=section.weights,
            device=device.type,
            engine=section.engine,
            max_size=section.max_size,
            batch_size=section.batch_size,
            record_threshold=section.record_threshold,
            nms_threshold=section.nms_threshold,
            bucket=CPU_ONNX_BUCKET if parallel_sessions else 128,
            session_threads=1 if parallel_sessions else None,
        )
        # If the ONNX export failed, "auto" fell back to torch, which runs one pass at a time.
        parallel_sessions = parallel_sessions and detector.engine_name == "onnx"
        detect_threads = max(1, torch.get_num_threads()) if parallel_sessions else 1
        _detectors[key] = (detector, detect_threads)
    return _detectors[key]


def _images(tar_url: str) -> Iterator[tuple[str, bytes]]:
    fs, path = storage.fs_for(tar_url)
    with fs.open(path, "rb") as handle:
        for member, data in tars.iter_members(
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


def _decode(key: str, data: bytes, section: FacesSection) -> tuple[str, str, Decoded]:
    decoded = decode_image(data, section.max_size, section.max_image_pixels)
    return key, hashlib.sha256(data).hexdigest(), decoded


def _detect_window(
    detector: FaceDetector, decoding: list[Future], sample_ids: dict[str, int]
) -> list[dict]:
    """The output rows of one window of images, once their decoding has finished."""
    decoded_window = [future.result() for future in decoding]
    good = [d for _, _, d in decoded_window if d.ok]
    found = iter(
        detector.detect_resized([d.pixels for d in good], [(d.width, d.height) for d in good])
    )
    return [
        {
            "key": key,
            "SAMPLE_ID": sample_ids.get(key),
            "width": decoded.width,
            "height": decoded.height,
            "phash": decoded.phash,
            "sha256": sha256,
            "decode_error": decoded.error,
            "faces": _face_rows(next(found)) if decoded.ok else [],
        }
        for key, sha256, decoded in decoded_window
    ]


def detect_shard(tar_url: str, raw_parquet_url: str, out_url: str, settings: dict) -> dict:
    """Detections, pHash and sha256 for every image of one raw shard."""
    section = FacesSection.model_validate(settings)
    detector, detect_threads = detector_for(section)
    raw = storage.read_parquet(raw_parquet_url, columns=["key", "SAMPLE_ID"])
    sample_ids = dict(
        zip(raw.column("key").to_pylist(), raw.column("SAMPLE_ID").to_pylist(), strict=True)
    )

    # Each window's images are decoded on one pool and detected on another, so decoding runs
    # ahead while the detector works; at most detect_threads + 1 windows are held.
    rows: list[dict] = []
    window = section.batch_size * (GPU_BATCHES_PER_WINDOW if detector.device.type == "cuda" else 1)
    with (
        ThreadPoolExecutor(DECODE_THREADS) as decoders,
        ThreadPoolExecutor(detect_threads) as detectors,
    ):
        in_flight: deque[Future] = deque()
        for chunk in _chunks(_images(tar_url), window):
            decoding = [decoders.submit(_decode, key, data, section) for key, data in chunk]
            in_flight.append(detectors.submit(_detect_window, detector, decoding, sample_ids))
            if len(in_flight) > detect_threads:
                rows += in_flight.popleft().result()
        while in_flight:
            rows += in_flight.popleft().result()

    storage.write_parquet(pa.Table.from_pylist(rows, schema=schemas.FACES), out_url)
    return {
        "items": len(rows),
        "faces": sum(len(row["faces"]) for row in rows),
        "decode_errors": sum(row["decode_error"] is not None for row in rows),
    }


def run(ctx: StageContext) -> None:
    section = ctx.config.faces
    # Missing weights are one clear error from a worker that would run the tasks, not one per
    # shard and retry (each with its download attempts).
    ctx.run_once(
        resolve_weights, section.network, section.weights, resources=section.task_resources()
    )
    tasks = []
    for tar_url in storage.list_files(ctx.layout.raw, ".tar"):
        shard = shard_of_file(tar_url)
        parquet_url, out_url = ctx.layout.raw_parquet(shard), ctx.layout.faces(shard)
        tasks.append(
            ShardTask(
                shard,
                dict(
                    tar_url=tar_url,
                    raw_parquet_url=parquet_url,
                    out_url=out_url,
                    settings=section.model_dump(),
                ),
                inputs=(tar_url, parquet_url),
                outputs=(out_url,),
            )
        )
    ctx.map_shards("faces", detect_shard, tasks, unit="images")


def _task_resources(config: Config) -> dict[str, float] | None:
    return config.faces.task_resources()


STAGE = Stage(
    name="faces",
    reads=(RAW,),
    writes=(FACES,),
    settings=("faces",),
    # Where and how fast the detector runs, never what it finds (the weights file is checked
    # against the checkpoint's sha256 wherever it lies).
    ignored=frozenset(
        {"faces.batch_size", "faces.device", "faces.engine", "faces.weights", "faces.resources"}
    ),
    resources=_task_resources,
    run=run,
)
