"""leaml.pretrain: a seconds-long smoke run writes a loadable base; the cached-feature fast
path computes LLaVA's own loss; exact steps reproduce a run."""
from __future__ import annotations

import random

import torch
from safetensors.torch import load_file

from leaml import models
from leaml import pretrain as P
from leaml import pretrain_data as D

SMALL = dict(n_train_scenes=64, n_eval_scenes=12, eval_per_type=2, batch_size=8,
             warmup_steps=3)


def test_smoke_run_writes_loadable_folder(tmp_path):
    metrics = P.pretrain_tiny(tmp_path / "tiny", P.PretrainConfig(minutes=10 / 60, **SMALL),
                              progress=None)
    assert set(metrics["exact_steps"]) == {"vision", "align", "instruct"}
    assert "overall" in metrics["eval"]["qa_accuracy"]
    model, proc = models.load(str(tmp_path / "tiny"))
    scene = D.random_scene(random.Random(1))
    (gen,) = models.generate(model, proc, [D.render(scene)], ["What color is the background?"],
                             max_new_tokens=3)
    assert len(gen) == 1 and isinstance(gen[0].text, str)
    assert "Held-out general QA" in (tmp_path / "tiny" / "PRETRAIN.md").read_text()


def test_fast_loss_equals_llava_forward():
    model, proc = models.build_tiny(seed=0)
    scenes = P._scenes(3, 0)
    pix = P._pixels(proc, scenes)
    feats = P._cache_features(model, pix)
    cfg = P.PretrainConfig(bf16=False)
    for i, s in enumerate(scenes):
        batch = models.encode_text(proc, ["What color is the background?"], [s.background])
        with P._autocast(cfg), torch.no_grad():
            fast = P._lm_loss(model, feats[i:i + 1], batch)
            ref = model(**batch, pixel_values=pix[i:i + 1]).loss
        assert torch.allclose(fast, ref, atol=1e-5)


def test_exact_steps_reproduce(tmp_path):
    steps = {"vision": 2, "align": 1, "instruct": 2}
    cfg = dict(SMALL, steps=steps, eval_per_type=1, tiny={"text_layers": 1, "vision_layers": 1})
    for name in ("a", "b"):
        P.pretrain_tiny(tmp_path / name, P.PretrainConfig(**cfg), progress=None)
    wa = load_file(tmp_path / "a" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
