"""Faces stage against the naive loop, side by side on the same demo-like JPEGs: images/s, ratio.

    python benchmarks/bench_faces.py                  # ~600 JPEGs, 2 rounds
    python benchmarks/bench_faces.py --profile        # + cProfile of decoding and detection

Images: the JPEGs of a demo corpus (`corpus.build_corpus`, seed 0, 700 rows: pasted faces,
groups, photos and scenes, 200-2,000 px), packed into img2dataset-layout raw tar shards.
Built once into --work (kept between runs).

Paths, each run over every image, interleaved per round (a noisy shared machine slows them
alike; compare ratios within one run, not across runs):

- naive: how batch-face is usually called. For each image file: `PIL.Image.open().convert("RGB")`
  (full decode), then `FaceDetector(engine="torch-nchw", batch_size=1).detect([pixels])`, which
  resizes to max_size with PIL and runs eager PyTorch (plain NCHW layout) on one image.
- stage onnx: `faces.detect_shard` over the tar shards with the default settings (engine auto =
  ONNX Runtime on CPU: single-threaded sessions on as many threads as torch has, canvases padded
  to 32 px; JPEG draft decoding on 2 threads ahead of detection), plus what the naive loop
  skips: pHash, sha256, the parquet output.
- stage torch: the same with `faces.engine = "torch"` (eager, channels_last, one forward pass at
  a time on torch's threads, 128 px canvases).

CPU ms/image is the process's CPU time (all threads) per image: steadier than images/s when other
processes share the machine.

Agreement: detections at score >= 0.9 of each path against the naive loop's (same count per
image; box differences of faces matched at IoU >= 0.5, in original pixels). Draft decoding
reduces big JPEGs in the DCT domain, so the stage sees slightly different pixels than a full
decode and resize: a few borderline faces may cross 0.9, and boxes move by a few pixels.
Weights come from LAIONFACE_WEIGHTS_DIR (or ../shared/models beside the checkout).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from laionface.config import FacesSection
from laionface.demo.corpus import build_corpus
from laionface.detect.detector import FaceDetector
from laionface.io import storage
from laionface.io.imagedecode import decode_image
from laionface.stages import faces
from laionface.stages.faces import detect_shard, detector_for

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCORE = 0.9


def prepare(work: Path, seed: int, rows: int, shards: int) -> tuple[list[Path], list[str]]:
    """The corpus's JPEG files (truth order) and the raw shards holding them, built once."""
    corpus = build_corpus(work / f"corpus-seed{seed}-rows{rows}", seed=seed, n_images=rows)
    truth = corpus.read_truth().to_pylist()
    files = [
        corpus.images_dir / row["file"]
        for row in truth
        if row["case"] == "ok" and row["format"] == "jpeg"
    ]
    raw = work / f"raw-seed{seed}-rows{rows}-shards{shards}"
    tars = [str(raw / f"{shard:05d}.tar") for shard in range(shards)]
    if not all(Path(t).is_file() for t in tars):
        raw.mkdir(parents=True, exist_ok=True)
        per_shard = -(-len(files) // shards)
        for shard, tar in enumerate(tars):
            keys = []
            with storage.atomic_open(tar, "wb") as handle:
                writer = tars.TarWriter(handle)
                for index, path in enumerate(files[shard * per_shard : (shard + 1) * per_shard]):
                    key = f"{shard:05d}{index:04d}"
                    writer.add(f"{key}.jpg", path.read_bytes())
                    writer.add(f"{key}.txt", b"a caption")
                    keys.append({"key": key, "SAMPLE_ID": shard * 10_000 + index})
                writer.close()
            storage.write_parquet(pa.Table.from_pylist(keys), tar[: -len(".tar")] + ".parquet")
    return files, tars


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def naive_loop(detector: FaceDetector, files: list[Path]) -> list[np.ndarray]:
    found = []
    for path in files:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        found.append(detector.detect([pixels])[0])
    return found


def stage_pass(tars: list[str], out: Path, settings: dict) -> list[np.ndarray]:
    found = []
    for tar in tars:
        name = Path(tar).name[: -len(".tar")]
        out_url = str(out / f"{name}.parquet")
        detect_shard(tar, tar[: -len(".tar")] + ".parquet", out_url, settings)
        table = storage.read_parquet(out_url, columns=["faces"])
        for image_faces in table.column("faces").to_pylist():
            found.append(
                np.array(
                    [[f["x1"], f["y1"], f["x2"], f["y2"], f["score"]] for f in image_faces],
                    dtype=np.float32,
                ).reshape(-1, 5)
            )
    return found


def iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def agreement(results: list[np.ndarray], reference: list[np.ndarray]) -> tuple[int, float, float]:
    """(images with the same count of faces >= SCORE, median and max box corner diff px)."""
    same, diffs = 0, []
    for found, expected in zip(results, reference, strict=True):
        found, expected = found[found[:, 4] >= SCORE], expected[expected[:, 4] >= SCORE]
        same += len(found) == len(expected)
        for face in expected:
            overlaps = [iou(face, other) for other in found]
            if overlaps and max(overlaps) >= 0.5:
                match = found[int(np.argmax(overlaps))]
                diffs.append(float(np.abs(match[:4] - face[:4]).max()))
    if not diffs:
        return same, 0.0, 0.0
    return same, statistics.median(diffs), max(diffs)


def profile_parts(tar: str) -> None:
    """cProfile of the stage's two halves run in this thread: decoding, then detection."""
    section = FacesSection(device="cpu")
    detector, _ = detector_for(section)
    images = [data for _, data in faces._images(tar)]
    profile = cProfile.Profile()
    profile.enable()
    decoded = [decode_image(data, section.max_size, section.max_image_pixels) for data in images]
    profile.disable()
    print(f"\ncProfile: decode_image of {len(images)} images (one thread)")
    pstats.Stats(profile).sort_stats("tottime").print_stats(8)
    profile = cProfile.Profile()
    profile.enable()
    for start in range(0, len(decoded), section.batch_size):
        part = decoded[start : start + section.batch_size]
        detector.detect_resized([d.pixels for d in part], [(d.width, d.height) for d in part])
    profile.disable()
    print(f"cProfile: the stage's detector on them, {section.batch_size} a call (one thread)")
    pstats.Stats(profile).sort_stats("tottime").print_stats(8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/laionface-bench-faces"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=700, help="corpus metadata rows")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile decode and detect")
    args = parser.parse_args()
    os.environ.setdefault("LAIONFACE_WEIGHTS_DIR", str(SHARED / "models"))

    start = time.perf_counter()
    files, tars = prepare(args.work, args.seed, args.rows, args.shards)
    print(f"{len(files)} JPEGs in {len(tars)} shards, ready in {time.perf_counter() - start:.0f} s")
    load = os.getloadavg()
    max_size = FacesSection().max_size
    naive_detector = FaceDetector(
        engine="torch-nchw", device="cpu", batch_size=1, max_size=max_size
    )
    paths = {
        "naive loop (full decode, torch NCHW, batch 1)": functools.partial(
            naive_loop, naive_detector, files
        ),
    }
    for engine in ("auto", "torch"):
        section = FacesSection(device="cpu", engine=engine)
        detector_for(section)  # load the model (and export it to ONNX) before timing
        label = "faces stage, engine " + ("auto = onnx (default)" if engine == "auto" else engine)
        out = args.work / f"faces-{engine}"
        paths[label] = functools.partial(stage_pass, tars, out, section.model_dump())
    naive_loop(naive_detector, files[:4])  # warm-up

    seconds: dict[str, list[float]] = {label: [] for label in paths}
    cpu_seconds: dict[str, list[float]] = {label: [] for label in paths}
    outputs: dict[str, list[np.ndarray]] = {}
    for _ in range(args.rounds):
        for label, run in paths.items():
            begin, begin_cpu = time.perf_counter(), process_cpu_seconds()
            outputs[label] = run()
            seconds[label].append(time.perf_counter() - begin)
            cpu_seconds[label].append(process_cpu_seconds() - begin_cpu)

    labels = list(paths)
    base_label = labels[0]
    base_rate = len(files) / min(seconds[base_label])
    print(
        f"\n{len(files)} JPEGs (200-2,000 px), max_size {max_size}, {torch.get_num_threads()} "
        f"torch threads, {os.cpu_count()} CPUs, load average {load[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at the end, best of {args.rounds} rounds\n"
    )
    print(
        "| path | images/s | vs naive | CPU ms/image | same faces >= 0.9 | "
        "box diff px (median / max) |"
    )
    print("|---|---|---|---|---|---|")
    for label in labels:
        rate = len(files) / min(seconds[label])
        cpu_ms = 1000 * min(cpu_seconds[label]) / len(files)
        same, median_diff, max_diff = agreement(outputs[label], outputs[base_label])
        print(
            f"| {label} | {rate:.1f} | {rate / base_rate:.2f}x | {cpu_ms:.1f} | "
            f"{same}/{len(files)} | {median_diff:.2f} / {max_diff:.2f} |"
        )
    same, median_diff, max_diff = agreement(outputs[labels[2]], outputs[labels[1]])
    print(
        f"\nstage onnx vs stage torch (same decoded pixels): same faces >= 0.9 in "
        f"{same}/{len(files)}, box diff median {median_diff:.3f} px, max {max_diff:.3f} px"
    )

    if args.profile:
        profile_parts(tars[0])


if __name__ == "__main__":
    main()
