"""leaml.tiny.pretrain: a seconds-long smoke run writes a loadable base; the cached-feature fast
path computes LLaVA's own loss; exact steps reproduce a run."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from leaml.engine import models
from leaml.tiny import build as tiny_build
from leaml.tiny import pretrain as P
from leaml.tiny import corpus as D

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
    model, proc = tiny_build.build_tiny(seed=0)
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


def test_qa_weights_steer_question_types():
    scenes = P._scenes(200, 3)
    rng = random.Random(0)
    only_color = {t: 0.0 for t in D.QUESTION_TYPES} | {"color": 1.0}
    asked = [P.sample_task(s, {"qa": 1.0}, rng, only_color)[0] for s in scenes]
    # every scene with a colour question got one; the others fell back to what they have
    colour = [q for q in asked if q.startswith("What color is the ") and "background" not in q]
    has_colour = [s for s in scenes if any(t == "color" for t, _, _ in D.questions(s, random.Random(0)))]
    assert len(colour) == len(has_colour) > 100
    uniform = [P.sample_task(s, {"qa": 1.0}, rng)[0] for s in scenes]
    assert sum(q.startswith("What color is the ") and "background" not in q for q in uniform) < 60


def test_qa_weights_are_validated():
    for bad in ("often", {"colour": 2.0}, {"color": -1.0}):
        try:
            P.PretrainConfig(qa_weights=bad)
        except ValueError as e:
            assert "qa_weights" in str(e)
        else:
            raise AssertionError(f"accepted {bad!r}")
    assert P.PretrainConfig(qa_weights="auto").qa_weights == "auto"


def test_auto_qa_weights_follow_the_error_rate(tmp_path):
    metrics = P.pretrain_tiny(tmp_path / "w", P.PretrainConfig(
        **dict(SMALL, steps={"vision": 0, "align": 0, "instruct": 1}, qa_weights="auto"),
        init_from=str(models.TINY_DIR)), progress=None)
    w = metrics["qa_weights"]
    assert set(w) == set(D.QUESTION_TYPES) and all(0.1 <= v <= 1.1 for v in w.values())
    assert w["background"] == 0.1  # the committed base never misses the background colour
    # an untrained model of the same shape misses far more, so every type weighs more
    untrained, proc = tiny_build.build_tiny(seed=0)
    cfg = P.PretrainConfig(**SMALL, qa_weights="auto")
    w0 = P._qa_weights(untrained, proc, P._corpus(untrained, proc, cfg), cfg)
    assert sum(w0.values()) > sum(w.values()) + 2.0
    record = (tmp_path / "w" / "PRETRAIN.md").read_text()
    assert "--qa-weights auto --batch-size 8 --lr-lm 0.003" in record  # the rerun line is exact


def test_repatch_recuts_the_image_into_more_tokens(tmp_path):
    """16 px patches from the committed 32 px base: 36 image tokens end to end, a flat image
    embeds as before, the folder reloads; a patch size that does not divide the image fails."""
    from PIL import Image
    model, proc = models.load("tiny")
    flat = models.pixel_values(proc, [Image.new("RGB", (96, 96), (120, 60, 50))])
    emb = model.model.vision_tower.embeddings
    before = emb.patch_embedding(flat)[0, :, 0, 0]
    P.repatch(model, proc, 16)
    emb = model.model.vision_tower.embeddings
    after = emb.patch_embedding(flat)[0, :, 0, 0]
    assert torch.allclose(before, after, atol=1e-4)
    assert emb.position_embedding.weight.shape[0] == 37 and model.config.image_seq_length == 36
    models.save(model, proc, tmp_path / "p16")
    model, proc = models.load(str(tmp_path / "p16"))
    batch = models.encode(proc, [Image.new("RGB", (80, 64))], ["What color is the background?"],
                          ["gray"])
    assert int((batch["input_ids"] == model.config.image_token_index).sum()) == 36
    assert torch.isfinite(model(**batch).loss)
    with pytest.raises(ValueError, match="does not divide"):
        P.repatch(model, proc, 20)
    with pytest.raises(ValueError, match="init_from"):
        P.PretrainConfig(patch_size=16)
