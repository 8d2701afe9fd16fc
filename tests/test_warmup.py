"""The vision warmup: answer targets, the heads on the image path, shifts and mirrored words."""
from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from leaml.engine import models
from leaml.engine.batches import Example
from leaml.engine.train import TrainConfig, train
from leaml.engine.warmup import AnswerTargets, mirror_word, shifted
from test_train import base  # noqa: F401  (the tiny model fixture the tests take)


CORNER = "What is in the corner?"


def _corner_examples(n=16):
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
    result = train(model, proc, _corner_examples(), cfg, should_stop=lambda: True,
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


def test_vision_lr_scale_zero_freezes_the_warmed_tower_for_the_main_loop(base):
    from leaml.engine.train import _vision_params
    model, proc = base
    cfg = dict(mode="full", batch_size=8, vision_warmup_steps=20, vision_warmup_lr=0.1,
               vision_lr_scale=0.0)
    warmed = train(copy.deepcopy(model), proc, _corner_examples(), TrainConfig(
        max_steps=5, **cfg), should_stop=lambda: True).model  # the warmup alone
    trained = train(copy.deepcopy(model), proc, _corner_examples(), TrainConfig(
        max_steps=5, **cfg)).model  # the same warmup, then 5 main steps
    vision = _vision_params(trained)
    before, mid, after = (dict(m.named_parameters()) for m in (model, warmed, trained))
    assert vision and any(not torch.equal(mid[n], before[n]) for n in vision)  # warmed
    assert all(torch.equal(after[n], mid[n]) for n in vision)  # then frozen, bit for bit
    assert not any(after[n].requires_grad for n in vision)
    lm = models.arch_spec(trained).language_model_prefix
    assert any(not torch.equal(after[n], mid[n]) for n in after if n.startswith(lm))


def test_warmup_shift_moves_the_warmup_images_and_it_still_learns(base):
    losses = {}
    for shift in (0, 4):
        seen = []
        cfg = TrainConfig(mode="full", batch_size=8, max_steps=5, vision_warmup_steps=60,
                          vision_warmup_lr=0.1, vision_warmup_shift=shift)
        train(copy.deepcopy(base[0]), base[1], _corner_examples(), cfg, should_stop=lambda: True,
              progress=lambda *a: seen.append(a))
        losses[shift] = [loss for stage, _, _, loss in seen if stage == "train: vision warmup"]
    assert losses[0] != losses[4]  # the same seed: only the moved pixels differ
    assert sum(losses[4][-10:]) / 10 < 0.6 * losses[4][0]


def test_shifted_moves_each_image_by_at_most_the_shift_and_repeats_the_edges():
    img = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(1))
    img[:, 5, 6] = 2.0  # one marked pixel (rand is below 1) tells where the image went
    batch = img.repeat(200, 1, 1, 1)
    out = shifted(batch, 2, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    moves = set()
    for k in range(len(out)):
        (y, x), = (out[k, 0] == 2.0).nonzero().tolist()
        dy, dx = y - 5, x - 6
        moves.add((dy, dx))
        rows, cols = (torch.arange(12) - dy).clamp(0, 11), (torch.arange(12) - dx).clamp(0, 11)
        assert torch.equal(out[k], img[:, rows][:, :, cols])  # moved, the edges repeated
    assert moves == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # all 25 drawn


def test_mirror_word_names_the_place_in_the_mirrored_image():
    assert mirror_word("upper-left", "h") == "upper-right"
    assert mirror_word("upper-left", "v") == "lower-left"
    assert mirror_word("lower right", "h") == "lower left"
    assert mirror_word("center", "h") == mirror_word("center", "v") == "center"
    assert mirror_word("none", "v") == "none"
    assert mirror_word("red", "h") is None and mirror_word("left-ish", "h") is None


WHERE, COLOUR, LEFT = "Where is the square?", "What colour is the square?", "Is the square on the left?"


def _square_scenes():
    """Pixel tensors (3, 12, 12) with a 3x3 square in one corner, and their QA."""
    corners = {"upper-left": (0, 0), "upper-right": (0, 9), "lower-left": (9, 0),
               "lower-right": (9, 9)}
    pixels, qs, answers, images = [], [], [], []
    for i, (name, (r, c)) in enumerate(corners.items()):
        for colour, channel in (("red", 0), ("blue", 2)):
            img = torch.zeros(3, 12, 12)
            img[channel, r:r + 3, c:c + 3] = 1.0
            k = len(pixels)
            pixels.append(img)
            for q, a in ((WHERE, name), (COLOUR, colour), (LEFT, "yes" if c == 0 else "no")):
                qs.append(q), answers.append(a), images.append(k)
    return torch.stack(pixels), AnswerTargets(qs, answers, images)


def _where(img: torch.Tensor) -> str:
    r, c = [int(v) for v in img.sum(0).nonzero()[0]]
    return f"{'upper' if r < 6 else 'lower'}-{'left' if c < 6 else 'right'}"


def test_mirrored_batches_move_place_answers_with_the_image_and_drop_what_cannot_follow():
    pixels, t = _square_scenes()
    q = {name: i for i, name in enumerate(t.questions)}
    label = {lab: i for i, lab in enumerate(t.labels)}
    rows = torch.arange(len(pixels)).repeat(8)  # 64 rows: every scene, many random mirrors
    out, y, asked = t.mirrored(pixels[rows], t.y[rows], t.asked[rows], torch.Generator().manual_seed(0))
    moved = 0
    for k, row in enumerate(rows.tolist()):
        where = [w for (qq, w), i in label.items() if qq == WHERE and y[k, i] == 1]
        assert where == [_where(out[k])]  # the label names where the square now is
        assert torch.equal(y[k, [label[(COLOUR, "red")], label[(COLOUR, "blue")]]],
                           t.y[row, [label[(COLOUR, "red")], label[(COLOUR, "blue")]]])
        same = torch.equal(out[k], pixels[row])
        moved += not same
        # "on the left" has no place-name answer: a mirrored row does not ask it
        assert bool(asked[k, q[LEFT]]) == same and asked[k, q[WHERE]] and asked[k, q[COLOUR]]
    assert 32 < moved < 64  # each axis mirrors half the rows


def test_warmup_epochs_set_its_length_and_lora_refuses_it(base):
    model, proc = copy.deepcopy(base[0]), base[1]
    seen = []
    cfg = TrainConfig(mode="full", batch_size=8, max_steps=5, vision_warmup_epochs=2.0)
    train(model, proc, _corner_examples(16), cfg, should_stop=lambda: True,
          progress=lambda *a: seen.append(a))
    warm = [(step, total) for stage, step, total, _ in seen if stage == "train: vision warmup"]
    assert warm == [(i, 4) for i in range(1, 5)]  # 16 images x 2 passes / 8 per step
    with pytest.raises(ValueError, match="need mode 'full'"):
        TrainConfig(mode="lora", vision_warmup_epochs=1.0)


def test_warmup_needs_full_mode_and_sane_numbers():
    with pytest.raises(ValueError, match="vision_warmup_steps/epochs need mode 'full'"):
        TrainConfig(mode="lora", vision_warmup_steps=10)
    with pytest.raises(ValueError, match="vision_warmup"):
        TrainConfig(mode="full", vision_warmup_steps=-1)
    with pytest.raises(ValueError, match="shift must be >= 0"):
        TrainConfig(mode="full", vision_warmup_shift=-2)


# --- hard examples ---------------------------------------------------------------------------


def test_heads_with_a_bias_per_token_tell_where_when_the_features_cannot():
    """One "hot" token per image, the same vector wherever it is: the answer (which token) is
    only in where it sits. Plain max-pooled heads cannot say it; ``where`` heads learn it."""
    from leaml.engine.warmup import AnswerHeads, AnswerTargets, loss_fn
    words = ["left", "center", "right"]
    targets = AnswerTargets(["Where?"] * 3, words, [0, 1, 2])
    feats = torch.zeros(3, 3, 8)
    for i in range(3):
        feats[i, i] = torch.linspace(-1, 1, 8)
    torch.manual_seed(0)
    acc = {}
    for tokens in (0, 3):
        heads = AnswerHeads(8, targets, tokens)
        opt = torch.optim.Adam(heads.parameters(), lr=0.05)
        for _ in range(300):
            loss = loss_fn(heads(feats), targets.y, targets.asked, heads.label_question)
            opt.zero_grad()
            loss.backward()
            opt.step()
        pred = heads(feats).argmax(1)
        acc[tokens] = sum(targets.labels[int(p)][1] == w for p, w in zip(pred, words))
    assert acc[3] == 3 and acc[0] <= 1


def test_warmup_where_reaches_the_heads_and_it_still_learns(base):
    losses = {}
    for where in (False, True):
        seen = []
        cfg = TrainConfig(mode="full", batch_size=8, max_steps=5, vision_warmup_steps=60,
                          vision_warmup_lr=0.1, vision_warmup_where=where)
        train(copy.deepcopy(base[0]), base[1], _corner_examples(), cfg,
              should_stop=lambda: True, progress=lambda *a: seen.append(a))
        losses[where] = [loss for stage, _, _, loss in seen if stage == "train: vision warmup"]
    # the same seed and start: the first step is the same, later ones differ by the bias alone
    assert losses[True][0] == losses[False][0] and losses[True] != losses[False]
    assert len(losses[True]) == 60 and sum(losses[True][-10:]) / 10 < 0.6 * losses[True][0]
