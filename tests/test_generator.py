"""The QA generator's data, config and streams (selective caption distillation)."""
import copy

import pytest
import torch
from PIL import Image

from leaml.engine import generator
from leaml.engine import models
from leaml.engine import neurons
from leaml.engine.generator import GeneratorConfig
from leaml.engine.train import TrainConfig


@pytest.fixture(scope="module")
def tiny_once():
    torch.set_num_threads(2)
    return models.load("tiny")


@pytest.fixture
def tiny(tiny_once):
    model, proc = tiny_once
    return copy.deepcopy(model), proc


def _examples(n=4):
    imgs = [Image.new("RGB", (64, 64), (60 * i % 255, 90, 120)) for i in range(n)]
    rows = [{"question": "Is there text?", "answer": "no" if i % 2 else "yes", "caption": f"a frame {i}"}
            for i in range(n)]
    files = {id(r): im for r, im in zip(rows, imgs)}
    return (generator.qa_examples(rows, lambda r: files[id(r)]),
            generator.caption_examples(rows, lambda r: files[id(r)]))


def test_examples_use_the_generation_and_caption_instructions():
    qa, caps = _examples(2)
    assert qa[0].instruction == "Generate a question about this image and answer it."
    assert qa[0].target == "Question: Is there text?\nAnswer: yes"
    assert caps[1].instruction == "Describe the image." and caps[1].target == "a frame 1"
    assert generator.caption_examples([{"caption": "  "}], str) == []


def test_caption_context_and_answer_stream_examples():
    rows = [{"question": " Is there text? ", "answer": "no", "image_caption": "A frame with text."},
            {"question": "How many polyps are in the image?", "answer": "2", "image_caption": None}]
    qa = generator.qa_examples(rows, str, context=True)
    assert qa[0].instruction == "A frame with text.\nGenerate a question about this image and answer it."
    assert qa[1].instruction == "Generate a question about this image and answer it."  # no caption
    assert generator.qa_examples(rows, str)[0].instruction == qa[1].instruction  # context off
    ans = generator.answer_examples(rows, str, context=True)
    assert [(e.instruction, e.target, e.open) for e in ans] == [
        ("A frame with text.\nIs there text?", "no", False),
        ("How many polyps are in the image?", "2", True)]
    assert GeneratorConfig().context and not GeneratorConfig(captions=False).context
    assert not GeneratorConfig(caption_context=False).context
    assert generator.known_form(GeneratorConfig().to_dict()) == ("answer", True)
    assert generator.known_form(GeneratorConfig(captions=False).to_dict()) == ("answer", False)
    old = {k: v for k, v in GeneratorConfig().to_dict().items()  # stored before these options
           if k not in ("answer_stream", "caption_context")}
    assert generator.known_form(old) == ("generate", False)


def test_answer_stream_is_the_seed_pairs_with_caption_context_or_nothing():
    rows = [{"question": "Where in the image is the polyp?", "answer": "center",
             "image_caption": "A polyp in the center."},
            {"question": "Is there text?", "answer": "no", "image_caption": "No text, no polyp."}]
    plain = generator.answer_examples(rows, str, context=True)
    assert plain[0].instruction == "A polyp in the center.\nWhere in the image is the polyp?"
    assert generator.answer_stream(rows, str, GeneratorConfig()) == plain
    assert generator.answer_stream(rows, str, GeneratorConfig(captions=False)) == \
        generator.answer_examples(rows, str)
    assert generator.answer_stream(rows, str, GeneratorConfig(answer_stream=False)) == []


def test_config_validates_and_round_trips():
    with pytest.raises(ValueError, match="mode must be 'full'"):
        GeneratorConfig(train=TrainConfig(mode="lora"))
    with pytest.raises(ValueError, match="rho"):
        GeneratorConfig(rho=0.0)
    with pytest.raises(ValueError, match="answer_ratio"):
        GeneratorConfig(answer_ratio=0)
    cfg = GeneratorConfig(rho=0.3, qa_epochs=2.0)
    assert GeneratorConfig.from_dict(cfg.to_dict()) == cfg
    assert GeneratorConfig(min_qa_steps=5, max_qa_steps=50, qa_epochs=1).qa_steps(320) == 10
    assert GeneratorConfig(min_qa_steps=5, max_qa_steps=8, qa_epochs=1).qa_steps(32_000) == 8


def test_pick_is_seeded_and_keeps_order():
    rows = list(range(20))
    a, b = generator.pick(rows, 5, seed=1), generator.pick(rows, 5, seed=1)
    assert a == b == sorted(a) and len(a) == 5 and generator.pick(rows, 0, 1) == rows


def test_caption_stream_masks_only_top_rho_neurons(tiny):
    model, proc = tiny
    qa, caps = _examples()
    answers = generator.answer_examples([{"question": "Is there text?", "answer": "no"}], str)
    streams, info = generator.streams(model, proc, qa, caps, GeneratorConfig(rho=0.25), answers)
    assert [s.name for s in streams] == ["qa", "answer", "caption"]
    assert streams[0].grad_masks is None and streams[1].grad_masks is None
    assert info["n_answers"] == 1 and info["caption_context"] and streams[1].weight == 4.0
    streams = [streams[0], streams[2]]
    masks = streams[1].grad_masks
    assert set(masks) == {n for n, _ in model.named_parameters()}  # every parameter covered
    spec = models.arch_spec(model)
    trained_rows = {n.rsplit(".", 1)[0]: int(m.sum()) for n, m in masks.items() if m.any()}
    assert set(trained_rows) == set(spec.neuron_modules)
    assert info["neurons"]["kept"] == sum(trained_rows.values())
    assert info["neurons"]["kept"] == sum(-(-m.out_features // 4) for n, m in model.named_modules()
                                          if n in spec.neuron_modules)


def test_rho_one_is_plain_caption_distillation_and_no_captions_drops_the_stream(tiny):
    model, proc = tiny
    qa, caps = _examples()
    plain, _ = generator.streams(model, proc, qa, caps, GeneratorConfig(rho=1.0))
    assert plain[1].grad_masks is None
    alone, info = generator.streams(model, proc, qa, caps, GeneratorConfig(captions=False))
    assert len(alone) == 1 and info["n_captions"] == 0


def test_train_generator_interleaves_steps_and_reports(tiny):
    model, proc = tiny
    qa, caps = _examples()
    cfg = GeneratorConfig(train=TrainConfig(mode="full", batch_size=4, lr=1e-3), min_qa_steps=2,
                          max_qa_steps=2, caption_ratio=1.0, rho=0.1)
    spec = models.arch_spec(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = generator.train_generator(model, proc, qa, caps, cfg)
    assert res.info["steps"] == res.info["total_steps"] == 4 and res.info["qa_steps"] == 2
    after = dict(res.train.model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(n.startswith(spec.language_model_prefix) for n in changed)
    assert any("vision_tower" in n for n in changed)  # seed-QA steps train everything
    with pytest.raises(ValueError, match="seed QA"):
        generator.train_generator(model, proc, [], caps, cfg)
    assert neurons.summary(neurons.select_top({"x": torch.ones(10)}, 0.1))["kept"] == 1


def test_regression_masks_survive_the_freeze_for_scoring(tiny_once):
    """Bug: train_generator froze every parameter before scoring, row_masks skipped frozen
    parameters, so caption steps ran unmasked and rho=0.1 trained exactly like rho=1.0."""
    model0, proc = tiny_once
    qa, caps = _examples()
    weights = {}
    for rho in (0.1, 1.0):
        cfg = GeneratorConfig(train=TrainConfig(mode="full", batch_size=4, lr=1e-3), min_qa_steps=1,
                              max_qa_steps=1, caption_ratio=1.0, rho=rho)
        model = copy.deepcopy(model0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        res = generator.train_generator(model, proc, qa, caps, cfg)
        weights[rho] = {n: p.detach().clone() for n, p in res.train.model.named_parameters()}
    assert any(not torch.equal(weights[0.1][n], weights[1.0][n]) for n in before)
