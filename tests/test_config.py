"""leaml/config.py: the typed configs (help, choices), removed options, and the one fold of
overrides every entry point calls."""
from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import fields

import pytest

from leaml import config
from leaml.config import (FinetuneOptions, GeneratorConfig, PseudoConfig, TrainConfig,
                          fold_overrides, leaml_options)


def test_config_module_imports_no_torch():
    code = "import sys, leaml.config, leaml.app.service; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_engine_modules_reexport_the_config_classes():
    from leaml.engine import generator, pseudo, train
    assert train.TrainConfig is TrainConfig and generator.GeneratorConfig is GeneratorConfig
    assert pseudo.PseudoConfig is PseudoConfig and train.describe_config is config.describe_config


@pytest.mark.parametrize("cls", [TrainConfig, GeneratorConfig, PseudoConfig, FinetuneOptions])
def test_every_field_has_help_and_a_default_inside_its_choices(cls):
    default = cls()
    for f in fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        if "choices" in f.metadata:
            assert getattr(default, f.name) in f.metadata["choices"]


def test_choices_are_enforced_with_the_allowed_values_named():
    with pytest.raises(ValueError, match="mode must be one of 'lora', 'full', not 'half'"):
        TrainConfig(mode="half")
    with pytest.raises(ValueError, match="question_mode must be one of"):
        PseudoConfig(question_mode="ask")
    with pytest.raises(ValueError, match="keep_top"):
        FinetuneOptions(keep_top=0.0)


def test_form_fields_take_type_and_help_from_the_declaration():
    got = config.form_fields(FinetuneOptions, ("min_confidence", "use_seed"))
    assert got == [("min_confidence", float, FinetuneOptions.__dataclass_fields__[
        "min_confidence"].metadata["help"]), ("use_seed", bool, "train on the seed QA")]
    from leaml.app import service
    for kind, knobs in service.JOB_HYPERPARAMETERS.items():
        for name, typ, help_text in knobs:
            assert help_text and typ in (int, float, str, bool), (kind, name)
    assert service.job_choices("finetune") == {"mode": ("lora", "full")}
    assert service.job_choices("pseudo") == {}


def test_leaml_options_hold_every_group_field_but_G_train_and_the_pseudo_seed():
    opts = leaml_options()
    assert set(opts["generator"]) == {f.name for f in fields(GeneratorConfig)} - {"train"}
    assert set(opts["pseudo"]) == {f.name for f in fields(PseudoConfig)} - {"seed"}
    assert FinetuneOptions(**opts["finetune"]) == FinetuneOptions()


def test_stored_params_naming_a_removed_option_load_with_a_warning(caplog):
    old = {**TrainConfig().to_dict(), "train_vision": True, "augment": "flip"}
    with caplog.at_level(logging.WARNING, logger="leaml.config"):
        assert TrainConfig.from_dict(old) == TrainConfig()
        gen = GeneratorConfig.from_dict({**GeneratorConfig().to_dict(), "caption_swaps": 2})
    assert gen == GeneratorConfig()
    text = caplog.text
    assert "TrainConfig.train_vision" in text and "TrainConfig.augment='flip'" in text
    assert "caption_swaps" in text and "removed option" in text


def test_a_stored_job_override_naming_a_removed_option_still_builds_its_config(caplog):
    from leaml.methods import pipeline
    pinned = {"train": {"lr": 0.002, "train_vision": True, "augment": "none",
                        "vision_warmup_transpose": False}}
    with caplog.at_level(logging.WARNING, logger="leaml.config"):
        cfg = pipeline.method_config("seed-full", 0, pinned)
    assert cfg.stages["train"].lr == 0.002 and "vision_warmup_transpose" in caplog.text
    cfg = pipeline.method_config("leaml", 0, {"generator": {"caption_swaps": 0, "rho": 0.5}})
    assert cfg.options["generator"]["rho"] == 0.5 and "caption_swaps" not in cfg.options["generator"]


def test_asking_for_a_removed_option_is_refused_unless_at_its_old_default():
    with pytest.raises(ValueError, match="train.augment was removed: it measured no gain"):
        fold_overrides("seed-full", sets=["train.augment=flip"])
    with pytest.raises(ValueError, match="caption_swaps was removed"):
        fold_overrides("leaml", sets=["generator.caption_swaps=2"])
    with pytest.raises(ValueError, match="train_vision was removed"):
        fold_overrides("seed-full", options={"train_vision": False})
    assert fold_overrides("seed-full", sets=["train.train_vision=true"]) == \
        {"train": {"train_vision": True}}  # the old default: method_config drops it


def test_every_form_of_override_folds_into_one_nested_dict():
    got = fold_overrides("leaml", {"eval_batch_size": 8, "pseudo": {"top_p": 0.9}},
                         sets=["generator.rho=0.2", "train.lr=1e-3", "pseudo.question_mode=known"],
                         options={"k": 3, "lr": 0.1, "keep_top": 0.5},
                         data_mix={"seed": False, "reviewed": True, "pending_min_conf": 0.8})
    assert got == {"eval_batch_size": 8, "pseudo": {"top_p": 0.9, "question_mode": "known", "k": 3},
                   "generator": {"rho": 0.2}, "train": {"lr": 0.001},
                   "finetune": {"lr": 0.1, "keep_top": 0.5, "use_seed": False,
                                "use_reviewed": True, "use_pending": True, "min_confidence": 0.8}}
    assert fold_overrides("caption-then-seed", options={"lr": 0.01}) == \
        {"align": {"lr": 0.01}, "train": {"lr": 0.01}}
    assert fold_overrides("finetune", data_mix={"pending_min_conf": None})["finetune"][
        "use_pending"] is False
    with pytest.raises(ValueError, match="option 'k' is not a knob of caption-then-seed"):
        fold_overrides("caption-then-seed", options={"k": 2})
    with pytest.raises(ValueError, match="STAGE.FIELD=VALUE"):
        fold_overrides("leaml", sets=["rho"])


def test_the_folded_overrides_reach_the_method_config():
    from leaml.methods import leaml as leaml_method
    from leaml.methods import pipeline
    ov = fold_overrides("leaml", options={"rho": 0.3, "k": 5, "lr": 0.004},
                        data_mix={"seed": True, "reviewed": False, "pending_min_conf": 0.7})
    cfg = pipeline.method_config("leaml", 2, ov)
    assert leaml_method.generator_config(cfg).rho == 0.3
    assert leaml_method.pseudo_config(cfg, 2).k == 5 and cfg.stages["finetune"].lr == 0.004
    ft = leaml_method.finetune_options(cfg)
    assert (ft.use_reviewed, ft.min_confidence, ft.keep_top) == (False, 0.7, 0.6)


def test_train_stages_name_stages_of_each_method():
    from leaml.methods import pipeline
    for method in config.METHODS:
        stages = pipeline.method_config(method).stages
        assert set(config.TRAIN_STAGES[method]) <= set(stages), method
    assert set(config.METHODS) == set(pipeline.DEFAULTS)
