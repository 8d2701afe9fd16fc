"""``python -m leaml simulate-review``: what review decisions are worth, by review order.

Thin: the work is in leaml/methods/review_sim.py (the simulated reviewer) and
leaml/methods/review_curve.py (the stored curve, table and chart).
"""
from __future__ import annotations

import sys

from leaml.cli.common import parse_overrides, print_json


def _add_simulate_review(sub, common) -> None:
    text = ("simulate a reviewer who knows the hidden answers: target accuracy after N review "
            "decisions per review order, against reviewer minutes and labeling more seed instead")
    p = sub.add_parser("simulate-review", help=text, description=text, parents=[common])
    p.add_argument("--project", required=True,
                   help="a project whose unlabeled train images keep their true QA (e.g. demo)")
    p.add_argument("--label-fraction", type=float, default=0.01, metavar="F",
                   help="the seed: QA of a seeded fraction F of the labeled train images (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the label subset, training and "
                   "the random order (default 0)")
    p.add_argument("--budgets", default=None, metavar="N,N,...",
                   help="review decisions per point, 'all' = every pending pair "
                        "(default 0,100,300,1000; --quick: 0,300)")
    p.add_argument("--orders", default=None, metavar="ORDER,...",
                   help="review orders: random, high-first, low-first, near-cut, balanced "
                        "(default random,high-first,low-first,near-cut; --quick: "
                        "random,high-first,near-cut)")
    p.add_argument("--reject-wrong", action="store_true",
                   help="the reviewer rejects a wrong pair instead of editing it to the truth")
    p.add_argument("--quick", action="store_true",
                   help="a subset: a short generator, pseudo pairs for 200 unlabeled images, a "
                        "200-step target, 100 test images; orders random,high-first,near-cut x "
                        "budgets 0,300")
    p.add_argument("--generator-run", type=int, default=None, metavar="ID",
                   help="reuse this stored generator run and its pairs (label fraction and seed "
                        "are its own)")
    p.add_argument("--label-more", choices=("largest", "all", "none"), default="largest",
                   help="finetunes with more seed labels for the reviewer minutes of the best "
                        "order's largest budget (default), of every budget, or none")
    p.add_argument("--seconds", default="", metavar="KIND=S,...",
                   help="reviewer seconds per accept, reject, edit and seed_pair (default "
                        "1, 1, 5, 10, or the project's own review timing from its events)")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                   help="override a stage knob, e.g. finetune.max_steps=300 (repeatable)")
    p.add_argument("--out", default=None, metavar="HTML",
                   help="where the chart goes (default: beside the stored curve)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=cmd_simulate_review)


def _costs(text: str) -> dict:
    out = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = part.partition("=")
        if key not in ("accept", "reject", "edit", "seed_pair") or not value:
            raise ValueError(f"--seconds '{part}': give accept=, reject=, edit= or seed_pair= "
                             "with seconds, e.g. edit=8")
        out[key] = float(value)
    return out


def cmd_simulate_review(args) -> int:
    import torch
    from tqdm import tqdm

    from leaml.methods import review_curve, review_sim  # torch: loaded when the command runs
    from leaml.methods.pipeline import ProgressBar  # with torch
    torch.set_num_threads(max(1, args.threads))
    plan = review_sim.quick_plan() if args.quick else review_sim.full_plan()
    if args.budgets:
        plan.budgets = review_sim.parse_budgets(args.budgets)
    if args.orders:
        plan.orders = review_sim.parse_orders(args.orders)
    plan.label_more = args.label_more
    if args.set:
        plan.overrides = review_sim.merge(plan.overrides, parse_overrides(args.set))
    bar = ProgressBar()
    try:
        result = review_sim.simulate_review(
            args.home, args.project, label_fraction=args.label_fraction, seed=args.seed,
            plan=plan, reject_wrong=args.reject_wrong, generator_run=args.generator_run,
            costs=_costs(args.seconds), progress=bar, log=lambda line: tqdm.write(line, file=sys.stderr))
    finally:
        bar.close()
    out = args.out or str(result["saved"]).removesuffix(".json") + ".html"
    result["chart"] = str(review_curve.write_chart(result, out))
    if not args.json:
        print(review_curve.format_table(result), flush=True)
        print(f"pseudo pairs: {result['n_pending']} pending, {result['pseudo_precision']}% right; "
              f"{result['seconds']:.0f} s in all", flush=True)
        print(f"stored {result['saved']}; chart {result['chart']}", flush=True)
        return 0
    print_json(result)  # the contract: the last line
    return 0
