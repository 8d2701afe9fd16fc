"""train.py / batches.py: LoRA vs full, frozen weights, resume == uninterrupted, data paths,
the vision warmup."""
from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from leaml.engine import models
from leaml.tiny import build as tiny_build
from leaml.engine.batches import EpochOrder, Example, mentions_position
from leaml.engine.train import (Stream, TrainConfig, has_checkpoint, load_trained, save_trained,
                         stream_schedule, total_steps, train)


# a smaller tiny LLaVA than the committed base: these tests check mechanics, not accuracy
SMALL = dict(image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
             vision_mlp=64, text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1,
             text_mlp=64, vocab_size=512)


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    return tiny_build.build_tiny(seed=0, **SMALL)


@pytest.fixture
def tiny(base):
    model, proc = base
    return copy.deepcopy(model), proc


def _examples(n=8):
    colours = [(200, 60, 60), (60, 60, 200)]
    return [Example(Image.new("RGB", (72, 64), colours[i % 2]), "What color is it?",
                    ["red", "blue"][i % 2], open=i % 4 == 0) for i in range(n)]


def _cfg(**kw):
    base = dict(lr=1e-2, batch_size=4, max_steps=3, warmup_ratio=0.0)
    return TrainConfig(**{**base, **kw})


def test_lora_trains_adapters_and_leaves_base_weights_bit_equal(tiny):
    model, proc = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, proc, _examples(), _cfg(mode="lora", lora_r=4))
    trained = dict(result.model.named_parameters())
    lora = {n: p for n, p in trained.items() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in lora.items() if "lora_B" in n)
    spec_prefix = models.arch_spec(result.model).language_model_prefix
    assert all(spec_prefix in n for n in lora), "LoRA only on the language model"
    for name, old in before.items():
        peft_name = next(n for n in trained if n.endswith(name.replace(".weight", ".base_layer.weight"))
                         or n.endswith(name))
        assert torch.equal(trained[peft_name], old), name


def test_full_finetuning_changes_weights_and_loss_goes_down(tiny):
    model, proc = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, proc, _examples(), _cfg(mode="full", max_steps=6, lr=3e-3))
    changed = [n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 0.9 * len(before)
    assert result.losses[-1] < result.losses[0]
    assert result.step == result.total_steps == 6 and not result.stopped


def test_full_mode_with_vision_lr_scale_0_freezes_the_vision_tower(tiny):
    model, proc = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, proc, _examples(), _cfg(mode="full", vision_lr_scale=0.0))
    after = dict(result.model.named_parameters())
    vision = [n for n in before if "vision_tower" in n]
    assert vision and all(torch.equal(after[n], before[n]) for n in vision)
    assert any(not torch.equal(after[n], before[n]) for n in before if n not in vision)


@pytest.mark.parametrize("mode,extra", [
    ("full", {}), ("lora", {}), ("full", {"vision_warmup_steps": 8}),
    ("full", {"vision_warmup_steps": 8, "vision_lr_scale": 0.0}),
    ("full", {"hard_fraction": 0.5, "checkpoint_every": 5})],
    ids=["full", "lora", "full-warmup", "full-warmup-frozen", "full-hard"])
def test_resume_from_checkpoint_gives_the_weights_of_an_uninterrupted_run(base, tmp_path, mode,
                                                                          extra):
    model, proc = base
    # dropout on: the checkpoint must carry RNG state and batch order; with a
    # vision warmup, the resumed run must not warm up again (its checkpoint holds those weights);
    # with hard examples, the running losses they are drawn by must travel with it
    cfg = _cfg(mode=mode, max_steps=6, lr=3e-3, lora_r=4, lora_dropout=0.1,
               weight_decay=0.01, warmup_ratio=0.3, batch_size=4, grad_accum=2, **extra)
    data = _shared_image_examples() if extra.get("hard_fraction") else _examples(10)
    whole = train(copy.deepcopy(model), proc, data, cfg, work_dir=tmp_path / "whole").model

    calls = {"n": 0}

    def stop_after_3():
        calls["n"] += 1
        return calls["n"] > 3
    first = train(copy.deepcopy(model), proc, data, cfg, work_dir=tmp_path, should_stop=stop_after_3)
    assert first.stopped and first.step == 3 and has_checkpoint(tmp_path)
    resumed = train(copy.deepcopy(model), proc, data, cfg, work_dir=tmp_path)
    assert resumed.step == 6 and not resumed.stopped
    a, b = dict(whole.named_parameters()), dict(resumed.model.named_parameters())
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    if extra.get("checkpoint_every"):  # both wrote one at step 5: the same running losses
        state = [torch.load(d / "checkpoint" / "state.pt", weights_only=False)
                 for d in (tmp_path / "whole", tmp_path)]
        assert state[0]["step"] == state[1]["step"] == 5
        assert torch.allclose(state[0]["question_losses"]["running"],
                              state[1]["question_losses"]["running"], rtol=0, atol=1e-6)


def test_checkpoint_from_another_config_is_refused(base, tmp_path):
    model, proc = base
    train(copy.deepcopy(model), proc, _examples(), _cfg(mode="full"), work_dir=tmp_path,
          should_stop=lambda: True)
    with pytest.raises(ValueError, match="another config"):
        train(copy.deepcopy(model), proc, _examples(), _cfg(mode="full", lr=1e-4),
              work_dir=tmp_path)


def test_lazy_images_train_exactly_like_the_tensor_cache(base):
    model, proc = base
    cached = train(copy.deepcopy(model), proc, _examples(), _cfg(mode="full"))
    lazy = train(copy.deepcopy(model), proc, _examples(), _cfg(mode="full", image_cache_mb=0))
    assert cached.image_cache and not lazy.image_cache
    assert cached.losses == pytest.approx(lazy.losses, abs=1e-6)


def test_lora_adapters_save_in_peft_format_and_reload(tiny, tmp_path):
    from peft import PeftModel
    model, proc = tiny
    base_dir = models.save(copy.deepcopy(model), proc, tmp_path / "base")
    result = train(model, proc, _examples(), _cfg(mode="lora", lora_r=4))
    out = save_trained(result.model, proc, tmp_path / "adapter")
    assert (out / "adapter_config.json").exists()
    base2, _ = models.load(str(base_dir))
    assert isinstance(PeftModel.from_pretrained(base2, out), PeftModel)
    merged, _ = load_trained(out, str(base_dir))
    pv = models.pixel_values(proc, [_examples(1)[0].image])
    batch = models.encode_text(proc, ["What color is it?"])
    result.model.eval()
    with torch.no_grad():
        want = result.model(**batch, pixel_values=pv).logits
        got = merged(**batch, pixel_values=pv).logits
    assert torch.allclose(want, got, atol=1e-4)


def test_streams_interleave_by_weight_and_masks_freeze_rows(tiny):
    model, proc = tiny
    name, p = next((n, p) for n, p in model.named_parameters() if n.endswith("down_proj.weight"))
    rows = torch.zeros(p.shape[0], dtype=torch.bool)
    rows[:3] = True
    before = p.detach().clone()
    streams = [Stream(_examples(4), weight=1, name="qa"),
               Stream(_examples(4), weight=1, name="cap", grad_masks={name: rows})]
    assert stream_schedule([1, 1], 4) == [0, 1, 0, 1]
    assert stream_schedule([3, 1], 8).count(0) == 6
    result = train(model, proc, streams, _cfg(mode="full", max_steps=2, weight_decay=0.1))
    after = dict(result.model.named_parameters())[name]
    assert not torch.equal(after, before)  # the unmasked qa step moved it


def test_config_is_validated_with_a_message_naming_the_field():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="half")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch_size=10, grad_accum=3)
    with pytest.raises(ValueError, match="mixed_precision must be one of 'no', 'bf16', 'fp16'"):
        TrainConfig(mixed_precision="fp8")
    assert TrainConfig.from_dict(TrainConfig(lr=0.5).to_dict()) == TrainConfig(lr=0.5)


def test_steps_scale_with_data_and_respect_min_steps():
    s = [Stream(_examples(8))]
    assert total_steps(s, TrainConfig(batch_size=4, epochs=2)) == 4
    assert total_steps(s, TrainConfig(batch_size=4, epochs=2, min_steps=50)) == 50
    assert total_steps(s, TrainConfig(max_steps=7)) == 7


def test_epoch_order_is_a_seeded_permutation_with_open_oversampling():
    order = EpochOrder([False] * 6, seed=1, stream_id=0, oversample=1.0)
    assert sorted(order.take(0, 6)) == list(range(6))
    assert order.take(0, 14) == EpochOrder([False] * 6, 1, 0, 1.0).take(0, 14)
    assert sorted(order.take(6, 6)) == list(range(6))
    over = EpochOrder([True, False, False, False], seed=0, stream_id=0, oversample=3.0)
    first_epoch = over.take(0, 6)
    assert first_epoch.count(0) == 3 and sorted(set(first_epoch)) == [0, 1, 2, 3]


def test_position_words_are_recognised():
    assert mentions_position("Where in the image is the polyp?", "upper-left")
    assert mentions_position("Is it on the left?", "yes")
    assert not mentions_position("What color is the abnormality?", "red")


def _shared_image_examples():
    """Three images, each asked several questions of different lengths (one pair twice)."""
    imgs = [Image.new("RGB", (64, 64), c) for c in ((200, 60, 60), (60, 60, 200), (60, 200, 60))]
    qa = [("What color is it?", "red"), ("Is there an object in this picture?", "yes"),
          ("How many?", "1"), ("How many?", "1")]
    return [Example(im, q, a) for im in imgs for q, a in qa]


def test_packed_rows_give_the_loss_and_gradients_of_separate_sequences(tiny):
    from leaml.engine.batches import ImageSource, PackedText, TextCache, image_groups
    model, proc = tiny
    model.train()
    ex = _shared_image_examples()
    images = ImageSource(proc, [e.image for e in ex], budget_mb=64)
    text = TextCache(proc, ex)
    index = [images.index(e.image) for e in ex]
    packed = PackedText(text, proc.image_token_id)
    rows = packed.rows(image_groups(index))
    assert [len(r) for r in rows] == [4, 4, 4]  # one sequence per image

    def loss_and_grads(batch, pixel_rows):
        model.zero_grad()
        loss = model(**batch, pixel_values=images.batch(pixel_rows)).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}

    sep_loss, sep_grads = loss_and_grads(text.batch(list(range(len(ex)))), index)
    pack_batch = packed.batch(rows)
    assert pack_batch["input_ids"].numel() < text.batch(list(range(len(ex))))["input_ids"].numel()
    pack_loss, pack_grads = loss_and_grads(pack_batch, [index[r[0]] for r in rows])
    assert pack_loss == pytest.approx(sep_loss, rel=1e-5)
    assert sep_grads.keys() == pack_grads.keys()
    for name, g in sep_grads.items():
        assert torch.allclose(g, pack_grads[name], atol=1e-5, rtol=1e-4), name


def test_training_packs_questions_of_one_image_unless_told_not_to(base):
    model, proc = base
    ex = _shared_image_examples()
    packed = train(copy.deepcopy(model), proc, ex, _cfg(mode="full", batch_size=8, max_steps=6))
    plain = train(copy.deepcopy(model), proc, ex, _cfg(mode="full", batch_size=8, max_steps=6,
                                                       pack=False))
    assert packed.losses[-1] < packed.losses[0] and plain.losses[-1] < plain.losses[0]
    assert packed.losses != plain.losses  # batches differ in composition, not in meaning


def test_vision_lr_scale_sets_the_vision_towers_learning_rate(tiny):
    from leaml.engine.train import _optimizer, _vision_params, prepare_model
    model, _ = tiny
    config = _cfg(mode="full", lr=1e-3, vision_lr_scale=5.0)
    model = prepare_model(model, config)
    vision = {id(p) for n, p in model.named_parameters() if n in _vision_params(model)}
    lrs = {id(p): g["lr"] for g in _optimizer(model, config).param_groups for p in g["params"]}
    assert vision and lrs.keys() == {id(p) for p in model.parameters()}
    assert all(lrs[i] == pytest.approx(5e-3) for i in vision)
    assert all(lr == pytest.approx(1e-3) for i, lr in lrs.items() if i not in vision)
    with pytest.raises(ValueError, match="vision_lr_scale"):
        _cfg(vision_lr_scale=-0.1)


# --- vision warmup (leaml/engine/warmup.py) -----------------------------------------------

def _packed_logits(model, proc, ex):
    from leaml.engine.batches import ImageSource, PackedText, TextCache, image_groups
    images = ImageSource(proc, [e.image for e in ex], budget_mb=64)
    text = TextCache(proc, ex)
    index = [images.index(e.image) for e in ex]
    packed = PackedText(text, proc.image_token_id)
    rows = packed.rows(image_groups(index))
    batch = packed.batch(rows, with_example=True)
    example = batch.pop("example")
    with torch.no_grad():
        out = model(**batch, pixel_values=images.batch([index[r[0]] for r in rows]))
    return out, batch["labels"], example


def _alone_losses(model, proc, ex):
    """Each example's own mean answer-token loss, in a sequence of its own."""
    from leaml.engine.batches import ImageSource, TextCache
    images = ImageSource(proc, [e.image for e in ex], budget_mb=64)
    text = TextCache(proc, ex)
    with torch.no_grad():
        return [float(model(**text.batch([i]), pixel_values=images.batch([images.index(e.image)])).loss)
                for i, e in enumerate(ex)]


def test_question_losses_give_the_models_loss_and_each_questions_running_mean(tiny):
    from leaml.engine.question_losses import QuestionLosses
    model, proc = tiny
    model.eval()
    ex = _shared_image_examples()
    out, labels, example = _packed_logits(model, proc, ex)
    keys = [e.instruction for e in ex]
    tracker = QuestionLosses(keys, momentum=0.5)
    loss = tracker.loss(out.logits, labels, example)
    assert float(loss) == pytest.approx(float(out.loss), rel=1e-5)  # what the model computes
    alone = _alone_losses(model, proc, ex)  # each example in a sequence of its own
    per_question = {}
    for k, value in zip(keys, alone):
        per_question.setdefault(k, []).append(value)
    first = torch.tensor([sum(v) / len(v) for v in per_question.values()])
    assert torch.allclose(tracker.running, first, rtol=1e-4)  # the first batch sets them
    assert torch.allclose(tracker.weights(), first, rtol=1e-4)
    # a later batch moves each by (1 - momentum); the state round-trips
    tracker.loss(out.logits * 0.5, labels, example)
    assert not torch.allclose(tracker.running, first)
    again = QuestionLosses(keys)
    again.load_state_dict(tracker.state_dict())
    assert torch.equal(again.running, tracker.running)


def test_hard_fraction_trains_and_is_validated(base):
    with pytest.raises(ValueError, match="hard_fraction"):
        TrainConfig(hard_fraction=1.0)
    model, proc = base
    result = train(copy.deepcopy(model), proc, _shared_image_examples(),
                   _cfg(mode="full", batch_size=8, max_steps=8, hard_fraction=0.5))
    assert result.losses[-1] < result.losses[0]


def test_hard_examples_come_from_the_questions_with_the_highest_running_loss(base):
    from leaml.engine.train import _Data
    model, proc = base
    ex = _shared_image_examples()
    cfg = _cfg(mode="full", batch_size=8, hard_fraction=0.5, question_power=2.0)
    data = _Data(proc, [Stream(ex)], cfg, pack=True)
    keys = list(dict.fromkeys(e.instruction for e in ex))
    data.losses.running = torch.tensor([0.1 if k != "How many?" else 2.0 for k in keys])
    picks = data._hard_examples(0, 400, cfg.seed, key=3)
    share = sum(ex[i].instruction == "How many?" for i in picks) / len(picks)
    assert share > 0.9  # 2.0**2 against 0.1**2 twice: 4 / 4.02 expected
    assert picks == data._hard_examples(0, 400, cfg.seed, key=3)  # seeded by (seed, key)
    # a micro-batch: the stream's order gives half of it (packed rows), the hard part the rest
    parts = data.micro_batch(0, position=0, size=8, rank=0, world=1, config=cfg, key=0)
    assert [share for _, share in parts] == [0.5, 0.5]
    hard_rows = parts[1][0]["example"]
    assert len(hard_rows) == 4 and all(len(set(r[r >= 0].tolist())) == 1 for r in hard_rows)


def test_a_huge_caption_is_cut_to_max_target_tokens_and_still_trains(tiny):
    from leaml.engine.batches import TextCache
    model, proc = tiny
    huge = "a large sessile polyp in the lower-left, reddish mucosa, no bleeding. " * 150
    ex = [Example(Image.new("RGB", (64, 64), (200, 60, 60)), "Describe the image.", huge, open=True),
          Example(Image.new("RGB", (64, 64), (60, 60, 200)), "What color is it?", "blue")]
    whole, cut = TextCache(proc, ex, max_target_tokens=0), TextCache(proc, ex, max_target_tokens=64)
    n_whole = int((whole.labels[0] != models.IGNORE_INDEX).sum())
    assert n_whole > 1000  # the caption really is long
    assert int((cut.labels[0] != models.IGNORE_INDEX).sum()) == 64
    prompt = int((whole.labels[0] == models.IGNORE_INDEX).sum())  # image tokens + instruction
    assert torch.equal(cut.ids[0], whole.ids[0][:prompt + 64])  # prompt whole, target's start
    assert torch.equal(cut.ids[1], whole.ids[1])  # a short example is untouched
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, proc, ex, _cfg(mode="full", max_steps=2, batch_size=2,
                                         max_target_tokens=64))
    assert any(not torch.equal(p, before[n]) for n, p in result.model.named_parameters())
