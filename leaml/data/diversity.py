"""Which image to label next: random, or diverse (farthest-first over cheap image features).

A seed set of ~1% of the images should cover the data, not 30 near-identical frames. The
features are deliberately cheap (numpy + PIL, no torch): an 8x8 RGB thumbnail (layout and
overall colour) and a 4x4x4 colour histogram (tissue tone, blood, instruments). They are
computed once per image and cached under ``<home>/cache/features/``. Farthest-first picks the
candidate whose nearest labeled image is farthest away (the greedy k-center step).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

THUMB = 8           # thumbnail side: 8x8x3 = 192 values
HIST_BINS = 4       # per channel: 4^3 = 64 histogram bins
HIST_WEIGHT = 2.0   # histograms sum to 1; scaled so both parts matter about as much
MAX_CANDIDATES = 1500  # unlabeled images scored per pick; a random sample beyond that


def image_features(path: str | os.PathLike) -> np.ndarray:
    """Feature vector (256 float32) of one image: thumbnail pixels in [0, 1] + colour histogram."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        thumb = np.asarray(rgb.resize((THUMB, THUMB), Image.BILINEAR), dtype=np.float32) / 255.0
        small = np.asarray(rgb.resize((32, 32), Image.BILINEAR), dtype=np.int64)
    idx = (small // (256 // HIST_BINS)).reshape(-1, 3)
    flat = idx[:, 0] * HIST_BINS * HIST_BINS + idx[:, 1] * HIST_BINS + idx[:, 2]
    hist = np.bincount(flat, minlength=HIST_BINS ** 3).astype(np.float32)
    hist /= max(hist.sum(), 1.0)
    return np.concatenate([thumb.ravel(), HIST_WEIGHT * hist])


class FeatureCache:
    """Features of a project's images, keyed by image id, kept in one ``.npz`` file."""

    def __init__(self, path: Path | None):
        self.path = path  # None: in memory only
        self.feats: dict[int, np.ndarray] = {}
        if path is not None and path.exists():
            with np.load(path) as data:
                self.feats = dict(zip(data["ids"].tolist(), data["feats"]))
        self.dirty = False

    def get(self, ids: Iterable[int], path_of: Callable[[int], Path]) -> np.ndarray:
        """Features of ``ids`` in order (computing and remembering any missing ones)."""
        out = []
        for i in ids:
            if i not in self.feats:
                self.feats[i] = image_features(path_of(i))
                self.dirty = True
            out.append(self.feats[i])
        return np.stack(out) if out else np.zeros((0, THUMB * THUMB * 3 + HIST_BINS ** 3))

    def save(self) -> None:
        if not self.dirty or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.array(list(self.feats), dtype=np.int64)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids, feats=np.stack(list(self.feats.values())))
        os.replace(tmp, self.path)  # atomic: two sessions never see half a file
        self.dirty = False


def farthest_first(labeled: np.ndarray, candidates: np.ndarray) -> int:
    """Index into ``candidates`` (N, D) of the row farthest from its nearest ``labeled`` row.

    With nothing labeled yet: the candidate closest to the candidates' mean, a typical image
    (starting from an outlier would waste the first label).
    """
    if len(candidates) == 0:
        raise ValueError("no candidates to choose from")
    if len(labeled) == 0:
        return int(np.argmin(((candidates - candidates.mean(0)) ** 2).sum(1)))
    # (N, L) squared distances, chunked by labeled rows to bound memory
    nearest = np.full(len(candidates), np.inf, dtype=np.float64)
    for start in range(0, len(labeled), 512):
        block = labeled[start:start + 512]
        d = ((candidates[:, None, :] - block[None, :, :]) ** 2).sum(-1)
        nearest = np.minimum(nearest, d.min(1))
    return int(np.argmax(nearest))


def pick_next(candidate_ids: list[int], labeled_ids: list[int], path_of: Callable[[int], Path],
              *, strategy: str = "diverse", cache_path: Path | None = None,
              seed: int | None = None, max_candidates: int = MAX_CANDIDATES) -> int | None:
    """The image id to label next among ``candidate_ids``; None when there is none.

    ``strategy`` is ``random`` or ``diverse``. ``path_of(image_id)`` gives the file of an
    image. For diverse, at most ``max_candidates`` (random sample, fixed by ``seed``) are scored
    against every labeled image.
    """
    if not candidate_ids:
        return None
    rng = random.Random(seed)
    if strategy == "random":
        return rng.choice(candidate_ids)
    if strategy != "diverse":
        raise ValueError(f"unknown strategy {strategy!r}: use 'random' or 'diverse'")
    cands = candidate_ids if len(candidate_ids) <= max_candidates else \
        rng.sample(candidate_ids, max_candidates)
    cache = FeatureCache(cache_path)
    c_feats = cache.get(cands, path_of)
    l_feats = cache.get(labeled_ids, path_of)
    cache.save()
    return cands[farthest_first(l_feats, c_feats)]
