"""What the web app does, as permission-checked functions (no Streamlit here).

Every page action goes through one of these: each takes the signed-in ``user`` (a users row
as a dict) and calls :func:`_require` (the row as the database holds it now, then
:func:`leaml.auth.require`) before touching the store, so a refused action is refused in
the library, not only by a hidden button, and a role taken away counts at once. An
annotator calling :func:`start_job` gets a PermissionError whatever the page shows. Store errors
(NotFoundError, ConflictError, ValueError) pass through for the page to show as messages.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path, PurePosixPath

import sqlite_utils

from leaml.app import accounts as app_accounts
from leaml.data import diversity
from leaml.data import ingest
from leaml.jobs import queue as jobs
# the accounts part of this service (sign-in, sessions, users) lives in app_accounts
from leaml.app.accounts import (SESSION_IDLE_SECONDS, add_user, create_first_admin,  # noqa: F401
                                list_users, needs_first_admin, open_session, reload_user,
                                reset_password, session_user, set_disabled, set_role, sign_in,
                                sign_out)
from leaml.config import DEFAULT_BASE
from leaml.store import app_queries
from leaml.store import images as images_store
from leaml.store import qa, runs
from leaml.store import projects as projects_store

MAX_UPLOAD_MB = 200           # also the Streamlit upload limit (.streamlit/config.toml)
UPLOAD_TYPES = ("zip", "jsonl", "csv", "parquet")
DEFAULT_SEED_FRACTION = 0.01  # seed target: 1% of the train images, at least one
DEMO_PROJECT = "demo"
LANDING_PROJECT = "demo-1pct"  # the demo at 1% labels: what a new user sees first


def _name(user: dict) -> str:
    return user["name"]


def _require(db: sqlite_utils.Database, user: dict | None, perm: str) -> dict:
    """Every permission check here (new functions too): reload the row by id, then require."""
    return app_accounts.require(db, user, perm)


# --- projects and import ------------------------------------------------------------------

def create_project(db: sqlite_utils.Database, user: dict, name: str,
                   base_model: str = DEFAULT_BASE, seed_target: int | None = None) -> dict:
    """A new project (needs 'import'); ``seed_target`` is stored in its settings."""
    user = _require(db, user, "import")
    settings = {"seed_target": int(seed_target)} if seed_target else {}
    return projects_store.create_project(db, (name or "").strip(),
                                         base_model=base_model or DEFAULT_BASE,
                                         settings=settings, user=_name(user))


def import_upload(db: sqlite_utils.Database, user: dict, project: str, filename: str,
                  data: bytes, *, skip_invalid: bool = False):
    """Import an uploaded zip, JSONL/CSV manifest or parquet file into ``project``.

    Returns ingest's ImportReport; raises ingest.ImportRejected (with the report, row by
    row) when rows are bad and ``skip_invalid`` is off, ValueError for a wrong file type
    or a file over :data:`MAX_UPLOAD_MB`, ingest.ImportFailed (one line, details logged)
    for anything unexpected; all three are ValueErrors the Projects page shows.
    """
    user = _require(db, user, "import")
    suffix = PurePosixPath(filename or "").suffix.lower().lstrip(".")
    if suffix not in UPLOAD_TYPES:
        raise ValueError(f"'{filename}': unsupported file type; upload one of "
                         f"{', '.join('.' + t for t in UPLOAD_TYPES)}")
    if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
        raise ValueError(f"'{filename}' is {len(data) / 2**20:.0f} MB; the limit is "
                         f"{MAX_UPLOAD_MB} MB (import larger sets with `python -m leaml import`)")
    return ingest.import_bytes(db, data, suffix, project, skip_invalid=skip_invalid,
                               user=_name(user), label=PurePosixPath(filename).name)


def seed_target(project: dict, counts: dict) -> int:
    """The project's seed target: its setting, else 1% of the train images (at least 1)."""
    target = (project.get("settings") or {}).get("seed_target")
    return int(target) if target else max(1, math.ceil(DEFAULT_SEED_FRACTION *
                                                       counts.get("train_images", 0)))


def ensure_demo(db: sqlite_utils.Database, n_train: int = 300, n_test: int = 60) -> dict | None:
    """The bundled ``demo-1pct`` project (and ``demo``), built (small, seconds) if the data
    home lacks them; returns ``demo-1pct``, the project a new user lands on.

    The full set is ``python -m leaml demo --data-only``; this small one makes the first
    start of the app quick.
    """
    try:
        projects_store.get_project(db, DEMO_PROJECT)
        return projects_store.get_project(db, LANDING_PROJECT)
    except LookupError:
        pass
    from leaml.data.demo import build as demo  # numpy drawing code: only needed on a first start
    from leaml.data.demo import projects as demo_projects
    demo_projects.load_demo_projects(db, demo.DemoConfig(n_train=n_train, n_test=n_test),
                                     user="demo")
    return projects_store.get_project(db, LANDING_PROJECT)


# --- seed labeling ------------------------------------------------------------------------

def next_image(db: sqlite_utils.Database, project_id: int, *, strategy: str = "diverse",
               seed: int | None = None, exclude: tuple[int, ...] = ()) -> dict | None:
    """The next train image without seed QA (random or diverse), or None when all are done."""
    cands = [r["id"] for r in images_store.list_images(db, project_id, unlabeled=True)
             if r["id"] not in set(exclude)]
    labeled = [r["id"] for r in images_store.list_images(db, project_id, unlabeled=False)]
    cache = Path(db.home) / "cache" / "features" / f"project-{project_id}.npz"
    picked = diversity.pick_next(cands, labeled, lambda i: images_store.image_path(db, i),
                                 strategy=strategy, cache_path=cache, seed=seed)
    return None if picked is None else images_store.get_image(db, picked)


def label_seed(db: sqlite_utils.Database, user: dict, *, project_id: int, image_id: int,
               question: str, answer: str, category: str | None = None,
               question_type: str | None = None) -> int:
    """Add one seed QA pair (needs 'label'); returns its id. Audited by the store."""
    user = _require(db, user, "label")
    question, answer = (question or "").strip(), (answer or "").strip()
    if not question or not answer:
        raise ValueError("both a question and an answer are needed; fill in the empty one")
    return qa.add_qa(db, project_id=project_id, image_id=image_id, question=question,
                     answer=answer, origin="seed", status="labeled",
                     question_type=question_type or None, category=category or None,
                     user=_name(user))


def edit_seed(db: sqlite_utils.Database, user: dict, qa_id: int, *, expected_version: int,
              **changes) -> dict:
    """Change a seed pair's question/answer/category (needs 'label'); ConflictError if stale."""
    user = _require(db, user, "label")
    return qa.update_qa(db, qa_id, expected_version=expected_version, user=_name(user),
                        **changes)


def delete_seed(db: sqlite_utils.Database, user: dict, qa_id: int, *, expected_version: int):
    """Delete a seed pair (needs 'label'); the audit log keeps what it was."""
    user = _require(db, user, "label")
    return qa.delete_qa(db, qa_id, expected_version=expected_version, user=_name(user))


def seed_pairs(db: sqlite_utils.Database, user: dict, project_id: int, limit: int = 200):
    """The project's seed pairs, newest first (needs 'view')."""
    user = _require(db, user, "view")
    return list(reversed(qa.list_qa(db, project_id, origin="seed")))[:limit]


# --- review -------------------------------------------------------------------------------

def next_pair(db: sqlite_utils.Database, user: dict, project_id: int, **filters) -> dict | None:
    """Claim the next pending pair for ``user`` (needs 'review'); None when the queue is empty."""
    user = _require(db, user, "review")
    return qa.claim_next(db, project_id, _name(user), **filters)


def decide(db: sqlite_utils.Database, user: dict, qa_id: int, decision: str, *,
           expected_version: int, question: str | None = None, answer: str | None = None):
    """accept, reject or edit one pseudo pair (needs 'review'); ConflictError on a stale
    version; ValueError on a seed or test pair (those change only through seed labeling,
    which needs 'label')."""
    user = _require(db, user, "review")
    if decision == "accept":
        return qa.accept(db, qa_id, expected_version=expected_version, user=_name(user))
    if decision == "reject":
        return qa.reject(db, qa_id, expected_version=expected_version, user=_name(user))
    if decision == "edit":
        return qa.edit(db, qa_id, expected_version=expected_version, user=_name(user),
                       question=question, answer=answer)
    raise ValueError(f"unknown decision {decision!r}: use accept, reject or edit")


def review_filter_options(db: sqlite_utils.Database, user: dict, project_id: int) -> dict:
    """Categories, question types, generator runs and sources (what made the pairs: the
    generator, or what an import named) present in the pending queue."""
    user = _require(db, user, "review")
    return {**app_queries.queue_facets(db, project_id),
            "sources": qa.pending_sources(db, project_id)}


def review_progress(db: sqlite_utils.Database, user: dict, project_id: int,
                    **filters) -> dict:
    """``left``: pending pairs under the queue ``filters``; ``mine``: pairs ``user`` has
    decided in the project (needs 'review'). Cheap enough for every decision."""
    user = _require(db, user, "review")
    filters = {k: v for k, v in filters.items() if k not in ("order", "exclude_ids")}
    return {"left": qa.count_queue(db, project_id, **filters),
            "mine": qa.decisions_by(db, project_id, _name(user))}


def calibration(db: sqlite_utils.Database, user: dict, project_id: int, bins: int = 10):
    """Acceptance rate by confidence bin of the reviewed pseudo pairs (needs 'view')."""
    user = _require(db, user, "view")
    return qa.calibration(db, project_id, bins)


def reviewer_stats(db: sqlite_utils.Database, user: dict, project_id: int) -> list[dict]:
    """Counters per reviewer; an annotator sees only their own row."""
    user = _require(db, user, "view")
    stats = qa.reviewer_stats(db, project_id)
    if user["role"] == "annotator":
        stats = [s for s in stats if s["reviewer"] == user["name"]]
    return stats


def skip(db: sqlite_utils.Database, user: dict, qa_id: int) -> None:
    """Give a claimed pair back to the queue (needs 'review')."""
    user = _require(db, user, "review")
    qa.release_claim(db, qa_id, _name(user))


def undo(db: sqlite_utils.Database, user: dict, project_id: int):
    """Undo ``user``'s last review decision in the project (needs 'review'): the pair's row,
    or for a bulk accept ``{"id", "bulk": True, "restored": n, "kept": m}``; None if none."""
    user = _require(db, user, "review")
    return qa.undo_last(db, user=_name(user), project_id=project_id)


def count_bulk(db: sqlite_utils.Database, user: dict, project_id: int, min_conf: float,
               **filters) -> int:
    """How many pending pairs a bulk accept at ``min_conf`` would touch."""
    user = _require(db, user, "review")
    return qa.count_queue(db, project_id, min_conf=min_conf, **filters)


def bulk_accept(db: sqlite_utils.Database, user: dict, project_id: int, min_conf: float,
                **filters) -> int:
    """Accept every pending pair at or above ``min_conf`` (needs 'review'); returns how many."""
    user = _require(db, user, "review")
    return qa.bulk_accept(db, project_id, min_conf=min_conf, user=_name(user), **filters)


# --- export -------------------------------------------------------------------------------

def export_zip(db: sqlite_utils.Database, user: dict, project: str | int, *,
               with_test: bool = False):
    """The curated QA of ``project`` as one zip, what ``leaml export`` writes (manifest.jsonl,
    images/, data.parquet), in a temporary file (deleted when closed), rewound; needs 'export'
    (experts, admins, viewers). Audited as 'export'."""
    from leaml.data import export  # pyarrow: loaded on the first export only
    user = _require(db, user, "export")
    out = tempfile.TemporaryFile(dir=db.home, prefix="leaml-export-", suffix=".zip")
    try:
        export.export_zip(db, project, out, with_test=with_test, user=_name(user))
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


# --- jobs ---------------------------------------------------------------------------------

METHODS = ("leaml", "seed-lora", "seed-full", "caption-then-seed", "caption-qa", "zero-shot")
# The main knobs per job kind: (name, type, help). Left empty in the form, a knob keeps the
# method's own default (pipeline.DEFAULTS, which differ per method); the names are those of
# TrainConfig / PseudoConfig (tests/test_app_service.py checks), mirrored so the app never
# imports torch.
_TRAIN_HP = [("mode", str, "'lora' (adapters) or 'full' finetuning"),
             ("lr", float, "peak learning rate of AdamW"),
             ("epochs", float, "passes over the data"),
             ("batch_size", int, "examples per optimizer step"),
             ("lora_r", int, "LoRA rank"),
             ("max_steps", int, "optimizer steps (0 = derive from epochs)"),
             ("min_steps", int, "at least this many steps"),
             ("vision_warmup_epochs", float, "passes of the image-path warmup before the "
                                             "main training (0 = none)")]
# the sampling temperature is left out: the default known-question mode samples nothing
_PSEUDO_HP = [("k", int, "known questions asked (or QA candidates sampled) per unlabeled image"),
              ("max_images", int, "sample at most this many unlabeled images (0 = all)")]
_NEURON_HP = [("rho", float, "share of neurons per layer updated by caption distillation")]
# G's step count comes from its own knobs (GeneratorConfig.qa_steps), never from the
# TrainConfig's epochs/max_steps, so its form shows those knobs instead
_GENERATOR_HP = [("lr", float, "peak learning rate of AdamW"),
                 ("batch_size", int, "examples per optimizer step"),
                 ("qa_epochs", float, "passes over the seed QA"),
                 ("min_qa_steps", int, "at least this many seed-QA steps"),
                 ("max_qa_steps", int, "at most this many seed-QA steps (0 = no cap)"),
                 ("max_captions", int, "caption distillation on at most this many unlabeled "
                                       "images (0 = all)")] + _NEURON_HP
JOB_HYPERPARAMETERS = {"generator": _GENERATOR_HP, "pseudo": _PSEUDO_HP,
                       "finetune": _TRAIN_HP, "leaml": _TRAIN_HP + _NEURON_HP + _PSEUDO_HP}


# training stages per method / job kind, for per-stage overrides (pipeline.method_config);
# mirrored from leaml/methods/pipeline.py (which imports torch, so the app cannot ask it)
TRAIN_STAGES = {"seed-lora": ["train"], "seed-full": ["train"],
                "caption-then-seed": ["align", "train"], "caption-qa": ["train"],
                # LEAML's G counts its own steps: a whole run's training knobs go to the target
                "leaml": ["finetune"], "generator": ["generator"],
                "finetune": ["finetune"], "pseudo": [], "zero-shot": []}
_ENGINE_HP = {name for name, _, _ in _TRAIN_HP}


def job_params(kind: str, *, base_model: str, seed: int, hyperparameters: dict,
               method: str | None = None, label_fraction: float | None = None,
               data_mix: dict | None = None, teacher: dict | None = None) -> dict:
    """The params of a job as the engine takes them (jobs.enqueue stores them as JSON).

    Training hyperparameters become per-stage ``overrides``; the others (pseudo k, rho ...)
    go to the stages that use them; ``data_mix`` (which pairs train the target) is sent only
    to the kinds that choose training data (finetune, and the leaml method); ``teacher``
    (``{"endpoint", "model"}``, both needed) to the caption-qa method, which asks it for QA.
    """
    target = method if kind == "run" else kind
    params: dict = {"base_model": base_model, "seed": int(seed)}
    if kind == "run":
        params["method"] = method
    if kind in ("run", "generator"):  # the generator picks the seed set as a run does
        params["label_fraction"] = float(label_fraction or 1.0)
    train_hp = {k: v for k, v in hyperparameters.items() if k in _ENGINE_HP}
    other_hp = {k: v for k, v in hyperparameters.items() if k not in _ENGINE_HP}
    if train_hp and TRAIN_STAGES.get(target):
        params["overrides"] = {stage: dict(train_hp) for stage in TRAIN_STAGES[target]}
    if other_hp:
        params["options"] = other_hp
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


def start_job(db: sqlite_utils.Database, user: dict, kind: str, project: str | int,
              params: dict) -> int:
    """Queue a background job (needs 'train') and make sure a worker runs; returns its id."""
    user = _require(db, user, "train")
    job_id = jobs.enqueue(db, kind, project, params, user=user)
    jobs.ensure_worker(db.home)
    return job_id


def cancel_job(db: sqlite_utils.Database, user: dict, job_id: int):
    user = _require(db, user, "train")
    return jobs.cancel(db, job_id, user=user)


def resume_job(db: sqlite_utils.Database, user: dict, job_id: int):
    user = _require(db, user, "train")
    result = jobs.resume(db, job_id, user=user)
    jobs.ensure_worker(db.home)
    return result


def label_choices(db: sqlite_utils.Database, project: dict) -> dict:
    """Quick picks for seed labeling: the project's questions, answers per question and
    categories (settings 'questions'/'categories' first, then what the data already holds)."""
    settings = project.get("settings") or {}
    vocab = qa.image_vocabulary(db, project["id"])
    questions = list(dict.fromkeys([*settings.get("questions", []), *vocab["questions"]]))
    cats = app_queries.image_categories(db, project["id"])
    categories = list(dict.fromkeys([*settings.get("categories", []), *cats]))
    return {"questions": questions, "answers": vocab["answers"], "categories": categories}


# --- results ------------------------------------------------------------------------------

def results(db: sqlite_utils.Database, user: dict, project_id: int) -> list[dict]:
    """Evaluated runs of a project as long-form rows (one per run x metric), newest first:
    run_id, method, base_model, label_fraction, created_at, finished_at, scope, key,
    accuracy (percent), n. Needs 'view'. Runs without metrics (stages) are left out."""
    user = _require(db, user, "view")
    out = []
    for r in runs.list_runs(db, project_id):
        if r["status"] != "succeeded":
            continue
        for m in runs.get_metrics(db, r["id"]):
            out.append({"run_id": r["id"], "method": r["method"], "base_model": r["base_model"],
                        "label_fraction": r["params"].get("label_fraction"),
                        "created_at": r["created_at"], "finished_at": r["finished_at"],
                        "scope": m["scope"], "key": m["key"] or "overall",
                        "accuracy": m["accuracy"], "n": m["n"]})
    return out
