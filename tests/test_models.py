"""leaml.engine.models: prompts, answer-only labels, tokenizer, generation logprobs, the tiny base."""
from __future__ import annotations

import random

import pytest
import torch

from leaml.engine import models
from leaml.tiny import build as tiny_build
from leaml.tiny.corpus import questions, random_scene, render

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def untrained():
    model, processor = tiny_build.build_tiny(seed=0)
    return model, processor


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(3)
    return [random_scene(rng) for _ in range(4)]


def test_prompt_uses_chat_template_with_one_image(untrained):
    _, proc = untrained
    text = models.prompt_text(proc, "What color is the star?")
    assert text.count("<image>") == 1 and "What color is the star?" in text
    assert text.endswith("ASSISTANT:\n")


def test_labels_cover_target_and_eos_only(untrained, scenes):
    model, proc = untrained
    targets = ["red", "circle, square", "5-10mm", "yes"]
    batch = models.encode(proc, [render(s) for s in scenes],
                          ["What color?", "Which shapes?", "How big is it?", "Is it?"], targets)
    tok = proc.tokenizer
    n_img = (proc.image_processor.crop_size["height"] // proc.patch_size) ** 2
    for ids, mask, labels, target in zip(batch["input_ids"], batch["attention_mask"],
                                         batch["labels"], targets):
        assert int((ids == model.config.image_token_id).sum()) == n_img
        kept = labels[labels != models.IGNORE_INDEX]
        assert kept[-1].item() == tok.eos_token_id
        assert tok.decode(kept[:-1]) == target
        # labelled positions are exactly the last len(kept) real tokens
        real = ids[mask.bool()]
        assert torch.equal(real[-len(kept):], kept)
    assert batch["pixel_values"].shape[0] == 4
    assert torch.isfinite(model(**batch).loss)


def test_encode_text_matches_encode(untrained, scenes):
    _, proc = untrained
    images = [render(s) for s in scenes[:2]]
    full = models.encode(proc, images, ["a?", "b b?"], ["x", "y z"])
    text = models.encode_text(proc, ["a?", "b b?"], ["x", "y z"])
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(full[k], text[k])
    assert torch.equal(full["pixel_values"], models.pixel_values(proc, images))


def test_byte_level_tokenizer_round_trips_any_unicode(untrained):
    tok = untrained[1].tokenizer
    for text in ["naïve café, 東京 🙂", "Polyp 5-10mm at 3 o'clock?", "\t tabs \n and ☃"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_generate_logprobs_match_teacher_forcing(untrained, scenes):
    model, proc = untrained
    images = [render(s) for s in scenes[:2]]
    gens = models.generate(model, proc, images, ["What color?", "Where?"], max_new_tokens=6)
    for img, instr, (g,) in zip(images, ["What color?", "Where?"], gens):
        assert len(g.token_ids) == len(g.token_logprobs) > 0
        batch = models.encode(proc, [img], [instr])
        ids = torch.cat([batch["input_ids"], torch.tensor([g.token_ids])], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=batch["pixel_values"]).logits
        n = len(g.token_ids)
        logp = logits[0, -n - 1:-1].log_softmax(-1)
        tf = logp.gather(-1, torch.tensor(g.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(tf, torch.tensor(g.token_logprobs), atol=1e-3)


def test_batched_greedy_equals_one_at_a_time(untrained, scenes):
    model, proc = untrained
    images = [render(s) for s in scenes]
    instr = ["What color is the circle?", "How many objects are there?", "Describe the image.",
             "Which shapes are in the image?"]
    batched = models.generate(model, proc, images, instr, max_new_tokens=5, batch_size=4)
    single = [models.generate(model, proc, [im], [q], max_new_tokens=5)[0]
              for im, q in zip(images, instr)]
    for b, s in zip(batched, single):
        assert b[0].token_ids == s[0].token_ids
        assert b[0].token_logprobs == pytest.approx(s[0].token_logprobs, abs=1e-3)


def test_sampling_returns_n_sequences_per_input(untrained, scenes):
    model, proc = untrained
    pv = models.pixel_values(proc, [render(s) for s in scenes[:2]])
    gens = models.generate(model, proc, pv, ["a?", "b?"], max_new_tokens=4, do_sample=True,
                           temperature=1.0, num_return_sequences=3, seed=1)
    assert [len(g) for g in gens] == [3, 3]


def test_arch_spec_targets_language_model_only(untrained):
    model, _ = untrained
    spec = models.arch_spec(model)
    assert spec.model_type == "llava"
    assert spec.lora_targets and all("language_model" in n for n in spec.lora_targets)
    leaves = {n.rsplit(".", 1)[-1] for n in spec.neuron_modules}
    assert leaves == {"o_proj", "down_proj"}
    assert len(spec.neuron_modules) == 2 * model.config.text_config.num_hidden_layers


def test_resolve_ref():
    assert models.resolve_ref("tiny") == str(models.TINY_DIR)
    assert models.resolve_ref("tiny16") == str(models.TINY_DIR.parent / "tiny16")
    assert models.resolve_ref("org/some-model") == "org/some-model"


def test_short_towers_get_plain_attention_that_computes_the_same(tmp_path):
    """load() gives towers of few patches plain attention (faster at 37 tokens), also in a
    folder saved from the base (a trained stage's model); the image features match SDPA's,
    and the language model keeps SDPA."""
    base, proc = models.load(models.DEFAULT_BASE)
    models.save(base, proc, tmp_path / "saved")
    model, proc = models.load(str(tmp_path / "saved"))
    assert model.config.vision_config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "sdpa"
    pixels = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        eager = model.get_image_features(pixel_values=pixels)
        model.set_attn_implementation({"vision_config": "sdpa"})
        sdpa = model.get_image_features(pixel_values=pixels)
    eager, sdpa = (getattr(f, "pooler_output", f) for f in (eager, sdpa))
    torch.testing.assert_close(torch.stack(list(eager)), torch.stack(list(sdpa)),
                               rtol=1e-4, atol=1e-5)


def test_committed_tiny_loads_through_auto_classes():
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(models.TINY_DIR)
    proc = AutoProcessor.from_pretrained(models.TINY_DIR)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert models.count_params(model) < 5_000_000
    assert "<image>" in models.prompt_text(proc, "hi")


@pytest.mark.parametrize("ref,tokens", [("tiny", 9), ("tiny16", 36)])
def test_committed_tiny_answers_general_questions(ref, tokens):
    """The pretrained bases read generated scenes (seeds unseen in pretraining)."""
    model, proc = models.load(ref)
    assert model.config.image_seq_length == tokens
    rng = random.Random(2026)
    items = []
    for _ in range(6):
        scene = random_scene(rng)
        qa = {t: (q, a) for t, q, a in questions(scene, rng)}
        items += [(render(scene), *qa[t]) for t in ("background", "count") if t in qa]
    gens = models.generate(model, proc, [i for i, _, _ in items], [q for _, q, _ in items],
                           max_new_tokens=6)
    right = sum(g[0].text == a for g, (_, _, a) in zip(gens, items))
    assert right >= 0.8 * len(items), [(q, a, g[0].text) for g, (_, q, a) in zip(gens, items)]
