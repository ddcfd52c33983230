"""A pixel cap in front of img2dataset's resizer: no image is decoded whole before its size is known.

img2dataset's `Resizer` decodes every downloaded image fully (OpenCV), whatever its size: a
PNG of a few hundred kilobytes declaring 8000 x 8000 RGBA pixels takes a worker past 5 GB
through the alpha blending. `PixelCappedResizer` reads the size from the image's header first
(Pillow's `Image.open` parses the header and decodes no pixels) and refuses, with no decode:

- an image whose header declares more than `max_pixels` pixels: `too_many_pixels: ...`
  (Pillow refuses on its own past twice `Image.MAX_IMAGE_PIXELS`, the same category);
- an empty body, or bytes whose size no header gives (not an image Pillow can read): `Image
  decoding error: ...`, img2dataset's own wording for bytes it can't decode (`not_an_image`).

Anything else goes to img2dataset's resizer unchanged, as the same `Downloader` calls it.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError

TOO_MANY_PIXELS_PREFIX = "too_many_pixels:"
# img2dataset's Resizer says this of bytes OpenCV can't decode; categories maps it to not_an_image.
NOT_AN_IMAGE = "Image decoding error"


def header_refusal(stream: io.BytesIO, max_pixels: int) -> str | None:
    """Why the image in `stream` must not be decoded, from its header alone; None when it may."""
    size = stream.getbuffer().nbytes
    if size == 0:
        return f"{NOT_AN_IMAGE}: empty response body (0 bytes)"
    stream.seek(0)
    try:
        with Image.open(stream) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        return f"{TOO_MANY_PIXELS_PREFIX} {exc}; not decoded"
    except UnidentifiedImageError:
        return f"{NOT_AN_IMAGE}: {size:,} bytes whose image size can't be read; not decoded"
    except Exception as exc:  # untrusted bytes: a broken header is this image's outcome
        return f"{NOT_AN_IMAGE}: unreadable image header ({type(exc).__name__}: {exc})"
    finally:
        stream.seek(0)
    if width * height > max_pixels:
        return (
            f"{TOO_MANY_PIXELS_PREFIX} {width} x {height} = {width * height:,} px, over "
            f"download.max_image_pixels ({max_pixels:,}); not decoded"
        )
    return None


class PixelCappedResizer:
    """img2dataset's `Resizer` (same call, same results) behind `header_refusal`."""

    def __init__(self, resizer: Any, max_pixels: int):
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        refusal = header_refusal(img_stream, self.max_pixels)
        if refusal is not None:
            return None, None, None, None, None, refusal
        return self.resizer(img_stream, blurring_bbox_list)
