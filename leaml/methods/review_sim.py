"""A simulated reviewer who knows the hidden truth: what N review decisions are worth.

On a project whose "unlabeled" train images keep their true QA (the ``demo`` project under a
label fraction: a run uses the seed QA of a seeded fraction of the labeled images only; or any
project imported with full labels), :func:`simulate_review`

1. copies the data home's database into a scratch home (images and models linked, not
   copied), so nothing it does touches the project's real review state;
2. trains the QA generator and samples pseudo pairs there once (or reuses a stored generator
   run and its pairs);
3. for each review order and budget N, copies that again and lets a reviewer who knows the
   truth decide the first N pending pairs in that order, through the store's own
   accept / edit / reject: a right pair is accepted, a wrong one edited to the true answer
   (``reject_wrong``: rejected), one whose question the image has no answer for rejected;
4. finetunes and evaluates the target there with the app's finetune stage itself
   (:func:`leaml.methods.leaml.finetune_command`: seed + those decisions + the pending pairs
   above the cut, exactly as the Training page's finetune job);
5. spends the same reviewer minutes on seed labels instead: the same finetune with the label
   fraction raised by the images those minutes label (same generator and pairs; the pairs of
   the newly labeled images left out, as they are labeled now).

The curve is stored under ``<home>/simulations/`` (:mod:`leaml.methods.review_curve`), where
the Dashboard and the Review page read it.
"""
from __future__ import annotations

import json
import random
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from leaml.data.split import keep_fraction
from leaml.engine.evaluate import exact_match
from leaml.engine.pseudo import question_key
from leaml.methods import review_curve
from leaml.methods.leaml import finetune_command, generator_command, pseudo_command
from leaml.methods.pseudo_stage import check_generator_run
from leaml.store import connect, transaction
from leaml.store import qa as qa_store
from leaml.store.db import DB_NAME
from leaml.store.images import list_images
from leaml.store.projects import get_project
from leaml.store.runs import get_run, update_run

SIM_USER = "simulated-reviewer"
# review orders: the queue's own orders (leaml.store.qa_queue), and a seeded shuffle
QUEUE_ORDERS = {"high-first": "desc", "low-first": "asc", "near-cut": "near-cut",
                "balanced": "balanced"}
ORDERS = ("random", *QUEUE_ORDERS)
Log = Callable[[str], None]


@dataclass
class SimPlan:
    """What a simulation runs: budgets, orders, the data subset and the stage budgets."""
    budgets: tuple = (0, 100, 300, 1000)   # decisions; "all" = every pending pair
    orders: tuple = ("random", "high-first", "low-first", "near-cut")
    test_images: int = 0        # evaluate on a seeded subset of this many test images (0 = all)
    overrides: dict = field(default_factory=dict)   # generator/pseudo/finetune overrides
    label_more: str = "largest"  # label-more-seed points: at the 'largest' budget, 'all', 'none'


def full_plan() -> SimPlan:
    """The method's own defaults on the whole project (the README's numbers)."""
    return SimPlan()


def quick_plan() -> SimPlan:
    """Three orders x budgets 0 and 300 on a subset: a short generator (20 seed-QA steps),
    pseudo pairs for 200 unlabeled images, a 200-step target of 32 without the vision warmup
    (as ``leaml demo --quick`` trains it), 100 test images."""
    return SimPlan(budgets=(0, 300), orders=("random", "high-first", "near-cut"), test_images=100,
                   overrides={"generator": {"min_qa_steps": 20, "max_qa_steps": 20,
                                            "max_captions": 600},
                              "pseudo": {"max_images": 200},
                              "finetune": {"min_steps": 200, "max_steps": 200, "batch_size": 32,
                                           "vision_warmup_epochs": 0.0, "hard_fraction": 0.0,
                                           "vision_lr_scale": 1.0}})


def merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, nested dicts merged."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


# --- the truth and the reviewer --------------------------------------------------------------

def truth_answers(db, project_id: int, pairs: list[dict]) -> dict[int, str | None]:
    """Per pair id, the true answer of its image to its question (the image's seed QA, hidden
    from the run), None where the image has no answer to that question."""
    images = sorted({p["image_id"] for p in pairs})
    truth: dict[tuple, str] = {}
    for r in db.query("SELECT image_id, question, answer FROM qa WHERE project_id = ? AND"
                      " origin = 'seed' AND image_id IN (SELECT value FROM json_each(?))"
                      " ORDER BY id", [project_id, json.dumps(images)]):
        truth.setdefault((r["image_id"], question_key(r["question"])), r["answer"])
    return {p["id"]: truth.get((p["image_id"], question_key(p["question"]))) for p in pairs}


def images_with_truth(db, project_id: int, image_ids) -> set[int]:
    """The images among ``image_ids`` that hold true QA (seed pairs)."""
    return {r["image_id"] for r in db.query(
        "SELECT DISTINCT image_id FROM qa WHERE project_id = ? AND origin = 'seed' AND image_id"
        " IN (SELECT value FROM json_each(?))", [project_id, json.dumps(sorted(image_ids))])}


def truthful_decision(pair: dict, truth: str | None, reject_wrong: bool = False) -> dict:
    """What a reviewer who knows ``truth`` does with ``pair``: accept it when right, edit the
    answer to the truth when wrong (reject instead with ``reject_wrong``), reject it when the
    image has no answer to the question."""
    if truth is None:
        return {"id": pair["id"], "action": "reject", "answer": None, "right": False}
    if exact_match(pair["answer"], truth) == 1.0:
        return {"id": pair["id"], "action": "accept", "answer": pair["answer"], "right": True}
    if reject_wrong:
        return {"id": pair["id"], "action": "reject", "answer": None, "right": False}
    return {"id": pair["id"], "action": "edit", "answer": truth, "right": False}


def apply_decisions(db, decisions: list[dict], user: str = SIM_USER) -> None:
    """Carry out decisions through the store's review functions (versions, events and all)."""
    for d in decisions:
        version = qa_store.get_qa(db, d["id"])["version"]
        if d["action"] == "accept":
            qa_store.accept(db, d["id"], expected_version=version, user=user)
        elif d["action"] == "reject":
            qa_store.reject(db, d["id"], expected_version=version, user=user)
        else:
            qa_store.edit(db, d["id"], expected_version=version, user=user, answer=d["answer"])


def ordered_pending(db, project_id: int, gen_run_id: int, order: str, seed: int = 0) -> list[dict]:
    """The generator run's pending pairs in review order: the queue's own order (what the
    Review page hands out) or, for 'random', a seeded shuffle."""
    if order == "random":
        rows = sorted((r for r in qa_store.list_qa(db, project_id, origin="pseudo", status="pending")
                       if r["gen_run_id"] == gen_run_id), key=lambda r: r["id"])
        random.Random(seed).shuffle(rows)
        return rows
    if order not in QUEUE_ORDERS:
        raise ValueError(f"review order '{order}' is not one of {', '.join(ORDERS)}")
    return qa_store.review_queue(db, project_id, order=QUEUE_ORDERS[order], gen_run_id=gen_run_id,
                        limit=10**9)


# --- scratch homes ---------------------------------------------------------------------------

def copy_home(db, dest: Path, model_dirs=()):
    """A scratch data home at ``dest``: a copy of ``db``'s database, its images folder linked,
    and the given model folders (relative to the home) linked under ``models/``."""
    dest.mkdir(parents=True)
    src = Path(db.home)
    if (src / "images").exists():
        (dest / "images").symlink_to((src / "images").resolve(), target_is_directory=True)
    (dest / "models").mkdir()
    for rel in model_dirs:
        (dest / rel).symlink_to((src / rel).resolve(), target_is_directory=True)
    target = sqlite3.connect(dest / DB_NAME)
    try:
        db.conn.backup(target)
    finally:
        target.close()
    return connect(dest)


def keep_test_subset(db, project_id: int, n: int, seed: int) -> int:
    """Delete all but a seeded ``n`` of the project's test images (a scratch copy only!);
    returns how many test QA pairs are left."""
    ids = [r["id"] for r in db.query("SELECT id FROM images WHERE project_id = ? AND split = 'test'"
                                     " ORDER BY id", [project_id])]
    keep = set(random.Random(seed).sample(ids, n)) if 0 < n < len(ids) else set(ids)
    with transaction(db):
        db.conn.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids if i not in keep])
    return db.execute("SELECT COUNT(*) FROM qa WHERE project_id = ? AND origin = 'test'",
                      [project_id]).fetchone()[0]


def _finetune_in_copy(base, dest: Path, project_id: int, gen_run_id: int, overrides: dict,
                      progress, decisions=(), prepare=None) -> dict:
    """Copy ``base``, apply ``decisions`` (and ``prepare(db)``), run the app's finetune stage
    there and return its result with the data it trained on; the copy is removed after."""
    gen = check_generator_run(base, gen_run_id, project_id)
    db = copy_home(base, dest, [gen["model_dir"]])
    try:
        apply_decisions(db, list(decisions))
        if prepare:
            prepare(db)
        result = finetune_command(db, project_id, generator_run=gen_run_id,
                                  overrides=overrides, progress=progress)
        if result.get("stopped"):
            raise RuntimeError("the finetune stopped")
        return {**result, "target_data": get_run(db, result["run_id"])["params"].get("target_data")}
    finally:
        db.conn.close()
        shutil.rmtree(dest, ignore_errors=True)


# --- the simulation --------------------------------------------------------------------------

def parse_budgets(text: str) -> tuple:
    """'0,100,300,all' -> (0, 100, 300, 'all')."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "all":
            out.append("all")
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"budget '{part}': give decision counts like 0,100,300 or 'all'")
    if not out:
        raise ValueError("give at least one budget, e.g. --budgets 0,300")
    return tuple(out)


def parse_orders(text: str) -> tuple:
    orders = tuple(o.strip() for o in str(text).split(",") if o.strip())
    bad = [o for o in orders if o not in ORDERS]
    if bad or not orders:
        raise ValueError(f"review order '{bad[0] if bad else text}': use {', '.join(ORDERS)}")
    return orders


def simulate_review(store, project, *, label_fraction: float = 0.01, seed: int = 0,
                    plan: SimPlan | None = None, reject_wrong: bool = False,
                    generator_run: int | None = None, costs: dict | None = None,
                    progress=None, log: Log = print, keep_scratch: bool = False) -> dict:
    """Run the simulation (module docstring) and store its curve; returns the result:
    ``{"curve": [{"order", "decisions", "accuracy", "by_category", "reviewer_seconds", ...}],
    "label_more": [...], "seconds", ...}`` (accuracies in percent)."""
    t0 = time.monotonic()
    plan = plan or full_plan()
    db = store if hasattr(store, "conn") else connect(store)
    proj = get_project(db, project)
    pid = proj["id"]
    costs = review_curve.decision_seconds(db, pid, costs)
    scratch = Path(db.home) / "work" / f"simulate-{time.time_ns()}"
    ov = plan.overrides
    try:
        models = []
        if generator_run is not None:
            models = [check_generator_run(db, int(generator_run), pid)["model_dir"]]
        base = copy_home(db, scratch / "base", models)
        n_test = keep_test_subset(base, pid, plan.test_images, seed) if plan.test_images else None
        if generator_run is None:
            log(f"training the generator ({label_fraction:g} of the labeled images, seed {seed})")
            gen_id = generator_command(base, pid, label_fraction=label_fraction, seed=seed,
                                       overrides=ov, progress=progress)["generator_run"]
        else:
            gen_id = int(generator_run)
        if not base.execute("SELECT COUNT(*) FROM qa WHERE gen_run_id = ? AND origin = 'pseudo'",
                            [gen_id]).fetchone()[0]:
            log("sampling pseudo pairs")
            pseudo_command(base, pid, generator_run=gen_id, overrides=ov, progress=progress)
        gen = check_generator_run(base, gen_id, pid)
        pending = ordered_pending(base, pid, gen_id, "high-first")
        known = images_with_truth(base, pid, {p["image_id"] for p in pending})
        if not known:
            raise ValueError(f"project '{proj['name']}': its unlabeled images hold no true QA to "
                             "simulate a reviewer with; use a project imported with every answer "
                             "(e.g. 'demo') and a --label-fraction below 1")
        truth = truth_answers(base, pid, [p for p in pending if p["image_id"] in known])
        decide = {p["id"]: truthful_decision(p, truth[p["id"]], reject_wrong)
                  for p in pending if p["id"] in truth}
        precision = sum(d["right"] for d in decide.values()) / max(1, len(decide))
        log(f"generator run {gen_id}: {len(pending)} pending pairs ({len(pending) - len(decide)}"
            f" on images without true QA, left pending), {100 * precision:.1f}% right")
        budgets = sorted({len(decide) if b == "all" else min(int(b), len(decide))
                          for b in plan.budgets})
        todo = 1 + sum(b > 0 for b in budgets) * len(plan.orders)
        done = 0

        def finetune(name, decisions=(), prepare=None) -> dict:
            nonlocal done
            done += 1
            log(f"[{done}/{todo + (len(budgets) if plan.label_more == 'all' else 1)}] {name}")
            return _finetune_in_copy(base, scratch / f"point-{done}", pid, gen_id, ov, progress,
                                     decisions, prepare)

        zero = finetune("no review")
        curve = []
        for order in plan.orders:
            ranked = [decide[p["id"]] for p in ordered_pending(base, pid, gen_id, order, seed)
                      if p["id"] in decide]
            for n in budgets:
                chosen = ranked[:n]
                res = zero if n == 0 else finetune(f"{order}, {n} decisions", chosen)
                curve.append(_curve_row(order, chosen, res, costs))
                log(f"  {order:<11} {n:>5} decisions: {res['accuracy']:.2f}%")
        result = {"project": proj["name"], "project_id": pid, "label_fraction": gen["params"].get("label_fraction"),
                  "seed": gen["params"].get("seed"), "generator_run": gen_id,
                  "reused_generator": generator_run is not None, "orders": list(plan.orders),
                  "budgets": budgets, "reject_wrong": reject_wrong, "costs": costs,
                  "n_pending": len(pending), "n_with_truth": len(decide),
                  "pseudo_precision": round(100 * precision, 2), "n_test_pairs": n_test,
                  "test_images": plan.test_images or None, "overrides": ov, "curve": curve}
        result["label_more"] = _label_more(base, pid, gen, result, plan, costs, finetune)
        result["seconds"] = round(time.monotonic() - t0, 1)
        result["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        result["saved"] = str(review_curve.save(db.home, result))
        return result
    finally:
        if not keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _curve_row(order: str, decisions: list[dict], res: dict, costs: dict) -> dict:
    count = {a: sum(d["action"] == a for d in decisions) for a in ("accept", "edit", "reject")}
    return {"order": order, "decisions": len(decisions), "accuracy": res["accuracy"],
            "by_category": res["by_category"], "by_question_type": res["by_question_type"],
            "reviewer_seconds": review_curve.cost_of(decisions, costs),
            "accepted": count["accept"], "edited": count["edit"], "rejected": count["reject"],
            "target_data": res.get("target_data")}


def _label_more(base, pid: int, gen: dict, result: dict, plan: SimPlan, costs: dict,
                finetune) -> list[dict]:
    """The other use of the reviewer's minutes: the same finetune with seed labels for the
    images those minutes label (``costs['seed_pair']`` seconds per QA pair; the kept images'
    mean pairs per image), at the best order's reviewer time of the largest (or every) budget."""
    if plan.label_more == "none":
        return []
    best = review_curve.best_order(result)
    rows = sorted((r for r in result["curve"] if r["order"] == best and r["decisions"] > 0),
                  key=lambda r: r["decisions"])
    rows = rows if plan.label_more == "all" else rows[-1:]
    labeled = [r["id"] for r in list_images(base, pid, split="train", unlabeled=False)]
    kept = keep_fraction(labeled, gen["params"]["label_fraction"], gen["params"]["seed"])
    n_seed = base.execute("SELECT COUNT(*) FROM qa WHERE origin = 'seed' AND image_id IN"
                          " (SELECT value FROM json_each(?))", [json.dumps(kept)]).fetchone()[0]
    per_image = n_seed / max(1, len(kept))
    out = []
    for r in rows:
        pairs = int(r["reviewer_seconds"] // costs["seed_pair"])
        images = max(1, round(pairs / per_image)) if pairs else 0
        n = min(len(labeled), len(kept) + images)
        fraction = n / len(labeled)
        more = keep_fraction(labeled, fraction, gen["params"]["seed"])
        new = sorted(set(more) - set(kept))

        def prepare(db, fraction=fraction, more=more, new=new):
            params = {**gen["params"], "label_fraction": fraction, "kept_images": more}
            update_run(db, gen["id"], params=params)
            with transaction(db):  # those images are labeled now: their pseudo pairs go
                db.execute("DELETE FROM qa WHERE gen_run_id = ? AND origin = 'pseudo' AND image_id"
                           " IN (SELECT value FROM json_each(?))", [gen["id"], json.dumps(new)])
        res = finetune(f"label {images} more seed images instead ({r['reviewer_seconds'] / 60:.1f} min)",
                       prepare=prepare)
        out.append({"minutes": round(r["reviewer_seconds"] / 60, 2), "for_order": best,
                    "for_decisions": r["decisions"], "seed_pairs": pairs,
                    "seed_images": len(more) - len(kept), "label_fraction": round(fraction, 5),
                    "nested": set(kept) <= set(more), "accuracy": res["accuracy"],
                    "by_category": res["by_category"], "target_data": res.get("target_data")})
    return out
