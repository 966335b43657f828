from pathlib import Path

import pytest

from lesionkit import LesionkitError
from lesionkit.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.train.phases and config.train.phases[0].unfreeze == 0


def test_defaults_are_the_study_recipe():
    config = load_config()
    head, finetune = config.train.phases
    assert (head.name, head.unfreeze) == ("head", 0)
    assert finetune.unfreeze == 1 and 1e-5 <= finetune.lr <= 1e-4
    assert config.model.name == "efficientnet_b1" and config.train.class_weights == "balanced"


def test_overrides_reach_nested_phases_and_parse_yaml_values():
    config = load_config(overrides=["train.phases.1.epochs=3", "data.image_size=[180, 240]", "train.seed=7",
                                    "train.phases.0.lr=1e-2"])
    assert config.train.phases[1].epochs == 3
    assert config.data.image_size == [180, 240]
    assert config.train.seed == 7 and config.train.phases[0].lr == 0.01


@pytest.mark.parametrize("override, message", [
    ("model.nme=x", "unknown setting model.nme"),
    ("trian.seed=1", "unknown setting trian"),
    ("train.seed=abc", "train.seed must be int"),
    ("train.phases.0.epochs=-1", "epochs must be at least 1"),
    ("train.phases.5.epochs=1", "not an index below 2"),
    ("data.batch_size=0", "data.batch_size must be at least 1"),
    ("split.val_fraction=1.5", "split.val_fraction must be in [0, 1)"),
    ("augment.hflip=2", "augment.hflip is a probability"),
    ("train.phases.0.schedule=linear", "schedule must be one of"),
    ("model.weights=lite1", "set model.name=tf_efficientnet_lite1"),
    ("seed", "must look like section.key=value"),
])
def test_bad_settings_name_what_to_change(override, message):
    with pytest.raises(LesionkitError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=[override])


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(LesionkitError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(LesionkitError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
