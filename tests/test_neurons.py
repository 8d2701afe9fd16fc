"""Importance scores, top-rho selection and the caption-step row masks (selective distillation)."""
import copy

import pytest
import torch
from PIL import Image

from leaml.engine import models
from leaml.tiny import build as tiny_build
from leaml.engine import neurons
from leaml.engine.batches import Example
from leaml.engine.train import Stream, TrainConfig, train


@pytest.fixture(scope="module")
def tiny_once():
    torch.set_num_threads(2)
    return tiny_build.build_tiny(0)


@pytest.fixture
def tiny(tiny_once):
    model, proc = tiny_once
    return copy.deepcopy(model), proc


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)) for _ in range(3)]


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_importance_is_accumulated_abs_taylor_term_per_row():
    model, batches = _mlp(), _batches()
    scores = neurons.importance_scores(model, ["0", "2"], batches, _mse)
    assert {k: v.shape for k, v in scores.items()} == {"0": (6,), "2": (3,)}
    expected = torch.zeros(6, dtype=torch.float64)
    for b in batches:
        model.zero_grad()
        _mse(model, b).backward()
        lin = model[0]
        expected += ((lin.weight.grad * lin.weight).sum(1) + lin.bias.grad * lin.bias).abs().double()
    assert torch.allclose(scores["0"], expected, atol=1e-6)


def test_importance_leaves_requires_grad_and_mode_alone():
    model = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    neurons.importance_scores(model, ["2"], _batches(), _mse)
    assert not any(p.requires_grad for p in model.parameters()) and model.training


def test_select_top_keeps_ceil_rho_rows_per_layer_by_score():
    scores = {"a": torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0]), "b": torch.tensor([1.0, 2.0])}
    sel = neurons.select_top(scores, 0.4)
    assert sel["a"].tolist() == [False, True, False, False, True]  # ceil(0.4*5)=2: rows 1, 4
    assert sel["b"].tolist() == [False, True]                       # ceil(0.8)=1, at least one
    assert all(m.all() for m in neurons.select_top(scores, 1.0).values())


def test_importance_on_the_tiny_model_covers_every_neuron_module(tiny):
    model, proc = tiny
    spec = models.arch_spec(model)
    img = Image.new("RGB", (64, 64), (200, 80, 80))
    batch = models.encode(proc, [img, img], ["Q?", "Q?"], ["Question: a\nAnswer: b", "c"])
    scores = neurons.importance_scores(model, spec.neuron_modules, [batch])
    modules = dict(model.named_modules())
    assert set(scores) == set(spec.neuron_modules) and len(scores) == 8
    for name, s in scores.items():
        assert s.shape == (modules[name].weight.shape[0],) and (s > 0).any()
    sel = neurons.select_top(scores, 0.1)
    assert neurons.summary(sel)["kept"] == sum(-(-s.numel() // 10) for s in scores.values())


def test_caption_steps_change_selected_rows_only_and_frozen_rows_stay_bit_equal(tiny):
    model, proc = tiny
    spec = models.arch_spec(model)
    rng = torch.Generator().manual_seed(0)
    sel = {n: torch.rand(dict(model.named_modules())[n].weight.shape[0], generator=rng) < 0.3
           for n in spec.neuron_modules}
    masks = neurons.row_masks(model, sel)  # full mode: names as in model.named_parameters()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    imgs = [Image.new("RGB", (64, 64), (40 * i, 90, 120)) for i in range(4)]
    caps = [Example(im, "Describe the image.", f"a pink polyp number {i}") for i, im in enumerate(imgs)]
    cfg = TrainConfig(mode="full", lr=1e-2, weight_decay=0.1, batch_size=4, max_steps=3,
                      warmup_ratio=0.0)
    trained = train(model, proc, [Stream(caps, name="caption", grad_masks=masks)], cfg).model
    after = dict(trained.named_parameters())
    for name, old in before.items():
        module = name.rsplit(".", 1)[0]
        if module in sel and name.endswith("weight"):
            rows = sel[module]
            assert torch.equal(after[name][~rows], old[~rows]), name
            assert (after[name][rows] != old[rows]).any(dim=1).all(), name
        else:
            assert torch.equal(after[name], old), name


def test_lora_masks_select_lora_b_rows_and_freeze_lora_a(tiny):
    from peft import LoraConfig, get_peft_model
    model, _ = tiny
    spec = models.arch_spec(model)
    name = spec.neuron_modules[0]
    rows = torch.zeros(dict(model.named_modules())[name].weight.shape[0], dtype=torch.bool)
    rows[:3] = True
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=spec.lora_targets))
    masks = neurons.row_masks(peft_model, {name: rows})
    b = [k for k in masks if k.startswith(f"base_model.model.{name}.lora_B")]
    a = [k for k in masks if k.startswith(f"base_model.model.{name}.lora_A")]
    assert len(b) == 1 and torch.equal(masks[b[0]], rows)
    assert len(a) == 1 and not masks[a[0]].any()
    assert sum(int(m.sum()) for m in masks.values()) == 3
