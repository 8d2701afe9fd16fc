"""Pretrain the embedded tiny base (``python -m leaml pretrain-tiny``).

Three stages on the general synthetic corpus (leaml/tiny/corpus.py), as LLaVA does, with a
vision stage first because a random CLIP tower learns shape far too slowly through the
answer tokens alone:

A. vision: the CLIP tower + throw-away linear heads predict, for every patch, the shape,
   colour, size and texture of the object in its 3x3-grid cell (and the background from CLS).
B. alignment: vision frozen; projector + Llama learn captions ("Describe the image.").
C. instruction tuning: vision frozen; projector + Llama on QA (question types balanced),
   captions and "Generate a question about this image and answer it." mixed.

In B and C the frozen tower's features are computed once and cached, so a step costs only the
projector and the language model. Stage lengths come from a time budget (steps are measured
after a few timed steps and recorded), or are given exactly for a reproducible rerun.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from leaml.engine import models
from leaml.tiny import build as tiny_build
from leaml.tiny import corpus as D
from leaml.tiny.evaluate import evaluate_general, qa_accuracy, report_markdown


@dataclass
class PretrainConfig:
    """Knobs of pretrain-tiny; defaults are the committed run."""
    seed: int = 0                      # seeds scenes, init, sampling
    minutes: float = 40.0              # wall-clock budget for the three stages (eval excluded)
    n_train_scenes: int = 16000        # rendered once, tensors cached
    n_eval_scenes: int = 400           # held-out scenes (different seed stream)
    batch_size: int = 256              # 64 stalls on object colour (13-20% after 2,300 steps)
    vision_share: float = 0.15         # budget shares of the stages A, B, C
    align_share: float = 0.10
    lr_vision: float = 2e-3            # stage A peak lr (warmup + cosine)
    lr_lm: float = 3e-3                # stages B/C peak lr
    warmup_steps: int = 30             # per stage; the pace is measured meanwhile
    micro_batches: int = 2             # LM batch split by length (less padding)
    bf16: bool = True                  # bf16 autocast for matmuls (fp32 weights/optimizer)
    weight_decay: float = 0.01
    steps: dict = field(default_factory=dict)  # {"vision": n, "align": n, "instruct": n}: exact
    eval_per_type: int = 60            # held-out questions per question type
    threads: int = 1                   # 1 beats 2 by 3-8x when other jobs share the 2 cores
    device: str = "cpu"                # "cuda" where a GPU is at hand (same steps, not bit-equal)
    tiny: dict = field(default_factory=dict)   # overrides of tiny_build.TinyConfig
    init_from: str = ""                # continue from a saved base instead of building one
    patch_size: int = 0                # with init_from: re-cut the tower's patches (repatch)
    qa_weights: dict | str = field(default_factory=dict)  # question-type sampling weights in
    # stages B/C: {} = uniform, {"color": 4, ...} (missing types weigh 1), or "auto" = each
    # type's error (+0.1) on 400 training scenes before stage B: weak types get more samples
    # (meant for continuing a base with --init-from; from scratch every type is weak alike)

    def __post_init__(self):
        if self.minutes <= 0 and not self.steps:
            raise ValueError("minutes must be > 0 (or give exact steps)")
        if self.warmup_steps < 2:
            raise ValueError("warmup_steps must be >= 2 (the pace is measured over them)")
        if not 0 < self.vision_share + self.align_share < 1:
            raise ValueError("vision_share + align_share must be in (0, 1)")
        if self.patch_size < 0 or (self.patch_size and not self.init_from):
            raise ValueError("--patch-size (patch_size) re-cuts a saved base: give --init-from "
                             "(init_from) too; a base built from scratch takes "
                             "tiny={'patch_size': N}")
        if isinstance(self.qa_weights, str) and self.qa_weights != "auto":
            raise ValueError(f"qa_weights must be 'auto' or a dict, not {self.qa_weights!r}")
        given = self.qa_weights if isinstance(self.qa_weights, dict) else {}
        unknown = set(given) - set(D.QUESTION_TYPES)
        if unknown or any(w < 0 for w in given.values()):
            raise ValueError(f"qa_weights: unknown types {sorted(unknown)} or a negative weight; "
                             f"types are {D.QUESTION_TYPES}")


# --- data: rendered once, cached as tensors ---------------------------------------------------

def _scenes(n: int, seed: int) -> list[D.Scene]:
    rng = random.Random(seed)
    return [D.random_scene(rng) for _ in range(n)]


def _pixels(processor, scenes: list[D.Scene], chunk: int = 512, device="cpu") -> torch.Tensor:
    out = [models.pixel_values(processor, [D.render(s) for s in scenes[i:i + chunk]])
           for i in range(0, len(scenes), chunk)]
    return torch.cat(out).to(device)  # (N, 3, H, W)


def _patch_labels(scenes: list[D.Scene], grid: int, device="cpu") -> dict[str, torch.Tensor]:
    """Per-patch class ids (grid x grid patches, each labelled by its 3x3 cell)."""
    cell_of = torch.tensor([(r * 3 // grid) * 3 + (c * 3 // grid)
                            for r in range(grid) for c in range(grid)])
    labs = [D.cell_labels(s) for s in scenes]
    out = {k: torch.tensor([lab[k] for lab in labs])[:, cell_of]
           for k in ("shape", "color", "size", "texture")}
    out["background"] = torch.tensor([lab["background"][0] for lab in labs])
    return {k: v.to(device) for k, v in out.items()}


# --- schedule and stage runner ---------------------------------------------------------------

def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup over a fixed number of steps, then cosine down to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _optimizer(params, lr: float, wd: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def _run_stage(name, step_fn, opt, peak, cfg, budget_s, progress, rng) -> dict:
    """Run ``step_fn(rng) -> loss`` for cfg.steps[name] steps, or as many as fit budget_s.

    Without exact steps the pace is measured over the first warmup steps, whose lr does not
    depend on the total, so rerunning with the recorded steps reproduces the run exactly.
    """
    total = cfg.steps.get(name) or cfg.warmup_steps
    t0, losses = time.time(), []
    step = 0
    while step < total:
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, peak, cfg.warmup_steps)
        losses.append(step_fn(rng))
        step += 1
        if step == 1:  # the first step (allocations) is not timed
            t_pace = time.time()
        if not cfg.steps.get(name) and step == cfg.warmup_steps:
            pace = (time.time() - t_pace) / (step - 1)
            total = max(step, int(step + (budget_s - (time.time() - t0)) / pace))
        if progress and step % 25 == 0:
            progress(name, step, total, sum(losses[-25:]) / len(losses[-25:]))
    secs = time.time() - t0
    return {"steps": total, "seconds": round(secs, 1),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "samples_per_s": round(total * cfg.batch_size / secs, 1)}


def _autocast(cfg):
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)


# --- stage A: vision tower with dense attribute heads -----------------------------------------

class _VisionHeads(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.sizes = {"shape": len(D.SHAPES) + 1, "color": len(D.COLORS) + 1,
                      "size": len(D.SIZES) + 1, "texture": len(D.TEXTURES) + 1}
        self.patch = torch.nn.Linear(width, sum(self.sizes.values()))
        self.background = torch.nn.Linear(width, len(D.BACKGROUNDS))

    def loss(self, hidden: torch.Tensor, labels: dict, idx) -> tuple[torch.Tensor, dict]:
        """hidden: (B, 1 + P, W) -> summed cross-entropies and per-attribute patch accuracy."""
        logits = self.patch(hidden[:, 1:]).split(list(self.sizes.values()), dim=-1)
        bg = labels["background"][idx]  # every patch token, not just CLS (which LLaVA drops)
        total = F.cross_entropy(self.background(hidden).flatten(0, 1),
                                bg[:, None].expand(-1, hidden.shape[1]).flatten())
        acc = {}
        for (k, _), lg in zip(self.sizes.items(), logits):
            y = labels[k][idx]  # (B, P)
            total = total + F.cross_entropy(lg.flatten(0, 1), y.flatten())
            acc[k] = (lg.argmax(-1) == y).float().mean().item()
        return total, acc


def _vision_hidden(model, pv: torch.Tensor) -> torch.Tensor:
    """The tower's output at config.vision_feature_layer (what LLaVA feeds the projector)."""
    out = model.model.vision_tower(pv, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer]


def _stage_vision(model, pix, labels, cfg, budget_s, progress, rng) -> dict:
    tower = model.model.vision_tower
    heads = _VisionHeads(model.config.vision_config.hidden_size).to(pix.device)
    opt = _optimizer(list(tower.parameters()) + list(heads.parameters()), cfg.lr_vision,
                     cfg.weight_decay)
    tower.train()

    def step(r):
        idx = torch.tensor(r.sample(range(len(pix)), cfg.batch_size))
        with _autocast(cfg):
            loss, _ = heads.loss(_vision_hidden(model, pix[idx]), labels, idx)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        opt.step()
        return loss.item()
    stats = _run_stage("vision", step, opt, cfg.lr_vision, cfg, budget_s, progress, rng)
    tower.eval()
    stats["heads"] = heads
    return stats


def _vision_eval(model, heads, pix, labels) -> dict:
    with torch.no_grad():
        idx = torch.arange(len(pix))
        _, acc = heads.loss(_vision_hidden(model, pix), labels, idx)
    return {k: round(v, 4) for k, v in acc.items()}


@torch.no_grad()
def _cache_features(model, pix: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Frozen tower features for every scene, CLS dropped ("default" strategy): (N, P, W)."""
    return torch.cat([_vision_hidden(model, pix[i:i + chunk])[:, 1:]
                      for i in range(0, len(pix), chunk)])


# --- stages B and C: projector + language model on cached features ---------------------------

def _lm_loss(model, feats: torch.Tensor, batch: dict) -> torch.Tensor:
    """LLaVA's forward with cached tower features, loss averaged per sample (so one long
    caption does not outweigh a batch of one-word answers)."""
    embeds = model.get_input_embeddings()(batch["input_ids"])  # (B, T, H)
    img = model.model.multi_modal_projector(feats).to(embeds.dtype)  # (B, P, H)
    mask = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask.expand_as(embeds), img)
    hidden = model.model.language_model(inputs_embeds=embeds,
                                        attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != models.IGNORE_INDEX  # (B, T-1)
    logits = model.lm_head(hidden[:, :-1][keep])  # only where a label is: (N, V)
    tok_loss = F.cross_entropy(logits.float(), labels[keep], reduction="none")
    per_row = torch.zeros(len(labels), device=labels.device).index_add_(0, keep.nonzero()[:, 0], tok_loss)
    return (per_row / keep.sum(1).clamp(min=1)).mean()


def sample_task(scene: D.Scene, mix: dict[str, float], rng: random.Random,
                qa_weights: dict[str, float] | None = None) -> tuple[str, str]:
    """One (instruction, target) for a scene: QA (type first, so rare types are not drowned;
    types drawn by ``qa_weights`` when given, else uniformly), a caption, or a generated
    question+answer."""
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "caption":
        return D.DESCRIBE, D.caption(scene)
    qa = D.questions(scene, rng)
    types = sorted({t for t, _, _ in qa})
    weights = [qa_weights.get(t, 1.0) for t in types] if qa_weights else []
    qtype = rng.choices(types, weights=weights)[0] if sum(weights) > 0 else rng.choice(types)
    _, q, a = rng.choice([x for x in qa if x[0] == qtype])
    if kind == "gen_qa":
        return D.GENERATE_QA, f"Question: {q}\nAnswer: {a}"
    return q, a


ALIGN_MIX = {"caption": 0.8, "qa": 0.2}
INSTRUCT_MIX = {"qa": 0.8, "caption": 0.1, "gen_qa": 0.1}


def _stage_lm(name, model, processor, feats, scenes, mix, cfg, budget_s, progress, rng,
              qa_weights=None):
    params = list(model.model.multi_modal_projector.parameters()) + \
        list(model.model.language_model.parameters())
    opt = _optimizer(params, cfg.lr_lm, cfg.weight_decay)
    model.train()

    def step(r):
        idx = r.sample(range(len(scenes)), cfg.batch_size)
        rows = sorted(((i, *sample_task(scenes[i], mix, r, qa_weights)) for i in idx),
                      key=lambda x: len(x[1]) + len(x[2]))  # similar lengths together
        opt.zero_grad()
        total = 0.0  # (B,) split into micro-batches, per-sample mean loss overall
        for k in range(cfg.micro_batches):
            lo, hi = k * len(rows) // cfg.micro_batches, (k + 1) * len(rows) // cfg.micro_batches
            part = rows[lo:hi]
            batch = models.encode_text(processor, [p[1] for p in part], [p[2] for p in part])
            batch = {k: v.to(feats.device) for k, v in batch.items()}
            with _autocast(cfg):
                loss = _lm_loss(model, feats[[p[0] for p in part]], batch) * len(part) / len(rows)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return total
    stats = _run_stage(name, step, opt, cfg.lr_lm, cfg, budget_s, progress, rng)
    model.eval()
    return stats


# --- the whole run ---------------------------------------------------------------------------

def _print_progress(stage, step, total, loss):
    print(f"[{stage}] step {step}/{total} loss {loss:.4f}", flush=True)


def pretrain_tiny(out_dir=None, cfg: PretrainConfig | None = None, progress=_print_progress) -> dict:
    """Build the tiny LLaVA from configs (or continue ``cfg.init_from``), pretrain it (stages
    A-C; a stage given 0 steps is skipped), save it to ``out_dir`` (default
    leaml/tiny/assets/tiny), evaluate it on held-out general QA and write PRETRAIN.md/json there.

    Returns the metrics dict (also written to ``pretrain.json`` in ``out_dir``).
    """
    cfg = cfg or PretrainConfig()
    out = Path(out_dir) if out_dir else models.TINY_DIR
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    if cfg.init_from:
        model, processor = models.load(cfg.init_from)
        if cfg.patch_size:
            repatch(model, processor, cfg.patch_size)
    else:
        model, processor = tiny_build.build_tiny(cfg.seed, **cfg.tiny)
    model.to(cfg.device)
    data = _corpus(model, processor, cfg)
    metrics = {"config": asdict(cfg), "data_seconds": round(time.time() - t0, 1)}
    metrics["stages"] = _train(model, processor, data, cfg, t0, progress, metrics)
    metrics["train_seconds"] = round(time.time() - t0, 1)
    metrics["exact_steps"] = {k: v["steps"] for k, v in metrics["stages"].items()}
    metrics["params"] = _param_counts(model)
    models.save(model, processor, out)  # before evaluating: the training is not lost
    metrics["eval"] = evaluate_general(model, processor, data["held"], data["held_pix"],
                                       cfg.eval_per_type, seed=cfg.seed)
    metrics["eval_seconds"] = round(time.time() - t0 - metrics["train_seconds"], 1)
    _write_report(out, metrics)
    return metrics


def repatch(model, processor, patch_size: int) -> None:
    """Re-cut a tiny LLaVA's image into ``patch_size`` patches, in place: more (or fewer) image
    tokens from the same weights, for a continued pretraining to adapt. The patch kernel is
    area-resized (scaled so a flat image embeds as before) and the patch position embeddings
    are interpolated bicubically on their grid; model config and processor follow."""
    import torch.nn.functional as F
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
    tower, vc = model.model.vision_tower, model.config.vision_config
    old = tower.embeddings
    if vc.image_size % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide image size {vc.image_size}")
    if patch_size == vc.patch_size:
        return
    vc.patch_size = patch_size
    new = CLIPVisionEmbeddings(vc).to(old.class_embedding.device, old.class_embedding.dtype)
    g_old, g_new = int(round((old.num_positions - 1) ** 0.5)), vc.image_size // patch_size
    with torch.no_grad():
        new.class_embedding.copy_(old.class_embedding)
        w = old.patch_embedding.weight
        new.patch_embedding.weight.copy_(
            F.interpolate(w, size=(patch_size, patch_size), mode="area")
            * (w.shape[-1] / patch_size) ** 2)
        pos = old.position_embedding.weight
        grid = pos[1:].T.reshape(1, -1, g_old, g_old)
        grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
        new.position_embedding.weight.copy_(torch.cat([pos[:1], grid.reshape(-1, g_new ** 2).T]))
    tower.embeddings = new
    model.config.image_seq_length = g_new ** 2
    processor.patch_size = patch_size


def _corpus(model, processor, cfg) -> dict:
    """Training and held-out scenes, their pixel tensors and per-patch labels."""
    train = _scenes(cfg.n_train_scenes, cfg.seed)
    held = _scenes(cfg.n_eval_scenes, 10_000 + cfg.seed)  # disjoint seed stream
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    dev = cfg.device
    return {"train": train, "held": held, "pix": _pixels(processor, train, device=dev),
            "held_pix": _pixels(processor, held, device=dev),
            "labels": _patch_labels(train, grid, dev), "held_labels": _patch_labels(held, grid, dev)}


def _train(model, processor, data, cfg, t0, progress, metrics) -> dict:
    """Stages A, B, C in order, each within its share of what is left of the budget."""
    rng, stages, train = random.Random(cfg.seed), {}, data["train"]
    left = lambda: cfg.minutes * 60 - (time.time() - t0)  # noqa: E731
    if cfg.steps.get("vision", 1):
        vis = _stage_vision(model, data["pix"], data["labels"], cfg, left() * cfg.vision_share,
                            progress, rng)
        metrics["vision_cell_accuracy_heldout"] = _vision_eval(
            model, vis.pop("heads"), data["held_pix"], data["held_labels"])
        stages["vision"] = vis
    weights = _qa_weights(model, processor, data, cfg)
    feats = _cache_features(model, data.pop("pix"))
    if weights:
        metrics["qa_weights"] = weights
    if cfg.steps.get("align", 1):
        share = cfg.align_share / (1 - cfg.vision_share)
        stages["align"] = _stage_lm("align", model, processor, feats, train, ALIGN_MIX, cfg,
                                    left() * share, progress, rng, weights)
    if cfg.steps.get("instruct", 1):
        stages["instruct"] = _stage_lm("instruct", model, processor, feats, train,
                                       INSTRUCT_MIX, cfg, left(), progress, rng, weights)
    return stages


def _qa_weights(model, processor, data, cfg) -> dict[str, float]:
    """cfg.qa_weights as a full dict ({} = uniform); "auto" measures each type's error now, on
    400 training scenes (not the held-out ones the report scores), and uses it + 0.1."""
    if cfg.qa_weights != "auto":
        return {t: float(cfg.qa_weights.get(t, 1.0)) for t in D.QUESTION_TYPES} \
            if cfg.qa_weights else {}
    n = min(400, len(data["train"]))
    acc = qa_accuracy(model, processor, data["train"][:n], data["pix"][:n],
                      cfg.eval_per_type, seed=cfg.seed + 1)
    return {t: round(1.0 - acc.get(t, 0.0) + 0.1, 3) for t in D.QUESTION_TYPES}


def _param_counts(model) -> dict:
    m = model.model
    return {"total": models.count_params(model), "vision_tower": models.count_params(m.vision_tower),
            "projector": models.count_params(m.multi_modal_projector),
            "language_model": models.count_params(m.language_model)}


def _write_report(out: Path, metrics: dict) -> None:
    (out / "pretrain.json").write_text(json.dumps(metrics, indent=1, default=str))
    (out / "PRETRAIN.md").write_text(report_markdown(metrics))
