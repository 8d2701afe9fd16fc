"""Image checks for import: one read, one decode, every reason to refuse a file.

An image is accepted when it is a regular file (or an in-memory blob) no larger than
``max_bytes``, PIL identifies it as one of :data:`FORMAT_EXT`, its header claims at most
``max_pixels`` pixels (checked *before* anything is decoded, so a decompression bomb never
allocates), ``verify()`` passes and a full ``load()`` decodes it. Width and height come from
the same open, and the sha256 from the same bytes, so each image is read and decoded once.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000          # 40 megapixels: far above any endoscopy frame
DEFAULT_MAX_BYTES = 64 * 1024 * 1024     # one image file
# What PIL calls the format -> the extension the content-addressed store gives the file.
FORMAT_EXT = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp", "GIF": ".gif",
              "TIFF": ".tif", "WEBP": ".webp"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class BadImage(ValueError):
    """An image the import refuses; the message completes "image 'x.png' ..."."""


@dataclass(frozen=True)
class CheckedImage:
    """What validation learnt about one image: enough to store it without opening it again."""
    sha256: str
    ext: str
    width: int
    height: int


def read_limited(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file, refusing FIFOs, devices and files over ``max_bytes``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BadImage(f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadImage("is not a regular file; point the row at an image file")
    if st.st_size > max_bytes:
        raise BadImage(f"is {human_bytes(st.st_size)}, over the limit of {human_bytes(max_bytes)}"
                       " per image; downscale or recompress it")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)   # +1: a file that grew since stat() still fails
    except OSError as exc:
        raise BadImage(f"cannot be read ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise BadImage(f"is over the limit of {human_bytes(max_bytes)} per image")
    return data


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as file managers show them)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckedImage:
    """Validate one encoded image and return its hash, extension and size, or raise BadImage."""
    if not data:
        raise BadImage("is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fmt, width, height = _open_and_verify(data, max_pixels)
            with Image.open(io.BytesIO(data)) as im:   # verify() leaves the image unusable
                im.load()                              # the one full decode: truncation shows here
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"claims more pixels than the limit of {max_pixels:,}"
                       " (decompression bomb?); downscale it") from None
    except UnidentifiedImageError:
        raise BadImage("is not a readable image (not a known image format); re-save it as PNG"
                       " or JPEG") from None
    except Exception as exc:   # PIL raises many types on hostile input; all mean "unreadable"
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise BadImage(f"is not a readable image ({reason}); re-save it as PNG or JPEG") from None
    return CheckedImage(hashlib.sha256(data).hexdigest(), FORMAT_EXT[fmt], width, height)


def _open_and_verify(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Header checks before any pixel is decoded: format, pixel count, then PIL's verify()."""
    with Image.open(io.BytesIO(data)) as im:
        fmt, (width, height) = im.format, im.size
        if fmt not in FORMAT_EXT:
            raise BadImage(f"has format {fmt}, which is not supported; convert it to PNG or JPEG")
        if width < 1 or height < 1:
            raise BadImage(f"has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise BadImage(f"is {width}x{height} = {width * height:,} pixels, over the limit of"
                           f" {max_pixels:,} (decompression bomb?); downscale it")
        im.verify()
    return fmt, width, height
