"""The Dashboard's numbers: labeling and review progress, evaluated runs as long-form rows,
the runs to compare by default, and the paper-style table (runs x categories, their
average, the overall accuracy). Plain rows; the page only draws them."""
from __future__ import annotations

import sqlite_utils

from leaml.app.accounts import require as _require
from leaml.app.projects import seed_target
from leaml.store import projects as projects_store
from leaml.store import runs


def progress(db: sqlite_utils.Database, user: dict, project: dict) -> dict:
    """Labeling and review progress (needs 'view'): the project's counts, ``seed_target``,
    ``seed_share`` (labeled seed images over the target, at most 1), ``reviewed`` and
    ``pseudo`` (decided and all pseudo pairs) and ``review_share`` (0 without pairs)."""
    _require(db, user, "view")
    counts = projects_store.project_counts(db, project["id"])
    target = seed_target(project, counts)
    reviewed = counts["accepted"] + counts["edited"] + counts["rejected"]
    pseudo = reviewed + counts["pending"]
    return {**counts, "seed_target": target,
            "seed_share": min(1.0, counts["seed_images"] / target),
            "reviewed": reviewed, "pseudo": pseudo,
            "review_share": reviewed / pseudo if pseudo else 0.0}


def results(db: sqlite_utils.Database, user: dict, project_id: int) -> list[dict]:
    """Evaluated runs of a project as long-form rows (one per run x metric), newest first:
    run_id, method, base_model, label_fraction, created_at, finished_at, scope, key,
    accuracy (percent), n. Needs 'view'. Runs without metrics (stages) are left out."""
    _require(db, user, "view")
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


def run_choices(rows: list[dict]) -> tuple[dict[int, str], list[int]]:
    """The runs of :func:`results` rows to pick from, newest first, as {run_id: label}
    ("#3 leaml (0.01)": the label fraction when known), and the default pick: the newest
    run of each method."""
    labels, default, methods = {}, [], set()
    for r in sorted(rows, key=lambda r: -r["run_id"]):
        if r["run_id"] in labels:
            continue
        frac = r["label_fraction"]
        labels[r["run_id"]] = f"#{r['run_id']} {r['method']}" + (
            f" ({frac:g})" if frac is not None else "")
        if r["method"] not in methods:
            methods.add(r["method"])
            default.append(r["run_id"])
    return labels, default


def chosen_rows(rows: list[dict], run_ids) -> list[dict]:
    """The :func:`results` rows of the runs ``run_ids``, each with ``run`` ("#3 leaml"),
    the name the table and the charts show."""
    chosen = set(run_ids)
    return [{**r, "run": f"#{r['run_id']} {r['method']}"} for r in rows if r["run_id"] in chosen]


def overall_over_time(rows: list[dict]) -> list[dict]:
    """The overall accuracy rows of :func:`results`, by the time their run finished."""
    return sorted((r for r in rows if r["scope"] == "overall"),
                  key=lambda r: r["finished_at"] or "")


def results_table(rows: list[dict], run_ids) -> list[dict]:
    """The paper's table for the runs ``run_ids``: one row per run with category metrics,
    by run label; ``run``, each category's accuracy (None where the run has none), the
    ``Average`` over its categories and its ``Overall`` accuracy, rounded to 0.1."""
    cats: dict[str, dict[str, list[float]]] = {}
    overall: dict[str, float] = {}
    for r in chosen_rows(rows, run_ids):
        if r["scope"] == "category":
            cats.setdefault(r["run"], {}).setdefault(r["key"], []).append(r["accuracy"])
        elif r["scope"] == "overall":
            overall[r["run"]] = r["accuracy"]
    keys = sorted({k for by_key in cats.values() for k in by_key})
    table = []
    for run in sorted(cats):
        means = {k: sum(v) / len(v) for k, v in cats[run].items()}
        line = {"run": run, **{k: _round(means.get(k)) for k in keys}}
        line["Average"] = _round(sum(means.values()) / len(means))
        line["Overall"] = _round(overall.get(run))
        table.append(line)
    return table


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
