"""evaluate.py: normalisation, exact match on sets, token recall for open types, grouping."""
from __future__ import annotations

import pytest

from leaml.engine.evaluate import (EvalItem, answer_set, exact_match, is_open, normalize, score,
                            summarize, token_recall)


@pytest.mark.parametrize("raw, want", [
    ("The Polyp.", "polyp"),
    ("  a   RED  polyp ", "red polyp"),
    ("An ulcer!", "ulcer"),
    ("theory", "theory"),               # articles only as whole words
    ("upper-left", "upper left"),
    ("Yes", "yes"),
    ("", ""),
])
def test_normalize(raw, want):
    assert normalize(raw) == want


@pytest.mark.parametrize("pred, ref, ok", [
    ("yes", "Yes.", True),
    ("the polyp", "polyp", True),
    ("metal clip, polyp snare", "polyp snare, metal clip", True),   # sets, any order
    ("metal clip; polyp snare", "polyp snare, metal clip", True),
    ("metal clip", "polyp snare, metal clip", False),                # a missing item
    ("metal clip, metal clip", "metal clip", True),                  # duplicates collapse
    ("<5mm", "5-10mm", False),
    ("center-left", "center left", True),
    ("no", "none", False),
])
def test_exact_match(pred, ref, ok):
    assert exact_match(pred, ref) == float(ok)


def test_answer_set_drops_empty_parts():
    assert answer_set("polyp, , ") == frozenset({"polyp"})


def test_open_types_use_token_recall_and_closed_types_exact_match():
    assert is_open("open") and is_open("Free_Text") and not is_open("yes/no")
    assert not is_open(None) and not is_open("choice")
    assert token_recall("a large red polyp on the left", "red polyp") == 1.0
    assert token_recall("red thing", "red polyp") == 0.5
    assert score("red thing", "red polyp", "open") == 0.5
    assert score("red thing", "red polyp", "colour") == 0.0


def test_summarize_overall_by_category_and_question_type():
    items = [EvalItem(None, "q", "yes", "polyp", "yes/no"),
             EvalItem(None, "q", "no", "polyp", "yes/no"),
             EvalItem(None, "q", "2", "normal", "count"),
             EvalItem(None, "q", "red polyp", None, "open")]
    out = summarize(items, ["yes", "yes", "2", "red"])
    assert out["accuracy"] == pytest.approx(100 * (1 + 0 + 1 + 0.5) / 4)
    assert out["by_category"] == {"normal": 100.0, "polyp": 50.0, "unknown": 50.0}
    assert out["by_question_type"] == {"count": 100.0, "open": 50.0, "yes/no": 50.0}
    assert out["by_category_n"]["polyp"] == 2 and out["n_test"] == 4
    with pytest.raises(ValueError):
        summarize(items, ["yes"])
