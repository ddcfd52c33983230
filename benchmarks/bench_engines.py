"""RetinaFace engines side by side on the same images: images/s, ratio to eager NCHW, agreement.

    python benchmarks/bench_engines.py                 # the face photos, their own shapes
    python benchmarks/bench_engines.py --fixed-shape --compile   # one 376x640 canvas, + compile

Engines are timed in interleaved rounds (every engine once per round, median round kept), so a
noisy shared machine slows them alike; compare ratios within one run, not across runs. The
decode table compares `decode_image` with and without JPEG draft mode on 2x-upscaled photos.
Weights come from LAIONFACE_WEIGHTS_DIR (or ../shared/models beside the checkout).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from laionface.detect.detector import FaceDetector, TorchEngine, load_network
from laionface.io.imagedecode import decode_image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BASELINE = "torch-nchw"


def load_images(folder: Path, count: int, fixed_shape: bool) -> list[np.ndarray]:
    photos = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    images = []
    for path in photos:
        image = Image.open(path).convert("RGB")
        if fixed_shape:  # centre crop to 640:376, then 640x376: every image on one canvas
            crop_h = min(image.height, round(image.width * 376 / 640))
            crop_w = round(crop_h * 640 / 376)
            left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h)).resize((640, 376))
        else:
            image.thumbnail((640, 640), Image.Resampling.BILINEAR)
        images.append(np.asarray(image))
    return [images[i % len(images)] for i in range(count)]


def make_detector(engine: str, batch_size: int, threads: int) -> tuple[FaceDetector, float]:
    start = time.perf_counter()
    if engine == "torch-compile":
        detector = FaceDetector(
            engine="torch", device="cpu", batch_size=batch_size, threads=threads
        )
        compiled = TorchEngine(
            load_network(detector.network, detector.weights_path), detector.device
        )
        compiled.model = torch.compile(compiled.model)
        detector.engine = compiled
    else:
        detector = FaceDetector(engine=engine, device="cpu", batch_size=batch_size, threads=threads)
    return detector, time.perf_counter() - start


def agreement(results: list[np.ndarray], reference: list[np.ndarray]) -> tuple[bool, float]:
    same = [len(a) for a in results] == [len(b) for b in reference]
    worst = 0.0
    if same:
        for a, b in zip(results, reference, strict=True):
            if len(a):
                worst = max(worst, float(np.abs(a[:, :4] - b[:, :4]).max()))
    return same, worst


def bench_engines(args: argparse.Namespace) -> None:
    images = load_images(args.images, args.count, args.fixed_shape)
    engines = [BASELINE, "torch", "onnx"] + (["torch-compile"] if args.compile else [])
    detectors, load_seconds, warm_seconds, outputs = {}, {}, {}, {}
    for name in engines:
        detectors[name], load_seconds[name] = make_detector(name, args.batch_size, args.threads)
        start = time.perf_counter()
        outputs[name] = detectors[name].detect(images)  # warm-up: first-shape costs, compile
        warm_seconds[name] = time.perf_counter() - start
    passes: dict[str, list[float]] = {name: [] for name in engines}
    deadline = time.perf_counter() + args.seconds
    while min(len(p) for p in passes.values()) < args.min_rounds or (
        time.perf_counter() < deadline and min(len(p) for p in passes.values()) < args.max_rounds
    ):
        for name in engines:
            start = time.perf_counter()
            detectors[name].detect(images)
            passes[name].append(time.perf_counter() - start)

    shapes = {detectors[BASELINE].canvas_shape(*im.shape[:2]) for im in images}
    print(
        f"\n{len(images)} images, {len(shapes)} canvas shape(s), batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{min(len(p) for p in passes.values())} rounds\n"
    )
    print(
        "| engine | load s | first pass s | images/s | vs eager NCHW | same faces | max box diff px |"
    )
    print("|---|---|---|---|---|---|---|")
    base_rate = len(images) / statistics.median(passes[BASELINE])
    for name in engines:
        rate = len(images) / statistics.median(passes[name])
        same, worst = agreement(outputs[name], outputs[BASELINE])
        print(
            f"| {name} | {load_seconds[name]:.1f} | {warm_seconds[name]:.1f} | {rate:.1f} | "
            f"{rate / base_rate:.2f}x | {'yes' if same else 'NO'} | {worst:.3f} |"
        )


def bench_decode(args: argparse.Namespace) -> None:
    photos = sorted(p for p in args.images.iterdir() if p.suffix == ".jpg")
    blobs = []
    for path in photos:
        image = Image.open(path).convert("RGB")
        image = image.resize((image.width * 2, image.height * 2))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    timings: dict[str, list[float]] = {"full decode": [], "draft decode": []}
    for _ in range(3):
        for label, draft in (("full decode", False), ("draft decode", True)):
            start = time.perf_counter()
            for blob in blobs:
                decode_image(blob, 640, 50_000_000, draft=draft)
            timings[label].append((time.perf_counter() - start) / len(blobs))
    exact = [decode_image(b, 640, 50_000_000, draft=False).phash for b in blobs]
    drafted = [decode_image(b, 640, 50_000_000).phash for b in blobs]
    distances = [bin(a ^ b).count("1") for a, b in zip(exact, drafted, strict=True)]
    print(f"\ndecode_image of {len(blobs)} JPEGs upscaled 2x (640-4400 px) to 640 px, with pHash\n")
    print("| path | ms/image | vs full |")
    print("|---|---|---|")
    full = statistics.median(timings["full decode"])
    for label, values in timings.items():
        value = statistics.median(values)
        print(f"| {label} | {value * 1000:.1f} | {full / value:.2f}x |")
    print(f"\npHash bits differing, draft vs exact (imagehash): {distances}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=SHARED / "faces")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=30.0, help="timed rounds budget")
    parser.add_argument("--min-rounds", type=int, default=3)
    parser.add_argument("--max-rounds", type=int, default=7)
    parser.add_argument("--fixed-shape", action="store_true", help="one 376x640 canvas")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (slow start)")
    args = parser.parse_args()
    if args.compile and not args.fixed_shape:
        sys.exit("--compile needs --fixed-shape: torch.compile recompiles for every canvas shape")
    os.environ.setdefault("LAIONFACE_WEIGHTS_DIR", str(SHARED / "models"))
    bench_engines(args)
    bench_decode(args)


if __name__ == "__main__":
    main()
