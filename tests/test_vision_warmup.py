"""Vision warmup (leaml/vision_warmup.py, TrainConfig.vision_warmup_steps): answer-word targets,
only the image path trains, its heads learn a small detail, resume skips it."""
from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from leaml import models
from leaml.batches import Example
from leaml.train import TrainConfig, has_checkpoint, train
from leaml.vision_warmup import AnswerTargets

SMALL = dict(image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
             vision_mlp=64, text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1,
             text_mlp=64, vocab_size=512)
CORNER = "What is in the corner?"


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    return models.build_tiny(seed=0, **SMALL)


def _examples(n=16):
    """A grey image with a small red or blue square in one corner: a detail, not a global colour."""
    out = []
    for i in range(n):
        img = Image.new("RGB", (32, 32), (128, 128, 128))
        img.paste([(220, 40, 40), (40, 40, 220)][i % 2], (0, 0, 8, 8))
        out.append(Example(img, CORNER, ["red", "blue"][i % 2]))
        out.append(Example(img, "Describe it.", f"a {i}, b {i}, c {i}"))  # 48 words: open, left out
    return out


def test_answer_targets_split_lists_and_leave_out_open_and_constant_questions():
    qs = ["Which?", "Which?", "Which?", "Same?", "Same?", "Free?", "Free?", "Free?"]
    answers = ["b, a", "c", "a", "yes", "yes", "one", "two", "three"]
    images = [0, 1, 2, 0, 1, 0, 1, 2]
    # "Same?" has one answer word: nothing to learn; with max_labels=2 the other two count as open
    assert AnswerTargets(qs, answers, images, max_labels=2).questions == []
    t = AnswerTargets(qs, answers, images, max_labels=3)
    assert t.questions == ["Free?", "Which?"]
    which = {w: i for i, (q, w) in enumerate(t.labels) if q == "Which?"}
    assert t.y[0, which["a"]] == 1 and t.y[0, which["b"]] == 1 and t.y[0, which["c"]] == 0
    assert t.y[1].tolist().count(1.0) == 2  # "c" and "two"
    assert t.asked.tolist() == [[True, True], [True, True], [True, True]]


def test_warmup_trains_only_the_image_path_and_its_heads_learn_a_small_detail(base):
    model, proc = copy.deepcopy(base[0]), base[1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    cfg = TrainConfig(mode="full", batch_size=8, max_steps=5, vision_warmup_steps=60,
                      vision_warmup_lr=0.1)
    # stopped before the first main step: what changed, the warmup changed
    result = train(model, proc, _examples(), cfg, should_stop=lambda: True,
                   progress=lambda *a: seen.append(a))
    assert result.stopped and result.step == 0
    warm = [loss for stage, _, _, loss in seen if stage == "train: vision warmup"]
    assert len(warm) == 60
    assert sum(warm[-10:]) / 10 < 0.25 * warm[0]
    after = dict(result.model.named_parameters())
    lm = models.arch_spec(result.model).language_model_prefix
    for name, old in before.items():
        if name.startswith(lm) or "lm_head" in name:
            assert torch.equal(after[name], old), name
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert any("vision_tower" in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed)


def test_warmup_needs_full_mode_and_sane_numbers():
    with pytest.raises(ValueError, match="vision_warmup_steps needs mode 'full'"):
        TrainConfig(mode="lora", vision_warmup_steps=10)
    with pytest.raises(ValueError, match="vision_warmup"):
        TrainConfig(mode="full", vision_warmup_steps=-1)


def test_a_resumed_run_does_not_warm_up_again(base, tmp_path):
    model, proc = base
    cfg = TrainConfig(mode="full", lr=3e-3, batch_size=4, max_steps=6, warmup_ratio=0.0,
                      vision_warmup_steps=8)
    data = _examples(8)
    whole = train(copy.deepcopy(model), proc, data, cfg).model
    calls = {"n": 0}

    def stop_after_3():
        calls["n"] += 1
        return calls["n"] > 3
    first = train(copy.deepcopy(model), proc, data, cfg, work_dir=tmp_path,
                  should_stop=stop_after_3)
    assert first.stopped and first.step == 3 and has_checkpoint(tmp_path)
    resumed = train(copy.deepcopy(model), proc, data, cfg, work_dir=tmp_path)
    a, b = dict(whole.named_parameters()), dict(resumed.model.named_parameters())
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
