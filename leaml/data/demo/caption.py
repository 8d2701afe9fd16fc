"""Teacher captions for the demo set: what a strong but imperfect captioning model would say.

A caption is built from the scene's facts (the same values the QA answers hold); each fact is,
with probability `error`, dropped (half the time) or swapped for a plausible wrong value.
"""
from __future__ import annotations

from dataclasses import dataclass

from leaml.data.demo.vocab import (ABNORMALITIES, CELLS, COLOURS, CORNERS, INSTRUMENTS, LANDMARKS,
                              PROCEDURES, SIZES, join_sorted)

_NUM = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass
class Fact:
    """One fact of a caption: its true value and what the teacher said (None: left out)."""

    name: str
    true: str
    shown: str | None

    @property
    def error(self) -> bool:
        return self.shown != self.true


def scene_facts(s) -> dict[str, str]:
    """The caption-worthy facts of a scene (name -> true value), in caption order."""
    f = {"procedure": s.procedure}
    if s.landmark:
        f["landmark"] = s.landmark
        f["landmark_location"] = s.cell(*s.landmark_xy)
    if s.findings:
        f["abnormality"] = join_sorted(x.kind for x in s.findings)
        f["abnormality_colour"] = join_sorted(c for x in s.findings for c in x.colours)
        f["abnormality_location"] = join_sorted(s.cell(x.x, x.y) for x in s.findings)
    if s.polyps:
        f["polyp_count"] = str(len(s.polyps))
        f["polyp_size"] = max((x.size for x in s.polyps), key=SIZES.index)
    if s.instruments:
        f["instruments"] = join_sorted(i.kind for i in s.instruments)
        f["instrument_location"] = join_sorted(s.cell(i.x, i.y) for i in s.instruments)
    if s.box:
        f["box"] = s.box
    if s.text:
        f["text"] = s.text
    return f


def _other(rng, pool, value):
    return str(rng.choice([p for p in pool if p != value]))


def _swap_one(rng, value: str, pool) -> str:
    """A set answer with one member replaced by a word it does not hold yet."""
    items = value.split(", ")
    spare = [p for p in pool if p not in items]
    items[int(rng.integers(len(items)))] = str(rng.choice(spare))
    return join_sorted(items)


def _wrong(rng, name: str, value: str) -> str:
    if name.endswith("location"):
        return _swap_one(rng, value, CELLS)
    if name == "polyp_count":
        n = int(value)
        return str(n + 1 if n == 1 or rng.random() < 0.5 else n - 1)
    if name == "polyp_size":
        i = SIZES.index(value)
        return SIZES[i + 1 if i == 0 or (i < 3 and rng.random() < 0.5) else i - 1]
    pools = {"procedure": PROCEDURES, "landmark": LANDMARKS, "abnormality": ABNORMALITIES,
             "abnormality_colour": COLOURS, "instruments": INSTRUMENTS,
             "box": CORNERS, "text": CORNERS}
    if name in ("abnormality_colour", "instruments"):
        return _swap_one(rng, value, pools[name])
    return _other(rng, pools[name], value)


def noisy_facts(s, rng, error: float) -> list[Fact]:
    """The scene's facts as the teacher reports them: each dropped/wrong with prob. `error`."""
    out = []
    for name, true in scene_facts(s).items():
        shown = true
        if rng.random() < error:
            shown = None if rng.random() < 0.5 else _wrong(rng, name, true)
        out.append(Fact(name, true, shown))
    return out


def _and(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _where(loc: str | None) -> str:
    return f" in the {_and(loc.split(', '))}" if loc else ""


def _lesion(f: dict, s) -> str:
    """Noun phrase of the abnormality: count, colour, kind, place, size as the teacher saw them."""
    kind, colour = f.get("abnormality"), f.get("abnormality_colour")
    colour = (_and(colour.split(", ")) + " ") if colour else ""
    if s.polyps or kind == "polyp":
        n = int(f.get("polyp_count") or len(s.polyps) or 1)
        count = (_NUM.get(n, str(n)) if "polyp_count" in f and n > 1 else "a") + " "
        if n > 1 and "polyp_count" not in f:
            count = ""
        noun = ("polyp" if kind == "polyp" else "lesion") + ("s" if n > 1 else "")
        out = f"{count}{colour}{noun}{_where(f.get('abnormality_location'))}"
        if kind and kind != "polyp":
            out += f" consistent with {kind}"
        size = f.get("polyp_size")
        if size:
            out += f", the larger estimated at {size}" if n > 1 else f", estimated at {size}"
        return out
    noun = {"esophagitis": "erosions consistent with esophagitis",
            "ulcerative colitis": "inflamed mucosa consistent with ulcerative colitis",
            }.get(kind, "an abnormal area")
    return f"{colour}{noun}{_where(f.get('abnormality_location'))}"


def _subject(f: dict, s) -> str:
    if s.findings:
        return _lesion(f, s)
    if s.landmark:
        name = f"the {f['landmark']}" if "landmark" in f else "a normal anatomical landmark"
        return f"{name}{_where(f.get('landmark_location'))} and no visible abnormality"
    return _instruments(f, s)


def _instruments(f: dict, s) -> str:
    kinds = f.get("instruments")
    if kinds is None:
        noun = "an instrument" if len(s.instruments) == 1 else "instruments"
    else:
        noun = _and(("an " if k[0] in "aeiou" else "a ") + k for k in kinds.split(", "))
    return f"{noun}{_where(f.get('instrument_location'))}"


_OPEN = ("{P} image showing {x}.", "This {p} view shows {x}.", "A {p} frame with {x}.")
_OPEN_NO_P = ("Endoscopic image showing {x}.", "This endoscopic view shows {x}.")
_INSTR = ("There {is} also {x}.", "The image also shows {x}.")
_BOX = ("A {c} box artefact is visible in the {k} corner.",
        "There is a {c} box overlay in the {k} corner.")
_TEXT = ("White text is overlaid in the {k} corner.", "Text annotations appear in the {k} corner.")


def _render(f: dict, s, rng) -> str:
    pick = lambda t: t[int(rng.integers(len(t)))]  # noqa: E731
    x = _subject(f, s)
    p = f.get("procedure")
    out = [pick(_OPEN).format(P=p.capitalize(), p=p, x=x) if p else pick(_OPEN_NO_P).format(x=x)]
    if s.findings and s.instruments:
        i = _instruments(f, s)
        many = len(s.instruments) > 1 if "instruments" not in f else "," in f["instruments"]
        out.append(pick(_INSTR).format(x=i, **{"is": "are" if many else "is"}))
    if "box" in f:
        out.append(pick(_BOX).format(c=s.box_colour, k=f["box"]))
    if "text" in f:
        out.append(pick(_TEXT).format(k=f["text"]))
    return " ".join(out)


def teacher_caption(s, rng, error: float) -> tuple[str, list[Fact]]:
    """A fluent caption of scene `s` with each fact dropped or wrong with probability `error`.

    Returns the caption and its facts (true and shown values), so the error rate is checkable.
    """
    facts = noisy_facts(s, rng, error)
    shown = {x.name: x.shown for x in facts if x.shown is not None}
    return _render(shown, s, rng), facts
