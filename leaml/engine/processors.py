"""Processors that differ from LLaVA's: flattened patches, and loading without a video part.

:class:`PatchLayout` (the architecture registry's word for Qwen2-VL's pixel values) says how
one fixed-size view per image is cached and handed to the model. Qwen2-VL's processor also
holds a video processor that needs torchvision; every stage here uses images and text only,
so a processor whose video processor cannot load (the library is missing, or the folder
holds none) loads as the same class without one (:func:`load`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PatchLayout:
    """Pixel values as flattened patches (Qwen2-VL's layout): the image processor puts the
    patches of all images of a call into one (patches, features) tensor and each image's patch
    grid (t, h, w) in ``grid``; the model also wants ``token_types`` (1 on the image tokens,
    aligned with input_ids). One fixed-size view per image: every image is resized to the
    largest square of ``size['longest_edge']`` pixels (max_pixels) whose side is a multiple of
    ``patch_size * merge_size``, so every image has the same grid and number of image tokens,
    and the cache keeps one (patches, features) row per image."""
    grid: str = "image_grid_thw"
    token_types: str = "mm_token_type_ids"
    # the patch, merge and temporal patch sizes: in the image processor, in the vision config
    processor_sizes: tuple[str, str, str] = ("patch_size", "merge_size", "temporal_patch_size")
    config_sizes: tuple[str, str, str] = ("patch_size", "spatial_merge_size",
                                          "temporal_patch_size")

    def side(self, image_processor) -> int:
        """The side (pixels) of every image's square view."""
        ip, size = image_processor, image_processor.size
        factor = ip.patch_size * ip.merge_size
        side = max(factor, math.isqrt(int(size["longest_edge"])) // factor * factor)
        if side * side < int(size["shortest_edge"] or 0):
            raise ValueError(f"min_pixels {size['shortest_edge']} exceeds the largest square "
                             f"view within max_pixels ({side}x{side}); set min_pixels = "
                             f"max_pixels = S*S, S a multiple of {factor}")
        return side

    def grid_row(self, image_processor) -> list[int]:
        """(t, h, w) patches of one view: one temporal patch, a square of spatial ones."""
        n = self.side(image_processor) // image_processor.patch_size
        return [1, n, n]

    def to_grid(self, rows: torch.Tensor, image_processor) -> torch.Tensor:
        """Cached rows (B, P, F) of square views -> images (B, C*T, H, W) (T copies of each
        channel), which mirror and move as pixel grids do; :meth:`from_grid` undoes it."""
        p, m, t = (getattr(image_processor, k) for k in self.processor_sizes)
        b, n, f = rows.shape
        g = math.isqrt(n)
        x = rows.reshape(b, g // m, g // m, m, m, f // (t * p * p), t, p, p)
        return x.permute(0, 5, 6, 1, 3, 7, 2, 4, 8).reshape(b, -1, g * p, g * p)

    def from_grid(self, images: torch.Tensor, vision_config) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C*T, H, W) -> the model's flattened patches and their grid rows."""
        p, m, t = (getattr(vision_config, k) for k in self.config_sizes)
        b, ct, h, w = images.shape
        x = images.reshape(b, ct // t, t, h // p // m, m, p, w // p // m, m, p)
        patches = x.permute(0, 3, 6, 4, 7, 1, 2, 5, 8).reshape(b * (h // p) * (w // p), -1)
        grid = torch.tensor([[1, h // p, w // p]] * b, dtype=torch.long, device=images.device)
        return patches, grid


def load(path: str):
    """``AutoProcessor`` of a local folder. A processor whose video processor cannot load
    (Qwen2-VL's needs torchvision; a folder may also hold none) loads as the same class
    without it: image and text are all a stage here uses."""
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, OSError) as exc:
        cls = _processor_class(path)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        try:
            return without_video(cls).from_pretrained(path, local_files_only=True)
        except Exception:
            raise exc from None


def _processor_class(path: str):
    import transformers
    try:
        name = json.loads((Path(path) / "processor_config.json").read_text())["processor_class"]
    except (OSError, ValueError, KeyError):
        return None
    return getattr(transformers, name, None)


def without_video(cls):
    """Processor class ``cls`` with no video processor: the same name, so a folder it saves
    names ``cls`` and loads back as ``cls`` where its video processor can load."""
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                     video_processor=None, chat_template=chat_template, **kwargs)
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__doc__": cls.__doc__})
