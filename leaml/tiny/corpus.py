"""The general-domain synthetic corpus the tiny base model is pretrained on.

CLEVR-like 2D scenes: 1-5 objects (shape, colour, size, texture), each in its own cell of a
3x3 grid, on a varied background. Every scene comes with a caption, dense per-cell labels
(for pretraining the vision tower) and every question that can be asked about it without
ambiguity. Nothing here is endoscopic: the point is general visual skills (colour, shape,
counting, 3x3 location, size bins, yes/no, lists) that later finetuning can reuse.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ["circle", "square", "triangle", "star"]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230),
          "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
SIZES = ["small", "large"]
TEXTURES = ["solid", "striped", "outlined"]
POSITIONS = ["upper-left", "upper-center", "upper-right", "center-left", "center",
             "center-right", "lower-left", "lower-center", "lower-right"]
BACKGROUNDS = {"gray": (128, 128, 128), "black": (20, 20, 20), "white": (235, 235, 235),
               "brown": (110, 80, 55)}
BG_STYLES = ["plain", "gradient", "noisy"]

DESCRIBE = "Describe the image."
GENERATE_QA = "Generate a question about this image and answer it."


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    texture: str
    cell: int  # 0..8, row-major in the 3x3 grid

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.texture} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    bg_style: str
    seed: int


def random_scene(rng: random.Random, max_objects: int = 5) -> Scene:
    """Draw a scene description: 1..max_objects objects in distinct grid cells."""
    n = rng.randint(1, max_objects)
    cells = rng.sample(range(9), n)
    objs = tuple(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES),
                     rng.choice(TEXTURES), c) for c in sorted(cells))
    return Scene(objs, rng.choice(list(BACKGROUNDS)), rng.choice(BG_STYLES), rng.randrange(2**31))


# --- rendering ---------------------------------------------------------------------------

def _background(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    base = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (size, size), base)
    if scene.bg_style == "gradient":
        d = ImageDraw.Draw(img)
        for y in range(size):
            f = 0.75 + 0.5 * y / size
            d.line([(0, y), (size, y)], fill=tuple(min(255, int(c * f + 10)) for c in base))
    elif scene.bg_style == "noisy":
        gauss = np.random.default_rng(rng.randrange(2**32)).normal(128, 40, (size, size))
        noise = Image.fromarray(gauss.clip(0, 255).astype(np.uint8)).convert("RGB")
        img = Image.blend(img, noise, 0.18)  # seeded: PIL's effect_noise is not
    return img


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * 1.0, y * 1.0) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    else:  # star: 5 points, inner radius 0.45
        pts = [((1 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _draw_object(img: Image.Image, o: Obj, scale: float, rng: random.Random) -> None:
    cell = img.size[0] / 3
    r = (0.45 if o.size == "large" else 0.3) * cell
    slack = cell / 2 - r - 1
    cx = (o.cell % 3 + 0.5) * cell + rng.uniform(-slack, slack)
    cy = (o.cell // 3 + 0.5) * cell + rng.uniform(-slack, slack)
    rot = rng.uniform(-0.25, 0.25)
    color = tuple(max(0, min(255, int(c + rng.uniform(-20, 20)))) for c in COLORS[o.color])
    mask = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(mask)
    w = max(2, int(2.5 * scale))
    fill, outline = (0, 255) if o.texture == "outlined" else (255, 255)
    if o.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=w)
    else:
        d.polygon(_polygon(o.shape, cx, cy, r, rot), fill=fill, outline=outline, width=w)
    if o.texture == "striped":  # cut horizontal gaps out of the filled shape
        stripe = ImageDraw.Draw(mask)
        period = max(4, int(3 * scale))
        for y in range(int(cy - r) + period // 2, int(cy + r), period):
            stripe.rectangle([cx - r - 1, y, cx + r + 1, y + period // 2 - 1], fill=0)
    img.paste(Image.new("RGB", img.size, color), (0, 0), mask)


def render(scene: Scene, size: int = 96, supersample: int = 2) -> Image.Image:
    """Draw a scene at size x size pixels (drawn larger, then downsampled for smooth edges)."""
    rng = random.Random(scene.seed)
    big = size * supersample
    img = _background(scene, big, rng)
    for o in scene.objects:
        _draw_object(img, o, supersample, rng)
    return img.resize((size, size), Image.LANCZOS).filter(ImageFilter.SMOOTH_MORE) \
        if supersample > 1 else img


# --- text: captions and questions --------------------------------------------------------

def _join(words: list[str]) -> str:
    return ", ".join(words)


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """One sentence naming every object with all its attributes and place, plus the background."""
    parts = [f"{o.phrase()} in the {o.position}" for o in scene.objects]
    n = len(scene.objects)
    head = f"{n} object{'s' if n > 1 else ''} on a {scene.background} background: "
    return head + "; ".join(parts) + "."


def _unique_ref(scene: Scene, o: Obj) -> str | None:
    """The shortest description that picks out exactly this object, or None."""
    options = [(o.shape,), (o.color,), (o.color, o.shape), (o.size, o.shape),
               (o.texture, o.shape), (o.size, o.color, o.shape)]
    for words in options:
        match = [p for p in scene.objects
                 if all(w in (p.shape, p.color, p.size, p.texture) for w in words)]
        if len(match) == 1:
            noun = "" if words[-1] in SHAPES else " object"
            return "the " + " ".join(words) + noun
    return None


def _attribute_qa(scene: Scene) -> list[tuple[str, str, str]]:
    qa = []
    for o in scene.objects:
        ref = _unique_ref(scene, o)
        if ref is None:
            continue
        if o.color not in ref:
            qa.append(("color", f"What color is {ref}?", o.color))
        if o.shape not in ref:
            qa.append(("shape", f"What shape is {ref}?", o.shape))
        if o.size not in ref:
            qa.append(("size", f"Is {ref} small or large?", o.size))
        if o.texture not in ref:
            qa.append(("texture", f"What texture does {ref} have?", o.texture))
        qa.append(("position", f"Where is {ref}?", o.position))
    return qa


def _count_qa(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    objs = scene.objects
    qa = [("count", "How many objects are there?", str(len(objs)))]
    shape = rng.choice(SHAPES)
    qa.append(("count", f"How many {shape}s are there?", str(sum(o.shape == shape for o in objs))))
    color = rng.choice(list(COLORS))
    qa.append(("count", f"How many {color} objects are there?",
               str(sum(o.color == color for o in objs))))
    return qa


def _yesno_qa(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    objs = scene.objects
    o = rng.choice(objs)
    # half the time ask about a present object, half about a random (probably absent) one
    shape, color = (o.shape, o.color) if rng.random() < 0.5 else \
        (rng.choice(SHAPES), rng.choice(list(COLORS)))
    present = any(p.shape == shape and p.color == color for p in objs)
    pos = rng.randrange(9)
    shape2 = rng.choice([o.shape, rng.choice(SHAPES)])
    at = any(p.cell == pos and p.shape == shape2 for p in objs)
    return [("yes/no", f"Is there a {color} {shape}?", "yes" if present else "no"),
            ("yes/no", f"Is there a {shape2} in the {POSITIONS[pos]}?", "yes" if at else "no")]


def _list_qa(scene: Scene) -> list[tuple[str, str, str]]:
    shapes = [s for s in SHAPES if any(o.shape == s for o in scene.objects)]
    colors = [c for c in COLORS if any(o.color == c for o in scene.objects)]
    return [("list", "Which shapes are in the image?", _join(shapes)),
            ("list", "Which colors are in the image?", _join(colors)),
            ("background", "What color is the background?", scene.background)]


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question_type, question, answer) for this scene; every answer is unambiguous."""
    return _attribute_qa(scene) + _count_qa(scene, rng) + _yesno_qa(scene, rng) + _list_qa(scene)


QUESTION_TYPES = ["color", "shape", "size", "texture", "position", "count", "yes/no", "list",
                  "background"]


def cell_labels(scene: Scene) -> dict[str, list[int]]:
    """Per grid cell class ids (0 = empty) for shape, colour, size, texture: vision pretraining."""
    out = {k: [0] * 9 for k in ("shape", "color", "size", "texture")}
    for o in scene.objects:
        out["shape"][o.cell] = SHAPES.index(o.shape) + 1
        out["color"][o.cell] = list(COLORS).index(o.color) + 1
        out["size"][o.cell] = SIZES.index(o.size) + 1
        out["texture"][o.cell] = TEXTURES.index(o.texture) + 1
    out["background"] = [list(BACKGROUNDS).index(scene.background)]
    return out


GENERAL_WORDS = """the a an of and or in on at to is are was were be this that there these those
what which who where when why how many much image picture photo shows show object objects
color colour shape size texture position left right upper lower center top bottom middle
yes no none zero one two three four five six seven eight nine ten number count small large
medium big tiny round flat smooth rough bright dark light red green blue yellow purple orange
pink white black gray grey brown cyan violet circle square triangle star rectangle oval line
dot spot region area part side corner edge surface tissue wall lumen fold vessel mucosa lesion
polyp ulcer bleeding inflammation instrument tool tube clip needle forceps procedure exam view
camera lens light text overlay artefact artifact mark marker box green-box normal abnormal
finding findings landmark cecum pylorus z-line esophagus stomach colon rectum intestine size
mm cm 5-10mm 11-20mm >20mm <5mm describe generate question answer about it its with without
has have does do can could not visible present absent seen any some all both each other
""".split()


def tokenizer_texts(n_scenes: int = 3000, seed: int = 0) -> list[str]:
    """Text the byte-level BPE tokenizer is trained on: corpus captions/QA + general words."""
    rng = random.Random(seed)
    texts = [" ".join(GENERAL_WORDS), DESCRIBE, GENERATE_QA]
    for _ in range(n_scenes):
        s = random_scene(rng)
        texts.append(caption(s))
        texts += [f"Question: {q}\nAnswer: {a}" for _, q, a in questions(s, rng)]
    texts += [" ".join(rng.sample(GENERAL_WORDS, 12)) for _ in range(500)]
    return texts
