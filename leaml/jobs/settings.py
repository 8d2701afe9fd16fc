"""The settings a queued job will really train with, flat by field name.

Built by the same functions the job kinds call (``config.fold_overrides``,
``pipeline.method_config``, ``generator_config``, ``pseudo_config``), so a form's test can
check that every field it shows reaches the engine: what the Training page stores as a job's
params must come out here as entered. Imports the engine (torch): for the worker side and
tests, never for the app process.
"""
from __future__ import annotations

from leaml.config import GENERATOR_OWN_STEPS, fold_overrides
from leaml.methods import leaml as leaml_method
from leaml.methods import pipeline


def _flat(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out


def effective_settings(kind: str, params: dict) -> dict:
    """``{field: value}`` of the config a job of ``kind`` with ``params`` runs with: stage
    TrainConfig fields, the stage's own knobs, and ``label_fraction`` / ``seed``."""
    seed = int(params.get("seed", 0))
    top = {"seed": seed, "label_fraction": float(params.get("label_fraction", 1.0))}
    if kind == "run":
        cfg = pipeline.method_config(params["method"], seed, _overrides(params["method"], params))
        options = [v for v in cfg.options.values() if isinstance(v, dict)]
        return _flat(*options, *(tc.to_dict() for tc in cfg.stages.values()), top)
    cfg = pipeline.method_config("leaml", seed, _overrides(kind, params))
    if kind == "generator":
        g = leaml_method.generator_config(cfg).to_dict()
        train = {k: v for k, v in g.pop("train").items() if k not in GENERATOR_OWN_STEPS}
        return _flat(train, g, top)
    if kind == "pseudo":
        pseudo = dict(leaml_method.pseudo_config(cfg, seed).__dict__)
        return _flat(pseudo, {"seed": seed})
    if kind == "finetune":
        return _flat(cfg.stages["finetune"].to_dict(), cfg.options["finetune"], {"seed": seed})
    raise ValueError(f"job kind {kind!r} has no training settings; use run, generator, "
                     "pseudo or finetune")


def _overrides(method: str, params: dict) -> dict:
    """The job's overrides with its flat ``options`` and ``data_mix`` folded in, as the job
    kinds (and pipeline.run_method) fold them."""
    options, mix = params.get("options"), params.get("data_mix")
    if options or mix is not None:
        return fold_overrides(method, params.get("overrides"), options=options, data_mix=mix)
    return params.get("overrides") or {}
