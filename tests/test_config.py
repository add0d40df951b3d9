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
    ({"train.batch_size": 0}, "train.batch_size must be at least 1, got 0"),
    ({"train.lr": 0}, "train.lr must be greater than 0 and finite, got 0.0"),
    ({"train.lr": "nan"}, "train.lr must be greater than 0 and finite, got nan"),
    ({"train.weight_decay": "inf"}, "train.weight_decay must be at least 0 and finite, got inf"),
    ({"train.epochs": -1}, "train.epochs must be at least 1, got -1"),
    ({"train.epochs": 0}, "train.epochs must be at least 1"),
    ({"train.val_every": 0}, "train.val_every must be at least 1"),
    ({"train.devices": 0}, "train.devices must be at least 1"),
    ({"train.precision": "foo"}, "train.precision: must be auto, 32, bf16 or 16, not 'foo'"),
    ({"train.accelerator": "tpu"}, "train.accelerator: must be auto, cpu, cuda or cuda:N, not 'tpu'"),
    ({"train.max_minutes": -1}, "train.max_minutes must be at least 0"),
    ({"train.max_minutes": "nan"}, "train.max_minutes must be at least 0 and finite, got nan"),
    ({"train.lr_factor": 1}, r"train.lr_factor must be in \(0, 1\)"),
    ({"train.min_lr": -1e-6}, "train.min_lr must be at least 0"),
    ({"train.early_stopping_patience": 0}, "train.early_stopping_patience must be at least 1"),
    ({"train.lr_patience": -1}, "train.lr_patience must be at least 0"),
    ({"train.seed": -1}, "train.seed must be a whole number from 0 to 4294967295, got -1"),
    ({"train.seed": 2**32}, "train.seed must be a whole number from 0 to 4294967295"),
    ({"data.image_size": 8}, "data.image_size must be at least 16, got 8"),
    ({"data.image_size": 63}, r"data.image_size must be a multiple of 2\*\*model.depth = 16 .*, got 63"),
    ({"model.depth": 10, "data.image_size": 64}, r"data.image_size must be a multiple of .* = 1024"),
    ({"data.patch_size": 40}, r"data.patch_size must be a multiple of 2\*\*model.depth = 16"),
    ({"data.context": -1}, "data.context must be at least 0, got -1"),
    ({"data.tumour_weight": -1}, "data.tumour_weight must be greater than 0 and finite, got -1.0"),
    ({"data.tumour_weight": "inf"}, "data.tumour_weight must be greater than 0 and finite, got inf"),
    ({"data.samples_per_epoch": -5}, "data.samples_per_epoch must be at least 0"),
    ({"data.num_workers": -7}, "data.num_workers must be at least -1"),
    ({"model.depth": 0}, r"model.depth must be in \[1, 16\], got 0"),
    ({"model.base_filters": 0}, "model.base_filters must be at least 1, got 0"),
    ({"model.dropout": 1.0}, r"model.dropout must be in \[0, 1\), got 1.0"),
    ({"model.options.x": "["}, r"model.options.x: '\[' is not a valid YAML value"),
])
def test_bad_settings_name_the_setting(updates, message):
    with pytest.raises(OptionError, match=message):
        RunConfig().override(updates)


@pytest.mark.parametrize("updates", [
    {"train.precision": "32"}, {"train.precision": "bf16-mixed"}, {"train.epochs": 1},
    {"train.seed": 2**32 - 1}, {"train.max_minutes": 0}, {"data.patch_size": 48, "data.image_size": 64},
    {"model.depth": 3, "data.image_size": 40}, {"train.lr_patience": 0},
])
def test_edge_settings_are_accepted(updates):
    RunConfig().override(updates)


def test_bad_config_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [1, 2")
    with pytest.raises(BadInputError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(BadInputError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00train")
    with pytest.raises(BadInputError, match=r"binary\.yaml: not UTF-8 text"):
        load_config(tmp_path / "binary.yaml")
    (tmp_path / "unknown.yaml").write_text("train:\n  speed: 3\n")
    with pytest.raises(OptionError, match=r"unknown setting train\.speed"):
        load_config(tmp_path / "unknown.yaml")
    assert issubclass(AugmentConfigError, OptionError)
    (tmp_path / "zero.yaml").write_text("train:\n  epochs: 0\n")  # an old run's config.yaml
    with pytest.raises(BadInputError, match=r"zero\.yaml: train\.epochs must be at least 1, got 0"):
        load_config(tmp_path / "zero.yaml")


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
