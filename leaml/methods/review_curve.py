"""What a reviewer's decision is worth, as stored curves (torch-free: the app reads these).

A simulation (``python -m leaml simulate-review``, :mod:`leaml.methods.review_sim`) stores one
JSON file per run under ``<home>/simulations/``: the accuracy of the target after N simulated
review decisions, per review order, and the accuracy of spending the same reviewer minutes on
labeling seed images instead. Here: the time a decision costs (defaults, or the project's own
events), storing and loading the curves, the chart, the table, and "the next N decisions are
worth about +x points" read off a stored curve.
"""
from __future__ import annotations

import json
import statistics
import time
from datetime import datetime
from pathlib import Path

# seconds a person spends per decision (accept and reject read a pair, an edit types the
# answer) and per seed QA pair labeled from scratch
DEFAULT_COSTS = {"accept": 1.0, "reject": 1.0, "edit": 5.0, "seed_pair": 10.0}
MIN_SAMPLES = 20      # decisions of a kind before the project's own timing replaces the default
MAX_GAP_S = 300.0     # a longer gap between two decisions is a break, not a decision
_ACTIONS = {"qa.accept": "accept", "qa.reject": "reject", "qa.edit": "edit"}
FOLDER = "simulations"


def decision_seconds(db, project_id: int, defaults: dict | None = None) -> dict:
    """Seconds per decision kind: the median gap before each accept/reject/edit event of the
    same reviewer in this project (gaps over :data:`MAX_GAP_S` left out) where at least
    :data:`MIN_SAMPLES` exist, else the default. ``source`` says which came from where."""
    costs = {**DEFAULT_COSTS, **(defaults or {})}
    gaps: dict[str, list[float]] = {k: [] for k in ("accept", "reject", "edit")}
    last: dict[str, datetime] = {}
    for e in db.query("SELECT ts, user, action FROM events WHERE project_id = ? AND action IN"
                      " ('qa.accept', 'qa.reject', 'qa.edit') AND user IS NOT NULL"
                      " ORDER BY user, ts", [project_id]):
        ts = datetime.fromisoformat(e["ts"])
        prev = last.get(e["user"])
        last[e["user"]] = ts
        if prev is not None and 0 < (ts - prev).total_seconds() <= MAX_GAP_S:
            gaps[_ACTIONS[e["action"]]].append((ts - prev).total_seconds())
    source = {}
    for kind, values in gaps.items():
        if len(values) >= MIN_SAMPLES and not (defaults and kind in defaults):
            costs[kind] = round(statistics.median(values), 2)
            source[kind] = f"events ({len(values)} decisions)"
        else:
            source[kind] = "default" if not (defaults and kind in defaults) else "given"
    source["seed_pair"] = "given" if defaults and "seed_pair" in defaults else "default"
    return {**costs, "source": source}


def cost_of(decisions: list[dict], costs: dict) -> float:
    """Reviewer seconds of a list of decisions (each with an ``action``)."""
    return float(sum(costs[d["action"]] for d in decisions))


# --- storage ---------------------------------------------------------------------------------

def folder(home) -> Path:
    return Path(home) / FOLDER


def save(home, result: dict) -> Path:
    """Store a simulation's result as ``<home>/simulations/project-<id>-<time>.json``."""
    out = folder(home)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"project-{result['project_id']}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def load_all(home, project_id: int) -> list[dict]:
    """Every stored simulation of a project, oldest first (each with its ``path``)."""
    out = []
    for p in sorted(folder(home).glob(f"project-{int(project_id)}-*.json")):
        try:
            out.append({**json.loads(p.read_text()), "path": str(p)})
        except (OSError, ValueError):
            continue  # a file being written, or not ours
    return out


def latest(home, project_id: int) -> dict | None:
    """The newest stored simulation of a project, or None."""
    found = load_all(home, project_id)
    return found[-1] if found else None


# --- reading a curve -------------------------------------------------------------------------

def points(result: dict, order: str) -> list[tuple[int, float]]:
    """(decisions, accuracy) of one order, by decisions."""
    return sorted((r["decisions"], r["accuracy"]) for r in result["curve"] if r["order"] == order)


def at(pts: list[tuple[int, float]], x: float) -> float:
    """The curve's accuracy at ``x`` decisions, linear between measured points (flat past the
    last one)."""
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


def best_order(result: dict) -> str:
    """The order whose largest measured budget reached the highest accuracy."""
    orders = dict.fromkeys(r["order"] for r in result["curve"])
    return max(orders, key=lambda o: (points(result, o)[-1][1], -list(orders).index(o)))


def next_gain(result: dict, done: int, n: int = 100, order: str | None = None) -> dict | None:
    """What the next ``n`` decisions are worth after ``done`` were made: accuracy points from
    the curve of ``order`` (default: the best order); None without a curve for that order.
    ``beyond`` is True when ``done + n`` lies past the largest simulated budget."""
    order = order or best_order(result)
    pts = points(result, order)
    if len(pts) < 2:
        return None
    return {"order": order, "points": round(at(pts, done + n) - at(pts, done), 2),
            "beyond": done + n > pts[-1][0], "largest": pts[-1][0]}


# --- the table and the chart -----------------------------------------------------------------

def format_table(result: dict) -> str:
    """Order x budget accuracy (and reviewer minutes), plus the label-more-seed points."""
    budgets = sorted({r["decisions"] for r in result["curve"]})
    orders = list(dict.fromkeys(r["order"] for r in result["curve"]))
    cell = {(r["order"], r["decisions"]): r for r in result["curve"]}
    lines = [f"{'order':<12}" + "".join(f"{b:>16}" for b in budgets)]
    for o in orders:
        row = [cell.get((o, b)) for b in budgets]
        lines.append(f"{o:<12}" + "".join(
            f"{r['accuracy']:>8.2f}% {r['reviewer_seconds'] / 60:>4.1f}min" if r else f"{'-':>16}"
            for r in row))
    for p in result.get("label_more", []):
        lines.append(f"label more seed instead: {p['minutes']:.1f} reviewer minutes = "
                     f"{p['seed_pairs']} seed pairs ({p['seed_images']} images) -> "
                     f"{p['accuracy']:.2f}%")
    return "\n".join(lines)


def figure(result: dict, x: str = "decisions"):
    """A plotly figure: accuracy against decisions (``x='decisions'``) or reviewer minutes
    (``x='minutes'``, with the label-more-seed points), one line per order."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for o in dict.fromkeys(r["order"] for r in result["curve"]):
        rows = sorted((r for r in result["curve"] if r["order"] == o), key=lambda r: r["decisions"])
        xs = [r["decisions"] if x == "decisions" else r["reviewer_seconds"] / 60 for r in rows]
        fig.add_trace(go.Scatter(x=xs, y=[r["accuracy"] for r in rows], mode="lines+markers",
                                 name=o, customdata=[r["decisions"] for r in rows],
                                 hovertemplate="%{customdata} decisions: %{y:.2f}%"))
    if x == "minutes" and result.get("label_more"):
        base = next((r for r in result["curve"] if r["decisions"] == 0), None)
        pts = ([(0.0, base["accuracy"])] if base else []) + [
            (p["minutes"], p["accuracy"]) for p in sorted(result["label_more"], key=lambda p: p["minutes"])]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                 name="label more seed instead", line={"dash": "dash"}))
    fig.update_layout(xaxis_title="review decisions" if x == "decisions" else "reviewer minutes",
                      yaxis_title="target accuracy (%)", legend_title_text="review order",
                      margin=dict(l=0, r=0, t=30, b=0))
    return fig


def write_chart(result: dict, path) -> Path:
    """Both charts (against decisions and against reviewer minutes) in one self-contained
    HTML file."""
    path = Path(path)
    a, b = figure(result, "decisions"), figure(result, "minutes")
    a.update_layout(title="Target accuracy after N simulated review decisions")
    b.update_layout(title="The same against reviewer minutes, beside labeling more seed pairs")
    html = (a.to_html(include_plotlyjs=True, full_html=False)
            + b.to_html(include_plotlyjs=False, full_html=False))
    path.write_text(f"<html><head><meta charset='utf-8'></head><body>{html}</body></html>")
    return path
