"""Typed configuration: defaults, YAML round trip, overrides with type checks, clear errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from brainseg.cli import app
from brainseg.config import AugmentConfigError, RunConfig, load_config, save_config
from brainseg.errors import BadInputError, OptionError


def test_yaml_round_trip_and_overrides(tmp_path):
    config = RunConfig().override({"train.lr": "3e-4", "data.test_patients": "A, B",
                                   "train.channels_last": "no", "model.options": {"upsample": "transpose"}})
    assert config.train.lr == 3e-4 and config.data.test_patients == ["A", "B"]
    assert RunConfig().override({"train.lr_milestones": "30, 38"}).train.lr_milestones == [30, 38]
    assert RunConfig().override({"train.lr_milestones": "[30,38]"}).train.lr_milestones == [30, 38]
    assert RunConfig().override({"train.lr_milestones": "[]"}).train.lr_milestones == []
    assert config.train.channels_last is False and config.model.options == {"upsample": "transpose"}
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config(path) == config


def test_one_model_option_can_be_set_on_its_own():
    config = RunConfig().override({"model.options": {"upsample": "bilinear", "extra": 1}})
    config = config.override({"model.options.upsample": "transpose", "model.options.width": "2"})
    assert config.model.options == {"upsample": "transpose", "extra": 1, "width": 2}


@pytest.mark.parametrize("updates, message", [
    ({"train.lrr": 1}, "unknown setting train.lrr"),
    ({"trian.lr": 1}, "unknown setting 'trian.lr'"),
    ({"train.epochs": "many"}, "train.epochs must be int"),
    ({"train.epochs": 2.5}, "train.epochs must be int"),
    ({"train.channels_last": "maybe"}, "train.channels_last must be bool"),
    ({"augment.gamma": 1.5}, r"augment.gamma must be in \[0, 1\)"),
    ({"train.lr_milestones": "30, x"}, r"train.lr_milestones\[1\] must be int"),
    ({"train.lr_milestones": "38, 30"}, "lr_milestones must be increasing"),
    ({"train.lr_milestones": [0]}, "of at least 1"),
])
def test_bad_settings_name_the_setting(updates, message):
    with pytest.raises(OptionError, match=message):
        RunConfig().override(updates)


def test_bad_config_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [1, 2")
    with pytest.raises(BadInputError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(BadInputError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "unknown.yaml").write_text("train:\n  speed: 3\n")
    with pytest.raises(OptionError, match=r"unknown setting train\.speed"):
        load_config(tmp_path / "unknown.yaml")
    assert issubclass(AugmentConfigError, OptionError)


def test_shipped_recipes_load_by_name():
    for name in ("lgg_cpu", "lgg_gpu"):
        config = load_config(name)
        assert len(config.data.test_patients) == 7


def test_train_cli_needs_out_or_resume():
    result = CliRunner().invoke(app, ["train", "--data", "x"])
    assert isinstance(result.exception, OptionError)


def test_every_public_api_name_resolves():
    import brainseg

    for name in brainseg.__all__:
        assert getattr(brainseg, name) is not None, name
    assert brainseg.split is brainseg.split_patients
