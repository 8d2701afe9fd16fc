"""What the web app does, as permission-checked functions (no Streamlit here).

The one module the pages import (tests/test_layers.py checks): it holds the job forms
(kinds, hyperparameters, params) and re-exports the other parts, one module per concern
in leaml/app/: accounts, projects, labeling, review, jobs, loop, dashboard, images, worth.

Every page action goes through one of these: each takes the signed-in ``user`` (a users row
as a dict) and calls :func:`_require` (the row as the database holds it now, then
:func:`leaml.auth.require`) before touching the store, so a refused action is refused in
the library, not only by a hidden button, and a role taken away counts at once. An
annotator calling :func:`start_job` gets a PermissionError whatever the page shows. Store errors
(NotFoundError, ConflictError, ValueError) pass through for the page to show as messages.
"""
from __future__ import annotations

import sqlite_utils

from leaml.app import accounts as app_accounts
# the accounts part of this service (sign-in, sessions, users) lives in app_accounts
from leaml.app.accounts import (SESSION_IDLE_SECONDS, add_user, create_first_admin,  # noqa: F401
                                list_users, needs_first_admin, open_session, reload_user,
                                reset_password, session_user, set_disabled, set_role, sign_in,
                                sign_out)
# what review decisions are worth (simulate-review curves) lives in app/worth.py
from leaml.app.worth import decision_runs, next_decisions_gain, simulation  # noqa: F401
# the other parts, one module per concern; the pages reach them through this module only
from leaml.app.dashboard import (chosen_rows, overall_over_time, results,  # noqa: F401
                                 results_table, run_choices)
from leaml.app.dashboard import progress as dashboard_progress  # noqa: F401
from leaml.app.images import VIEW_PX, image_path, view_image  # noqa: F401
from leaml.app.jobs import (active_jobs, cancel_job, caption_job_params,  # noqa: F401
                            captions_missing, job_log_tail, job_progress, job_train_log,
                            places, project_jobs, resume_job, start_job)
from leaml.app.labeling import (delete_seed, edit_seed, label_choices, label_seed,  # noqa: F401
                                next_image, project_image, seed_pairs)
from leaml.app.loop import (BASELINE_METHOD, LOOP_KINDS, PRESET_LABELS, PRESETS,  # noqa: F401
                            baseline_params, default_label_fraction, has_baseline,
                            loop_status, preset_values, start_generator_and_pseudo)
from leaml.app.projects import (DEFAULT_SEED_FRACTION, DEMO_PROJECT,  # noqa: F401
                                LANDING_PROJECT, MAX_UPLOAD_MB, UPLOAD_TYPES, ImportRejected,
                                create_project, ensure_demo, export_zip, import_upload,
                                list_projects, project_counts, projects_overview, seed_target)
from leaml.app.review import (bulk_accept, calibration, count_bulk, decide,  # noqa: F401
                              next_pair, pair_image_url, review_filter_options,
                              review_progress, reviewer_stats, skip, undo)
# what the pages show or catch without an action: roles, the default base model, store errors
from leaml.auth import ROLES, can  # noqa: F401
from leaml import config
from leaml.config import DEFAULT_BASE  # noqa: F401
from leaml.store import ConflictError, NotFoundError, StoreError, connect  # noqa: F401


def _require(db: sqlite_utils.Database, user: dict | None, perm: str) -> dict:
    """Every permission check here (new functions too): reload the row by id, then require."""
    return app_accounts.require(db, user, perm)


# --- jobs ---------------------------------------------------------------------------------

METHODS = config.METHODS
# The main knobs per job kind, by name; their types and help come from leaml/config.py. Left
# empty in the form, a knob keeps the method's own default (pipeline.DEFAULTS differ per
# method). The sampling temperature is left out: the default known-question mode samples
# nothing. G's step count comes from its own knobs (GeneratorConfig.qa_steps), never from the
# TrainConfig's epochs/max_steps, so its form shows those knobs instead.
_TRAIN_HP = config.form_fields(config.TrainConfig, (
    "mode", "lr", "epochs", "batch_size", "lora_r", "max_steps", "min_steps",
    "vision_warmup_epochs"))
_PSEUDO_HP = config.form_fields(config.PseudoConfig, ("k", "max_images"))
_NEURON_HP = config.form_fields(config.GeneratorConfig, ("rho",))
_GENERATOR_HP = config.form_fields(config.TrainConfig, ("lr", "batch_size")) + config.form_fields(
    config.GeneratorConfig, ("qa_epochs", "min_qa_steps", "max_qa_steps", "max_captions", "rho"))
JOB_HYPERPARAMETERS = {"generator": _GENERATOR_HP, "pseudo": _PSEUDO_HP,
                       "finetune": _TRAIN_HP, "leaml": _TRAIN_HP + _NEURON_HP + _PSEUDO_HP,
                       "zero-shot": []}


def samples_pairs(kind: str, method: str | None = None) -> bool:
    """Whether a job of ``kind`` (with ``method`` for 'run'; 'loop' is generator then pseudo)
    samples pseudo pairs, so that the sampling engine applies to it."""
    return kind == "loop" or (method if kind == "run" else kind) in ("pseudo", "leaml")


def job_params(kind: str, *, base_model: str, seed: int, hyperparameters: dict,
               method: str | None = None, label_fraction: float | None = None,
               data_mix: dict | None = None, teacher: dict | None = None,
               device: str = "auto", processes: int = 1, engine: str = "hf") -> dict:
    """The params of a job as the engine takes them (jobs.enqueue stores them as JSON).

    The hyperparameters become ``overrides`` (``config.fold_overrides``: training knobs go to
    the kind's training stages, the others, pseudo k, rho ..., to their groups); ``data_mix``
    (which pairs train the target) is sent only to the kinds that choose training data
    (finetune, and the leaml method); ``teacher`` (``{"endpoint", "model"}``, both needed) to
    the caption-qa method, which asks it for QA. Where it runs: ``device`` ('auto': the
    worker's GPU if it has one), ``processes`` (above 1: data-parallel through accelerate's
    launcher, checked when queued) and ``engine`` ('vllm': LEAML's pseudo sampling on vLLM;
    kinds that sample only).
    """
    target = method if kind == "run" else kind
    params: dict = {"base_model": base_model, "seed": int(seed)}
    if kind == "run":
        params["method"] = method
    if kind in ("run", "generator"):  # the generator picks the seed set as a run does
        params["label_fraction"] = float(label_fraction or 1.0)
    if engine != "hf":
        if not samples_pairs(kind, method):
            raise ValueError(f"engine {engine!r} samples pseudo pairs: only the pseudo kind and "
                             "the leaml method sample")
        if int(processes) != 1:
            raise ValueError(f"engine {engine!r} runs in one process (vLLM spreads the model "
                             "over the GPUs itself): set processes to 1")
        hyperparameters = dict(hyperparameters or {}, engine=engine)
    if hyperparameters:
        params["overrides"] = config.fold_overrides(target, options=hyperparameters)
    if device != "auto":
        params["device"] = device
    if int(processes) != 1:
        params["processes"] = int(processes)
    if data_mix is not None and target in ("finetune", "leaml"):
        params["data_mix"] = data_mix
    if target == "caption-qa":
        teacher = {k: (v or "").strip() for k, v in (teacher or {}).items()}
        if not teacher.get("endpoint") or not teacher.get("model"):
            raise ValueError("caption-qa asks a teacher for QA pairs: give its OpenAI-compatible "
                             "endpoint and model name (e.g. `python -m leaml serve`)")
        params.setdefault("overrides", {})["qa"] = {"endpoint": teacher["endpoint"],
                                                    "model": teacher["model"]}
    return params


def job_hyperparameters(kind: str) -> list[tuple[str, type, str]]:
    """(name, type, help) of the main hyperparameters of a job kind, for the form."""
    return list(JOB_HYPERPARAMETERS.get(kind, _TRAIN_HP))


def job_choices(kind: str) -> dict[str, tuple]:
    """The allowed values of those of a job kind's knobs that have a fixed set ('mode':
    ('lora', 'full')), from leaml/config.py, for a pick list instead of free text."""
    names = [name for name, _, _ in job_hyperparameters(kind)]
    out: dict[str, tuple] = {}
    for cls in (config.TrainConfig, config.GeneratorConfig, config.PseudoConfig):
        out.update(config.choices_of(cls, names))
    return out
