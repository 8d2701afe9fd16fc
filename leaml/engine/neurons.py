"""Selective neuron distillation: which neurons matter for QA generation, and row masks.

A *neuron* is one output row of a Linear layer in the language model's attention output
(``o_proj``) and MLP output (``down_proj``) projections (``models.arch_spec(model)
.neuron_modules`` names them). Its importance for a loss L is the first-order estimate of how
much L changes when the row is removed, ``|sum_j dL/dW_ij * W_ij|`` (+ the bias term), summed
over batches (the absolute value is taken per batch, so opposite-signed batches do not cancel:
Molchanov et al.'s accumulated Taylor criterion). LEAML keeps the top ``rho`` of the rows of
every layer and lets caption distillation update only those; everything else stays exactly as
the QA-generation steps left it.

Generic over any ``nn.Module``: give it the module names and a loss closure.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

LossFn = Callable[[torch.nn.Module, object], torch.Tensor]


def default_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The Hugging Face convention: ``model(**batch).loss`` (labels inside the batch)."""
    return model(**batch).loss


def _linears(model: torch.nn.Module, module_names: Iterable[str]) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for name in module_names:
        m = modules.get(name)
        if m is None or not hasattr(m, "weight") or m.weight.dim() != 2:
            raise ValueError(f"neuron module '{name}' is not a Linear layer of the model; "
                             "take the names from models.arch_spec(model).neuron_modules")
        out[name] = m
    return out


def importance_scores(model: torch.nn.Module, module_names: Iterable[str], batches: Iterable,
                      loss_fn: LossFn = default_loss,
                      progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Per module, a float tensor (out_features,): accumulated |sum(grad x weight)| per row.

    ``batches`` are fed one by one to ``loss_fn(model, batch)``; gradients are taken only
    with respect to the named modules' weights and biases (other parameters are untouched,
    their ``.grad`` too). The model runs in eval mode (no dropout) and is left in the mode
    and ``requires_grad`` state it had. ``progress(n)`` is called after the n-th batch (a
    job shows it, and may stop there).
    """
    linears = _linears(model, module_names)
    params = [p for m in linears.values() for p in (m.weight, m.bias) if p is not None]
    was_training, flags = model.training, [p.requires_grad for p in params]
    scores = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in linears.items()}
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for n, batch in enumerate(batches, 1):
            grads = iter(torch.autograd.grad(loss_fn(model, batch), params))
            for name, m in linears.items():
                with torch.no_grad():
                    taylor = (next(grads) * m.weight).sum(dim=1)  # (out,)
                    if m.bias is not None:
                        taylor = taylor + next(grads) * m.bias
                scores[name] += taylor.abs().double().cpu()
            if progress:
                progress(n)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return scores


def select_top(scores: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """Per layer, a bool mask of its top ``ceil(rho * rows)`` rows by score (at least one).

    Ties are broken by row index (stable sort), so the selection is deterministic.
    """
    if not 0 < rho <= 1:
        raise ValueError(f"rho={rho}: the kept fraction of neurons must be in (0, 1]")
    out = {}
    for name, s in scores.items():
        k = max(1, math.ceil(rho * s.numel()))
        order = torch.sort(s, descending=True, stable=True).indices[:k]
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[order] = True
        out[name] = mask
    return out


def _owner(param_name: str) -> tuple[str, str]:
    """(module name in the base model, role) of a parameter of a plain or peft-wrapped model.

    role: 'weight'/'bias' for a plain parameter, 'lora_A'/'lora_B' for adapter matrices.
    """
    for role in ("lora_A", "lora_B"):
        marker = f".{role}."
        if marker in param_name:
            module = param_name.split(marker)[0]
            return module.removeprefix("base_model.model."), role
    module, _, leaf = param_name.rpartition(".")
    return module.removeprefix("base_model.model."), leaf


def row_masks(model: torch.nn.Module, selected: dict[str, torch.Tensor], *,
              trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Gradient row masks for ``train.Stream.grad_masks``: only the selected neurons train.

    Covers every trainable parameter of ``model`` (the model as it will be trained, plain or
    LoRA-wrapped): a selected module's weight and bias get its row mask (for LoRA, the rows of
    ``lora_B``, whose rows are the output neurons of the merged delta; ``lora_A`` is shared by
    all rows and stays frozen); every other trainable parameter gets an all-False mask.
    ``trainable_only=False`` covers every parameter (for a model whose ``requires_grad``
    flags are set later, e.g. by ``train.prepare_model`` in full mode).
    """
    masks = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        module, role = _owner(name)
        rows = selected.get(module)
        if rows is not None and role in ("weight", "bias", "lora_B"):
            if rows.numel() != p.shape[0]:
                raise ValueError(f"mask for '{module}' has {rows.numel()} rows, parameter "
                                 f"'{name}' has {p.shape[0]}; recompute the importance scores")
            masks[name] = rows.clone()
        else:
            masks[name] = torch.zeros(p.shape[0], dtype=torch.bool)
    return masks


def summary(selected: dict[str, torch.Tensor]) -> dict:
    """How many neurons were kept, overall and per layer (for run params and logs)."""
    per = {n: int(m.sum()) for n, m in selected.items()}
    total = sum(m.numel() for m in selected.values())
    return {"kept": sum(per.values()), "total": total, "per_layer": per}
