"""The running loss of every question, for ``TrainConfig.hard_fraction``.

On a mix of many questions the easy ones keep the gradient while the hard ones sit on their
plateau (bench/RESULTS.md); drawing part of every batch by each question's running loss gives
the questions the model has not learned yet more samples.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


class QuestionLosses:
    """Computes a batch's loss and keeps each question's running mean loss.

    ``keys`` holds one question key (the instruction text) per example of the training data,
    indexable by the ``example`` tensor of a batch. The running loss of a question is an
    exponential moving average (``momentum``) of its examples' mean answer-token loss, stored
    in :meth:`state_dict` so a resumed run draws as an uninterrupted one.
    """

    def __init__(self, keys: Sequence[str], power: float = 1.0, momentum: float = 0.9):
        names = list(dict.fromkeys(keys))
        where = {k: i for i, k in enumerate(names)}
        self.group = torch.tensor([where[k] for k in keys], dtype=torch.long)
        self.power, self.momentum = power, momentum
        self._running = torch.full((len(names),), float("nan"))
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # not folded in yet, in order

    @property
    def running(self) -> torch.Tensor:
        """Each question's running loss, every computed loss folded in (:meth:`flush`)."""
        self.flush()
        return self._running

    @running.setter
    def running(self, value: torch.Tensor) -> None:
        self.pending, self._running = [], value

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
        """The mean over the batch's answer tokens (what the model computes from labels) from
        logits (B, T, V), labels (B, T) and example ids (B, T), labels shifted as in causal LM
        training; updates the running loss of the questions in the batch."""
        target, owner = labels[:, 1:], example[:, 1:]
        keep = target != -100
        ce = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")
        with torch.no_grad():
            ids, inverse = owner[keep].unique(return_inverse=True)
            per_example = torch.zeros(len(ids), device=ce.device).index_add(0, inverse, ce)
            per_example = (per_example / torch.bincount(inverse, minlength=len(ids))).cpu()
            self.pending.append((self.group[ids.cpu()], per_example))
        return ce.mean()

    def flush(self, world: int = 1) -> None:
        """Fold the losses computed since the last flush into the running ones, in order.
        Training calls it after every micro-batch with its number of processes: under
        ``world`` > 1 (each process computed a slice of every part) the slices of each part
        are gathered first, so every process folds the whole batch's losses, exactly as one
        process does, and all draw the same hard examples next."""
        if not self.pending and world == 1:
            return
        mine, self.pending = self.pending, []
        parts = [mine]
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * world
            torch.distributed.all_gather_object(parts, mine)
        for k in range(max(len(p) for p in parts)):
            got = [p[k] for p in parts if len(p) > k]
            if got:
                self._update(torch.cat([g for g, _ in got]), torch.cat([v for _, v in got]))

    def weights(self) -> torch.Tensor:
        """Running loss ** power of every question; questions not seen yet get the mean."""
        seen = ~self.running.isnan()
        fill = self.running[seen].mean() if seen.any() else torch.tensor(1.0)
        return torch.where(seen, self.running, fill).clamp(min=1e-6) ** self.power

    def _update(self, group: torch.Tensor, losses: torch.Tensor) -> None:
        count = torch.bincount(group, minlength=len(self._running)).float()
        mean = torch.zeros(len(self._running)).index_add(0, group, losses) / count.clamp(min=1)
        seen = count > 0
        old = self._running[seen]
        self._running[seen] = torch.where(old.isnan(), mean[seen],
                                         self.momentum * old + (1 - self.momentum) * mean[seen])

    def state_dict(self) -> dict:
        return {"running": self.running.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.running = state["running"].clone()
