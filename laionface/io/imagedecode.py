"""Decode untrusted image bytes once: upright RGB pixels for the detector and the pHash.

`decode_image` never raises for bad input: every failure comes back as `Decoded.error`, a string
that starts with a short reason code (`too_large:`, `not_an_image:`, `decode_failed:`, `empty:`)
followed by the detail. Size is checked from the header before any pixel is decoded, so a
20,000 x 20,000 px image costs nothing but its header.

Frames and orientation:
- The detector's pixels are the upright image (EXIF orientation applied); `width`/`height` are
  the upright image's full-resolution size, and detections are in that frame.
- The pHash is computed exactly as `imagehash.phash(PIL.Image.open(bytes))` computes it: from
  the first frame as stored (no EXIF rotation), `convert("L")` from the file's own mode, then a
  32x32 LANCZOS resize and the DCT. So it equals imagehash's value bit for bit whenever the
  image is decoded at full resolution.
- Large JPEGs (at least twice `max_size`) are decoded with PIL's draft mode (DCT-domain
  downscaling, 2.5-5x faster) unless `draft=False`. The hash then comes from the reduced pixels
  and can differ from imagehash's: on 272 such JPEGs made from 34 photos and test images, 240 were
  identical and 22 two bits apart; only synthetic chessboards (whose low DCT coefficients all sit
  near the median) differed by 4-20 bits. `Decoded.phash_exact` says which path was taken; pass
  `draft=False` for hashes that always equal imagehash's.
- The shrink to `max_size` runs on torch's vectorized kernel (the faces stage, which has torch
  for the detector anyway) or, with `torch_resize=False`, on PIL's own BILINEAR resize, for
  callers that must not import torch (the report's thumbnails): within a few levels of each other.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.fftpack
from PIL import Image, UnidentifiedImageError

# Transposes that undo EXIF orientations 2..8 (the same table PIL's ImageOps.exif_transpose uses).
_EXIF_ORIENTATION_TAG = 0x0112
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PHASH_SIDE = 32
_PHASH_BITS = 8
# Draft decoding only pays off when the JPEG can be reduced by at least 2x.
_DRAFT_MIN_RATIO = 2
_UINT64 = 1 << 64


@dataclass(frozen=True)
class Decoded:
    """One decoded image, or the reason it could not be decoded (`error`)."""

    pixels: np.ndarray | None  # RGB uint8 (h, w, 3), upright, longest side <= max_size
    width: int  # full-resolution upright size (as stored when refused as too large); 0: unknown
    height: int
    phash: int | None  # 64-bit pHash as an unsigned int
    phash_exact: bool  # True: hashed from full-resolution pixels, equal to imagehash's phash
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def scale(self) -> tuple[float, float]:
        """(pixels width / width, pixels height / height): multiply upright coords to get pixels'."""
        if self.pixels is None:
            raise ValueError(f"no pixels: {self.error}")
        return self.pixels.shape[1] / self.width, self.pixels.shape[0] / self.height


def fit_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """The size with the same aspect whose longest side is `max_size`; smaller images unchanged.

    Images are never upscaled: RetinaFace detects at native resolution up to `max_size`.
    """
    longest = max(width, height)
    if longest <= max_size:
        return width, height
    scale = max_size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def phash_of_gray32(gray: np.ndarray) -> int:
    """imagehash's pHash of a 32x32 grayscale array, as a 64-bit unsigned int (first bit = MSB)."""
    dct = scipy.fftpack.dct(scipy.fftpack.dct(gray, axis=0), axis=1)
    low = dct[:_PHASH_BITS, :_PHASH_BITS]
    bits = (low > np.median(low)).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_image(image: Image.Image) -> int:
    """pHash of a PIL image, computed exactly like `imagehash.phash(image)`."""
    with warnings.catch_warnings():
        # imagehash converts palette images with transparency straight to "L" too; PIL's advice
        # to go through RGBA would change the value.
        warnings.simplefilter("ignore", UserWarning)
        gray = image.convert("L")
    gray = gray.resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS)
    return phash_of_gray32(np.asarray(gray))


def phash_to_hex(value: int) -> str:
    """16 hex digits, the same text as `str(imagehash.phash(...))`."""
    return f"{value % _UINT64:016x}"


def _failed(error: str, width: int = 0, height: int = 0) -> Decoded:
    return Decoded(None, width, height, None, False, error)


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for the detector: transparency composited on white (as img2dataset does), 16-bit and
    float grayscale scaled to 8 bits instead of clipped."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image.convert("F") if image.mode != "F" else image, dtype=np.float32)
        peak = float(values.max()) if values.size else 0.0
        if peak > 255:
            values = values * (255.0 / 65535.0 if peak <= 65535 else 255.0 / peak)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if _has_transparency(image):
        with warnings.catch_warnings():
            # PIL warns that palette transparency "should be converted to RGBA": we do exactly that.
            warnings.simplefilter("ignore", UserWarning)
            rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # convert() would copy an RGB image; the caller only reads it (resize and asarray copy).
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(
    data: bytes, max_size: int, max_pixels: int, *, draft: bool = True, torch_resize: bool = True
) -> Decoded:
    """Decode `data` to upright RGB with its longest side <= `max_size`, plus its pHash.

    Images over `max_pixels` (by their header) are refused before decoding. With `draft`, JPEGs at
    least twice `max_size` are decoded at a reduced scale (faster; pHash may differ slightly).
    `torch_resize`: shrink with torch (less CPU; imports torch) or, if False, with PIL.
    """
    try:
        return _decode(data, max_size, max_pixels, draft, torch_resize)
    except Image.DecompressionBombError as exc:
        return _failed(f"too_large: {exc}")
    except UnidentifiedImageError:
        return _failed(f"not_an_image: {len(data)} bytes that PIL can't identify as an image")
    except Exception as exc:  # untrusted bytes: any decoder error is this image's outcome
        return _failed(f"decode_failed: {type(exc).__name__}: {exc}")


def _decode(
    data: bytes, max_size: int, max_pixels: int, draft: bool, torch_resize: bool
) -> Decoded:
    image = Image.open(io.BytesIO(data))
    stored_w, stored_h = image.size
    if stored_w < 1 or stored_h < 1:
        return _failed(f"empty: the header says {stored_w}x{stored_h} px")
    if stored_w * stored_h > max_pixels:
        return _failed(
            f"too_large: {stored_w}x{stored_h} = {stored_w * stored_h:,} px is over the "
            f"{max_pixels:,} px cap (faces.max_image_pixels); not decoded",
            stored_w,
            stored_h,
        )
    # Only after the size check: PNG keeps EXIF after the pixel data, so reading it decodes.
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not lose an otherwise fine picture
        orientation = 1
    undo = _UNDO_ORIENTATION.get(orientation)
    upright_w, upright_h = (
        (stored_h, stored_w) if orientation in (5, 6, 7, 8) else (stored_w, stored_h)
    )
    target = fit_size(stored_w, stored_h, max_size)
    drafted = False
    if draft and image.format == "JPEG" and max(stored_w, stored_h) >= _DRAFT_MIN_RATIO * max_size:
        drafted = image.draft("RGB", target) is not None and image.size != (stored_w, stored_h)
    image.load()

    phash = phash_image(image)
    rgb = _to_rgb(image)
    if rgb.size == target:
        pixels = np.asarray(rgb, dtype=np.uint8)
    elif torch_resize:
        pixels = _shrink(rgb, target)
    else:
        pixels = np.asarray(rgb.resize(target, Image.Resampling.BILINEAR), dtype=np.uint8)
    if undo is not None:
        pixels = np.asarray(Image.fromarray(pixels).transpose(undo))
    return Decoded(pixels, upright_w, upright_h, phash, not drafted, None)


def _shrink(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An RGB image shrunk to `size` with PIL's BILINEAR filter (a triangle as wide as the
    scale), computed by torch's vectorized uint8 kernel: 2.5x less CPU than `Image.resize`, and
    within 2 levels of its pixels (1-2 levels apart on 0.14 % of them on the benchmark's JPEGs).
    """
    # Imported here: modules that only hash (dedup, emit) import this one and not torch.
    import torch
    from torch.nn import functional

    # np.array, not asarray: torch takes writable arrays, and asarray wraps PIL's bytes.
    hwc = torch.from_numpy(np.array(image, dtype=np.uint8))
    # (1, 3, h, w) over HWC memory is channels_last, the layout of torch's vectorized kernel.
    resized = functional.interpolate(
        hwc.permute(2, 0, 1)[None],
        size=(size[1], size[0]),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    # An HWC view of planar memory, left so: the detector's float input is planar too.
    return resized[0].permute(1, 2, 0).numpy()
