"""The fixed vocabulary of the demo data set: questions, question types, answer words.

Multi-answer answers are comma-separated ("a, b") in alphabetical order, "none" when empty.
"""
from __future__ import annotations

from collections.abc import Iterable

SPLITS = ("train", "test")
CATEGORIES = ("normal", "polyp", "esophagitis", "ulcerative colitis", "instrument")
PROCEDURES = ("colonoscopy", "gastroscopy")
LANDMARKS = ("cecum", "pylorus", "z-line")
ABNORMALITIES = ("esophagitis", "polyp", "ulcerative colitis")
INSTRUMENTS = ("biopsy forceps", "injection needle", "metal clip", "polyp snare")
POLYP_COLOURS = ("pink", "red", "yellow")
COLOURS = ("pink", "red", "white", "yellow")
SIZES = ("<5mm", "5-10mm", "11-20mm", ">20mm")
# polyp radius as a fraction of the shorter image side, per size answer; the gaps between the
# bins keep the size learnable from the picture
SIZE_BINS = {"<5mm": (0.035, 0.05), "5-10mm": (0.06, 0.08),
             "11-20mm": (0.095, 0.125), ">20mm": (0.145, 0.185)}
CELLS = ("upper-left", "upper-center", "upper-right",
         "center-left", "center", "center-right",
         "lower-left", "lower-center", "lower-right")
CORNERS = ("upper-left", "upper-right", "lower-left", "lower-right")

# Question wording is Kvasir-VQA's (ImageCLEFmed-MEDVQA-GI), so a model or script made for the
# real data set reads ours unchanged. That includes the typo "instrumnets", which is kept on
# purpose: the real data set and its evaluation scripts spell it that way.
QUESTION_TYPES: dict[str, str] = {
    "What type of procedure is the image taken from?": "choice",       # colonoscopy|gastroscopy
    "Are there any abnormalities in the image?": "choice",             # ABNORMALITIES list|none
    "Are there any anatomical landmarks in the image?": "choice",      # LANDMARKS|none
    "Are there any instruments in the image?": "choice",               # INSTRUMENTS list|none
    "Does this image contain any finding?": "yes/no",                  # finding = abnormality
    "How many findings are present?": "count",                         # each polyp counts
    "How many polyps are in the image?": "count",                      # 0..3
    "How many instrumnets are in the image?": "count",                 # 0..2 (sic)
    "What color is the abnormality?": "colour",                        # COLOURS list
    "Where in the image is the abnormality?": "location",              # CELLS list (centres)
    "What is the size of the polyp?": "size",                          # SIZES, the largest
    "Where in the image is the anatomical landmark?": "location",      # CELLS
    "Where in the image is the instrument?": "location",               # CELLS list (tips)
    "Is there a green/black box artefact?": "yes/no",
    "Is there text?": "yes/no",
}
QUESTIONS: list[str] = list(QUESTION_TYPES)


def cell_of(x: float, y: float, w: int, h: int) -> str:
    """Name of the 3x3 grid cell holding pixel (x, y) of a w x h image, e.g. "upper-left"."""
    col = min(2, max(0, int(3 * x / w)))
    row = min(2, max(0, int(3 * y / h)))
    return CELLS[3 * row + col]


def join_sorted(words: Iterable[str]) -> str:
    """Canonical multi-answer: distinct words, alphabetical, comma-separated; "none" if empty."""
    return ", ".join(sorted(set(words))) or "none"
