"""The rules for free text people give: imported questions, answers and captions, and text
typed in the app (seed labeling, review edits). Torch-free and database-free, so the store
and the importers apply exactly the same check.

A text is refused when it

- holds a control character other than tab and newline (NUL included; a carriage return
  counts as a newline: ``\\r\\n`` and ``\\r`` become ``\\n``), or half of a surrogate pair;
- is blank: nothing is left once whitespace and invisible format characters (Unicode
  categories Cf, Zs, Zl, Zp: zero-width spaces, byte-order marks ...) are stripped from its
  ends;
- is longer than :data:`MAX_TEXT_CHARS` characters once stripped.

What is stored is the stripped text.
"""
from __future__ import annotations

import re
import unicodedata

__all__ = ["MAX_TEXT_CHARS", "BlankText", "clean_text", "optional_text", "text_problem"]

MAX_TEXT_CHARS = 10_000          # one question, answer, caption or category
_INVISIBLE = ("Cf", "Zs", "Zl", "Zp")
# C0 and C1 controls but tab and newline, DEL, and lone surrogates (SQLite cannot store them).
_BAD_CHAR = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


class BlankText(ValueError):
    """A text that is empty once whitespace and invisible characters are stripped."""


def _invisible(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) in _INVISIBLE


def _strip(text: str) -> str:
    """``text`` without whitespace and invisible format characters at either end."""
    text = text.strip()
    start, end = 0, len(text)
    while start < end and _invisible(text[start]):
        start += 1
    while end > start and _invisible(text[end - 1]):
        end -= 1
    return text[start:end]


def _control_problem(text: str) -> str | None:
    """Why ``text`` holds a character it may not hold, or None."""
    bad = _BAD_CHAR.search(text)
    if bad is None:
        return None
    ch, at = bad.group(), bad.start() + 1
    if "\ud800" <= ch <= "\udfff":
        return (f"holds half of a surrogate pair (U+{ord(ch):04X}) at character {at}, which is"
                " not valid Unicode; remove it")
    return (f"holds a control character (U+{ord(ch):04X}) at character {at}; remove it (tab and"
            " newline are the only control characters allowed)")


def clean_text(value, field: str, where: str = "", *,
               max_chars: int = MAX_TEXT_CHARS) -> str:
    """``value`` checked by the module's rules and stripped; ValueError names ``where`` +
    ``field`` and says how to fix it. Numbers are taken as their text (an answer "3")."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}{field} must be text, not {type(value).__name__}")
    text = str(value)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    problem = _control_problem(text)
    if problem:
        raise ValueError(f"{where}{field} {problem}")
    text = _strip(text)
    if not text:
        raise BlankText(f"{where}{field} is empty or whitespace-only (invisible characters such"
                        f" as zero-width spaces count as whitespace); give a non-blank {field}")
    if len(text) > max_chars:
        raise ValueError(f"{where}{field} is {len(text):,} characters, over the limit of"
                         f" {max_chars:,}; shorten it")
    return text


def optional_text(value, field: str, where: str = "", *,
                  max_chars: int = MAX_TEXT_CHARS) -> str | None:
    """Like :func:`clean_text` for a field that may be left out: None (and a blank value)
    give None; control characters and overlong text are still refused."""
    if value is None:
        return None
    try:
        return clean_text(value, field, where, max_chars=max_chars)
    except BlankText:
        return None


def text_problem(value, field: str = "text") -> str | None:
    """Why the store would refuse ``value`` as a question or answer, or None: for generated
    text, which is dropped (counted as malformed) rather than failing a whole batch."""
    try:
        clean_text(value, field)
    except ValueError as exc:
        return str(exc)
    return None
