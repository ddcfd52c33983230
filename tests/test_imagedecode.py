"""decode_image on real photos and on every kind of bad input, built from the photos with PIL."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from laionface.io.imagedecode import (
    decode_image,
    fit_size,
    phash_to_hex,
)
from tests.photos import PHOTOS

MAX_SIZE = 640
MAX_PIXELS = 50_000_000


def imagehash_value(data: bytes) -> int:
    """What a user gets from imagehash on the same bytes."""
    return int(str(imagehash.phash(Image.open(io.BytesIO(data)))), 16)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


@pytest.fixture(scope="module")
def obama(shared_faces) -> Image.Image:
    return Image.open(shared_faces / "fr_obama_small.jpg").convert("RGB")


@pytest.fixture(scope="module")
def two_people(shared_faces) -> Image.Image:
    return Image.open(shared_faces / "fr_two_people.jpg").convert("RGB")


# --- the pHash ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_phash_equals_imagehash_on_the_photos(shared_faces, name):
    data = (shared_faces / name).read_bytes()
    for draft in (False, True):
        decoded = decode_image(data, MAX_SIZE, MAX_PIXELS, draft=draft)
        assert decoded.ok, decoded.error
        if decoded.phash_exact:
            assert decoded.phash == imagehash_value(data)
    exact = decode_image(data, MAX_SIZE, MAX_PIXELS, draft=False)
    assert exact.phash_exact and exact.phash == imagehash_value(data)
    assert phash_to_hex(exact.phash) == str(imagehash.phash(Image.open(io.BytesIO(data))))


def test_phash_equals_imagehash_for_every_mode(obama):
    variants = {
        "png-rgba": encode(obama.convert("RGBA"), "PNG"),
        "png-palette": encode(obama.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "jpeg-gray": encode(obama.convert("L"), "JPEG", quality=90),
        "jpeg-cmyk": encode(obama.convert("CMYK"), "JPEG", quality=90),
        "png-16bit": encode(
            Image.fromarray(np.asarray(obama.convert("L")).astype(np.uint16) * 257), "PNG"
        ),
        "webp": encode(obama, "WEBP", quality=80),
        "bmp-1bit": encode(obama.convert("1"), "BMP"),
    }
    for kind, data in variants.items():
        decoded = decode_image(data, MAX_SIZE, MAX_PIXELS)
        assert decoded.ok, (kind, decoded.error)
        assert decoded.phash_exact, kind
        assert decoded.phash == imagehash_value(data), kind


def test_large_jpeg_is_drafted_and_its_phash_stays_close(two_people):
    big = two_people.resize((3378, 1983), Image.Resampling.LANCZOS)
    data = encode(big, "JPEG", quality=90)
    fast = decode_image(data, MAX_SIZE, MAX_PIXELS)
    exact = decode_image(data, MAX_SIZE, MAX_PIXELS, draft=False)
    assert not fast.phash_exact and exact.phash_exact
    assert exact.phash == imagehash_value(data)
    # Measured on 256 drafted photos: 94% identical, the rest 2 bits apart.
    assert hamming(fast.phash, exact.phash) <= 2
    assert fast.pixels.shape == exact.pixels.shape == (376, 640, 3)
    assert (fast.width, fast.height) == (3378, 1983)
    difference = np.abs(fast.pixels.astype(int) - exact.pixels.astype(int)).mean()
    assert difference < 3


def test_phash_hex_and_signed_storage_keep_the_bits():
    high = 0xF000000000000001
    assert phash_to_hex(high) == "f000000000000001" == str(imagehash.hex_to_hash(f"{high:016x}"))
    assert phash_to_hex(5) == "0000000000000005"
    # The faces parquet column is uint64; a store without uint64 (int64) keeps the same bits.
    column = pa.array([high, 0, (1 << 64) - 1], type=pa.uint64())
    signed = column.cast(pa.int64(), safe=False)
    assert signed[0].as_py() == high - (1 << 64)
    assert signed.cast(pa.uint64(), safe=False).to_pylist() == column.to_pylist()


def test_downscaled_pixels_are_pils_bilinear_within_two_levels(two_people):
    """Shrinking runs on torch's vectorized kernel: the same filter as PIL's BILINEAR resize."""
    for size in ((1126, 661), (900, 1400), (1279, 700)):
        source = two_people.resize(size, Image.Resampling.LANCZOS)
        decoded = decode_image(encode(source, "PNG"), MAX_SIZE, MAX_PIXELS)  # PNG: lossless
        pil = np.asarray(source.resize(fit_size(*size, MAX_SIZE), Image.Resampling.BILINEAR))
        assert decoded.pixels.shape == pil.shape
        difference = np.abs(decoded.pixels.astype(int) - pil.astype(int))
        assert difference.max() <= 2 and (difference > 0).mean() < 0.01, size


def test_fit_size_never_upscales():
    assert fit_size(1126, 661, 640) == (640, 376)
    assert fit_size(970, 2204, 640) == (282, 640)
    assert fit_size(320, 240, 640) == (320, 240)
    assert fit_size(20000, 1, 640) == (640, 1)


# --- bad and unusual inputs: each one is an outcome, never an exception -------------------------


def test_truncated_files_are_recorded_failures(obama):
    for fmt in ("JPEG", "PNG", "GIF"):
        data = encode(obama, fmt)
        decoded = decode_image(data[: len(data) * 6 // 10], MAX_SIZE, MAX_PIXELS)
        assert not decoded.ok, fmt
        assert decoded.error.startswith("decode_failed:") and "truncated" in decoded.error, fmt
        assert decoded.pixels is None and decoded.phash is None


def test_cmyk_jpeg_decodes_to_the_right_colours(obama):
    decoded = decode_image(encode(obama.convert("CMYK"), "JPEG", quality=95), MAX_SIZE, MAX_PIXELS)
    assert decoded.ok, decoded.error
    assert np.abs(decoded.pixels.astype(int) - np.asarray(obama, dtype=int)).mean() < 6


def test_16_bit_png_is_scaled_not_clipped(obama):
    gray = np.asarray(obama.convert("L"))
    decoded = decode_image(encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), 640, 10**8)
    assert decoded.ok, decoded.error
    assert np.abs(decoded.pixels[..., 0].astype(int) - gray).max() <= 1
    assert (decoded.pixels[..., 0] == decoded.pixels[..., 2]).all()


def test_palette_transparency_is_composited_on_white(obama):
    palette = obama.convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    palette.putpalette(palette.getpalette()[: 255 * 3] + [0, 0, 0])  # index 255: black...
    palette.paste(255, (0, 0, 100, 60))  # ...and transparent, in this rectangle only
    for fmt in ("PNG", "GIF"):
        data = encode(palette, fmt, transparency=255)
        decoded = decode_image(data, MAX_SIZE, MAX_PIXELS)
        assert decoded.ok, (fmt, decoded.error)
        assert (decoded.pixels[:60, :100] == 255).all(), fmt
        assert decoded.phash == imagehash_value(data)


def test_rgba_transparency_is_composited_on_white(obama):
    rgba = obama.convert("RGBA")
    rgba.putalpha(Image.new("L", obama.size, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 50, 50))
    decoded = decode_image(encode(rgba, "PNG"), MAX_SIZE, MAX_PIXELS)
    assert (decoded.pixels[:50, :50] == 255).all()
    assert np.array_equal(decoded.pixels[60:, 60:], np.asarray(obama)[60:, 60:])


def test_animated_gif_uses_the_first_frame(obama):
    first = obama.convert("P", palette=Image.Palette.ADAPTIVE)
    black = Image.new("P", obama.size, 0)
    data = encode(first, "GIF", save_all=True, append_images=[black], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    decoded = decode_image(data, MAX_SIZE, MAX_PIXELS)
    assert decoded.ok, decoded.error
    assert np.array_equal(decoded.pixels, np.asarray(first.convert("RGB")))
    assert decoded.phash == imagehash_value(data)


def test_grayscale_becomes_three_equal_channels(obama):
    decoded = decode_image(encode(obama.convert("L"), "PNG"), MAX_SIZE, MAX_PIXELS)
    assert decoded.pixels.shape == (240, 320, 3)
    assert np.array_equal(decoded.pixels[..., 0], np.asarray(obama.convert("L")))
    assert (decoded.pixels[..., 0] == decoded.pixels[..., 1]).all()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotation_is_applied_and_sizes_are_upright(obama, orientation):
    # What a camera writes: pixels stored sideways plus the tag that says how to turn them.
    stored = obama.transpose(
        {
            3: Image.Transpose.ROTATE_180,
            6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270,
        }[orientation]
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data, MAX_SIZE, MAX_PIXELS)
    assert decoded.ok, decoded.error
    assert (decoded.width, decoded.height) == obama.size == (320, 240)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(decoded.pixels, np.asarray(upright))
    assert np.abs(decoded.pixels.astype(int) - np.asarray(obama, dtype=int)).mean() < 4
    # The pHash is imagehash's on the bytes as stored (imagehash does not read EXIF).
    assert decoded.phash == imagehash_value(data)


def test_exif_rotated_large_jpeg_keeps_upright_size_and_scale(two_people):
    big = two_people.resize((2252, 1322), Image.Resampling.LANCZOS)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(big.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes())
    decoded = decode_image(data, MAX_SIZE, MAX_PIXELS)
    assert (decoded.width, decoded.height) == (2252, 1322)
    assert decoded.pixels.shape == (376, 640, 3)
    sx, sy = decoded.scale
    assert sx == pytest.approx(640 / 2252) and sy == pytest.approx(376 / 1322)


def test_one_pixel_image(obama):
    data = encode(obama.resize((1, 1)), "PNG")
    decoded = decode_image(data, MAX_SIZE, MAX_PIXELS)
    assert decoded.ok and decoded.pixels.shape == (1, 1, 3)
    assert (decoded.width, decoded.height) == (1, 1)
    assert decoded.phash == imagehash_value(data)


def _with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with a start-of-frame header claiming another size."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def _with_png_size(data: bytes, width: int, height: int) -> bytes:
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return data[:16] + bytes(ihdr) + crc + data[33:]


def test_huge_images_are_refused_from_the_header_before_decoding(obama):
    jpeg = encode(obama, "JPEG", quality=90)
    png = encode(obama, "PNG")
    # 20,000 x 20,000: over PIL's own decompression-bomb limit, refused at open.
    for data in (_with_jpeg_size(jpeg, 20000, 20000), _with_png_size(png, 20000, 20000)):
        decoded = decode_image(data, MAX_SIZE, MAX_PIXELS)
        assert decoded.error.startswith("too_large:"), decoded.error
        assert decoded.pixels is None
    # 10,000 x 8,000 is under PIL's limit: refused by max_pixels alone (a higher cap lets it
    # through to the decoder).
    for data in (_with_jpeg_size(jpeg, 10000, 8000), _with_png_size(png, 10000, 8000)):
        decoded = decode_image(data, MAX_SIZE, MAX_PIXELS)
        assert decoded.error.startswith("too_large: 10000x8000 = 80,000,000 px"), decoded.error
        assert "faces.max_image_pixels" in decoded.error
        assert (decoded.width, decoded.height) == (10000, 8000)
        uncapped = decode_image(data, MAX_SIZE, 10**8)
        assert not (uncapped.error or "").startswith("too_large")


def test_bytes_that_are_not_an_image(obama):
    for data in (b"", b"<html>404 not found</html>", encode(obama, "JPEG")[:40]):
        decoded = decode_image(data, MAX_SIZE, MAX_PIXELS)
        assert not decoded.ok
        assert decoded.error.split(":")[0] in ("not_an_image", "decode_failed"), decoded.error
    assert decode_image(b"GIF89a", MAX_SIZE, MAX_PIXELS).error


# --- the torch-free resize ---------------------------------------------------------------------


def test_pil_resize_matches_the_torch_resize_and_imports_no_torch(shared_faces):
    data = (shared_faces / "fr_two_people.jpg").read_bytes()
    fast = decode_image(data, 320, MAX_PIXELS, draft=False)
    pil = decode_image(data, 320, MAX_PIXELS, draft=False, torch_resize=False)
    assert pil.ok and pil.pixels.shape == fast.pixels.shape and max(pil.pixels.shape[:2]) == 320
    assert (pil.width, pil.height, pil.phash) == (fast.width, fast.height, fast.phash)
    difference = np.abs(pil.pixels.astype(int) - fast.pixels.astype(int))
    assert np.percentile(difference, 99) <= 2 and difference.max() <= 16

    script = (
        "import sys; from laionface.io.imagedecode import decode_image; "
        "d = decode_image(open(sys.argv[1], 'rb').read(), 320, 10**8, torch_resize=False); "
        "print(d.pixels.shape, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(shared_faces / "fr_two_people.jpg")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split()[-1] == "False", done.stdout + done.stderr
