"""The data side of training: examples, the image tensor cache, tokenised text, batch order.

Kept apart from the loop (``leaml/engine/train.py``) so that the loop reads as a loop. Everything
here is deterministic given a seed and a step number: the order of examples in an epoch and
the hard draws of a batch are derived from ``(seed, stream, epoch)`` and ``(seed, step)``,
never from a running RNG, so a run resumed from a checkpoint sees exactly the batches an
uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from leaml.config import MAX_TARGET_TOKENS
from leaml.engine import models

# Words whose meaning a flip of the image changes ("where is the polyp?" -> "left"): the
# vision warmup (leaml/engine/warmup.py) mirrors only answers it can mirror with the image.
_POSITION_WORDS = re.compile(
    r"\b(left|right|top|bottom|upper|lower|up|down|above|below|center|centre|central|"
    r"middle|corner|side|position|located|location|where|quadrant|clockwise|"
    r"counterclockwise|horizontal|vertical|orientation|rotated|flipped)\b", re.IGNORECASE)


def mentions_position(*texts: str) -> bool:
    """True when any text speaks about position or orientation (a mirror may change the answer)."""
    return any(_POSITION_WORDS.search(t or "") for t in texts)


# the parts a place is named with ("upper-left", "center", "lower right"), and what a mirror
# along each axis ('h': left-right, 'v': up-down) makes of them
_PLACE_PARTS = {"left", "right", "upper", "lower", "top", "bottom", "center", "centre",
                "middle", "none"}
_MIRROR = {"h": {"left": "right", "right": "left"},
           "v": {"upper": "lower", "lower": "upper", "top": "bottom", "bottom": "top"}}


def mirror_word(word: str, axis: str) -> str | None:
    """``word`` as it reads in the image mirrored along ``axis``: 'upper-left' -> 'upper-right'
    ('h') or 'lower-left' ('v'); None when the word is not a place name."""
    parts = re.split(r"([-\s]+)", word)
    if not all(p in _PLACE_PARTS for p in parts[::2]):
        return None
    return "".join(_MIRROR[axis].get(p, p) if i % 2 == 0 else p for i, p in enumerate(parts))


@dataclass
class Example:
    """One supervised example: the model sees ``image`` + ``instruction`` and learns ``target``.

    ``image`` is a path (opened lazily or cached as a tensor) or an already open PIL image.
    ``open`` marks free-text/short-answer examples that ``TrainConfig.oversample_open``
    repeats.
    """
    image: str | Path | Image.Image
    instruction: str
    target: str
    open: bool = False


def open_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or an image; names the file when it cannot be read."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {image}: {exc}; re-import the file") from exc


def _image_key(image) -> object:
    return str(image) if isinstance(image, (str, Path)) else id(image)


class ImageSource:
    """Pixel tensors for a list of images: cached once when they fit ``budget_mb``, else lazy.

    The cache holds the processor's output for every distinct image in one tensor (N, C, H, W)
    so that a batch is one index operation; the lazy path opens and preprocesses the images of
    each batch (slower, constant memory).
    """

    def __init__(self, processor, images: Sequence, budget_mb: float, chunk: int = 256):
        self.processor = processor
        self.keys: dict[object, int] = {}
        self.images: list = []
        for im in images:
            key = _image_key(im)
            if key not in self.keys:
                self.keys[key] = len(self.images)
                self.images.append(im)
        first = models.pixel_values(processor, [open_image(self.images[0])])
        per_image_mb = first[0].numel() * first.element_size() / 2**20
        self.cached = per_image_mb * len(self.images) <= budget_mb
        self.tensor = self._preprocess_all(chunk) if self.cached else None

    def _preprocess_all(self, chunk: int) -> torch.Tensor:
        parts = [models.pixel_values(self.processor,
                                     [open_image(im) for im in self.images[i:i + chunk]])
                 for i in range(0, len(self.images), chunk)]
        return torch.cat(parts)

    def index(self, image) -> int:
        return self.keys[_image_key(image)]

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Pixel values (B, C, H, W) for image indices (from :meth:`index`)."""
        if self.cached:
            return self.tensor[torch.as_tensor(list(indices), dtype=torch.long)]
        return models.pixel_values(self.processor, [open_image(self.images[i]) for i in indices])

    def grids(self, indices: Sequence[int]) -> torch.Tensor:
        """:meth:`batch` as images (B, C, H, W) that mirror and move as pixel grids do: a
        PatchLayout's rows of patches put back in place (:func:`models.image_inputs` and the
        vision warmup flatten them again)."""
        rows = self.batch(indices)
        layout = models.patch_layout(self.processor)
        return rows if layout is None else layout.to_grid(rows, self.processor.image_processor)




class TextCache:
    """Every (instruction, target) pair tokenised once; batches are padded on the fly.

    ``models.encode_text`` returns padded tensors; padding is stripped with the attention
    mask (either padding side) and re-applied per batch on the right, which is what causal
    LM training wants.
    """

    def __init__(self, processor, examples: Sequence[Example], chunk: int = 256,
                 max_target_tokens: int = MAX_TARGET_TOKENS):
        self.pad_id = _pad_id(processor)
        seqs = [(e.instruction, e.target) for e in examples]
        self.example_of = list(range(len(examples)))  # the example of each sequence
        # VQA sets repeat the same few questions and answers: tokenise each distinct pair once
        pairs = list(dict.fromkeys(seqs))
        ids, labels = [], []
        for i in range(0, len(pairs), chunk):
            part = pairs[i:i + chunk]
            enc = models.encode_text(processor, [p[0] for p in part], [p[1] for p in part])
            for row in range(len(part)):
                keep = enc["attention_mask"][row].bool()
                seq, lab = enc["input_ids"][row][keep], enc["labels"][row][keep]
                end = _target_end(lab, max_target_tokens)
                ids.append(seq[:end].clone())
                labels.append(lab[:end].clone())
        where = {p: i for i, p in enumerate(pairs)}
        self.ids = [ids[where[p]] for p in seqs]
        self.labels = [labels[where[p]] for p in seqs]

    def batch(self, indices: Sequence[int], with_example: bool = False) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels (B, T) for sequence indices, right-padded; with
        ``with_example`` also ``example`` (B, T): the example index of every token."""
        length = max(len(self.ids[i]) for i in indices)
        ids = torch.full((len(indices), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(indices), length), -100, dtype=torch.long)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        example = torch.full((len(indices), length), -1, dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.ids[i])
            ids[row, :n], labels[row, :n], mask[row, :n] = self.ids[i], self.labels[i], 1
            example[row, :n] = self.example_of[i]
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return out | {"example": example} if with_example else out


def _target_end(labels: torch.Tensor, max_target_tokens: int) -> int:
    """Where a sequence ends when its target (the labelled tokens after the prompt) may hold at
    most ``max_target_tokens`` tokens; the prompt is never cut (it holds the image tokens)."""
    target = (labels != models.IGNORE_INDEX).nonzero()
    if max_target_tokens <= 0 or len(target) <= max_target_tokens:
        return len(labels)
    return int(target[0]) + max_target_tokens


def image_groups(image_index: Sequence[int]) -> list[list[int]]:
    """Example indices grouped by image, in order of first appearance: the examples that may
    share one packed sequence."""
    groups: dict[int, list[int]] = {}
    for i, img in enumerate(image_index):
        groups.setdefault(img, []).append(i)
    return list(groups.values())


class PackedText:
    """Several examples of one image in one sequence, exactly as if each trained alone.

    The shared prefix (the longest common token prefix of the group, which must hold every
    image token and no supervised token) is computed once; each example's remaining tokens
    follow as a block that attends to the prefix and causally to itself only, with position
    ids restarting where the prefix ends. So a block's loss equals that example's loss in its
    own sequence, while the vision tower and the prefix run once per image instead of once per
    question. Groups that cannot share a prefix are split into one row per example.
    """

    def __init__(self, text: TextCache, image_token_id: int):
        self.text, self.image_token_id = text, image_token_id
        self._prefix: dict[tuple[int, ...], int] = {}  # packed row -> shared prefix length

    def _prefix_len(self, rows: Sequence[int]) -> int:
        seqs = [self.text.ids[i] for i in rows]
        first = seqs[0]
        n = min(len(s) for s in seqs)
        for s in seqs[1:]:
            diff = (s[:n] != first[:n]).nonzero()
            n = int(diff[0]) if len(diff) else n
        for i in rows:  # no supervised token in the shared part
            sup = (self.text.labels[i][:n] != -100).nonzero()
            n = int(sup[0]) if len(sup) else n
        images = [(s == self.image_token_id).nonzero() for s in seqs]
        if any(len(im) and int(im[-1]) >= n for im in images):
            return 0
        return n

    def rows(self, groups: Sequence[Sequence[int]]) -> list[list[int]]:
        """Each group as one packed row, or as one row per example where it cannot pack."""
        out = []
        for g in groups:
            p = self._prefix_len(g) if len(g) > 1 else 0
            if p > 0:
                self._prefix[tuple(g)] = p
                out.append(list(g))
            else:
                out.extend([i] for i in g)
        return out

    def batch(self, rows: Sequence[Sequence[int]], with_example: bool = False) -> dict[str, torch.Tensor]:
        """input_ids, labels, position_ids (B, T) and a boolean 4-D attention mask
        (B, 1, T, T), right-padded; ``rows`` as from :meth:`rows`. With ``with_example`` also
        ``example`` (B, T): the example index of every token of a block (-1 on a shared
        prefix and on padding)."""
        seqs, labs, pos, seg = [], [], [], []
        for row in rows:
            if len(row) > 1:
                p = self._prefix.get(tuple(row))
                if p is None:  # a row :meth:`rows` saw under other indices (a later stream's)
                    p = self._prefix[tuple(row)] = self._prefix_len(row)
            else:  # one example: its whole sequence is the "prefix", no blocks follow
                p = len(self.text.ids[row[0]])
            ids = [self.text.ids[row[0]][:p]]
            lab = [self.text.labels[row[0]][:p]]
            ps, sg = [torch.arange(p)], [torch.zeros(p, dtype=torch.long)]
            for k, i in enumerate(row if len(row) > 1 else []):
                tail = self.text.ids[i][p:]
                ids.append(tail)
                lab.append(self.text.labels[i][p:])
                ps.append(torch.arange(p, p + len(tail)))
                sg.append(torch.full((len(tail),), k + 1, dtype=torch.long))
            seqs.append(torch.cat(ids)), labs.append(torch.cat(lab))
            pos.append(torch.cat(ps)), seg.append(torch.cat(sg))
        length = max(len(s) for s in seqs)
        B = len(rows)
        input_ids = torch.full((B, length), self.text.pad_id, dtype=torch.long)
        labels = torch.full((B, length), -100, dtype=torch.long)
        position_ids = torch.zeros((B, length), dtype=torch.long)
        segment = torch.full((B, length), -1, dtype=torch.long)  # -1 = padding
        example = torch.full((B, length), -1, dtype=torch.long)
        for b in range(B):
            n = len(seqs[b])
            input_ids[b, :n], labels[b, :n] = seqs[b], labs[b]
            position_ids[b, :n], segment[b, :n] = pos[b], seg[b]
            if len(rows[b]) == 1:
                example[b, :n] = self.text.example_of[rows[b][0]]
            else:
                owner = torch.tensor([-1] + [self.text.example_of[i] for i in rows[b]],
                                     dtype=torch.long)
                example[b, :n] = owner[seg[b]]
        q, k = segment[:, :, None], segment[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        # every row starts with its prefix (segment 0), so no query row is fully masked (SDPA
        # would give NaN): padding queries see the prefix, their labels are ignored anyway
        mask = causal & (k >= 0) & ((k == 0) | (k == q))
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
               "attention_mask": mask[:, None]}
        return out | {"example": example} if with_example else out


def _pad_id(processor) -> int:
    tok = getattr(processor, "tokenizer", processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad)


class EpochOrder:
    """The example sequence of one stream: epoch after epoch, each a seeded permutation.

    Open examples are repeated ``oversample`` times per epoch (the fractional part by a
    seeded coin), so one epoch is the stream's examples plus the extra open ones. Position
    ``p`` of the infinite sequence is a pure function of (seed, stream id, p).
    """

    def __init__(self, open_flags: Sequence[bool], seed: int, stream_id: int, oversample: float):
        self.n = len(open_flags)
        self.open = [i for i, f in enumerate(open_flags) if f]
        self.seed, self.stream_id, self.oversample = seed, stream_id, oversample
        self._epoch, self._order = -1, []
        self._starts = [0]  # cumulative epoch lengths

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.stream_id * 10_007 + epoch) & 0x7FFFFFFF)
        items = list(range(self.n))
        extra = self.oversample - 1.0
        if extra > 0 and self.open:
            whole, frac = int(math.floor(extra)), extra - math.floor(extra)
            coins = torch.rand(len(self.open), generator=g).tolist()
            for i, c in zip(self.open, coins):
                items.extend([i] * (whole + (1 if c < frac else 0)))
        perm = torch.randperm(len(items), generator=g).tolist()
        return [items[j] for j in perm]

    def take(self, start: int, count: int) -> list[int]:
        """Example indices at positions start .. start+count-1 of the sequence."""
        out = []
        while len(out) < count:
            pos = start + len(out)
            epoch = self._locate(pos)
            offset = pos - self._starts[epoch]
            order = self._order_of(epoch)
            out.extend(order[offset:offset + count - len(out)])
        return out

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_order(epoch)
        return self._order

    def _locate(self, pos: int) -> int:
        while self._starts[-1] <= pos:  # extend the table of epoch starts as far as needed
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._epoch_order(e)))
        return max(e for e, s in enumerate(self._starts[:-1]) if s <= pos)
