"""`python -m leaml demo --data-only` builds `demo` (all labeled) and `demo-1pct` (the seed
split that `run --label-fraction 0.01 --seed 0` keeps on `demo`, the rest unlabeled)."""
from leaml.methods import pipeline
from leaml.cli.main import main
from leaml.store import connect
from leaml.store.images import list_images
from leaml.store.projects import get_project, project_counts
from leaml.store.qa import list_qa

ARGS = ["demo", "--data-only", "--n-train", "200", "--n-test", "20"]


def shas(db, project: str, **kw) -> set[str]:
    pid = get_project(db, project)["id"]
    return {r["sha256"] for r in list_images(db, pid, **kw)}


def test_demo_1pct_seed_images_are_the_split_run_keeps(home, capsys):
    assert main([*ARGS, "--home", str(home)]) == 0
    db = connect(home)
    demo, small = get_project(db, "demo")["id"], get_project(db, "demo-1pct")["id"]
    data = pipeline.load_run_data(db, demo, 0.01, 0)  # what `run` keeps on demo
    kept = {r["sha256"] for r in list_images(db, demo, split="train", unlabeled=False)
            if r["id"] in set(data.kept_images)}
    assert len(kept) == 2
    assert shas(db, "demo-1pct", split="train", unlabeled=False) == kept
    assert shas(db, "demo-1pct") == shas(db, "demo")  # the same images
    counts = project_counts(db, small)
    assert counts["unlabeled_images"] == 198 and counts["test"] == project_counts(db, demo)["test"]
    seed_rows = list_qa(db, small, origin="seed")
    demo_seed = {(r["question"], r["answer"]) for r in pipeline.load_run_data(
        db, demo, 0.01, 0).seed_rows}
    assert {(r["question"], r["answer"]) for r in seed_rows} == demo_seed


def test_no_answer_or_category_leaks_into_unlabeled_images(home, capsys):
    assert main([*ARGS, "--home", str(home)]) == 0
    db = connect(home)
    small = get_project(db, "demo-1pct")["id"]
    unlabeled = list_images(db, small, unlabeled=True)
    assert len(unlabeled) == 198
    ids = {r["id"] for r in unlabeled}
    assert not [r for r in list_qa(db, small) if r["image_id"] in ids]
    assert all(r["category"] is None and r["caption"] for r in unlabeled)


def test_second_build_changes_nothing(home, capsys):
    assert main([*ARGS, "--home", str(home)]) == 0
    capsys.readouterr()
    assert main([*ARGS, "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "'demo' already holds" in out and "'demo-1pct' already holds" in out
