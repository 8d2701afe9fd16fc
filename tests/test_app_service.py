"""leaml/app/service.py: permissions in the library, and the form defaults the app mirrors."""
import pytest
from apphelp import add_users

from leaml.app import service as app_service


def test_form_knobs_are_engine_fields():
    from leaml.engine.pseudo import PseudoConfig
    from leaml.engine.train import TrainConfig
    train, pseudo = TrainConfig(), PseudoConfig()
    for name, typ, _ in app_service._TRAIN_HP:
        assert isinstance(getattr(train, name), typ), name
    for name, typ, _ in app_service._PSEUDO_HP:
        assert isinstance(getattr(pseudo, name), typ), name


def test_job_params_shapes():
    p = app_service.job_params("run", base_model="tiny", seed=1, method="caption-then-seed",
                               label_fraction=0.01, hyperparameters={"lr": 0.01})
    assert p == {"base_model": "tiny", "seed": 1, "method": "caption-then-seed",
                 "label_fraction": 0.01, "overrides": {"align": {"lr": 0.01},
                                                       "train": {"lr": 0.01}}}
    p = app_service.job_params("run", base_model="tiny", seed=1, method="leaml",
                               hyperparameters={"lr": 0.01, "k": 2, "rho": 0.5})
    assert p["overrides"] == {"finetune": {"lr": 0.01}, "pseudo": {"k": 2},
                              "generator": {"rho": 0.5}}
    with pytest.raises(ValueError, match="'k' is not a knob of caption-then-seed"):
        app_service.job_params("run", base_model="tiny", seed=1, method="caption-then-seed",
                               hyperparameters={"k": 2})


@pytest.mark.parametrize("role,allowed", [("admin", True), ("expert", True),
                                          ("annotator", False), ("viewer", False)])
def test_train_permission_by_role(db, role, allowed, tmp_path):
    users = add_users(db)
    from apphelp import make_project
    make_project(db, tmp_path, "p1")
    import os
    import socket

    from leaml.store import jobs as jobs_store
    jobs_store.register_worker(db, os.getpid(), socket.gethostname())  # no real worker
    if allowed:
        assert app_service.start_job(db, users[role], "run", "p1", {"method": "seed-lora"})
    else:
        with pytest.raises(PermissionError):
            app_service.start_job(db, users[role], "run", "p1", {"method": "seed-lora"})


def test_review_permission(db, tmp_path):
    users = add_users(db)
    from apphelp import make_project
    p = make_project(db, tmp_path, "p1")
    with pytest.raises(PermissionError):
        app_service.next_pair(db, users["viewer"], p["id"])
    with pytest.raises(PermissionError):
        app_service.bulk_accept(db, users["viewer"], p["id"], 0.9)
    assert app_service.next_pair(db, users["annotator"], p["id"]) is None


def test_first_admin_only_once(db):
    app_service.create_first_admin(db, "root", "long-enough-pw")
    with pytest.raises(PermissionError):
        app_service.create_first_admin(db, "root2", "long-enough-pw")


def test_the_app_process_never_imports_torch():
    import subprocess
    import sys
    code = ("import sys; import leaml.app.service, pages._common; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("apphelp").ROOT))
