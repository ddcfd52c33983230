"""RetinaFace in the project: real weights on real faces, batching, engines, weights resolution."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from laionface.detect import detector as detector_mod
from laionface.detect import retinaface
from laionface.detect.detector import FaceDetector, load_network, nms
from laionface.detect.weights import CHECKPOINTS, WeightsError, load_state_dict, resolve_weights
from laionface.io.imagedecode import decode_image
from tests.photos import readme_face_counts

MOBILENET = CHECKPOINTS["mobilenet0.25"]

# Rough face centres (fractions of width, height), checked by eye on the photos.
FACE_CENTRES = {
    "astronaut.png": [(0.44, 0.23)],
    "camera.png": [(0.44, 0.30)],
    "fr_biden.jpg": [(0.58, 0.17)],
    "fr_obama.jpg": [(0.54, 0.22)],
    "fr_obama_partial_face.jpg": [(0.19, 0.22)],
    "fr_obama_small.jpg": [(0.49, 0.47)],
    "fr_two_people.jpg": [(0.27, 0.19), (0.77, 0.23)],
    "grace_hopper.jpg": [(0.52, 0.36)],
}


# Read at import: the weights tests below change the environment variable.
REAL_WEIGHTS = Path(os.environ.get("LAIONFACE_WEIGHTS_DIR", "")) / MOBILENET.filename


def weights_file() -> Path:
    if not REAL_WEIGHTS.is_file():
        pytest.fail(f"{REAL_WEIGHTS} missing: point LAIONFACE_WEIGHTS_DIR at shared/models")
    return REAL_WEIGHTS


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory):
    """ONNX exports and downloads go to a private cache, not the developer's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def photos(shared_faces) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(Image.open(shared_faces / name).convert("RGB"))
        for name in sorted(FACE_CENTRES)
    }


@pytest.fixture(scope="module")
def torch_detector() -> FaceDetector:
    return FaceDetector(engine="torch", device="cpu", weights=str(weights_file()))


@pytest.fixture(scope="module")
def onnx_detector() -> FaceDetector:
    return FaceDetector(engine="onnx", device="cpu", weights=str(weights_file()))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def assert_same_faces(first: list[np.ndarray], second: list[np.ndarray], tolerance_px: float):
    assert [len(r) for r in first] == [len(r) for r in second]
    for a, b in zip(first, second, strict=True):
        if len(a):
            np.testing.assert_allclose(a[:, :4], b[:, :4], atol=tolerance_px)
            np.testing.assert_allclose(a[:, 5:], b[:, 5:], atol=tolerance_px)
            np.testing.assert_allclose(a[:, 4], b[:, 4], atol=1e-3)


# --- the network ------------------------------------------------------------------------------


def test_official_mobilenet_checkpoint_loads_every_key():
    state = load_state_dict(weights_file())
    model = retinaface.RetinaFace("mobilenet0.25")
    assert len(state) == 300  # the figures in shared/models/README.md
    assert sum(v.numel() for v in state.values()) == 433_343
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }


def test_resnet50_layout_matches_the_published_checkpoint():
    """Resnet50_Final.pth = torchvision resnet50 body (layer2..4 via IntermediateLayerGetter)
    + the same FPN/SSH/heads as MobileNet's checkpoint at 256 channels."""
    model = retinaface.RetinaFace("resnet50")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    expected = {"body.conv1.weight": (64, 3, 7, 7)}

    def batchnorm(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{prefix}.{name}"] = (channels,)
        expected[f"{prefix}.num_batches_tracked"] = ()

    batchnorm("body.bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for block in range(blocks):
            prefix = f"body.layer{layer}.{block}"
            block_in = inplanes if block == 0 else planes * 4
            expected[f"{prefix}.conv1.weight"] = (planes, block_in, 1, 1)
            expected[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            expected[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            batchnorm(f"{prefix}.bn1", planes)
            batchnorm(f"{prefix}.bn2", planes)
            batchnorm(f"{prefix}.bn3", planes * 4)
            if block == 0:
                expected[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                batchnorm(f"{prefix}.downsample.1", planes * 4)
        inplanes = planes * 4

    # The neck and heads: the real MobileNet checkpoint's names, channels 64 -> 256 and the FPN
    # inputs (64, 128, 256) -> in_channels_list (512, 1024, 2048).
    fpn_inputs = {"fpn.output1": 512, "fpn.output2": 1024, "fpn.output3": 2048}
    for key, tensor in load_state_dict(weights_file()).items():
        if key.startswith("body."):
            continue
        shape = [d * 4 if d in (16, 32, 64) else d for d in tensor.shape]
        module = key.rsplit(".", 2)[0]
        if module in fpn_inputs and key.endswith("0.weight"):
            shape[1] = fpn_inputs[module]
        expected[key] = tuple(shape)

    assert shapes == expected
    assert shapes["fpn.output3.0.weight"] == (256, 2048, 1, 1)
    assert shapes["ClassHead.0.conv1x1.weight"] == (4, 256, 1, 1)


def test_resnet50_checkpoint_with_module_prefix_loads_and_runs(tmp_path):
    model = retinaface.RetinaFace("resnet50")
    state = {f"module.{k}": v for k, v in model.state_dict().items() if "num_batches" not in k}
    path = tmp_path / "Resnet50_Final.pth"
    torch.save(state, path)
    loaded = load_network("resnet50", path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.inference_mode():
        boxes, scores, landmarks = loaded(torch.zeros(1, 3, 64, 96))
    anchors = retinaface.priors(64, 96)
    assert boxes.shape == (1, len(anchors), 4)
    assert scores.shape == (1, len(anchors))
    assert landmarks.shape == (1, len(anchors), 10)


def test_fused_heads_form_gives_the_networks_outputs(photos):
    """The form exported to ONNX equals the network on inputs with sides multiples of 32 px."""
    model = load_network("mobilenet0.25", weights_file())
    fused = retinaface.FusedHeadsRetinaFace(model).eval()
    image = photos["fr_two_people.jpg"][:320, :448, ::-1].astype(np.float32)
    x = torch.from_numpy(image - np.float32(retinaface.BGR_MEAN)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        for expected, got in zip(model(x), fused(x), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_wrong_checkpoint_for_network_is_a_clear_error():
    with pytest.raises(WeightsError, match="does not fit RetinaFace resnet50"):
        load_network("resnet50", weights_file())


def test_priors_follow_the_biubug6_layout():
    anchors = retinaface.priors(640, 640)
    assert len(anchors) == 2 * (80 * 80 + 40 * 40 + 20 * 20) == 16800
    assert anchors[0].tolist() == [4.0, 4.0, 16.0, 16.0]
    assert anchors[1].tolist() == [4.0, 4.0, 32.0, 32.0]
    assert anchors[2].tolist() == [12.0, 4.0, 16.0, 16.0]
    assert anchors[-1].tolist() == [624.0, 624.0, 512.0, 512.0]


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array(
        [[0, 0, 100, 100], [5, 5, 105, 105], [200, 200, 260, 260], [0, 0, 100, 40]], np.float32
    )
    scores = np.array([0.8, 0.9, 0.7, 0.95], np.float32)
    # box 1 suppresses box 0 (IoU ~0.82); box 3 overlaps box 1 by ~0.33 < 0.4, so it stays.
    assert nms(boxes, scores, 0.4).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.3).tolist() == [3, 2]
    assert nms(boxes[:0], scores[:0], 0.4).tolist() == []


# --- detection on real photos -----------------------------------------------------------------


@pytest.mark.parametrize("engine", ["torch_detector", "onnx_detector"])
def test_face_counts_match_the_readme(shared_faces, photos, engine, request):
    expected = readme_face_counts(shared_faces)
    assert set(expected) == set(photos)
    results = request.getfixturevalue(engine).detect(list(photos.values()))
    counts = {
        name: int((found[:, 4] > 0.5).sum()) for name, found in zip(photos, results, strict=True)
    }
    assert counts == expected


def test_boxes_cover_the_faces(photos, torch_detector):
    results = torch_detector.detect(list(photos.values()))
    for (name, image), found in zip(photos.items(), results, strict=True):
        height, width = image.shape[:2]
        centres = sorted(
            ((row[0] + row[2]) / 2 / width, (row[1] + row[3]) / 2 / height) for row in found
        )
        assert len(centres) == len(FACE_CENTRES[name]), name
        for (x, y), (ex, ey) in zip(centres, sorted(FACE_CENTRES[name]), strict=True):
            assert abs(x - ex) < 0.06 and abs(y - ey) < 0.06, (name, x, y)
        for row in found:
            # Landmarks (eyes, nose, mouth) lie inside their face box; the face is not tiny.
            xs, ys = row[5::2], row[6::2]
            assert (xs > row[0]).all() and (xs < row[2]).all(), name
            assert (ys > row[1]).all() and (ys < row[3]).all(), name
            assert row[2] - row[0] > 0.08 * width, name
            left_eye_x, right_eye_x = row[5], row[7]
            assert left_eye_x < right_eye_x, name  # image-left eye first


def test_detections_are_in_original_pixels_of_a_scaled_and_shifted_photo(photos, torch_detector):
    """Paste the two-people photo at 1.5x into a bigger canvas: detect() resizes it to 640 px and
    must map the boxes back to the canvas's own pixels."""
    source = Image.fromarray(photos["fr_two_people.jpg"])
    scaled = source.resize((source.width * 3 // 2, source.height * 3 // 2), Image.BILINEAR)
    canvas = Image.new("RGB", (2400, 1500), (90, 120, 90))
    offset = (500, 300)
    canvas.paste(scaled, offset)
    original, big = torch_detector.detect([np.asarray(source), np.asarray(canvas)])
    assert len(big) == len(original) == 2
    mapped = original.copy()
    mapped[:, [0, 2]] = mapped[:, [0, 2]] * 1.5 + offset[0]
    mapped[:, [1, 3]] = mapped[:, [1, 3]] * 1.5 + offset[1]
    for row in mapped:
        assert max(iou(row, other) for other in big) > 0.8


def test_batched_results_equal_batch_one(photos, onnx_detector):
    images = list(photos.values()) * 2
    batched = FaceDetector(engine="onnx", device="cpu", batch_size=16).detect(images)
    singles = [onnx_detector.detect([image])[0] for image in images[: len(photos)]]
    assert_same_faces(batched[: len(photos)], singles, tolerance_px=1.0)
    assert_same_faces(batched[len(photos) :], singles, tolerance_px=1.0)
    for a, b in zip(batched, singles * 2, strict=True):
        for row in a:
            assert max(iou(row, other) for other in b) > 0.99


def test_engines_agree(photos, torch_detector, onnx_detector):
    # Three canvas shapes (portrait, landscape, square); plain NCHW eager is slow on CPU.
    images = [photos[n] for n in ("fr_biden.jpg", "fr_two_people.jpg", "camera.png")]
    reference = FaceDetector(engine="torch-nchw", device="cpu").detect(images)
    assert_same_faces(torch_detector.detect(images), reference, tolerance_px=1.0)
    assert_same_faces(onnx_detector.detect(images), reference, tolerance_px=1.0)


def test_detect_resized_on_decoded_bytes_matches_full_image(shared_faces, photos, onnx_detector):
    """The stage's path: decode (draft mode, straight to 640 px) then detect_resized."""
    names = ["fr_biden.jpg", "fr_two_people.jpg", "fr_obama.jpg"]
    decoded = [decode_image((shared_faces / n).read_bytes(), 640, 50_000_000) for n in names]
    fast = onnx_detector.detect_resized(
        [d.pixels for d in decoded], [(d.width, d.height) for d in decoded]
    )
    full = onnx_detector.detect([photos[n] for n in names])
    for a, b in zip(fast, full, strict=True):
        assert len(a) == len(b) >= 1
        for row in a:
            assert max(iou(row, other) for other in b) > 0.9


def test_an_image_without_faces_gives_an_empty_array(torch_detector):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    tiny = np.zeros((1, 1, 3), np.uint8)
    for found in torch_detector.detect([noise, tiny, np.full((64, 64, 3), 200, np.uint8)]):
        assert found.shape == (0, 15) and found.dtype == np.float32


def test_record_threshold_and_canvas_buckets(photos):
    strict = FaceDetector(engine="torch", device="cpu", record_threshold=0.9999)
    loose = FaceDetector(engine="torch", device="cpu", record_threshold=0.02)
    image = photos["camera.png"]
    assert len(loose.detect([image])[0]) > len(strict.detect([image])[0])
    assert strict.canvas_shape(376, 640) == (384, 640)
    assert strict.canvas_shape(1, 1) == (128, 128)
    large = FaceDetector(engine="torch", device="cpu", max_size=1080)
    assert large.canvas_shape(1080, 700) == (1088, 768)


def test_bad_arrays_are_refused_with_the_index(torch_detector):
    with pytest.raises(ValueError, match="image 1: expected dtype uint8"):
        torch_detector.detect([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match=r"image 0: expected an RGB array"):
        torch_detector.detect([np.zeros((8, 8), np.uint8)])
    assert torch_detector.detect([]) == []
    with pytest.raises(ValueError, match="over max_size 640"):
        torch_detector.detect_resized([np.zeros((10, 700, 3), np.uint8)], [(700, 10)])


def test_auto_engine_falls_back_to_torch_when_onnx_export_fails(tmp_path, monkeypatch, photos):
    blocker = tmp_path / "a-file-not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # no ONNX file can be written there
    threads = torch.get_num_threads()
    try:
        # A thread count no other test uses, so no cached ONNX session is reused.
        with pytest.raises(RuntimeError, match="use faces.engine = 'torch'"):
            FaceDetector(engine="onnx", device="cpu", threads=threads + 1)
        fallback = FaceDetector(engine="auto", device="cpu", threads=threads + 1)
    finally:
        torch.set_num_threads(threads)
    assert fallback.engine_name == "torch"
    assert len(fallback.detect([photos["fr_two_people.jpg"]])[0]) == 2


def test_engine_is_loaded_once_per_process(torch_detector):
    again = FaceDetector(engine="torch", device="cpu", weights=str(weights_file()))
    assert again.engine is torch_detector.engine
    assert FaceDetector(engine="auto", device="cpu").engine_name == "onnx"


def test_onnx_export_is_cached_by_weights_checksum():
    first = detector_mod.export_onnx("mobilenet0.25", weights_file())
    stamp = first.stat().st_mtime_ns
    assert MOBILENET.sha256[:16] in first.name
    assert detector_mod.export_onnx("mobilenet0.25", weights_file()) == first
    assert first.stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]


# --- weights resolution ------------------------------------------------------------------------


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv("LAIONFACE_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "laionface" / "weights"


class _WeightsServer:
    """A real HTTP server on 127.0.0.1 serving the weights and a corrupted copy."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def weights_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(weights_file(), served / MOBILENET.filename)
    corrupt = bytearray((served / MOBILENET.filename).read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    (served / "corrupt.pth").write_bytes(bytes(corrupt))
    server = _WeightsServer(served)
    yield server
    server.close()


def test_weights_from_the_env_folder_under_either_name(tmp_path, no_weights_anywhere, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(weights_file(), folder / "detection_mobilenet0.25_Final.pth")
    monkeypatch.setenv("LAIONFACE_WEIGHTS_DIR", str(folder))
    found = resolve_weights("mobilenet0.25", download=False)
    assert found == folder / "detection_mobilenet0.25_Final.pth"


def test_weights_from_an_explicit_file_win(tmp_path, no_weights_anywhere, monkeypatch):
    monkeypatch.setenv("LAIONFACE_WEIGHTS_DIR", str(tmp_path / "empty"))
    explicit = tmp_path / "my-copy.pth"
    shutil.copy(weights_file(), explicit)
    assert resolve_weights("mobilenet0.25", str(explicit), download=False) == explicit
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights("mobilenet0.25", str(tmp_path / "missing.pth"))


def test_weights_in_the_cache_folder_are_used(no_weights_anywhere):
    no_weights_anywhere.mkdir(parents=True)
    shutil.copy(weights_file(), no_weights_anywhere / MOBILENET.filename)
    found = resolve_weights("mobilenet0.25", download=False)
    assert found == no_weights_anywhere / MOBILENET.filename


def test_a_file_with_the_wrong_checksum_is_refused(tmp_path, no_weights_anywhere, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    data = bytearray(weights_file().read_bytes())
    data[100] ^= 0x01
    (folder / MOBILENET.filename).write_bytes(bytes(data))
    monkeypatch.setenv("LAIONFACE_WEIGHTS_DIR", str(folder))
    with pytest.raises(WeightsError) as error:
        resolve_weights("mobilenet0.25")
    message = str(error.value)
    assert str(folder / MOBILENET.filename) in message
    assert MOBILENET.sha256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message


def test_offline_error_says_what_is_missing_and_where_to_put_it(no_weights_anywhere):
    with socket.socket() as probe:  # a port nobody listens on: the download fails at once
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/mobilenet0.25_Final.pth"
    with pytest.raises(WeightsError) as error:
        resolve_weights("mobilenet0.25", urls=[dead_url], timeout=5)
    message = str(error.value)
    for needle in (
        "mobilenet0.25_Final.pth",
        "detection_mobilenet0.25_Final.pth",
        MOBILENET.sha256,
        dead_url,
        "LAIONFACE_WEIGHTS_DIR",
        str(no_weights_anywhere),
    ):
        assert needle in message
    assert not no_weights_anywhere.exists() or not any(no_weights_anywhere.iterdir())


def test_default_urls_are_named_when_downloads_are_disabled(no_weights_anywhere):
    with pytest.raises(WeightsError) as error:
        resolve_weights("resnet50", download=False)
    message = str(error.value)
    assert "Resnet50_Final.pth" in message and CHECKPOINTS["resnet50"].sha256 in message
    assert "https://github.com/xinntao/facexlib/releases" in message


def test_download_from_a_local_server_is_checked_and_cached(no_weights_anywhere, weights_server):
    urls = [f"{weights_server.url}/missing.pth", f"{weights_server.url}/{MOBILENET.filename}"]
    path = resolve_weights("mobilenet0.25", urls=urls)
    assert path == no_weights_anywhere / MOBILENET.filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MOBILENET.sha256
    assert [p.name for p in no_weights_anywhere.iterdir()] == [MOBILENET.filename]
    # Now cached: no server needed.
    weights_server.close()
    assert resolve_weights("mobilenet0.25", urls=[], download=False) == path
    detector = FaceDetector(engine="torch", device="cpu")
    assert detector.weights_path == path


def test_a_corrupted_download_is_refused_and_not_kept(no_weights_anywhere, weights_server):
    with pytest.raises(WeightsError) as error:
        resolve_weights("mobilenet0.25", urls=[f"{weights_server.url}/corrupt.pth"])
    assert "does not match the published" in str(error.value)
    assert not no_weights_anywhere.exists() or not any(no_weights_anywhere.iterdir())
