import dataclasses
from pathlib import Path

import pytest
import yaml

from lesionkit import LesionkitError
from lesionkit.config import load_config, save_config

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
    ("augment.hue=0.7", "augment.hue is a share of the colour circle"),
    ("augment.saturation=-0.1", "augment.saturation must be >= 0"),
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


def test_overrides_parse_values_as_yaml():
    config = load_config(overrides=["train.devices=2", "model.weights=none", "data.per_class_limit=null",
                                    "train.phases.1.lr=1e-5", "augment.rotation=10"])
    assert config.train.devices == "2" and config.model.weights == "none" and config.data.per_class_limit is None
    assert config.train.phases[1].lr == 1e-5 and isinstance(config.augment.rotation, float)


@pytest.mark.parametrize("override, message", [
    ("train.phases.0.bogus=1", "unknown setting train.phases.0.bogus; known in train.phases.0: name, epochs, lr,"),
    ("model.nme=x", "known in model: name, weights, dropout"),
    ("data.batch_size=abc", "setting data.batch_size must be int, got 'abc'"),
    ("data.batch_size=null", "setting data.batch_size must be int, got None"),
    ("data.image_size=5", "setting data.image_size must be list[int] | None, got 5"),
    ("train.phases.x.epochs=1", "'x' is not an index below 2"),
    ("train.phases.2={name: x, epochs: 1, lr: 0.1}", "'2' is not an index below 2"),
    ("train.phases=[{name: x, epochs: 1}]", "setting train.phases.0.lr is required"),
    ("train.phases.0.lr=1", "phase 'head': lr must be in (0, 1), got 1.0"),  # an int reaches __post_init__
    ("data..batch_size=1", "must look like section.key=value"),
])
def test_omegaconf_errors_become_one_line_naming_the_setting(override, message):
    with pytest.raises(LesionkitError) as caught:
        load_config(overrides=[override])
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.__suppress_context__ or caught.value.__context__ is None  # no OmegaConf traceback


def _write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_floats_without_a_dot_and_partial_phases(tmp_path):
    path = _write(tmp_path, "augment: {zoom: 5e-2}\ntrain:\n  phases:\n    - {name: only, epochs: 2, lr: 3e-4}\n")
    config = load_config(path, ["train.phases.0.weight_decay=1e-3"])
    (phase,) = config.train.phases
    assert (phase.name, phase.lr, phase.weight_decay, phase.schedule) == ("only", 3e-4, 1e-3, "cosine")
    assert config.augment.zoom == 0.05
    with pytest.raises(LesionkitError, match=r"'1' is not an index below 1"):
        load_config(path, ["train.phases.1.epochs=3"])  # the file's list replaces the default one


@pytest.mark.parametrize("text, message", [
    ("train:\n  phases:\n    - {name: a, epochs: 1}\n", "setting train.phases.0.lr is required"),
    ("train:\n  phases:\n    - {name: a, epochs: 1, lr: 1e-3}\n    - {name: b, epochs: 1, lr: 1e-3, bogus: 2}\n",
     "unknown setting train.phases.1.bogus; known in train.phases.1: name, epochs, lr,"),
    ("train:\n  phases:\n    - {name: a, epochs: abc, lr: 1e-3}\n",
     "setting train.phases.0.epochs must be int, got 'abc'"),
    ("data:\n  bogus: 1\n", "unknown setting data.bogus; known in data: data_dir, metadata,"),
    ("train: 3\n", "setting train must be a mapping, got 3"),
    ("train:\n  phases: {a: 1}\n", "'a' is not an index below 2"),
    ("- data\n- train\n", "must hold a mapping of sections"),
    ("data: {}\ndata: {}\n", "not valid YAML"),
])
def test_bad_settings_in_files_name_the_setting(tmp_path, text, message):
    with pytest.raises(LesionkitError) as caught:
        load_config(_write(tmp_path, text))
    assert message in str(caught.value)


def test_an_empty_file_is_the_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing set\n")) == load_config()


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=lambda p: getattr(p, "name", "defaults"))
def test_saved_config_loads_back_equal(tmp_path, path):
    config = load_config(path, ["train.devices=2", "data.data_dir=/data/ham 10000", "data.cache_dir='1e-4'",
                                "data.metadata='null'", "train.phases.1.lr=1e-5"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == config.to_dict() and list(saved) == ["data", "split", "model", "augment", "train"]


def test_to_dict_is_plain_asdict():
    config = load_config(CONFIGS[0], ["data.image_size=[180, 240]"])
    assert config.to_dict() == dataclasses.asdict(config)
    assert type(config.to_dict()["data"]["image_size"]) is list and type(config.train.phases) is list
