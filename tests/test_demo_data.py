"""The bundled demo data set (leaml/data/demo/build.py): determinism, manifest format, answers that follow
from the drawn scene, and the teacher captions' error rate."""
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leaml.data.demo.build import (DemoConfig, QUESTION_TYPES, QUESTIONS, build_demo_files, main,
                        qa_pairs, sample_scene, scene_rng, teacher_caption)
from leaml.data.demo.caption import scene_facts
from leaml.data.demo.draw import render
from leaml.data.demo.vocab import (ABNORMALITIES, CATEGORIES, CELLS, COLOURS, INSTRUMENTS, LANDMARKS,
                              SIZE_BINS)

SMALL = DemoConfig(n_train=40, n_test=10)
COLUMNS = ["image", "question", "answer", "split", "category", "question_type", "caption"]


def folder_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def read_rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, read_rows(build_demo_files(out, SMALL))


def by_image(rows):
    out = {}
    for r in rows:
        out.setdefault(r["image"], []).append(r)
    return out


def test_same_seed_regenerates_byte_identical_files(small_build, tmp_path):
    out, _ = small_build
    assert folder_hash(build_demo_files(tmp_path / "again", SMALL).parent) == folder_hash(out)
    other = DemoConfig(n_train=40, n_test=10, seed=1)
    assert folder_hash(build_demo_files(tmp_path / "other", other).parent) != folder_hash(out)


def test_image_does_not_depend_on_set_size(small_build, tmp_path):
    out, _ = small_build
    build_demo_files(tmp_path, DemoConfig(n_train=5, n_test=2))
    for name in ("train_00000.png", "train_00004.png", "test_00001.png"):
        assert (tmp_path / "images" / name).read_bytes() == (out / "images" / name).read_bytes()


def test_images_are_rgb_png_64_to_128(small_build):
    out, rows = small_build
    files = sorted((out / "images").iterdir())
    assert len(files) == 50 == len(by_image(rows))
    for p in files:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert 64 <= im.width <= 128 and 64 <= im.height <= 128
            assert not im.info.get("dpi") and "tIME" not in im.info  # no metadata


def test_manifest_rows_have_the_columns_and_vocabulary(small_build):
    out, rows = small_build
    qtypes = {"yes/no", "choice", "colour", "location", "count", "size"}
    for n, r in enumerate(rows, 1):
        assert list(r) == COLUMNS, f"row {n}"
        assert all(isinstance(v, str) and v.strip() for v in r.values()), f"row {n}: {r}"
        assert re.fullmatch(r"images/(train|test)_\d{5}\.png", r["image"]), r["image"]
        assert (out / r["image"]).is_file()
        assert r["split"] == r["image"][7:].split("_")[0]
        assert r["category"] in CATEGORIES and r["question_type"] in qtypes
        assert QUESTION_TYPES[r["question"]] == r["question_type"]
    for image, group in by_image(rows).items():
        assert len({(r["category"], r["caption"]) for r in group}) == 1, image
        assert 10 <= len(group) <= 15, image
    assert Counter(r["split"] for r in rows[::1]).keys() == {"train", "test"}


def test_questions_are_kvasir_vqa_wording():
    assert len(QUESTIONS) >= 10 and set(QUESTIONS) == set(QUESTION_TYPES)
    # the real data set's typo is kept on purpose (see leaml/data/demo/vocab.py)
    assert "How many instrumnets are in the image?" in QUESTIONS


def _multi(answer: str, vocab) -> list[str]:
    words = answer.split(", ")
    assert words == sorted(set(words)) and set(words) <= set(vocab), answer
    return words


def check_answers(scene, answers: dict[str, str]) -> None:
    """Each answer against the scene object the picture was drawn from."""
    q = QUESTIONS
    assert answers[q[0]] in ("colonoscopy", "gastroscopy")
    abn = answers[q[1]]
    assert abn == ("none" if not scene.findings else ", ".join(_multi(abn, ABNORMALITIES)))
    assert int(answers[q[6]]) == len(scene.polyps)
    assert int(answers[q[7]]) == len(scene.instruments)
    assert int(answers[q[5]]) == len(scene.findings)
    assert answers[q[4]] == ("yes" if scene.findings else "no")
    if scene.category == "polyp":
        assert "polyp" in abn and 1 <= len(scene.polyps) <= 3
        assert answers[q[0]] == "colonoscopy"
    if scene.category in ("esophagitis", "ulcerative colitis"):
        assert abn == scene.category
    if scene.category == "normal":
        assert answers[q[2]] in LANDMARKS and abn == "none"
        assert answers[q[0]] == ("colonoscopy" if answers[q[2]] == "cecum" else "gastroscopy")
    else:
        assert answers[q[2]] == "none"
    if scene.category == "instrument":
        assert 1 <= len(_multi(answers[q[3]], INSTRUMENTS)) <= 2
    else:
        assert answers[q[3]] == "none"
    if scene.polyps:
        size = answers[q[10]]
        lo, hi = SIZE_BINS[size]
        side = min(scene.width, scene.height)
        assert lo <= max(f.r for f in scene.polyps) / side <= hi
    for k in (8, 9, 11, 12):
        if q[k] in answers:
            _multi(answers[q[k]], COLOURS if k == 8 else CELLS)
    if scene.findings:
        assert len(_multi(answers[q[9]], CELLS)) == len(scene.findings)  # one cell each


def test_answers_follow_from_the_scene(small_build):
    _, rows = small_build
    for image, group in by_image(rows).items():
        split, index = re.fullmatch(r"images/(\w+)_(\d+)\.png", image).groups()
        scene = sample_scene(SMALL, split, int(index))
        answers = {r["question"]: r["answer"] for r in group}
        assert answers == {q: a for q, a, _ in qa_pairs(scene)}
        assert scene.category == group[0]["category"]
        check_answers(scene, answers)


def test_answers_follow_from_the_scene_many():
    cfg = DemoConfig(seed=3)
    for i in range(600):
        scene = sample_scene(cfg, "train", i)
        check_answers(scene, {q: a for q, a, _ in qa_pairs(scene)})


def _disk_mean(im: np.ndarray, x, y, r) -> np.ndarray:
    yy, xx = np.mgrid[0:im.shape[0], 0:im.shape[1]] + 0.5
    return im[(xx - x) ** 2 + (yy - y) ** 2 <= r * r].mean(axis=0)


def test_drawn_pixels_show_the_scene():
    """Polyp colours and the box artefact are where the scene says, as the answers claim."""
    cfg, seen = DemoConfig(seed=5), Counter()
    for i in range(250):
        s = sample_scene(cfg, "test", i)
        im = np.asarray(render(s, scene_rng(cfg.seed, "test", i, 1)), dtype=np.float32)
        for f in s.polyps:
            r, g, b = _disk_mean(im, f.x + 0.2 * f.r, f.y + 0.2 * f.r, max(1.0, 0.3 * f.r))
            colour = "red" if g < 0.35 * r else "yellow" if b < 0.8 * g else "pink"
            assert colour == f.colours[0], (i, f, (r, g, b))
            seen[colour] += 1
        if s.box:
            x0, y0, x1, y1 = s.box_rect
            r, g, b = im[y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(-1, 3).mean(axis=0)
            assert (g > 1.5 * r) if s.box_colour == "green" else max(r, g, b) < 40, i
            seen["box"] += 1
    assert min(seen[c] for c in ("red", "pink", "yellow", "box")) > 5, seen


def test_categories_balanced_and_all_present(tmp_path):
    rows = read_rows(build_demo_files(tmp_path, DemoConfig(n_train=100, n_test=20)))
    assert {r["category"] for r in rows} == set(CATEGORIES)
    counts = Counter(sample_scene(DemoConfig(), "train", i).category for i in range(1000))
    assert all(130 <= counts[c] <= 270 for c in CATEGORIES), counts


def test_caption_error_rate_is_near_the_config():
    for p in (0.0, 0.1, 0.3):
        facts = []
        for i in range(800):
            s = sample_scene(DemoConfig(), "train", i)
            facts += teacher_caption(s, scene_rng(0, "train", i, 2), p)[1]
        rate = sum(f.error for f in facts) / len(facts)
        assert rate == pytest.approx(p, abs=0.02 if p else 0.0), (p, rate, len(facts))
        if p:
            dropped = sum(f.shown is None for f in facts) / len(facts)
            assert dropped == pytest.approx(p / 2, abs=0.02)


def _mentions(caption: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}s?(?![\w-])", caption, re.I) is not None


def test_error_free_caption_mentions_the_true_facts():
    numbers = {"2": "two", "3": "three"}
    for i in range(400):
        s = sample_scene(DemoConfig(), "train", i)
        caption, facts = teacher_caption(s, scene_rng(0, "train", i, 2), 0.0)
        assert all(not f.error for f in facts)
        for name, value in scene_facts(s).items():
            if name == "polyp_count":
                value = numbers.get(value, "a")
            for word in value.split(", "):
                assert _mentions(caption, word), (caption, name, value)


def test_caption_is_fluent_and_varied():
    caps = [teacher_caption(sample_scene(DemoConfig(), "train", i), scene_rng(0, "train", i, 2),
                            0.1)[0] for i in range(200)]
    assert all(c[0].isupper() and c.endswith(".") and "  " not in c for c in caps)
    assert len({c.split()[0] for c in caps}) >= 4  # several opening templates


def test_progress_and_stale_images(tmp_path):
    calls = []
    build_demo_files(tmp_path, DemoConfig(n_train=6, n_test=2),
                     progress=lambda d, t: calls.append((d, t)))
    assert calls == [(k, 8) for k in range(1, 9)]
    (tmp_path / "images" / "notes.txt").write_text("keep me")
    rows = read_rows(build_demo_files(tmp_path, DemoConfig(n_train=3, n_test=1)))
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == ["notes.txt", "test_00000.png"] + [f"train_0000{k}.png" for k in range(3)]
    assert {r["image"] for r in rows} == {f"images/{n}" for n in names if n.endswith(".png")}


@pytest.mark.parametrize("bad", [{"min_size": 32}, {"max_size": 200},
                                 {"min_size": 100, "max_size": 90},
                                 {"caption_error": 1.5}, {"n_train": -1}, {"seed": -2}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DemoConfig(**bad)


def test_config_fields_have_help():
    from dataclasses import fields
    assert all(f.metadata.get("help") for f in fields(DemoConfig))


def test_module_cli(tmp_path, capsys):
    assert main([str(tmp_path), "--n-train", "3", "--n-test", "1", "--seed", "7"]) == 0
    assert len(read_rows(tmp_path / "manifest.jsonl")) >= 40
    assert "wrote 4 images" in capsys.readouterr().out
    assert main([str(tmp_path), "--n-train", "-3"]) == 2
    assert "n_train" in capsys.readouterr().err


def test_findings_are_visible_not_hidden_or_overlapping():
    """Regression: large esophagitis/colitis patches were placed with a smaller radius than
    drawn, so a box or text overlay could cover them."""
    for size in (64, 128):
        cfg = DemoConfig(min_size=size, max_size=size, seed=11)
        for i in range(500):
            s = sample_scene(cfg, "train", i)
            fs = s.findings
            for a, f in enumerate(fs):
                assert np.hypot(f.x - s.width / 2, f.y - s.height / 2) < s.fov_r, (size, i)
                for rect in filter(None, (s.box_rect, s.text_rect)):
                    x0, y0, x1, y1 = rect
                    assert not (f.x + f.r > x0 and f.x - f.r < x1 and f.y + f.r > y0
                                and f.y - f.r < y1), (size, i, f, rect)
                for g in fs[a + 1:]:
                    assert np.hypot(f.x - g.x, f.y - g.y) > f.r + g.r, (size, i)
