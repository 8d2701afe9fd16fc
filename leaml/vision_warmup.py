"""Vision warmup: teach the vision tower what the questions ask about before the LM trains.

Measured on the demo (bench/RESULTS.md): through the answer tokens alone, a tiny LLaVA's tower
barely learns small details (text, instruments, polyps) in a mix of many questions, because its
only signal passes through a language model that does not yet look at the right image tokens.
The same tower with direct heads learns them in seconds. So, before the usual training, the
tower and projector train for a few steps on the training examples themselves through small
throw-away heads: a linear score per answer word (answers split on ", ", multi-label, per
question) on every image token, max-pooled over the tokens. Open questions (more
than ``max_labels`` distinct words) are left out; the heads are discarded afterwards.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F


class AnswerTargets:
    """Per image, multi-hot answer words of every closed question asked about it."""

    def __init__(self, instructions: Sequence[str], targets: Sequence[str],
                 image_index: Sequence[int], max_labels: int = 32):
        words: dict[str, set[str]] = defaultdict(set)
        for q, a in zip(instructions, targets):
            words[q].update(_words(a))
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
                for w in _words(a):
                    self.y[r, lid[(q, w)]] = 1.0

    def __len__(self) -> int:
        return len(self.images)


def _words(answer: str) -> list[str]:
    return [w.strip().lower() for w in answer.split(",") if w.strip()] or [""]


class AnswerHeads(torch.nn.Module):
    """Per answer word, a linear score on every image token, max over the tokens.

    Max pooling, not a learned attention query: an attention query must first find the one
    token that holds a small detail before it gets a useful gradient (the same plateau the
    language model is stuck on); the maximum passes the gradient to that token at once.
    """

    def __init__(self, width: int, targets: AnswerTargets):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.score = torch.nn.Linear(width, len(targets.labels))
        self.register_buffer("label_question", targets.label_question)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, T, W) -> logits (B, labels)."""
        return self.score(self.norm(feats)).max(dim=1).values


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, T, W) image features as the language model receives them (after the projector)."""
    feats = model.get_image_features(pixel_values=pixel_values)
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
