"""Vision warmup: teach the vision tower what the questions ask about before the LM trains.

Measured on the demo (bench/RESULTS.md): through the answer tokens alone, a tiny LLaVA's tower
barely learns small details (text, instruments, polyps) in a mix of many questions, because its
only signal passes through a language model that does not yet look at the right image tokens.
The same tower with direct heads learns them in seconds. So, before the usual training, the
tower and projector train for a few steps on the training examples themselves through small
throw-away heads: a linear score per answer word (answers split on ", ", multi-label, per
question) on every image token, max-pooled over the tokens. Open questions (more
than ``max_labels`` distinct words) are left out; the heads are discarded afterwards.

The tower overfits a few thousand images (demo heads: train loss near 0, test accuracy flat),
so the warmup mirrors images left-right and up-down at random. Answers that name a place are
mirrored with the image ("upper-left" -> "upper-right"); a position question whose answers
cannot be mirrored that way (say "Is the polyp on the left?") sits the mirrored rows out.
Measured by bench/bench_vision_heads.py (the heads alone on the demo test split, 4,000 steps
of 64, seed 0): 79.3% -> 86.1% of the answers, polyp size 36 -> 54%, locations 14-42% ->
28-52%.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from leaml.engine import models
from leaml.engine.batches import mentions_position, mirror_word


class AnswerTargets:
    """Per image, multi-hot answer words of every closed question asked about it."""

    def __init__(self, instructions: Sequence[str], targets: Sequence[str],
                 image_index: Sequence[int], max_labels: int = 32):
        words: dict[str, set[str]] = defaultdict(set)
        for q, a in zip(instructions, targets):
            words[q].update(answer_words(a))
        self.questions = sorted(q for q, w in words.items() if 2 <= len(w) <= max_labels)
        qid = {q: i for i, q in enumerate(self.questions)}
        self.labels = [(q, w) for q in self.questions for w in sorted(words[q])]
        lid = {lab: i for i, lab in enumerate(self.labels)}
        self.label_question = torch.tensor([qid[q] for q, _ in self.labels], dtype=torch.long)
        self.images = sorted(set(image_index))
        row = {img: i for i, img in enumerate(self.images)}
        self.y = torch.zeros(len(self.images), len(self.labels))
        self.asked = torch.zeros(len(self.images), len(self.questions), dtype=torch.bool)
        for q, a, img in zip(instructions, targets, image_index):
            if q in qid:
                r = row[img]
                self.asked[r, qid[q]] = True
                for w in answer_words(a):
                    self.y[r, lid[(q, w)]] = 1.0
        # per axis: the label each label becomes in a mirrored image, and which questions keep
        # their labels there (a question about position whose answers are not place names
        # cannot say what a mirror does to it)
        self.mirror: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for axis in ("h", "v"):
            perm, keeps = list(range(len(self.labels))), []
            for q in self.questions:
                ws = sorted(words[q])
                mirrored = {w: mirror_word(w, axis) for w in ws}
                if not mentions_position(q, *ws):
                    keeps.append(True)
                elif all(m in words[q] for m in mirrored.values()):
                    for w, m in mirrored.items():
                        perm[lid[(q, w)]] = lid[(q, m)]
                    keeps.append(True)
                else:
                    keeps.append(False)
            self.mirror[axis] = torch.tensor(perm), torch.tensor(keeps)

    def mirrored(self, pixels: torch.Tensor, y: torch.Tensor, asked: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch (pixels (B, C, H, W) and its rows of ``y``/``asked``) with each image
        mirrored left-right and up-down with probability 1/2 each. Labels follow."""
        pixels, y, asked = pixels.clone(), y.clone(), asked.clone()
        for axis in ("h", "v"):
            rows = torch.rand(len(pixels), generator=generator) < 0.5
            if rows.any():
                perm, keeps = self.mirror[axis]
                pixels[rows] = pixels[rows].flip(-1 if axis == "h" else -2)
                y[rows] = y[rows][:, perm]
                asked[rows] &= keeps
        return pixels, y, asked

    def __len__(self) -> int:
        return len(self.images)


def shifted(pixels: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of (B, C, H, W) (or (B, V, C, H, W): the V views of an image move alike)
    moved by up to ``shift`` pixels along each axis (uniform, edges repeated to fill). Answers
    stay as they are: a few pixels move few objects across the border of a place."""
    b, h, w = pixels.shape[0], pixels.shape[-2], pixels.shape[-1]
    padded = F.pad(pixels.reshape(b, -1, h, w), (shift, shift, shift, shift), mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))]
                       ).reshape(pixels.shape)


def answer_words(answer: str) -> list[str]:
    """The words of a (multi-)answer: "Red, white" -> ["red", "white"]."""
    return [w.strip().lower() for w in answer.split(",") if w.strip()] or [""]


class AnswerHeads(torch.nn.Module):
    """Per answer word, a linear score on every image token, max over the tokens.

    Max pooling, not a learned attention query: an attention query must first find the one
    token that holds a small detail before it gets a useful gradient (the same plateau the
    language model is stuck on); the maximum passes the gradient to that token at once.

    With ``tokens`` (the number of image tokens), each answer word also gets a learned bias
    per token: a place word ("upper-left") can then prefer the tokens of its place, so the
    tower only has to say what is in a token, and the language model reads where from the
    tokens' order, as its pretraining taught it.
    """

    def __init__(self, width: int, targets: AnswerTargets, tokens: int = 0):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.score = torch.nn.Linear(width, len(targets.labels))
        self.where = torch.nn.Parameter(torch.zeros(tokens, len(targets.labels))) \
            if tokens else None
        self.register_buffer("label_question", targets.label_question)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, T, W) -> logits (B, labels)."""
        scores = self.score(self.norm(feats))
        if self.where is not None:
            scores = scores + self.where
        return scores.max(dim=1).values


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, T, W) image features as the language model receives them (after the projector);
    ``pixel_values`` (B, C, H, W) images, flattened here where the model takes patches."""
    patches = models.arch_entry(model).patches
    if patches is None:
        feats = model.get_image_features(pixel_values=pixel_values)
    else:
        flat, grid = patches.from_grid(pixel_values, model.config.vision_config)
        feats = model.get_image_features(pixel_values=flat, **{patches.grid: grid})
    feats = getattr(feats, "pooler_output", feats)  # transformers 5: an output object
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats.reshape(pixel_values.shape[0], -1, feats.shape[-1])


def loss_fn(logits: torch.Tensor, y: torch.Tensor, asked: torch.Tensor,
            label_question: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the words of the questions asked about each image."""
    mask = asked[:, label_question].float()
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def fit(model, targets: AnswerTargets, pixels_of: Callable[[list[int]], torch.Tensor], *,
        steps: int, batch_size: int, lr: float, flips: bool = True,
        shift: int = 0, where: bool = False, seed: int = 0,
        max_grad_norm: float = 1.0,
        progress: Callable[[int, int, float], None] | None = None
        ) -> tuple[AnswerHeads, list[float]]:
    """Train the model's trainable parameters (the image path) and fresh heads on ``targets``
    for ``steps`` SGD steps (momentum 0.9, linear warmup over 5%, cosine decay) of
    ``batch_size`` images drawn with replacement, mirrored with ``flips`` and
    moved by up to ``shift`` pixels, with a bias per image token and answer word if ``where``;
    ``pixels_of(image ids)`` gives their pixel tensors.
    Returns the heads and the losses."""
    with torch.no_grad():  # the features' width, device and dtype
        probe = image_features(model, pixels_of(targets.images[:1]))
    heads = AnswerHeads(probe.shape[-1], targets, probe.shape[1] if where else 0).to(
        probe.device, probe.dtype)
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm
        else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for i in range(steps):
        rows = torch.randint(0, len(targets), (batch_size,), generator=gen)
        pixels = pixels_of([targets.images[r] for r in rows.tolist()])
        y, asked = targets.y[rows], targets.asked[rows]
        if flips:
            pixels, y, asked = targets.mirrored(pixels, y, asked, gen)
        if shift:
            pixels = shifted(pixels, shift, gen)
        logits = heads(image_features(model, pixels.to(probe.device, probe.dtype)))
        loss = loss_fn(logits.float(), y.to(logits.device), asked.to(logits.device),
                       heads.label_question)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:  # SGD at this lr diverges on an unlucky batch without it
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(i + 1, steps, losses[-1])
    model.zero_grad(set_to_none=True)
    return heads, losses
