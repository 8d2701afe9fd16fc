"""A third architecture family through the same code: a tiny random Qwen2-VL (flattened
patches with a patch grid, 3-D rotary positions, token types; its processor without a video
processor) built offline by ``build-tiny``, saved as a folder, given to ``leaml run
--base-model FOLDER`` on a small imported project: it trains, evaluates, samples pseudo pairs
(known questions, chosen and generated answers) and serves, as real ``python -m leaml``
processes. The cache holds one fixed-size view per image (the registry's PatchLayout)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_second_arch import TRAIN_FAST, _db, _run, leaml_runs_on, make_world, served_answer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, "qwen2_vl")


@pytest.fixture(scope="module")
def tiny(world):
    from leaml.engine import models
    return models.load(str(world[1]))


def test_the_folder_loads_without_a_video_processor_and_every_image_is_one_view(world, tiny):
    from leaml.engine import models
    model, processor = tiny
    assert model.config.model_type == "qwen2_vl"
    assert getattr(processor, "video_processor", None) is None
    assert json.loads((world[1] / "processor_config.json").read_text())["processor_class"] \
        == "Qwen2VLProcessor"
    assert models.arch_spec(model).language_model_prefix == "model.language_model"
    # different sizes and shapes: one fixed view each, the same grid, one row per image
    images = [Image.new("RGB", (120, 80), (200, 10, 10)), Image.new("RGB", (64, 64), (0, 90, 9)),
              Image.new("RGB", (30, 200), (9, 9, 200))]
    pv = models.pixel_values(processor, images)
    assert pv.shape == (3, 36, 3 * 2 * 16 * 16)
    questions, answers = ["What colour?", "Is it red?", "What is it?"], ["red", "no", "blue"]
    enc = models.encode(processor, images, questions, answers)
    assert enc["image_grid_thw"].tolist() == [[1, 6, 6]] * 3
    assert torch.equal(pv.reshape(-1, pv.shape[-1]), enc["pixel_values"])
    # the cached path (text without images + cached rows) is the processor's path exactly
    text = models.encode_text(processor, questions, answers)
    inputs = models.image_inputs(processor, pv, text["input_ids"])
    assert torch.equal(text["input_ids"], enc["input_ids"])
    for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(inputs[key], enc[key]), key
    assert int(enc["mm_token_type_ids"].sum()) == 3 * 9  # 6x6 patches merged by 2
    with torch.no_grad():
        assert torch.allclose(model(**enc).loss, model(**text, **inputs).loss)
    cached = models.generate(model, processor, pv, questions, max_new_tokens=3)
    direct = models.generate(model, processor, images, questions, max_new_tokens=3)
    assert [g[0].token_ids for g in cached] == [g[0].token_ids for g in direct]


def test_patches_go_back_in_place_for_the_vision_warmup(tiny):
    from leaml.engine import models
    from leaml.engine.warmup import image_features
    model, processor = tiny
    layout = models.patch_layout(processor)
    noise = Image.fromarray((np.random.RandomState(0).rand(96, 96, 3) * 255).astype("uint8"))
    pv = models.pixel_values(processor, [noise, noise.transpose(Image.FLIP_LEFT_RIGHT)])
    grid = layout.to_grid(pv, processor.image_processor)
    assert grid.shape == (2, 6, 96, 96)  # 3 channels x 2 temporal copies
    assert torch.allclose(grid[0].flip(-1), grid[1], atol=1e-5)  # a mirror is a mirror
    flat, rows = layout.from_grid(grid, model.config.vision_config)
    assert torch.equal(flat, pv.reshape(-1, pv.shape[-1])) and rows.tolist() == [[1, 6, 6]] * 2
    with torch.no_grad():
        feats = image_features(model, grid)
        ref = model.get_image_features(pixel_values=flat, image_grid_thw=rows).pooler_output
    assert feats.shape == (2, 9, 64) and torch.allclose(feats, torch.stack(list(ref)))


def test_known_questions_are_answered_from_cached_pixels(tiny):
    from leaml.engine import models, pseudo
    model, processor = tiny
    images = [Image.new("RGB", (90, 70), (200, 10, 10)), Image.new("RGB", (64, 64), (0, 90, 9))]
    pv = models.pixel_values(processor, images)
    cfg = pseudo.PseudoConfig(max_new_tokens=4, batch_size=2, k=1)
    stats = pseudo.ParseStats()
    pseudo.answer_known(model, processor, pv, [0, 1], [["What colour?"], ["Is it red?"]],
                        cfg, stats)
    assert stats.sampled == 2  # each question answered (a random model's answers are dropped)
    chosen = pseudo.choose_known(model, processor, pv, [0, 1], [["What colour?"], ["Is it red?"]],
                                 {"What colour?": ["red", "green"], "Is it red?": ["yes", "no"]},
                                 cfg, pseudo.ParseStats())
    assert sorted(c.image_index for c in chosen) == [0, 1]
    assert all(c.answer in ("red", "green", "yes", "no") and 0.0 < c.confidence <= 1.0
               for c in chosen)


def test_the_whole_leaml_method_runs_on_qwen2_vl(world):
    home, folder = world
    run, gen = leaml_runs_on(home, folder, "qwen2_vl")
    for model_dir in (run["model_dir"], gen["model_dir"]):
        assert json.loads((home / model_dir / "processor_config.json").read_text())[
            "processor_class"] == "Qwen2VLProcessor"


def test_seed_lora_trains_evaluates_and_serves_on_qwen2_vl(world):
    home, folder = world
    lora = _run(home, folder, "seed-lora", *TRAIN_FAST)
    db = _db(home)
    run = db.execute("SELECT * FROM runs WHERE id = ?", (lora["run_id"],)).fetchone()
    assert run["status"] == "succeeded" and lora["n_test"] > 0
    targets = json.loads((home / run["model_dir"] / "adapter_config.json").read_text())[
        "target_modules"]
    targets = targets if isinstance(targets, list) else [targets]
    assert targets and all(t.startswith("model.language_model.") for t in targets), targets[:3]
    answer = served_answer(home, lora["run_id"])
    # the prompt held one fixed view's 9 image tokens, whatever the image's shape (40x30)
    assert answer["usage"]["prompt_tokens"] == _prompt_tokens(folder)


def _prompt_tokens(folder) -> int:
    from leaml.engine import models
    _, processor = models.load(str(folder))
    return int(models.encode_text(processor, ["Describe the image."])["input_ids"].shape[1])
