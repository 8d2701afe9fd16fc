"""Which labeled images a run keeps: the seeded label fraction (torch-free, so the app and the
demo builder use the very split that ``run --label-fraction F --seed S`` uses)."""
from __future__ import annotations

import random


def keep_fraction(image_ids: list[int], fraction: float, seed: int) -> list[int]:
    """A seeded random ``fraction`` of the images (at least one), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} must be in (0, 1], e.g. 0.01 for 1%")
    ids = sorted(image_ids)
    n = max(1, round(fraction * len(ids))) if ids else 0
    return sorted(random.Random(seed).sample(ids, n))
