"""A second architecture family through the same code: a tiny random Idefics3 (SmolVLM's
architecture: SigLIP-style tower, pixel-shuffle connector, Llama; a 5-D pixel tensor, another
prompt format, another eos) built offline by ``build-tiny``, saved as a folder, and given to
``leaml run --base-model FOLDER`` with each method on a small imported project: it trains,
evaluates, samples pseudo pairs and serves, as real ``python -m leaml`` processes."""
from __future__ import annotations

import base64
import io
import json
import sqlite3
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from servehelp import Server, cli

# a few steps per stage: the point is that every stage runs on this family, not what it learns
FAST = ["--set", "generator.min_qa_steps=4", "--set", "generator.max_qa_steps=4",
        "--set", "generator.batch_size=4", "--set", "generator.caption_ratio=0.5",
        "--set", "pseudo.k=2", "--set", "pseudo.max_new_tokens=16", "--set", "pseudo.chunk=3",
        "--set", "finetune.min_steps=2", "--set", "finetune.max_steps=2",
        "--set", "finetune.batch_size=4", "--set", "max_new_tokens=4"]
TRAIN_FAST = ["--set", "train.min_steps=2", "--set", "train.max_steps=2",
              "--set", "train.batch_size=4", "--set", "max_new_tokens=4"]


def make_world(tmp_path_factory, arch: str) -> tuple[Path, Path]:
    """A data home with a small demo project, and a tiny random ``arch`` model folder."""
    root = tmp_path_factory.mktemp(arch)
    home, folder = root / "home", root / arch
    r = cli(home, "build-tiny", "--arch", arch, "--out", folder)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["model_type"] == arch
    r = cli(home, "demo", "--data-only", "--n-train", "8", "--n-test", "1")
    assert r.returncode == 0, r.stderr
    return home, folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, "idefics3")


def _run(home: Path, folder: Path, method: str, *extra: str) -> dict:
    r = cli(home, "run", "--project", "demo", "--method", method, "--label-fraction", "0.25",
            "--seed", "1", "--base-model", folder, *extra, "--json", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _db(home: Path) -> sqlite3.Connection:
    db = sqlite3.connect(home / "leaml.db")
    db.row_factory = sqlite3.Row
    return db


def test_pixel_values_are_one_row_per_image_and_views_of_an_image_move_together():
    from leaml.engine import models
    from leaml.engine.warmup import shifted
    from leaml.tiny.build import build_tiny_arch
    _, processor = build_tiny_arch("idefics3")
    images = [Image.new("RGB", (120, 80), (200, 10, 10)), Image.new("RGB", (64, 64), (0, 90, 9))]
    pv = models.pixel_values(processor, images)
    assert pv.shape == (2, 1, 3, 96, 96)  # not one sample of two images
    enc = models.encode(processor, images, ["What colour?"] * 2, ["red", "green"])
    assert torch.equal(pv, enc["pixel_values"])  # the cache feeds what the processor would
    views = torch.rand(4, 2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    out = shifted(views, 2, torch.Generator().manual_seed(0))
    flat = shifted(views.reshape(4, 6, 12, 12), 2, torch.Generator().manual_seed(0))
    assert out.shape == views.shape and torch.equal(out.reshape(4, 6, 12, 12), flat)
    assert not torch.equal(out, views)


def test_build_tiny_names_every_family_the_builder_knows():
    from leaml.cli.pretrain import _ARCHS
    from leaml.tiny.build import TINY_ARCHS
    assert set(_ARCHS) == set(TINY_ARCHS)


def leaml_runs_on(home: Path, folder: Path, model_type: str) -> tuple[sqlite3.Row, sqlite3.Row]:
    """``run --method leaml`` (with the vision warmup) on ``folder``: the run and its QA
    generator succeed on that family, the generator's samples are pending pairs, and both
    save a ``model_type`` folder. Returns the two runs rows."""
    out = _run(home, folder, "leaml", *FAST, "--set", "finetune.vision_warmup_epochs=2")
    assert out["method"] == "leaml" and out["n_test"] > 0 and 0.0 <= out["accuracy"] <= 100.0
    db = _db(home)
    run = db.execute("SELECT * FROM runs WHERE id = ?", (out["run_id"],)).fetchone()
    assert run["status"] == "succeeded" and run["base_model"] == str(folder)
    assert db.execute("SELECT count(*) FROM metrics WHERE run_id = ? AND scope = 'overall'",
                      (run["id"],)).fetchone()[0] == 1
    gen = db.execute("SELECT * FROM runs WHERE method = 'generator' AND base_model = ?",
                     (str(folder),)).fetchall()
    assert len(gen) == 1 and gen[0]["status"] == "succeeded"
    pending = db.execute("SELECT question, answer, confidence FROM qa WHERE origin = 'pseudo' "
                         "AND status = 'pending' AND gen_run_id = ?", (gen[0]["id"],)).fetchall()
    assert pending and all(0.0 < p["confidence"] <= 1.0 for p in pending)
    for model_dir in (run["model_dir"], gen[0]["model_dir"]):
        assert json.loads((home / model_dir / "config.json").read_text())["model_type"] == model_type
    return run, gen[0]


def test_the_whole_leaml_method_runs_on_idefics3(world):
    # the target is fully finetuned after the vision warmup, whose moves see 5-D pixel values
    leaml_runs_on(*world, "idefics3")


def _png_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_seed_lora_and_seed_full_train_evaluate_and_serve_on_idefics3(world):
    home, folder = world
    full = _run(home, folder, "seed-full", *TRAIN_FAST, "--set", "train.vision_warmup_epochs=2")
    lora = _run(home, folder, "seed-lora", *TRAIN_FAST)
    db = _db(home)
    for out in (full, lora):
        run = db.execute("SELECT * FROM runs WHERE id = ?", (out["run_id"],)).fetchone()
        assert run["status"] == "succeeded" and run["base_model"] == str(folder), dict(run)
        assert out["n_test"] > 0 and run["accuracy"] == pytest.approx(out["accuracy"])
    dirs = {out["method"]: home / db.execute("SELECT model_dir FROM runs WHERE id = ?",
                                             (out["run_id"],)).fetchone()[0] for out in (full, lora)}
    assert json.loads((dirs["seed-full"] / "config.json").read_text())["model_type"] == "idefics3"
    # LoRA adapters on the language model only, where the architecture registry says it lives
    targets = json.loads((dirs["seed-lora"] / "adapter_config.json").read_text())["target_modules"]
    targets = targets if isinstance(targets, list) else [targets]
    assert targets and all(t.startswith("model.text_model.") for t in targets), targets[:3]
    # serve the LoRA run: the server loads the Idefics3 base from the folder + the adapters
    served_answer(home, lora["run_id"])


def served_answer(home: Path, run_id: int) -> dict:
    """``leaml serve --run RUN_ID`` answers a chat request with an image: at most 4 tokens,
    each with its log-probability. Returns the response."""
    server = Server(home, "--project", "demo", "--run", str(run_id))
    try:
        body = {"model": f"run-{run_id}", "max_tokens": 4, "temperature": 0, "logprobs": True,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": _png_url()}},
                    {"type": "text", "text": "Describe the image."}]}]}
        req = urllib.request.Request(server.url + "/chat/completions",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
            answer = json.loads(resp.read())
    finally:
        server.stop()
    choice = answer["choices"][0]
    assert isinstance(choice["message"]["content"], str)
    tokens = choice["logprobs"]["content"]
    assert len(tokens) <= 4 and all(t["logprob"] <= 0.0 for t in tokens)
    assert answer["usage"]["completion_tokens"] == len(tokens)
    return answer
