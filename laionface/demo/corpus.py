"""The demo corpus: a small LAION-400M-style metadata file, the images it points to, and the truth.

`build_corpus(out_dir, seed)` writes, deterministically from the seed (same seed, same bytes):

    metadata.parquet  the LAION-400M schema (`schemas.LAION_METADATA`), one row per URL, shuffled;
                      URLs use the fixed host `DEMO_HOST` (no port), served by
                      `laionface.imageserver.ImageServer` through `download.resolve`
    images/           the files the server serves (JPEG mostly, some PNG, one grayscale photo)
    truth.parquet     what each metadata row really is (`TRUTH_SCHEMA`, same row order)
    corpus.json       seed, version, counts and the size and sha256 of every file; written last,
                      so its presence means the corpus is complete
    .lock             an empty file builders lock, so two processes never build one folder at once

The images are real faces pasted at known places and sizes (16 px up to most of the frame) onto
photos, textures and drawn backgrounds, the real photos themselves, and images with no face. Face
photos and backgrounds come from `laionface/demo/assets/` (public domain / CC0, see its README.md), so
nothing outside the package is needed. Unrelated images are at least `DISTINCT_MIN_DISTANCE`
pHash bits apart before encoding (the tiny placeholders aside); every near-duplicate is within
`NEAR_MAX_DISTANCE` bits of its group's original, as decoded; so a dedup at pHash distance <= 4
should find exactly the dup groups.

truth.parquet columns (one row per metadata row, in the same order):

    SAMPLE_ID      int64   as in metadata.parquet
    URL            string  as in metadata.parquet
    case           string  what the server does for this URL (the server route in brackets):
                           ok [/img/], http_404 [/img/<missing>], http_5xx [/error/<code>/],
                           timeout [/slow/: answers after slow_seconds], not_an_image [/html/],
                           truncated [/truncated/: first half of a JPEG], too_small [/img/: an
                           image of 1x1 to 12x9 px while the metadata claims a normal size],
                           opted_out [/noai/: X-Robots-Tag: noai], flaky [/flaky/1/: 500 on the
                           first request, the image after], redirect [/redirect/img/: 302 to a
                           same-host image], redirect_private [/redirect/private/: 302 to
                           169.254.169.254]
    expected_status string img2dataset's status for one attempt with laionface's defaults and a
                           timeout below slow_seconds: success (ok, redirect, too_small: the size
                           rules drop it later), failed_to_download (http_404, http_5xx, timeout,
                           opted_out, redirect_private, and flaky on its first attempt; a retry
                           succeeds), failed_to_resize (not_an_image, truncated: they don't decode)
    path           string  the URL's path: what the server routes on
    file           string  the file under images/ behind the URL; null for http_404, http_5xx,
                           not_an_image, redirect_private
    sha256         string  hex sha256 of the body a GET finally answers with 200 (for truncated
                           the half served, for not_an_image the HTML page); null when none
    width, height  int32   pixel size of the image a successful download decodes; null when none
                           (also null for truncated)
    format         string  "jpeg" or "png"; null when no image is served
    layout         string  how the image was made: scene (no face), paste (1-3 pasted heads),
                           group (4-8 heads in rows), photo (a real photo, its own faces),
                           tiny; null when no image is served
    n_faces        int32   real human faces in the image; null when no image is served (or
                           truncated). Big crops of the cat (sources scenes/chelsea.jpg) fool
                           RetinaFace MobileNet-0.25 at 0.9-0.95: realistic false positives
    faces          list<struct<x1, y1, x2, y2: float32>>  face boxes in the served image's pixels
                           (RetinaFace-style boxes: brow to chin, cheek to cheek), every side
                           >= 16 px, all inside the image; empty if none
    dup_group      int32   id shared by an original and its duplicates; null for the others
    dup_kind       string  original | exact (same bytes, other URL) | reencode (other JPEG
                           quality) | resize (0.8x) | crop (up to 3 % per side) | watermark; null
                           when dup_group is null
    wh_swapped     bool    metadata HEIGHT and WIDTH are swapped for this image (a LAION quirk)
    sources        list<string>  the asset files the image was built from
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from laionface.demo.imageserver import DEMO_HOST, HTML_PAGE, truncated_body
from laionface.io import storage
from laionface.io.schemas import LAION_METADATA

# A face box without score or landmarks (ground truth).
BOX = pa.struct(
    [("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32())]
)

# truth.parquet: what each metadata row really is.
TRUTH_SCHEMA = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("case", pa.string()),
        ("expected_status", pa.string()),
        ("path", pa.string()),
        ("file", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("layout", pa.string()),
        ("n_faces", pa.int32()),
        ("faces", pa.list_(BOX)),
        ("dup_group", pa.int32()),
        ("dup_kind", pa.string()),
        ("wh_swapped", pa.bool_()),
        ("sources", pa.list_(pa.string())),
    ]
)

__all__ = ["DEMO_HOST", "Corpus", "CorpusError", "TRUTH_SCHEMA", "build_corpus"]

CORPUS_FORMAT = "laionface-demo-corpus"
CORPUS_VERSION = 1
DEFAULT_ROWS = 360
MIN_ROWS = 100
DISTINCT_MIN_DISTANCE = 10
NEAR_MAX_DISTANCE = 4
MIN_FACE_SIDE = 16.6  # the smallest face box side drawn; boxes come out >= 16 px after rounding

ASSETS_DIR = Path(__file__).with_name("assets")

EXPECTED_STATUS = {
    "ok": "success",
    "redirect": "success",
    "too_small": "success",
    "http_404": "failed_to_download",
    "http_5xx": "failed_to_download",
    "timeout": "failed_to_download",
    "opted_out": "failed_to_download",
    "redirect_private": "failed_to_download",
    "flaky": "failed_to_download",
    "not_an_image": "failed_to_resize",
    "truncated": "failed_to_resize",
}

# The cases besides "ok": (share of the rows, at least this many).
_SPECIAL_CASES = {
    "http_404": (0.014, 2),
    "http_5xx": (0.011, 2),
    "timeout": (0.006, 2),
    "not_an_image": (0.011, 2),
    "truncated": (0.011, 2),
    "too_small": (0.011, 2),
    "opted_out": (0.011, 2),
    "flaky": (0.006, 2),
    "redirect": (0.006, 2),
    "redirect_private": (0.003, 1),
}
# Cases whose URL serves (some of) a generated image; the rest serve no image at all.
_CASES_WITH_PICTURE = ("timeout", "truncated", "opted_out", "flaky", "redirect")
_ROUTES = {
    "ok": "/img/{name}",
    "timeout": "/slow/{name}",
    "truncated": "/truncated/{name}",
    "opted_out": "/noai/{name}",
    "flaky": "/flaky/1/{name}",
    "redirect": "/redirect/img/{name}",
    "too_small": "/img/{name}",
}
_ERROR_CODES = (500, 503, 502)
NEAR_KINDS = ("reencode", "resize", "crop", "watermark")
RESIZE_FACTOR = 0.8

Box = tuple[float, float, float, float]


class CorpusError(ValueError):
    """A corpus that can't be built where or how it was asked; the message says what to do."""


@dataclass(frozen=True)
class Corpus:
    """A built corpus folder; `rows` is the number of metadata rows."""

    root: Path
    seed: int
    rows: int
    counts: dict

    @property
    def metadata_path(self) -> Path:
        return self.root / "metadata.parquet"

    @property
    def truth_path(self) -> Path:
        return self.root / "truth.parquet"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def manifest_path(self) -> Path:
        return self.root / "corpus.json"

    def read_metadata(self) -> pa.Table:
        return pq.read_table(self.metadata_path)

    def read_truth(self) -> pa.Table:
        return pq.read_table(self.truth_path)


# ---------------------------------------------------------------------------------------------
# Assets


@dataclass(frozen=True)
class _HeadSource:
    photo: str
    box: Box

    @property
    def short_side(self) -> float:
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])


@lru_cache(maxsize=1)
def _face_boxes() -> dict[str, list[Box]]:
    doc = json.loads((ASSETS_DIR / "faces" / "faces.json").read_text())
    return {name: [tuple(b) for b in entry["faces"]] for name, entry in doc["photos"].items()}


# Faces whole enough to cut out and paste (not the one cut by the frame, not the small profile).
_HEAD_PHOTOS = (
    "astronaut.jpg",
    "fr_biden.jpg",
    "fr_obama.jpg",
    "fr_obama_small.jpg",
    "fr_two_people.jpg",
    "grace_hopper.jpg",
)
_PHOTO_SUBJECTS = {
    "astronaut.jpg": "astronaut",
    "camera.png": "camera",
    "fr_biden.jpg": "biden",
    "fr_obama.jpg": "obama",
    "fr_obama_partial_face.jpg": "obama",
    "fr_obama_small.jpg": "obama",
    "fr_two_people.jpg": "two_leaders",
    "grace_hopper.jpg": "grace_hopper",
}


def _head_sources() -> list[_HeadSource]:
    boxes = _face_boxes()
    return [_HeadSource(photo, box) for photo in _HEAD_PHOTOS for box in boxes[photo]]


@cache
def _asset(folder: str, name: str) -> Image.Image:
    path = ASSETS_DIR / folder / name
    if not path.is_file():
        raise CorpusError(f"{path} is missing: reinstall laionface (its assets folder is damaged)")
    with Image.open(path) as image:
        image.load()
        return image if image.mode in ("RGB", "L") else image.convert("RGB")


@cache
def _head_cutout_full(head: _HeadSource) -> tuple[Image.Image, Box]:
    """The head around a face as RGBA with a feathered oval alpha, and the face box in it."""
    source = _asset("faces", head.photo).convert("RGB")
    x1, y1, x2, y2 = head.box
    w, h = x2 - x1, y2 - y1
    left, top = math.floor(x1 - 0.45 * w), math.floor(y1 - 0.6 * h)
    right, bottom = math.ceil(x2 + 0.45 * w), math.ceil(y2 + 0.45 * h)
    size = (right - left, bottom - top)
    crop = source.crop((left, top, right, bottom))  # outside the photo comes out black...
    inside = Image.new("L", size, 0)  # ...and is made transparent here
    inside.paste(
        255,
        (
            max(0, -left),
            max(0, -top),
            min(size[0], source.width - left),
            min(size[1], source.height - top),
        ),
    )
    feather = max(2, round(0.05 * min(size)))
    oval = Image.new("L", size, 0)
    ImageDraw.Draw(oval).ellipse(
        (feather, feather, size[0] - 1 - feather, size[1] - 1 - feather), fill=255
    )
    alpha = ImageChops.multiply(oval.filter(ImageFilter.GaussianBlur(feather / 2)), inside)
    crop.putalpha(alpha)
    return crop, (x1 - left, y1 - top, x2 - left, y2 - top)


def _head_cutout(head: _HeadSource, face_side: float, mirror: bool) -> tuple[Image.Image, Box]:
    """The head scaled so the face box's short side is `face_side` px."""
    full, (x1, y1, x2, y2) = _head_cutout_full(head)
    scale = face_side / head.short_side
    size = (max(1, round(full.width * scale)), max(1, round(full.height * scale)))
    if scale < 1:
        image = full.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    else:
        image = full.resize(size, Image.Resampling.BICUBIC)
    sx, sy = size[0] / full.width, size[1] / full.height
    box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
    if mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        box = (size[0] - box[2], box[1], size[0] - box[0], box[3])
    return image, box


# ---------------------------------------------------------------------------------------------
# Random helpers


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _color(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    r, g, b = rng.integers(low, high, 3)
    return int(r), int(g), int(b)


_ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3, 9 / 16, 5 / 4)


def _frame_size(
    rng: np.random.Generator, low: int = 300, high: int = 1200, large: float = 0.17
) -> tuple[int, int]:
    """Mostly `low`-`high` px on the long side; a `large` share up to 2000, 5 % down to 200."""
    draw = rng.random()
    if draw < 0.05:
        long_side = rng.uniform(200, low)
    elif draw < 1 - large:
        long_side = _loguniform(rng, low, high)
    else:
        long_side = _loguniform(rng, high, 2000)
    aspect = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
    if aspect >= 1:
        return round(long_side), max(1, round(long_side / aspect))
    return max(1, round(long_side * aspect)), round(long_side)


def _tint(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Scale each channel by its own gain: the same scene in another light."""
    gains = rng.uniform(1 - strength, 1 + strength, 3)
    channels = [
        band.point([min(255, round(i * gain)) for i in range(256)])
        for band, gain in zip(image.split(), gains, strict=True)
    ]
    return Image.merge("RGB", channels)


def _gradient(
    rng: np.random.Generator, size: tuple[int, int], start: tuple, end: tuple
) -> Image.Image:
    """A linear gradient from `start` to `end` colour in a random direction."""
    w, h = size
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    t = np.clip(xs * math.cos(angle) + ys * math.sin(angle) + 0.5, 0.0, 1.0)
    a, b = np.array(start, np.float32), np.array(end, np.float32)
    pixels = a + (b - a) * t[..., None]
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# Backgrounds (no faces)

SCENE_KINDS = ("coffee", "cat", "rocket", "brick", "grass", "landscape", "abstract", "bokeh")
_SCENE_PHOTOS = {"coffee": "coffee.jpg", "cat": "chelsea.jpg", "rocket": "rocket.jpg"}
_TEXTURES = {"brick": "brick.jpg", "grass": "grass.jpg"}
_DRAW_SIDE = 480


def _background(
    rng: np.random.Generator, size: tuple[int, int], kind: str
) -> tuple[Image.Image, list[str]]:
    if kind in _SCENE_PHOTOS:
        return _photo_crop(rng, size, _SCENE_PHOTOS[kind]), [f"scenes/{_SCENE_PHOTOS[kind]}"]
    if kind in _TEXTURES:
        return _texture(rng, size, _TEXTURES[kind]), [f"scenes/{_TEXTURES[kind]}"]
    # Drawn small and scaled up: smooth scenes lose nothing, and drawing costs 10x less.
    scale = min(1.0, _DRAW_SIDE / max(size))
    small = (max(8, round(size[0] * scale)), max(8, round(size[1] * scale)))
    drawers = {"landscape": _landscape, "abstract": _abstract, "bokeh": _bokeh}
    return drawers[kind](rng, small).resize(size, Image.Resampling.BICUBIC), []


def _photo_crop(rng: np.random.Generator, size: tuple[int, int], name: str) -> Image.Image:
    source = _asset("scenes", name)
    aspect = size[0] / size[1]
    area = rng.uniform(0.2, 0.75) * source.width * source.height
    crop_w, crop_h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    shrink = min(1.0, source.width / crop_w, source.height / crop_h)
    # min(): the product can land a rounding error above the source's side.
    crop_w, crop_h = min(crop_w * shrink, source.width), min(crop_h * shrink, source.height)
    x0 = rng.uniform(0, source.width - crop_w)
    y0 = rng.uniform(0, source.height - crop_h)
    image = source.resize(size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _tint(image, rng, 0.15)


def _texture(rng: np.random.Generator, size: tuple[int, int], name: str) -> Image.Image:
    gray = _asset("scenes", name)
    tile_side = round(gray.width * rng.uniform(0.5, 1.4))
    tile = gray.resize((tile_side, tile_side), Image.Resampling.BICUBIC)
    dark, light = _color(rng, 0, 110), _color(rng, 140, 256)
    lut = []
    for start, end in zip(dark, light, strict=True):
        lut += [round(start + (end - start) * i / 255) for i in range(256)]
    tile = tile.convert("RGB").point(lut)
    canvas = Image.new("RGB", size)
    off_x, off_y = int(rng.integers(tile_side)), int(rng.integers(tile_side))
    for y in range(-off_y, size[1], tile_side):
        for x in range(-off_x, size[0], tile_side):
            canvas.paste(tile, (x, y))
    return canvas


def _landscape(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    sky_top, sky_low = _color(rng, 20, 140), _color(rng, 120, 256)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = np.array(sky_top, np.float32) * (1 - t) + np.array(sky_low, np.float32) * t
    image = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.6:
        r = rng.uniform(0.03, 0.09) * max(w, h)
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.4) * h
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_color(rng, 200, 256))
    horizon = rng.uniform(0.4, 0.7) * h
    xs = np.linspace(0, w, 96)
    for layer in range(int(rng.integers(2, 5))):
        ys = np.full_like(xs, horizon + layer * 0.08 * h)
        for _ in range(3):
            ys += (
                rng.uniform(0.01, 0.08)
                * h
                * np.sin(2 * np.pi * rng.uniform(0.5, 4) * xs / w + rng.uniform(0, 2 * np.pi))
            )
        shade = 1.0 - 0.18 * layer
        base = _color(rng, 30, 150)
        fill = tuple(round(c * shade) for c in base)
        draw.polygon([(0, h), *zip(xs.tolist(), ys.tolist(), strict=True), (w, h)], fill=fill)
    return image.filter(ImageFilter.GaussianBlur(max(1.0, w / 700)))


def _abstract(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    image = _gradient(rng, size, _color(rng), _color(rng)).convert("RGBA")
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(6, 25))):
        x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2) * w)
        y0, y1 = sorted(rng.uniform(-0.1, 1.1, 2) * h)
        fill = (*_color(rng), int(rng.integers(120, 256)))
        shape = rng.integers(4)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == 2:
            points = [(float(x), float(y)) for x, y in rng.uniform(0, 1, (3, 2)) * (w, h)]
            draw.polygon(points, fill=fill)
        else:
            draw.line(
                (x0, y0, x1, y1), fill=fill, width=max(2, round(rng.uniform(0.005, 0.03) * w))
            )
        image = Image.alpha_composite(image, overlay)
        overlay.paste((0, 0, 0, 0), (0, 0, w, h))
    return image.convert("RGB")


def _bokeh(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    grid = rng.integers(0, 256, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
    image = Image.fromarray(grid.astype(np.uint8), "RGB").resize(size, Image.Resampling.BICUBIC)
    image = image.convert("RGBA")
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(10, 40))):
        r = rng.uniform(0.02, 0.12) * max(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(*_color(rng, 150), 70))
    image = Image.alpha_composite(image, overlay).convert("RGB")
    return image.filter(ImageFilter.GaussianBlur(max(w, h) / 250))


# ---------------------------------------------------------------------------------------------
# Pictures


@dataclass
class _Picture:
    """One generated image: its pixels, faces and how it is encoded."""

    image: Image.Image
    faces: list[Box]
    layout: str
    subject: str
    sources: list[str]
    fmt: str = "jpeg"
    quality: int = 90
    progressive: bool = False
    data: bytes = b""

    @property
    def extension(self) -> str:
        return "png" if self.fmt == "png" else "jpg"

    def encode(self) -> _Picture:
        buffer = io.BytesIO()
        if self.fmt == "png":
            self.image.save(buffer, "PNG", compress_level=6)
        else:
            self.image.save(
                buffer, "JPEG", quality=self.quality, progressive=self.progressive, optimize=False
            )
        self.data = buffer.getvalue()
        return self


@dataclass(frozen=True)
class _Job:
    """What one unique picture shows; rendered with its own random stream."""

    index: int
    n_faces: int
    photo: str = ""  # a real photo shown whole
    size_class: str = ""  # for one pasted face: tiny, small, medium, large, closeup


def _render(seed: int, job: _Job, attempt: int = 0) -> _Picture:
    rng = np.random.default_rng([seed, 1, job.index, attempt])
    if job.photo:
        picture = _photo_layout(rng, job.photo)
    elif job.n_faces == 0:
        kind = SCENE_KINDS[int(rng.integers(len(SCENE_KINDS)))]
        image, sources = _background(rng, _frame_size(rng), kind)
        picture = _Picture(image, [], "scene", kind, sources)
    elif job.n_faces >= 4:
        picture = _group_layout(rng, job.n_faces)
    else:
        picture = _paste_layout(rng, job.n_faces, job.size_class)
    long_side = max(picture.image.size)
    if long_side <= 900 and rng.random() < 0.08:
        picture.fmt = "png"
    picture.quality = int(rng.choice([75, 80, 85, 88, 90, 92, 95]))
    picture.progressive = bool(rng.random() < 0.1)
    return picture.encode()


def _photo_layout(rng: np.random.Generator, name: str) -> _Picture:
    source = _asset("faces", name)
    low, high = 240 / max(source.size), 1600 / max(source.size)
    scale = float(np.clip(rng.uniform(0.55, 1.15), low, max(low, high)))
    size = (round(source.width * scale), round(source.height * scale))
    image = source.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    sx, sy = size[0] / source.width, size[1] / source.height
    faces = [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in _face_boxes()[name]]
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        faces = [(size[0] - x2, y1, size[0] - x1, y2) for x1, y1, x2, y2 in faces]
    return _Picture(image, faces, "photo", _PHOTO_SUBJECTS[name], [f"faces/{name}"])


def _pick_head(rng: np.random.Generator, face_side: float) -> tuple[_HeadSource, float]:
    """A head to paste at `face_side` px, upscaled at most 2x (smaller if none is big enough)."""
    heads = _head_sources()
    fitting = [head for head in heads if 2 * head.short_side >= face_side]
    if not fitting:
        biggest = max(heads, key=lambda head: head.short_side)
        return biggest, 2 * biggest.short_side
    return fitting[int(rng.integers(len(fitting)))], face_side


def _fit_face_side(head: _HeadSource, face_side: float, frame: tuple[int, int]) -> float:
    """Shrink `face_side` until the face box fits in 92 % of the frame."""
    w, h = head.box[2] - head.box[0], head.box[3] - head.box[1]
    limit = min(0.92 * frame[0] / (w / head.short_side), 0.92 * frame[1] / (h / head.short_side))
    return max(MIN_FACE_SIDE, min(face_side, limit))


def _paste_layout(rng: np.random.Generator, n_faces: int, size_class: str) -> _Picture:
    """1-3 heads at random places on a background; none overlaps another."""
    if size_class == "closeup":
        frame = _frame_size(rng, 300, 800, large=0.0)
    else:
        frame = _frame_size(rng)
    kind = SCENE_KINDS[int(rng.integers(len(SCENE_KINDS)))]
    background, sources = _background(rng, frame, kind)
    short = min(frame)
    ranges = {
        "tiny": (MIN_FACE_SIDE, 32),
        "small": (32, 80),
        "medium": (80, 200),
        "large": (200, 420),
        "closeup": (0.45 * short, 0.8 * short),
    }
    low, high = ranges.get(size_class, (MIN_FACE_SIDE, max(24.0, 0.45 * short / n_faces)))
    high = max(min(high, 0.8 * short), MIN_FACE_SIDE + 1)
    low = min(low, high - 1)
    wanted = [_loguniform(rng, low, high) for _ in range(n_faces)]
    for _ in range(12):
        placed = _place_heads(rng, frame, wanted)
        if placed is not None:
            break
        wanted = [max(MIN_FACE_SIDE, side * 0.8) for side in wanted]
    else:
        raise AssertionError(f"could not place {n_faces} heads in a {frame} frame")
    faces = []
    for head_image, box, (ox, oy), _ in placed:
        background.paste(head_image, (ox, oy), head_image)
        faces.append((box[0] + ox, box[1] + oy, box[2] + ox, box[3] + oy))
    heads = [f"faces/{photo}" for photo in dict.fromkeys(photo for *_, photo in placed)]
    subject = {1: "portrait", 2: "two", 3: "three"}[n_faces]
    return _Picture(background, faces, "paste", subject, sources + heads)


def _place_heads(
    rng: np.random.Generator, frame: tuple[int, int], wanted: list[float]
) -> list[tuple[Image.Image, Box, tuple[int, int], str]] | None:
    """Cut heads at the wanted face sizes and find non-overlapping places with whole faces."""
    taken: list[tuple[int, int, int, int]] = []
    placed = []
    for side in sorted(wanted, reverse=True):
        head, side = _pick_head(rng, side)
        side = _fit_face_side(head, side, frame)
        image, box = _head_cutout(head, side, mirror=bool(rng.random() < 0.5))
        x_range = (math.ceil(1 - box[0]), math.floor(frame[0] - 1 - box[2]))
        y_range = (math.ceil(1 - box[1]), math.floor(frame[1] - 1 - box[3]))
        if x_range[0] > x_range[1] or y_range[0] > y_range[1]:
            return None
        for _ in range(60):
            ox = int(rng.integers(x_range[0], x_range[1] + 1))
            oy = int(rng.integers(y_range[0], y_range[1] + 1))
            rect = (ox, oy, ox + image.width, oy + image.height)
            if not any(_overlap(rect, other) for other in taken):
                taken.append(rect)
                placed.append((image, box, (ox, oy), head.photo))
                break
        else:
            return None
    return placed


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _group_layout(rng: np.random.Generator, n_faces: int) -> _Picture:
    """A group photo: 4-8 heads of similar size in one or two rows."""
    frame = _frame_size(rng, 500, 1600)
    if frame[0] < frame[1]:
        frame = (frame[1], frame[0])
    kind = SCENE_KINDS[int(rng.integers(len(SCENE_KINDS)))]
    background, sources = _background(rng, frame, kind)
    rows = 1 if n_faces <= 4 else 2
    cols = math.ceil(n_faces / rows)
    cell_w, cell_h = frame[0] / cols, frame[1] / rows
    largest = max(MIN_FACE_SIDE * 1.2, min(0.45 * cell_w, 0.32 * cell_h, 200))
    side = _loguniform(rng, MIN_FACE_SIDE * 1.2, largest)
    faces, photos = [], []
    for i in range(n_faces):
        row, col = divmod(i, cols)
        wanted = max(MIN_FACE_SIDE, side * rng.uniform(0.85, 1.15))
        head, wanted = _pick_head(rng, wanted)
        wanted = min(wanted, 0.45 * cell_w, 0.32 * cell_h)
        image, box = _head_cutout(head, max(MIN_FACE_SIDE, wanted), bool(rng.random() < 0.5))
        slack_x = max(0.0, cell_w - image.width)
        slack_y = max(0.0, cell_h - image.height)
        ox = round(col * cell_w + rng.uniform(0, slack_x))
        oy = round(row * cell_h + rng.uniform(0, slack_y))
        # Keep the whole face inside the frame even when the head is wider than its cell.
        ox = min(max(ox, math.ceil(1 - box[0])), math.floor(frame[0] - 1 - box[2]))
        oy = min(max(oy, math.ceil(1 - box[1])), math.floor(frame[1] - 1 - box[3]))
        background.paste(image, (ox, oy), image)
        faces.append((box[0] + ox, box[1] + oy, box[2] + ox, box[3] + oy))
        photos.append(f"faces/{head.photo}")
    return _Picture(background, faces, "group", "group", sources + list(dict.fromkeys(photos)))


def _tiny(seed: int, index: int) -> _Picture:
    """A placeholder-sized image (a tracking pixel, a thumbnail of noise)."""
    rng = np.random.default_rng([seed, 5, index])
    size = ((8, 8), (1, 1), (12, 9))[index % 3]
    pixels = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    fmt = "png" if size == (1, 1) else "jpeg"
    return _Picture(Image.fromarray(pixels, "RGB"), [], "tiny", "icon", [], fmt=fmt).encode()


# ---------------------------------------------------------------------------------------------
# Near-duplicates


def _decoded(picture: _Picture) -> Image.Image:
    with Image.open(io.BytesIO(picture.data)) as image:
        return image.convert("RGB")


def _phash(image: Image.Image) -> int:
    return int(str(imagehash.phash(image)), 16)


def _distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _near_duplicate(
    original: _Picture, kind: str, rng: np.random.Generator, strength: float
) -> _Picture:
    image = _decoded(original)
    faces = list(original.faces)
    quality = int(rng.choice([80, 85, 90]))
    if kind == "reencode":
        quality = 65 if original.quality >= 85 or original.fmt == "png" else 95
    elif kind == "resize":
        size = (round(image.width * RESIZE_FACTOR), round(image.height * RESIZE_FACTOR))
        sx, sy = size[0] / image.width, size[1] / image.height
        image = image.resize(size, Image.Resampling.LANCZOS)
        faces = [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in faces]
    elif kind == "crop":
        image, faces = _crop_keeping_faces(image, faces, rng, 0.03 * strength)
    elif kind == "watermark":
        image = _watermark(image, faces, rng, strength)
    else:
        raise ValueError(f"unknown near-duplicate kind {kind!r}")
    picture = _Picture(image, faces, original.layout, original.subject, original.sources)
    picture.quality = quality
    return picture.encode()


def _crop_keeping_faces(
    image: Image.Image, faces: list[Box], rng: np.random.Generator, most: float
) -> tuple[Image.Image, list[Box]]:
    w, h = image.size
    want = rng.uniform(most / 3, most, 4) * (w, h, w, h)
    room = [w, h, w, h]  # how far each side may move in without cutting a face
    for x1, y1, x2, y2 in faces:
        room = [
            min(room[0], x1 - 1),
            min(room[1], y1 - 1),
            min(room[2], w - x2 - 1),
            min(room[3], h - y2 - 1),
        ]
    left, top, right, bottom = (
        max(0, math.floor(min(a, b))) for a, b in zip(want, room, strict=True)
    )
    cropped = image.crop((left, top, w - right, h - bottom))
    moved = [(x1 - left, y1 - top, x2 - left, y2 - top) for x1, y1, x2, y2 in faces]
    return cropped, moved


def _watermark(
    image: Image.Image, faces: list[Box], rng: np.random.Generator, strength: float
) -> Image.Image:
    """A small semi-transparent label in a corner that covers no face."""
    w, h = image.size
    font = ImageFont.load_default(size=max(8, round(min(w, h) * 0.035 * strength)))
    text = str(rng.choice(["© stockpix", "© demo photos", "sample", "www.example.com"]))
    left, top, right, bottom = font.getbbox(text)
    pad = max(2, (bottom - top) // 3)
    box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
    margin = max(4, round(0.02 * min(w, h)))
    corners = [
        (w - box_w - margin, h - box_h - margin),
        (margin, h - box_h - margin),
        (w - box_w - margin, margin),
        (margin, margin),
    ]
    for x, y in corners:
        label = (x, y, x + box_w, y + box_h)
        if not any(_overlap(label, tuple(round(v) for v in face)) for face in faces):
            break
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((x, y, x + box_w, y + box_h), fill=(0, 0, 0, 90))
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=(255, 255, 255, 200))
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


# ---------------------------------------------------------------------------------------------
# Plan


@dataclass
class _Row:
    case: str
    path: str
    picture: _Stored | None = None
    name: str = ""  # the file under images/
    dup_group: int | None = None
    dup_kind: str | None = None
    wh_swapped: bool = False
    query: str = ""
    claimed_size: tuple[int, int] = (0, 0)


@dataclass
class _Plan:
    case_counts: dict[str, int]
    exact_copies: list[int]  # per exact group: how many extra URLs
    near_kinds: list[list[str]]  # per near group: the variants
    swapped: int
    jobs: list[_Job] = field(default_factory=list)


def _plan(seed: int, n_rows: int) -> _Plan:
    rng = np.random.default_rng([seed, 0])
    cases = {
        case: max(least, round(share * n_rows)) for case, (share, least) in _SPECIAL_CASES.items()
    }
    exact_groups = max(3, round(0.012 * n_rows))
    near_groups = max(4, round(0.015 * n_rows))
    exact_copies = [1 + g % 2 for g in range(exact_groups)]
    near_kinds = [
        [NEAR_KINDS[(g + j) % len(NEAR_KINDS)] for j in range(1 + g % 3)]
        for g in range(near_groups)
    ]
    fixed = sum(cases.values()) + exact_groups + sum(exact_copies) + near_groups
    fixed += sum(len(kinds) for kinds in near_kinds)
    unique_ok = n_rows - fixed
    plan = _Plan(cases, exact_copies, near_kinds, swapped=max(3, round(0.01 * n_rows)))
    if unique_ok < plan.swapped + 20:
        raise CorpusError(f"n_images={n_rows} is too small for every case: use >= {MIN_ROWS}")
    n_pictures = unique_ok + exact_groups + near_groups
    n_pictures += sum(cases[case] for case in _CASES_WITH_PICTURE)
    photos = sorted(_face_boxes())
    rest = n_pictures - len(photos)
    quotas = {0: round(0.30 * rest), 1: round(0.33 * rest), 2: round(0.14 * rest)}
    quotas[3] = round(0.07 * rest)
    many = rest - sum(quotas.values())
    specs: list[tuple[int, str, str]] = [(len(_face_boxes()[p]), p, "") for p in photos]
    specs += [(0, "", "")] * quotas[0]
    classes = ("tiny", "small", "medium", "large", "closeup")
    specs += [(1, "", classes[i % len(classes)]) for i in range(quotas[1])]
    specs += [(2, "", "")] * quotas[2] + [(3, "", "")] * quotas[3]
    specs += [(4 + i % 5, "", "") for i in range(many)]
    order = rng.permutation(len(specs))
    plan.jobs = [_Job(i, *specs[k]) for i, k in enumerate(order)]
    return plan


# ---------------------------------------------------------------------------------------------
# Captions and metadata values

_LICENSES = (
    "https://creativecommons.org/licenses/by/2.0/",
    "https://creativecommons.org/licenses/by-sa/4.0/",
    "https://creativecommons.org/licenses/by-nc/3.0/",
    "https://creativecommons.org/publicdomain/zero/1.0/",
)


@lru_cache(maxsize=1)
def _captions() -> dict:
    return json.loads((ASSETS_DIR / "captions.json").read_text(encoding="utf-8"))


def _pick(rng: np.random.Generator, choices: list[str]) -> str:
    return choices[int(rng.integers(len(choices)))]


def _caption(rng: np.random.Generator, subject: str) -> str:
    if rng.random() < 0.03:
        return f"IMG_{int(rng.integers(1000, 10000))}.JPG"
    captions = _captions()
    text = _pick(rng, captions["subjects"][subject])
    return f"{_pick(rng, captions['prefixes'])}{text}{_pick(rng, captions['suffixes'])}"


def _nsfw(rng: np.random.Generator) -> str:
    draw = rng.random()
    return "NSFW" if draw < 0.03 else "UNSURE" if draw < 0.11 else "UNLIKELY"


def _license(rng: np.random.Generator) -> str:
    if rng.random() < 0.85:
        return "?"
    return _LICENSES[int(rng.integers(len(_LICENSES)))]


# ---------------------------------------------------------------------------------------------
# Building
#
# Every picture goes to a spool folder as soon as it is encoded, so the builder's memory does not
# grow with the number of images (it holds no pixels, no encoded bytes); build_corpus then moves
# the spooled files to their names under images/.


@dataclass(frozen=True)
class _Stored:
    """An encoded picture in the spool: what the rows and the truth need of it, no pixels."""

    path: Path
    width: int
    height: int
    fmt: str
    quality: int
    layout: str
    subject: str
    sources: list[str]
    faces: list[Box]
    size: int
    sha256: str

    @property
    def extension(self) -> str:
        return "png" if self.fmt == "png" else "jpg"

    def read(self) -> bytes:
        return self.path.read_bytes()

    def load(self) -> _Picture:
        """The picture again, decoded from its file (for its near-duplicates)."""
        data = self.read()
        with Image.open(io.BytesIO(data)) as image:
            decoded = image.convert("RGB")
        fields = (self.faces, self.layout, self.subject, self.sources, self.fmt, self.quality)
        return _Picture(decoded, *fields, data=data)


class _Spool:
    """A folder of encoded pictures, numbered as they come; build_corpus moves them to images/."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.folder = folder
        self.count = 0

    def store(self, picture: _Picture) -> _Stored:
        path = self.folder / f"{self.count:07d}"
        self.count += 1
        path.write_bytes(picture.data)
        return _Stored(
            path,
            *picture.image.size,
            picture.fmt,
            picture.quality,
            picture.layout,
            picture.subject,
            picture.sources,
            picture.faces,
            len(picture.data),
            hashlib.sha256(picture.data).hexdigest(),
        )


RENDER_AHEAD = 32  # jobs rendered ahead of the one being checked: the pictures held at once


def _render_distinct(seed: int, jobs: list[_Job], workers: int, spool: _Spool) -> list[_Stored]:
    """Render every job; re-render (next attempt) any picture whose pHash is under
    DISTINCT_MIN_DISTANCE bits from an earlier one's. Spools each picture it keeps, in order."""

    def render(job: _Job, attempt: int = 0) -> tuple[_Picture, int]:
        picture = _render(seed, job, attempt)
        return picture, _phash(picture.image)

    accepted = np.empty(len(jobs), np.uint64)  # the pHashes of the pictures kept so far
    stored: list[_Stored] = []
    with ThreadPoolExecutor(workers) as pool:
        ahead = collections.deque(pool.submit(render, job) for job in jobs[:RENDER_AHEAD])
        for i, job in enumerate(jobs):
            picture, phash = ahead.popleft().result()
            if i + RENDER_AHEAD < len(jobs):
                ahead.append(pool.submit(render, jobs[i + RENDER_AHEAD]))
            attempt = 0
            while _too_close(phash, accepted[:i]):
                attempt += 1
                if attempt > 25:
                    raise AssertionError(f"no distinct picture for {job} after 25 attempts")
                picture, phash = render(job, attempt)
            accepted[i] = phash
            stored.append(spool.store(picture))
    return stored


def _too_close(phash: int, others: np.ndarray) -> bool:
    """Whether `phash` is under DISTINCT_MIN_DISTANCE bits from any of `others`."""
    distances = np.bitwise_count(others ^ np.uint64(phash))
    return bool(len(others)) and int(distances.min()) < DISTINCT_MIN_DISTANCE


def _near_duplicates(
    seed: int, group: int, kinds: list[str], original: _Picture
) -> list[_Picture] | None:
    """One variant per kind, each within NEAR_MAX_DISTANCE of the original, milder if needed.

    None when some kind can't get that close (pHash is fragile on some images: many DCT
    coefficients near the median, and the truth promises what pHash can find), or when resizing
    would shrink a face below the corpus's 16 px floor.
    """
    smallest = min((min(x2 - x1, y2 - y1) for x1, y1, x2, y2 in original.faces), default=1e9)
    if "resize" in kinds and smallest * RESIZE_FACTOR < 16:
        return None
    target = _phash(_decoded(original))
    variants = []
    for j, kind in enumerate(kinds):
        for strength in (1.0, 0.6, 0.35, 0.2):
            rng = np.random.default_rng([seed, 2, group, j])
            variant = _near_duplicate(original, kind, rng, strength)
            if _distance(_phash(_decoded(variant)), target) <= NEAR_MAX_DISTANCE:
                variants.append(variant)
                break
        else:
            return None
    return variants


def _assemble(seed: int, plan: _Plan, pictures: list[_Stored], spool: _Spool) -> list[_Row]:
    counter = iter(range(10**6))
    rows, unique_ok = _picture_rows(seed, plan, pictures, spool, counter)
    for row in rows:
        row.path = _ROUTES[row.case].format(name=row.name)
    rows += _failure_rows(plan, counter)
    rng = np.random.default_rng([seed, 3])
    _claim_sizes(rng, plan, rows, unique_ok)
    return [rows[k] for k in rng.permutation(len(rows))]


def _picture_rows(
    seed: int, plan: _Plan, pictures: list[_Stored], spool: _Spool, counter: Iterator[int]
) -> tuple[list[_Row], list[_Row]]:
    """(every row served a picture, the unique ok ones among them), named from `counter`."""

    def name_for(picture: _Stored) -> str:
        return f"{next(counter):06d}.{picture.extension}"

    rows: list[_Row] = []
    queue = list(pictures)
    for case in _CASES_WITH_PICTURE:
        for _ in range(plan.case_counts[case]):
            # A truncated PNG is another case; this one is the classic half-sent JPEG.
            wanted = "jpeg" if case == "truncated" else None
            k = next(i for i in reversed(range(len(queue))) if wanted in (None, queue[i].fmt))
            picture = queue.pop(k)
            rows.append(_Row(case, "", picture, name_for(picture)))
    for group, copies in enumerate(plan.exact_copies):
        picture = queue.pop()
        rows.append(_Row("ok", "", picture, name_for(picture), group, "original"))
        for _ in range(copies):
            rows.append(_Row("ok", "", picture, name_for(picture), group, "exact"))
    first_near = len(plan.exact_copies)
    unsuitable: list[_Stored] = []  # kept as unique images instead
    for g, kinds in enumerate(plan.near_kinds):
        group = first_near + g
        variants = None
        while variants is None:
            if not queue:
                raise AssertionError("no picture takes near-duplicates within the pHash bound")
            original = queue.pop()
            variants = _near_duplicates(seed, group, kinds, original.load())
            if variants is None:
                unsuitable.append(original)
        rows.append(_Row("ok", "", original, name_for(original), group, "original"))
        for kind, variant in zip(kinds, map(spool.store, variants), strict=True):
            rows.append(_Row("ok", "", variant, name_for(variant), group, kind))
    queue += unsuitable
    unique_ok = [_Row("ok", "", p, name_for(p)) for p in queue]
    rows += unique_ok
    for i in range(plan.case_counts["too_small"]):
        tiny = spool.store(_tiny(seed, i))
        rows.append(_Row("too_small", "", tiny, name_for(tiny)))
    return rows, unique_ok


def _failure_rows(plan: _Plan, counter: Iterator[int]) -> list[_Row]:
    """The rows whose URL serves no picture: 404s, server errors, HTML, private redirects."""
    rows = [
        _Row("http_404", f"/img/{next(counter):06d}.jpg")
        for _ in range(plan.case_counts["http_404"])
    ]
    for i in range(plan.case_counts["http_5xx"]):
        code = _ERROR_CODES[i % len(_ERROR_CODES)]
        rows.append(_Row("http_5xx", f"/error/{code}/{next(counter):06d}.jpg"))
    for _ in range(plan.case_counts["not_an_image"]):
        rows.append(_Row("not_an_image", f"/html/{next(counter):06d}.jpg"))
    for _ in range(plan.case_counts["redirect_private"]):
        rows.append(_Row("redirect_private", f"/redirect/private/{next(counter):06d}.jpg"))
    return rows


def _claim_sizes(rng: np.random.Generator, plan: _Plan, rows: list[_Row], unique_ok: list[_Row]):
    """The WIDTH/HEIGHT the metadata claims: the picture's, a few swapped, some with a query."""
    for row in rows:
        if row.picture is None or row.case == "too_small":
            row.claimed_size = _frame_size(rng)
        else:
            row.claimed_size = (row.picture.width, row.picture.height)
    candidates = [r for r in unique_ok if r.picture.width != r.picture.height]
    for k in rng.permutation(len(candidates))[: plan.swapped]:
        candidates[k].wh_swapped = True
        candidates[k].claimed_size = candidates[k].claimed_size[::-1]
    for k in rng.permutation(len(unique_ok))[: max(2, len(unique_ok) // 25)]:
        unique_ok[k].query = f"?w={int(rng.choice([400, 800, 1200]))}"


def _tables(seed: int, rows: list[_Row]) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng([seed, 4])
    sample_ids = rng.choice(4_000_000_000, size=len(rows), replace=False) + 10**8
    metadata, truth = [], []
    for sample_id, row in zip(sample_ids.tolist(), rows, strict=True):
        url = f"http://{DEMO_HOST}{row.path}{row.query}"
        picture = row.picture
        subject = picture.subject if picture is not None else "unknown"
        metadata.append(
            {
                "SAMPLE_ID": sample_id,
                "URL": url,
                "TEXT": _caption(rng, subject),
                "HEIGHT": row.claimed_size[1],
                "WIDTH": row.claimed_size[0],
                "LICENSE": _license(rng),
                "NSFW": _nsfw(rng),
                "similarity": float(0.3 + min(0.2, rng.gamma(2.0, 0.025))),
            }
        )
        truth.append(_truth_row(sample_id, url, row))
    return (
        pa.Table.from_pylist(metadata, schema=LAION_METADATA),
        pa.Table.from_pylist(truth, schema=TRUTH_SCHEMA),
    )


def _truth_row(sample_id: int, url: str, row: _Row) -> dict:
    picture = row.picture
    served = picture is not None and row.case != "truncated"
    sha256 = picture.sha256 if served else None
    if row.case == "truncated":
        sha256 = hashlib.sha256(truncated_body(picture.read())).hexdigest()
    elif row.case == "not_an_image":
        sha256 = hashlib.sha256(HTML_PAGE).hexdigest()
    faces = picture.faces if served else []
    return {
        "SAMPLE_ID": sample_id,
        "URL": url,
        "case": row.case,
        "expected_status": EXPECTED_STATUS[row.case],
        "path": row.path,
        "file": row.name or None,
        "sha256": sha256,
        "width": picture.width if served else None,
        "height": picture.height if served else None,
        "format": picture.fmt if picture is not None else None,
        "layout": picture.layout if picture is not None else None,
        "n_faces": len(faces) if served else None,
        "faces": [dict(zip(("x1", "y1", "x2", "y2"), box, strict=True)) for box in faces],
        "dup_group": row.dup_group,
        "dup_kind": row.dup_kind,
        "wh_swapped": row.wh_swapped,
        "sources": picture.sources if picture is not None else [],
    }


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="snappy", row_group_size=1_000_000)
    return buffer.getvalue()


def _counts(truth: pa.Table, n_files: int) -> dict:
    cases: dict[str, int] = {}
    for case in truth.column("case").to_pylist():
        cases[case] = cases.get(case, 0) + 1
    faces = {"0": 0, "1": 0, "2": 0, "3": 0, "4+": 0}
    for case, n in zip(
        truth.column("case").to_pylist(), truth.column("n_faces").to_pylist(), strict=True
    ):
        if case == "ok":
            faces[str(n) if n < 4 else "4+"] += 1
    groups = [g for g in truth.column("dup_group").to_pylist() if g is not None]
    return {
        "rows": truth.num_rows,
        "cases": dict(sorted(cases.items())),
        "ok_rows_by_faces": faces,
        "dup_groups": len(set(groups)),
        "dup_rows": len(groups),
        "wh_swapped": sum(truth.column("wh_swapped").to_pylist()),
        "image_files": n_files,
    }


_OWN_ENTRIES = {"images", "metadata.parquet", "truth.parquet", "corpus.json", ".lock"}


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One builder per folder at a time (tests, demo and benchmarks may share a cache folder)."""
    with open(out / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(out: Path, seed: int, n_rows: int) -> Corpus | None:
    """The corpus already in `out` if it is complete and was built for this seed and size."""
    try:
        manifest = json.loads((out / "corpus.json").read_text())
    except (OSError, ValueError):
        return None
    wanted = (CORPUS_FORMAT, CORPUS_VERSION, seed, n_rows)
    if (
        manifest.get("format"),
        manifest.get("version"),
        manifest.get("seed"),
        manifest.get("rows"),
    ) != wanted:
        return None
    for relative, entry in manifest.get("files", {}).items():
        path = out / relative
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return None
    return Corpus(out, seed, n_rows, manifest["counts"])


def _clear(out: Path) -> None:
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if p.name not in _OWN_ENTRIES and not p.name.startswith(storage.TEMP_PREFIX)
    )
    if foreign:
        raise CorpusError(
            f"{out} holds files that are not part of a demo corpus ({', '.join(foreign[:5])}); "
            "pass an empty or new folder"
        )
    (out / "corpus.json").unlink(missing_ok=True)  # first: the folder is now incomplete
    for p in out.iterdir():
        if p.name == ".lock":
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _place_images(images: Path, rows: list[_Row]) -> dict[str, dict]:
    """Move each spooled picture to images/<its name> (copied for each further name: the exact
    duplicates); returns their manifest entries."""
    images.mkdir()
    placed: dict[Path, Path] = {}
    entries = {}
    for row in rows:
        picture = row.picture
        if picture is None:
            continue
        target = images / row.name
        if picture.path in placed:
            shutil.copyfile(placed[picture.path], target)
        else:
            os.replace(picture.path, target)
            placed[picture.path] = target
        entries[f"images/{row.name}"] = {"bytes": picture.size, "sha256": picture.sha256}
    return entries


def build_corpus(out_dir: str | Path, seed: int = 0, n_images: int = DEFAULT_ROWS) -> Corpus:
    """Write the demo corpus for `seed` with `n_images` metadata rows (URLs) into local `out_dir`.

    Returns at once if `out_dir` already holds the complete corpus for this seed and size;
    rebuilds a partial or different one; refuses a folder holding anything else. Byte-identical
    for the same seed, size and library versions (Pillow, pyarrow, numpy, imagehash). Pictures
    are written as they are rendered and never held: 350 MB of peak RSS at 20,000 rows, 670 MB
    at 100,000 (the rows' metadata; benchmarks/bench_corpus.py); ~30 ms of CPU per picture.
    """
    if not isinstance(seed, int) or seed < 0:
        raise CorpusError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(n_images, int) or n_images < MIN_ROWS:
        raise CorpusError(f"n_images must be an int >= {MIN_ROWS}, got {n_images!r}")
    if "://" in str(out_dir) and not str(out_dir).startswith("file://"):
        raise CorpusError(f"{out_dir}: the corpus is served from a local folder; pass a local path")
    out = Path(str(out_dir).removeprefix("file://")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        existing = _complete(out, seed, n_images)
        if existing is not None:
            return existing
        _clear(out)
        spool = _Spool(out / f"{storage.TEMP_PREFIX}pictures")
        plan = _plan(seed, n_images)
        pictures = _render_distinct(seed, plan.jobs, min(4, os.cpu_count() or 1), spool)
        rows = _assemble(seed, plan, pictures, spool)
        metadata, truth = _tables(seed, rows)
        files = _place_images(out / "images", rows)
        spool.folder.rmdir()  # every picture spooled has its place in images/
        for name, table in (("metadata.parquet", metadata), ("truth.parquet", truth)):
            data = _parquet_bytes(table)
            storage.write_bytes(str(out / name), data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        counts = _counts(truth, sum(1 for name in files if name.startswith("images/")))
        manifest = {
            "format": CORPUS_FORMAT,
            "version": CORPUS_VERSION,
            "seed": seed,
            "rows": n_images,
            "host": DEMO_HOST,
            "counts": counts,
            "files": dict(sorted(files.items())),
        }
        storage.write_json(str(out / "corpus.json"), manifest)
        return Corpus(out, seed, n_images, counts)
