"""Images of ``leaml serve`` requests, bounded before they cost anything.

A request's images are opened in two steps. :func:`open_data_url` decodes the base64 and reads
the image's header only (``Image.open(...).size``, no pixel decoded), so the limits on pixels
per image and per request are checked for the whole request at the cost of its headers.
:func:`decode_image` decodes the pixels later, under the server's bounded semaphore and outside
the model lock, and downscales anything with a side over ``max_image_side`` (JPEG already
while decoding, through PIL's draft mode), so that the images a queued request holds stay
small. Images come only as data URLs: the server never fetches a URL a client names.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from leaml.serve.limits import ApiError


@dataclass
class ImageRef:
    """An image whose header was read and checked, its pixels not yet decoded. It keeps the
    encoded bytes, not an opened image: an opened image keeps its pixels once loaded, and a
    request holds its refs until it is answered."""
    data: bytes
    size: tuple[int, int]
    where: str             # e.g. messages[0].content[1], for error messages

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


def _bad(where: str, message: str, code: str) -> ApiError:
    return ApiError(400, f"{where}: {message}", param="messages", code=code)


def open_data_url(url, max_pixels: int, where: str) -> ImageRef:
    """The image of ``data:image/...;base64,...`` with its size checked against
    ``max_pixels``; ApiError(400) for a remote URL, bad base64 or an unreadable header."""
    from PIL import Image
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:80] if isinstance(url, str) else type(url).__name__
        raise _bad(where, f"only data URLs are accepted (data:image/png;base64,...), got {shown!r}; "
                   "this server never fetches remote URLs (that would let a request make it reach "
                   "other hosts)", "invalid_image_url")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise _bad(where, "write the data URL as data:image/<format>;base64,<data>", "invalid_image_url")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(where, "the image's base64 data does not decode", "invalid_image") from None
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        w, h = image.size
    except Exception as exc:  # PIL raises many kinds for corrupt headers (and bombs)
        raise _bad(where, f"the image cannot be read ({type(exc).__name__}: {exc})",
                   "invalid_image") from None
    if w * h > max_pixels:
        raise _bad(where, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                   "per image; downscale it", "image_too_large")
    return ImageRef(data, (w, h), where)


def check_request_pixels(refs: list, max_request_pixels: int) -> None:
    """ApiError(400) when the request's images together hold more than ``max_request_pixels``
    (checked on their headers, before any is decoded)."""
    total = sum(r.pixels for r in refs if isinstance(r, ImageRef))
    if total > max_request_pixels:
        raise ApiError(400, f"the request's {len(refs)} images hold {total} pixels together, over "
                       f"the limit of {max_request_pixels} per request; send fewer or smaller "
                       "images", param="messages", code="image_too_large")


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled so that its longer side is ``side`` (aspect kept, at least 1 px)."""
    w, h = size
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def decode_image(ref, max_image_side: int):
    """An RGB PIL image from an :class:`ImageRef` (a PIL image passes through as RGB); an
    image with a side over ``max_image_side`` (0: no limit) comes back downscaled to it.
    ApiError(400) if the pixel data is corrupt or truncated."""
    from PIL import Image
    if not isinstance(ref, ImageRef):
        return ref.convert("RGB")
    too_big = max_image_side and max(ref.size) > max_image_side
    try:
        image = Image.open(io.BytesIO(ref.data))
        if too_big:
            image.draft("RGB", _fit(image.size, max_image_side))  # JPEG: decode at 1/2..1/8 scale
        image.load()
        if image.mode != "RGB":  # convert() copies even when the mode is already right
            image = image.convert("RGB")
        if too_big and max(image.size) > max_image_side:
            image = image.resize(_fit(image.size, max_image_side), reducing_gap=3.0)
        return image
    except Exception as exc:  # PIL raises many kinds for truncated/corrupt data
        raise _bad(ref.where, f"the image cannot be read ({type(exc).__name__}: {exc})",
                   "invalid_image") from None
