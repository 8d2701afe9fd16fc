"""Keys that st.button's ``shortcut`` refuses, through Streamlit's components v2.

Streamlit reserves 'R' (rerun) and 'C' (clear caches), so ``shortcut="R"`` is refused. A
components v2 component runs its JavaScript in the app's own page (no iframe, nothing
deprecated): it listens for the key in the capture phase, before Streamlit's own handler,
and clicks the button, so the key goes through the button's callback like a click.
"""
from __future__ import annotations

import functools

import streamlit as st

_KEY_JS = """
export default function(component) {
  const d = component.data;
  if (!d || !d.key) return;
  const prop = "__leaml_key_" + d.key;
  if (window[prop]) document.removeEventListener("keydown", window[prop], true);
  window[prop] = (ev) => {
    const t = ev.target, tag = (t && t.tagName || "").toLowerCase();
    if (ev.key.toLowerCase() !== d.key || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (tag === "input" || tag === "textarea" || (t && t.isContentEditable)) return;
    const btn = Array.from(document.querySelectorAll("button")).find(
        b => b.innerText.trim().startsWith(d.label) && !b.disabled);
    if (!btn) return;
    ev.preventDefault(); ev.stopImmediatePropagation(); btn.click();
  };
  document.addEventListener("keydown", window[prop], true);
}
"""


@functools.cache
def _component():
    """Registered once per process (registering again would log a warning)."""
    from streamlit.components.v2 import component
    return component("leaml_key_to_button", js=_KEY_JS)


def key_to_button(key: str, label_start: str) -> None:
    """Press ``key`` (no modifier, outside text fields) to click the first enabled button
    whose label starts with ``label_start``; for keys ``st.button(shortcut=...)`` refuses."""
    _component()(data={"key": key.lower(), "label": label_start},
                 key=f"leaml_key_{key.lower()}")
