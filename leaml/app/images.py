"""Images as the pages show them: where an image's file lives, the view (upscaled, zoomed
around a point) and the same view as a JPEG data URL, which arrives with the page itself
(no second request from the browser)."""
from __future__ import annotations

import base64
import functools
import io
from pathlib import Path

import sqlite_utils
from PIL import Image

from leaml.store import images as images_store

VIEW_PX = 560  # images are shown this wide (demo frames are 64-128 px: upscaled)


def image_path(db: sqlite_utils.Database, image: dict | int) -> Path:
    """The file of ``image`` (a row, or an image id)."""
    return images_store.image_path(db, image)


def view_image(path: str, zoom: float = 1.0, cx: float = 0.5, cy: float = 0.5,
               width: int = VIEW_PX) -> Image.Image:
    """The image at ``path`` upscaled to ``width`` px; ``zoom`` > 1 crops around (cx, cy),
    the centre given as fractions (0..1) of the width and height."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    if zoom > 1:
        cw, ch = w / zoom, h / zoom
        left = min(max(cx * w - cw / 2, 0), w - cw)
        top = min(max(cy * h - ch / 2, 0), h - ch)
        im = im.crop((int(left), int(top), int(left + cw), int(top + ch)))
    scale = width / im.size[0]
    return im.resize((width, max(1, round(im.size[1] * scale))), Image.LANCZOS)


@functools.lru_cache(maxsize=512)
def jpeg_data_url(path: str, zoom: float = 1.0, cx: float = 0.5, cy: float = 0.5,
                  width: int = VIEW_PX) -> str:
    """:func:`view_image` as a ``data:image/jpeg;base64,...`` URL, cached (image files are
    stored by content hash, so a path always holds the same image): a review decision
    costs no resize and no encoding for an image seen before."""
    buf = io.BytesIO()
    view_image(path, zoom, cx, cy, width).save(buf, format="JPEG", quality=92)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
