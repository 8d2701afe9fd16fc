"""The bundled demo data set: synthetic endoscopy-like frames with Kvasir-VQA-style QA.

Every image is a `Scene` sampled from a generator seeded by (seed, split, index), so the set
regenerates byte-identically and independently of the order or the process that builds it.
The same scene object is drawn (leaml/data/demo/draw.py), asked about (`qa_pairs`) and described by
an imperfect teacher (`teacher_caption`), so the answers follow from the picture exactly.
`build_demo_files` writes `images/*.png` and a JSONL manifest for the importer (leaml/data/ingest.py).

    python -m leaml.data.demo.build OUT_DIR [--n-train N] [--n-test N] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leaml.data.demo.caption import Fact, teacher_caption  # noqa: F401  (re-exported)
from leaml.data.demo.draw import render
from leaml.data.demo.vocab import (ABNORMALITIES, CATEGORIES, CELLS, CORNERS, INSTRUMENTS,
                              LANDMARKS, POLYP_COLOURS, QUESTION_TYPES, QUESTIONS, SIZE_BINS,
                              SIZES, SPLITS, cell_of, join_sorted)

__all__ = ["DemoConfig", "Scene", "Finding", "Instrument", "Fact", "QUESTIONS", "QUESTION_TYPES",
           "build_demo_files", "sample_scene", "qa_pairs", "teacher_caption", "scene_rng"]


@dataclass
class DemoConfig:
    """How the demo set is generated; stored with the import so the set can be rebuilt."""

    n_train: int = field(default=3000, metadata={"help": "number of train images"})
    n_test: int = field(default=500, metadata={"help": "number of test images"})
    seed: int = field(default=0, metadata={"help": "seed; same seed -> byte-identical files"})
    min_size: int = field(default=64, metadata={"help": "smallest image side in px (>= 64)"})
    max_size: int = field(default=128, metadata={"help": "largest image side in px (<= 128)"})
    caption_error: float = field(default=0.10, metadata={
        "help": "probability that each fact in the teacher caption is dropped or wrong"})

    def __post_init__(self):
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError(f"DemoConfig: n_train={self.n_train}, n_test={self.n_test}; "
                             "both must be >= 0")
        if self.seed < 0:
            raise ValueError(f"DemoConfig: seed={self.seed}; use a seed >= 0")
        if not 64 <= self.min_size <= self.max_size <= 128:
            raise ValueError(f"DemoConfig: min_size={self.min_size}, max_size={self.max_size}; "
                             "need 64 <= min_size <= max_size <= 128")
        if not 0.0 <= self.caption_error <= 1.0:
            raise ValueError(f"DemoConfig: caption_error={self.caption_error}; "
                             "use a probability in [0, 1]")


@dataclass
class Finding:
    """One abnormality: centre (px), radius (px), colours (sorted answer words), polyp size."""

    kind: str
    x: float
    y: float
    r: float
    colours: tuple[str, ...]
    size: str | None = None


@dataclass
class Instrument:
    """One instrument: its working tip (x, y) and where its shaft enters the field of view."""

    kind: str
    x: float
    y: float
    entry_x: float
    entry_y: float


@dataclass
class Scene:
    """Everything that is in one frame; drawing, QA and caption all read only this."""

    split: str
    index: int
    category: str
    procedure: str
    width: int
    height: int
    fov_r: float                      # radius of the round field of view, px
    hue: float                        # mucosa colour, HSV (degrees, 0..1, 0..1)
    sat: float
    val: float
    folds: str                        # "rings" (colon), "waves" (stomach), "radial" (oesophagus)
    lumen: tuple[float, float]
    landmark: str | None = None
    landmark_xy: tuple[float, float] | None = None
    findings: list[Finding] = field(default_factory=list)
    instruments: list[Instrument] = field(default_factory=list)
    box: str | None = None            # corner of the green/black box artefact
    box_colour: str = "green"
    box_rect: tuple[int, int, int, int] | None = None
    text: str | None = None           # corner of the white text overlay
    text_lines: tuple[str, ...] = ()
    text_rect: tuple[int, int, int, int] | None = None

    @property
    def polyps(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "polyp"]

    def cell(self, x: float, y: float) -> str:
        return cell_of(x, y, self.width, self.height)


def scene_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, split, index, stream): 0 scene, 1 pixels, 2 caption."""
    return np.random.default_rng([seed, SPLITS.index(split), index, stream])


# ---------------------------------------------------------------- scene sampling

class _Placer:
    """Puts objects in distinct 3x3 cells, inside the field of view, clear of overlays."""

    def __init__(self, s: Scene):
        self.s, self.used, self.taken = s, set(), []
        self.avoid = [r for r in (s.box_rect, s.text_rect) if r]

    def _ok(self, x, y, r, spaced=True):
        s = self.s
        if math.hypot(x - s.width / 2, y - s.height / 2) + 0.5 * r > 0.9 * s.fov_r:
            return False
        if any(x + r > a and x - r < c and y + r > b and y - r < d for a, b, c, d in self.avoid):
            return False
        return not spaced or all(math.hypot(x - tx, y - ty) > r + tr + 2
                                 for tx, ty, tr in self.taken)

    def place(self, rng, r: float, crowd: bool = True) -> tuple[float, float] | None:
        """Centre of a new object of radius r (px), its cell then taken; with crowd=False,
        None where it does not fit beside the objects already placed."""
        w, h = self.s.width, self.s.height
        free = [c for c in range(9) if c not in self.used] or list(range(9))
        # within a cell, stay off its borders (so the answer is no coin toss) and lean towards
        # the middle of the frame (so corner cells fit inside the round field of view)
        span = ((0.4, 0.82), (0.2, 0.8), (0.18, 0.6))
        # crowded small frame: rather touch another object than hide under an overlay
        for spaced, cells in ((True, free), (False, free), (False, range(9)))[:3 if crowd else 1]:
            for _ in range(8):
                c = int(rng.choice(cells))
                for _ in range(10):
                    x = (c % 3 + rng.uniform(*span[c % 3])) * w / 3
                    y = (c // 3 + rng.uniform(*span[c // 3])) * h / 3
                    if self._ok(x, y, r, spaced):
                        return self._take(x, y, r)
        return self._take(w / 2, h / 2, r) if crowd else None

    def _take(self, x, y, r) -> tuple[float, float]:
        self.used.add(CELLS.index(cell_of(x, y, self.s.width, self.s.height)))
        self.taken.append((x, y, r))
        return float(x), float(y)


def _frame(rng, cfg: DemoConfig) -> tuple[int, int, float]:
    w = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    h = int(np.clip(round(w * rng.uniform(0.8, 1.0)), cfg.min_size, cfg.max_size))
    return w, h, float(min(w, h) / 2 * rng.uniform(1.0, 1.12))


def _overlays(rng, s: Scene) -> None:
    w, h = s.width, s.height
    rects = {"upper-left": lambda bw, bh: (0, 0, bw, bh),
             "upper-right": lambda bw, bh: (w - bw, 0, w, bh),
             "lower-left": lambda bw, bh: (0, h - bh, bw, h),
             "lower-right": lambda bw, bh: (w - bw, h - bh, w, h)}
    corners = list(CORNERS)
    if rng.random() < (0.35 if s.procedure == "colonoscopy" else 0.1):
        # the real scope guide sits lower-left; keep that the most common corner
        s.box = corners[int(rng.choice(4, p=[0.1, 0.1, 0.7, 0.1]))]
        corners.remove(s.box)
        s.box_colour = "green" if rng.random() < 0.75 else "black"
        side = int(round(min(w, h) * rng.uniform(0.22, 0.3)))
        s.box_rect = rects[s.box](side, side)
    if rng.random() < 0.3:
        s.text = corners[int(rng.integers(len(corners)))]
        s.text_lines = (f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}",
                        f"ID{int(rng.integers(100, 1000))}")[: int(rng.integers(1, 3))]
        tw, th = int(min(w, h) * 0.36), int(min(w, h) * 0.11) * len(s.text_lines) + 2
        s.text_rect = rects[s.text](tw, th)


def _polyp(rng, placer: _Placer, side: int, size: str) -> Finding:
    while True:  # a polyp that does not fit a crowded small frame comes out a size smaller
        r = side * rng.uniform(*SIZE_BINS[size])
        xy = placer.place(rng, r, crowd=size == SIZES[0])
        if xy:
            break
        size = SIZES[SIZES.index(size) - 1]
    colour = POLYP_COLOURS[int(rng.integers(len(POLYP_COLOURS)))]
    return Finding("polyp", *xy, r, (colour,), size)


def _polyps(rng, placer: _Placer, side: int, n: int) -> list[Finding]:
    # place the largest first: it needs the most room
    sizes = sorted((SIZES[int(rng.integers(4))] for _ in range(n)), key=SIZES.index, reverse=True)
    return [_polyp(rng, placer, side, z) for z in sizes]


def _instruments(rng, s: Scene, placer: _Placer, side: int) -> list[Instrument]:
    n = 1 if rng.random() < 0.8 else 2
    kinds = [INSTRUMENTS[int(i)] for i in rng.choice(len(INSTRUMENTS), n, replace=False)]
    out = []
    for kind in kinds:
        x, y = placer.place(rng, side * 0.09)
        ex, ey = _entry(rng, s, x, y, side)
        out.append(Instrument(kind, x, y, ex, ey))
        placer.taken.append(((x + ex) / 2, (y + ey) / 2, side * 0.03))  # keep off the shaft
    return out


def _seg_dist(px, py, ax, ay, bx, by) -> float:
    dx, dy = bx - ax, by - ay
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    return math.hypot(px - ax - t * dx, py - ay - t * dy)


def _entry(rng, s: Scene, x, y, side) -> tuple[float, float]:
    """Where the shaft enters the frame: on the rim, its path clear of findings and overlays."""
    cx, cy, best = s.width / 2, s.height / 2, None
    for k in range(24):
        # the working channel sits low on the scope: prefer the lower half of the rim
        a = rng.uniform(-0.2, math.pi + 0.2) if k < 12 else rng.uniform(0.0, 2 * math.pi)
        ex, ey = cx + s.fov_r * math.cos(a), cy + s.fov_r * math.sin(a)
        clear = min([_seg_dist(f.x, f.y, ex, ey, x, y) - f.r for f in s.findings] + [side])
        if best is None or clear > best[0]:
            best = (clear, ex, ey)
        if clear > side * 0.06:
            break
    return float(best[1]), float(best[2])


def _contents(rng, s: Scene, placer: _Placer) -> None:
    side = min(s.width, s.height)
    if s.category == "normal":
        s.landmark_xy = placer.place(rng, side * 0.15)
        if s.landmark in ("z-line", "pylorus"):
            s.lumen = s.landmark_xy
    elif s.category == "polyp":
        s.findings = _polyps(rng, placer, side, int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2])))
    elif s.category in ("esophagitis", "ulcerative colitis"):
        r = side * rng.uniform(0.12, 0.2)
        x, y = placer.place(rng, r)
        white = bool(rng.random() < 0.5)
        s.findings = [Finding(s.category, x, y, r, ("red", "white") if white else ("red",))]
        if s.category == "esophagitis":  # erosions radiate from the oesophageal lumen
            cx, cy = s.width / 2, s.height / 2
            s.lumen = (cx + (x - cx) * 0.2, cy + (y - cy) * 0.2)
    else:  # instrument, beside a polyp a third of the time
        if rng.random() < 0.35:
            s.findings = _polyps(rng, placer, side, 1)
        s.instruments = _instruments(rng, s, placer, side)


_PROCEDURE = {"polyp": "colonoscopy", "esophagitis": "gastroscopy",
              "ulcerative colitis": "colonoscopy", "instrument": "colonoscopy",
              "z-line": "gastroscopy", "pylorus": "gastroscopy", "cecum": "colonoscopy"}


def sample_scene(cfg: DemoConfig, split: str, index: int) -> Scene:
    """Sample the scene of image `index` of `split`: a pure function of (cfg, split, index)."""
    rng = scene_rng(cfg.seed, split, index, 0)
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    landmark = LANDMARKS[int(rng.integers(3))] if category == "normal" else None
    procedure = _PROCEDURE[landmark or category]
    w, h, fov_r = _frame(rng, cfg)
    gastro = procedure == "gastroscopy"
    hue = rng.uniform(8, 24) if gastro else rng.uniform(-10, 6)
    if category == "ulcerative colitis":
        hue = rng.uniform(-6, 2)
    folds = ("radial" if category == "esophagitis" or landmark == "z-line"
             else "waves" if gastro else "rings")
    lumen = (w / 2 + rng.uniform(-0.5, 0.5) * fov_r, h / 2 + rng.uniform(-0.5, 0.5) * fov_r)
    s = Scene(split, index, category, procedure, w, h, fov_r, float(hue % 360),
              rng.uniform(0.38, 0.6) + (0.15 if category == "ulcerative colitis" else 0.0),
              rng.uniform(0.72, 0.92), folds, lumen, landmark=landmark)
    _overlays(rng, s)
    _contents(rng, s, _Placer(s))
    return s


# ---------------------------------------------------------------- QA from the scene

def scene_answers(s: Scene) -> dict[str, str]:
    """The answer to every question that makes sense for this scene (question -> answer)."""
    abn = sorted({f.kind for f in s.findings})
    a = {QUESTIONS[0]: s.procedure,
         QUESTIONS[1]: join_sorted(abn),
         QUESTIONS[2]: s.landmark or "none",
         QUESTIONS[3]: join_sorted(i.kind for i in s.instruments),
         QUESTIONS[4]: "yes" if s.findings else "no",
         QUESTIONS[5]: str(len(s.findings)),
         QUESTIONS[6]: str(len(s.polyps)),
         QUESTIONS[7]: str(len(s.instruments))}
    if s.findings:
        a[QUESTIONS[8]] = join_sorted(c for f in s.findings for c in f.colours)
        a[QUESTIONS[9]] = join_sorted(s.cell(f.x, f.y) for f in s.findings)
    if s.polyps:
        a[QUESTIONS[10]] = max((f.size for f in s.polyps), key=SIZES.index)
    if s.landmark:
        a[QUESTIONS[11]] = s.cell(*s.landmark_xy)
    if s.instruments:
        a[QUESTIONS[12]] = join_sorted(s.cell(i.x, i.y) for i in s.instruments)
    a[QUESTIONS[13]] = "yes" if s.box else "no"
    a[QUESTIONS[14]] = "yes" if s.text else "no"
    return a


def qa_pairs(s: Scene) -> list[tuple[str, str, str]]:
    """(question, answer, question_type) for every question that makes sense, in QUESTIONS order."""
    return [(q, a, QUESTION_TYPES[q]) for q, a in scene_answers(s).items()]


# ---------------------------------------------------------------- files

def scene_image(cfg: DemoConfig, split: str, index: int):
    """Scene ``index`` of ``split`` and its picture, as the demo set draws them."""
    scene = sample_scene(cfg, split, index)
    return scene, render(scene, scene_rng(cfg.seed, split, index, 1))


def _make_image(cfg: DemoConfig, split: str, index: int, img_dir: Path) -> list[dict]:
    scene, image = scene_image(cfg, split, index)
    name = f"{split}_{index:05d}.png"
    image.save(img_dir / name, format="PNG", optimize=False, compress_level=6)
    caption, _ = teacher_caption(scene, scene_rng(cfg.seed, split, index, 2), cfg.caption_error)
    return [{"image": f"images/{name}", "question": q, "answer": a, "split": split,
             "category": scene.category, "question_type": t, "caption": caption}
            for q, a, t in qa_pairs(scene)]


_OURS = re.compile(r"(train|test)_\d{5}\.png")


def build_demo_files(out_dir: Path, cfg: DemoConfig = DemoConfig(), progress=None) -> Path:
    """Write out_dir/images/*.png and out_dir/manifest.jsonl; return the manifest path.

    The files are a pure function of `cfg` (byte-identical on rebuild). Images left from an
    earlier, larger build in the same folder are removed; other files are left alone.
    `progress`, if given, is called as progress(done, total) after each image.
    """
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    todo = [(sp, i) for sp, n in (("train", cfg.n_train), ("test", cfg.n_test)) for i in range(n)]
    rows: list[dict] = []
    for done, (split, index) in enumerate(todo, 1):
        rows.extend(_make_image(cfg, split, index, img_dir))
        if progress is not None:
            progress(done, len(todo))
    keep = {f"{sp}_{i:05d}.png" for sp, i in todo}
    for p in img_dir.iterdir():
        if _OURS.fullmatch(p.name) and p.name not in keep:
            p.unlink()
    manifest = out_dir / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m leaml.data.demo.build", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path, help="folder to write images/ and manifest.jsonl into")
    ap.add_argument("--n-train", type=int, default=DemoConfig.n_train)
    ap.add_argument("--n-test", type=int, default=DemoConfig.n_test)
    ap.add_argument("--seed", type=int, default=DemoConfig.seed)
    ap.add_argument("--caption-error", type=float, default=DemoConfig.caption_error)
    args = ap.parse_args(argv)
    try:
        cfg = DemoConfig(n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                         caption_error=args.caption_error)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    path = build_demo_files(args.out_dir, cfg)
    n = cfg.n_train + cfg.n_test
    print(f"wrote {n} images to {path} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
