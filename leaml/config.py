"""Configuration dataclass fields with a default and a help text, for every config in leaml.

``describe_config`` (leaml/engine/train.py), the CLI's ``--set`` and the app read the help from the
field's metadata, so every knob documents itself where it is declared.
"""
from __future__ import annotations

import copy
from dataclasses import field, is_dataclass

# The base model of a new project and of models.load(): an embedded base (leaml/engine/models.py)
DEFAULT_BASE = "tiny16"


def option(default, help: str, **kw):
    """A dataclass field with ``help`` in its metadata; mutable defaults (lists, dicts,
    nested config dataclasses) are copied per instance so no two configs share one."""
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)
