"""Batched RetinaFace inference: images in, boxes + scores + landmarks in original pixels out.

Flow for a list of images:
1. Images whose longest side is over `max_size` are resized to it (never upscaled; RetinaFace
   works at native resolution, and LAION-Face's batch-face detected at native resolution).
   `detect_resized` skips this for callers that decoded straight to the target size.
2. Each image gets a canvas whose sides are its own rounded up to a multiple of `bucket` px
   (capped at `max_size` rounded up to 32). Images are grouped by canvas shape and run in
   batches of up to `batch_size`; the image sits at the top-left and the rest is the mean colour
   (zero after normalisation, as biubug6 pads in training). The canvas depends only on the image,
   never on its batch mates, so batched results equal batch-1 results up to float rounding.
3. Only anchors scoring >= `record_threshold` are decoded (the whole batch's at once) and
   scaled back to the original pixels; then per image the 5000 best, greedy NMS at
   `nms_threshold` (IoU with the +1 pixel convention of biubug6/batch-face), the 750 best.

Engines: `torch` (eager, channels_last; on CUDA half precision), `torch-nchw` (eager, plain
layout: the baseline), and `onnx` (ONNX Runtime on an exported graph with dynamic batch and
size, sides multiples of 32 px as the canvases are, cached on disk). torch.compile is not
offered: on CPU it compiles for about 40 s per canvas shape and a dynamic-shape compile was no
faster than eager (benchmarks/bench_engines.py).
`auto` is `torch` on CUDA and `onnx` on CPU when onnxruntime is installed (fastest here; see
benchmarks/bench_engines.py), else `torch`.

Each process keeps one loaded engine per (network, weights file, device, engine, threads), so a
Dask worker loads the model once however many shards it runs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import threading
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from laionface.detect import retinaface
from laionface.detect import weights as weights_mod
from laionface.io.imagedecode import fit_size

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "torch-nchw", "onnx")
DEVICES = ("auto", "cpu", "cuda")
PRE_NMS_TOP_K = 5000
POST_NMS_TOP_K = 750
ONNX_OPSET = 17
ONNX_FORM = "fusedheads"  # in the file name: a graph exported before this rewrite is not reused
_BGR_MEAN_U8 = np.array([round(v) for v in retinaface.BGR_MEAN], dtype=np.uint8)
_COLUMNS = 15  # x1, y1, x2, y2, score, then (x, y) of 5 landmarks
_X_COLUMNS = [0, 2, 5, 7, 9, 11, 13]
_Y_COLUMNS = [1, 3, 6, 8, 10, 12, 14]
# What an engine returns for one batch: the anchors scoring >= the threshold, as NumPy arrays of
# (image slot, anchor index, box regressions (k, 4), scores (k,), landmark regressions (k, 10)),
# ordered by slot.
Selected = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def empty_detections() -> np.ndarray:
    return np.zeros((0, _COLUMNS), dtype=np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, best score first.

    IoU uses the (x2 - x1 + 1) pixel-inclusive areas of biubug6's and batch-face's py_cpu_nms,
    so the kept set matches theirs.
    """
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        height = np.maximum(
            0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1
        )
        inter = width * height
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[iou <= threshold]
    return np.asarray(keep, dtype=np.int64)


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: choose one of {DEVICES}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("faces.device = 'cuda' but PyTorch sees no CUDA device; use 'cpu'")
    return torch.device(device)


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(engine: str, device: torch.device) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {ENGINES}")
    if engine != "auto":
        return engine
    if device.type == "cpu" and _onnxruntime_available():
        return "onnx"
    return "torch"


def load_network(network: str, weights_path: str | Path) -> retinaface.RetinaFace:
    """A RetinaFace in eval mode with the checkpoint's weights (all keys must match)."""
    model = retinaface.RetinaFace(network)
    state = weights_mod.load_state_dict(weights_path)
    expected = model.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 have no BatchNorm num_batches_tracked buffers.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise weights_mod.WeightsError(
            f"{weights_path}: does not fit RetinaFace {network}: {exc}"
        ) from None
    return model.eval()


def _bgr_canvas(images: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """uint8 BGR NHWC canvases: each RGB image at the top-left, the rest the mean colour."""
    canvas = np.empty((len(images), shape[0], shape[1], 3), dtype=np.uint8)
    canvas[:] = _BGR_MEAN_U8
    for slot, image in enumerate(images):
        canvas[slot, : image.shape[0], : image.shape[1]] = image[..., ::-1]
    return canvas


class TorchEngine:
    """Eager PyTorch; uint8 canvases go to the device (a quarter of float32's bytes)."""

    def __init__(
        self, model: retinaface.RetinaFace, device: torch.device, channels_last: bool = True
    ) -> None:
        self.device = device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.channels_last = channels_last
        model = model.to(device=device, dtype=self.dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.mean = torch.tensor(retinaface.BGR_MEAN, dtype=self.dtype, device=device)
        self.lock = threading.Lock()

    def __call__(
        self, images: Sequence[np.ndarray], shape: tuple[int, int], threshold: float
    ) -> Selected:
        with torch.inference_mode():
            pixels = torch.from_numpy(_bgr_canvas(images, shape)).to(self.device, non_blocking=True)
            # NHWC permuted to NCHW is already channels_last in memory.
            x = (pixels.to(self.dtype) - self.mean).permute(0, 3, 1, 2)
            if not self.channels_last:
                x = x.contiguous()
            with self.lock:  # one forward at a time per model: threads share the CPU anyway
                boxes, scores, landmarks = self.model(x)
            # Select on the device, so only the anchors kept leave a GPU.
            slots, rows = (scores.float() >= threshold).nonzero(as_tuple=True)
            kept = (boxes[slots, rows], scores[slots, rows], landmarks[slots, rows])
            return (
                slots.cpu().numpy(),
                rows.cpu().numpy(),
                *(values.float().cpu().numpy() for values in kept),
            )


def onnx_cache_dir() -> Path:
    return weights_mod.cache_dir().parent / "onnx"


def export_onnx(network: str, weights_path: str | Path) -> Path:
    """Export (once) the network to ONNX with dynamic batch, height and width (multiples of 32)
    as `retinaface.FusedHeadsRetinaFace`; returns the file.

    The file is named by the checkpoint's sha256, the graph's form, the opset and the torch
    version, and written atomically so concurrent workers can race safely.
    """
    sha = weights_mod.sha256_of(weights_path)
    tag = torch.__version__.split("+")[0]
    name = f"retinaface-{network}-{sha[:16]}-{ONNX_FORM}-op{ONNX_OPSET}-torch{tag}.onnx"
    path = onnx_cache_dir() / name
    if path.is_file():
        return path
    model = retinaface.FusedHeadsRetinaFace(load_network(network, weights_path)).eval()
    temp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model,
                (torch.zeros(1, 3, 64, 64),),
                str(temp),
                input_names=["input"],
                output_names=["boxes", "scores", "landmarks"],
                dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}},
                opset_version=ONNX_OPSET,
                dynamo=False,  # the TorchScript exporter: the dynamo one needs onnxscript
            )
        os.replace(temp, path)
    except Exception as exc:
        raise RuntimeError(
            f"exporting RetinaFace {network} to ONNX failed ({exc}); use faces.engine = 'torch'"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
    return path


class OnnxEngine:
    """ONNX Runtime on the exported graph (CPU, or CUDA when onnxruntime-gpu is installed)."""

    def __init__(self, onnx_path: Path, device: torch.device, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "faces.engine = 'onnx' on CUDA needs onnxruntime-gpu; "
                    "install it or use engine 'torch'"
                )
            providers = ["CUDAExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.mean = np.asarray(retinaface.BGR_MEAN, dtype=np.float32)

    def __call__(
        self, images: Sequence[np.ndarray], shape: tuple[int, int], threshold: float
    ) -> Selected:
        # Each RGB HWC image goes to BGR CHW minus the mean in one pass, straight into the float
        # input (no uint8 canvas: 5x less CPU). The padding is zeros: the mean colour minus the mean.
        x = np.zeros((len(images), 3, *shape), dtype=np.float32)
        for slot, image in enumerate(images):
            height, width = image.shape[:2]
            np.subtract(
                image.transpose(2, 0, 1)[::-1],
                self.mean[:, None, None],
                out=x[slot, :, :height, :width],
            )
        boxes, scores, landmarks = self.session.run(None, {"input": x})
        slots, rows = np.nonzero(scores >= threshold)
        return slots, rows, boxes[slots, rows], scores[slots, rows], landmarks[slots, rows]


_ENGINE_CACHE: dict[tuple, TorchEngine | OnnxEngine] = {}
_ENGINE_CACHE_LOCK = threading.Lock()


def get_engine(
    network: str, weights_path: Path, device: torch.device, engine: str, threads: int
) -> TorchEngine | OnnxEngine:
    """The process-wide engine for these settings, loaded on first use."""
    key = (network, str(weights_path), str(device), engine, threads if engine == "onnx" else 0)
    with _ENGINE_CACHE_LOCK:
        cached = _ENGINE_CACHE.get(key)
        if cached is None:
            if engine == "onnx":
                cached = OnnxEngine(export_onnx(network, weights_path), device, threads)
            else:
                cached = TorchEngine(
                    load_network(network, weights_path), device, channels_last=engine == "torch"
                )
            _ENGINE_CACHE[key] = cached
        return cached


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


class FaceDetector:
    """RetinaFace over lists of RGB uint8 images; see the module docstring for the flow."""

    def __init__(
        self,
        network: str = "mobilenet0.25",
        weights: str = "",
        device: str = "auto",
        engine: str = "auto",
        max_size: int = 640,
        batch_size: int = 16,
        record_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        threads: int | None = None,
        bucket: int = 128,
        weights_urls: Sequence[str] | None = None,
        session_threads: int | None = None,
    ) -> None:
        """`threads` sets torch's (process-wide) thread count; `session_threads` the ONNX Runtime
        session's alone (default: `threads`, or torch's), for callers that run several
        single-threaded sessions side by side."""
        if max_size < 32:
            raise ValueError(f"max_size must be at least 32, got {max_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if bucket < 32 or bucket % 32:
            raise ValueError(f"bucket must be a positive multiple of 32, got {bucket}")
        if threads is not None:
            torch.set_num_threads(threads)
        self.network = network
        self.device = resolve_device(device)
        self.engine_name = resolve_engine(engine, self.device)
        self.weights_path = weights_mod.resolve_weights(network, weights, urls=weights_urls)
        self.max_size = max_size
        self.batch_size = batch_size
        self.record_threshold = record_threshold
        self.nms_threshold = nms_threshold
        self.bucket = bucket
        self.canvas_cap = _round_up(max_size, 32)
        threads = threads or torch.get_num_threads()
        try:
            self.engine = get_engine(
                network,
                self.weights_path,
                self.device,
                self.engine_name,
                session_threads or threads,
            )
        except Exception as exc:  # export or runtime trouble: "auto" may still run on torch
            if engine != "auto" or self.engine_name != "onnx":
                raise
            log.warning("ONNX Runtime engine unavailable (%s); using the torch engine", exc)
            self.engine_name = "torch"
            self.engine = get_engine(network, self.weights_path, self.device, "torch", threads)

    def canvas_shape(self, height: int, width: int) -> tuple[int, int]:
        """The padded (height, width) an image of this size is run at."""
        return (
            min(_round_up(height, self.bucket), self.canvas_cap),
            min(_round_up(width, self.bucket), self.canvas_cap),
        )

    def detect(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Faces in each RGB uint8 (h, w, 3) image: float32 (n, 15) rows of x1, y1, x2, y2, score
        and five (x, y) landmarks (left eye, right eye, nose, mouth left, mouth right), in the
        image's own pixel coordinates, best score first."""
        resized, sizes = [], []
        for index, image in enumerate(images):
            _check_image(image, index)
            height, width = image.shape[:2]
            target = fit_size(width, height, self.max_size)
            if target != (width, height):
                image = np.asarray(Image.fromarray(image).resize(target, Image.Resampling.BILINEAR))
            resized.append(image)
            sizes.append((width, height))
        return self.detect_resized(resized, sizes)

    def detect_resized(
        self, images: Sequence[np.ndarray], original_sizes: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        """Like `detect` for images already resized to fit `max_size` (e.g. by
        `imagedecode.decode_image`); `original_sizes[i]` is the (width, height) that image i's
        detections are mapped back to."""
        if len(images) != len(original_sizes):
            raise ValueError(f"{len(images)} images but {len(original_sizes)} original sizes")
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            _check_image(image, index)
            height, width = image.shape[:2]
            if max(height, width) > self.max_size:
                raise ValueError(
                    f"image {index} is {width}x{height}, over max_size {self.max_size}; "
                    "use detect() to resize it"
                )
            groups[self.canvas_shape(height, width)].append(index)
        results: list[np.ndarray] = [empty_detections()] * len(images)
        for shape, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                detections = self._run_batch(
                    shape, [images[i] for i in chunk], [original_sizes[i] for i in chunk]
                )
                for index, found in zip(chunk, detections, strict=True):
                    results[index] = found
        return results

    def _run_batch(
        self,
        shape: tuple[int, int],
        images: list[np.ndarray],
        original_sizes: list[tuple[int, int]],
    ) -> list[np.ndarray]:
        slots, rows, box_regressions, scores, landmark_regressions = self.engine(
            images, shape, self.record_threshold
        )
        # The whole batch's kept anchors are decoded and scaled at once; only NMS is per image.
        boxes, landmarks = retinaface.decode(
            box_regressions, landmark_regressions, retinaface.priors(*shape)[rows]
        )
        found = np.concatenate([boxes, scores[:, None], landmarks], axis=1)
        scales = np.array(
            [
                (width / image.shape[1], height / image.shape[0])
                for image, (width, height) in zip(images, original_sizes, strict=True)
            ],
            dtype=np.float32,
        )
        found[:, _X_COLUMNS] *= scales[slots, 0, None]
        found[:, _Y_COLUMNS] *= scales[slots, 1, None]
        bounds = np.searchsorted(slots, np.arange(len(images) + 1))
        return [
            self._suppress(found[start:end]) if end > start else empty_detections()
            for start, end in itertools.pairwise(bounds)
        ]

    def _suppress(self, found: np.ndarray) -> np.ndarray:
        order = np.argsort(-found[:, 4], kind="stable")[:PRE_NMS_TOP_K]
        found = found[order]
        kept = nms(found[:, :4], found[:, 4], self.nms_threshold)[:POST_NMS_TOP_K]
        return np.ascontiguousarray(found[kept], dtype=np.float32)


def _check_image(image: np.ndarray, index: int) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image {index}: expected an RGB array of shape (h, w, 3), got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image {index}: expected dtype uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image {index}: empty image {image.shape}")
