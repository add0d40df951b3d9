"""brainseg ensemble: members averaged in probability, mixed 2.5D context, refusals, export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from brainseg.errors import BadInputError, OptionError
from brainseg.evaluation.evaluate import EvaluateOptions, evaluate
from brainseg.export import export_model
from brainseg.inference import Predictor
from brainseg.models import create_model
from brainseg.runs.combine import build_ensemble
from brainseg.runs.model_file import load_model_file


def write_variant(run, out, *, context: int = 0, image_size: int | None = None, seed: int = 0):
    """A model file like the tiny run's, freshly initialised, with another context or input size."""
    description, _ = load_model_file(run)
    description = json.loads(json.dumps(description))
    spec = description["model"]
    spec["kwargs"]["in_channels"] = 3 * (2 * context + 1)
    description["preprocessing"].update(in_channels=3 * (2 * context + 1), context=context)
    if image_size:
        description["preprocessing"]["image_size"] = image_size
    torch.manual_seed(seed)
    network = create_model(spec["name"], **spec["kwargs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"brainseg": description, "state_dict": network.state_dict()}, out)
    return out


def volume(n: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)


def test_ensemble_of_one_model_twice_predicts_like_the_model(tiny_run, tmp_path):
    _, run = tiny_run
    summary = build_ensemble([run, run], tmp_path / "ens")
    assert (tmp_path / "ens" / "split.json").exists() and summary["split"] == "shared by all members"
    single = Predictor.load(run, precision="32").predict_volume(volume())
    combined = Predictor.load(tmp_path / "ens", precision="32").predict_volume(volume())
    np.testing.assert_allclose(combined, single, atol=1e-5)


def test_members_with_different_context_each_read_their_own_channels(tiny_run, tmp_path):
    _, run = tiny_run
    flat = write_variant(run, tmp_path / "flat" / "model.pt", context=0, seed=2)
    stacked = write_variant(run, tmp_path / "stacked" / "model.pt", context=1, seed=3)
    build_ensemble([flat, stacked], tmp_path / "ens")
    ensemble = Predictor.load(tmp_path / "ens", precision="32")
    assert ensemble.context == 1 and ensemble.in_channels == 9
    slices = volume(6)
    expected = (Predictor.load(flat, precision="32").predict_volume(slices)
                + Predictor.load(stacked, precision="32").predict_volume(slices)) / 2
    np.testing.assert_allclose(ensemble.predict_volume(slices), expected, atol=1e-5)


def test_members_of_different_input_size_each_see_their_own_size(tiny_run, tmp_path):
    _, run = tiny_run
    small = write_variant(run, tmp_path / "small" / "model.pt", image_size=32, seed=4)
    build_ensemble([run, small], tmp_path / "ens")
    ensemble = Predictor.load(tmp_path / "ens", precision="32")
    assert ensemble.image_size == max(Predictor.load(run).image_size, 32)
    slices = volume(4)
    expected = (Predictor.load(run, precision="32").predict_volume(slices)
                + Predictor.load(small, precision="32").predict_volume(slices)) / 2
    np.testing.assert_allclose(ensemble.predict_volume(slices), expected, atol=1e-5)


def test_ensemble_exports_to_onnx_and_matches_torch(tiny_run, tmp_path):
    _, run = tiny_run
    stacked = write_variant(run, tmp_path / "stacked" / "model.pt", context=1, seed=3)
    small = write_variant(run, tmp_path / "small" / "model.pt", image_size=32, seed=4)
    build_ensemble([run, stacked, small], tmp_path / "ens")
    result = export_model(tmp_path / "ens", tmp_path / "ens.onnx")
    assert result["max_abs_logit_difference"] < 1e-3
    onnx_masks = Predictor.load(tmp_path / "ens.onnx", backend="onnx").predict_volume(volume()) >= 0.5
    torch_masks = Predictor.load(tmp_path / "ens", precision="32").predict_volume(volume()) >= 0.5
    assert (onnx_masks == torch_masks).mean() > 0.999


def test_settings_from_copies_a_tuned_models_threshold_and_postprocessing(tiny_run, tmp_path):
    from brainseg.evaluation.tune import store_postprocessing

    _, run = tiny_run
    build_ensemble([run, run], tmp_path / "tuned")
    store_postprocessing(tmp_path / "tuned", {"threshold": 0.6, "largest_component": True, "min_size": 20})
    build_ensemble([run, run], tmp_path / "refit", settings_from=tmp_path / "tuned")
    predictor = Predictor.load(tmp_path / "refit", precision="32")
    assert predictor.cutoff == 0.6
    assert predictor.postprocessing == {"largest_component": True, "min_size": 20, "min_fraction": 0.0}
    description, _ = load_model_file(tmp_path / "refit")
    assert description["settings_from"] == str(tmp_path / "tuned")
    assert "validation" in description["threshold_source"]
    with pytest.raises(OptionError, match="not both"):
        build_ensemble([run, run], tmp_path / "both", threshold=0.4, settings_from=tmp_path / "tuned")
    # Post-processing given outright replaces the copied entries it names and keeps the threshold.
    build_ensemble([run, run], tmp_path / "cv", settings_from=tmp_path / "tuned",
                   postprocessing={"largest_component": False, "min_fraction": 0.25, "min_size": None})
    chosen = Predictor.load(tmp_path / "cv", precision="32")
    assert chosen.cutoff == 0.6
    assert chosen.postprocessing == {"largest_component": False, "min_size": 20, "min_fraction": 0.25}
    assert load_model_file(tmp_path / "cv")[0]["postprocessing"]["source"] == "given to brainseg ensemble"
    with pytest.raises(OptionError, match="between 0 and 1"):
        build_ensemble([run, run], tmp_path / "bad", postprocessing={"min_fraction": 2.0})


def test_refusals(tiny_run, tmp_path):
    _, run = tiny_run
    with pytest.raises(OptionError, match="at least two"):
        build_ensemble([run], tmp_path / "one")
    build_ensemble([run, run], tmp_path / "ens")
    with pytest.raises(BadInputError, match="already holds"):
        build_ensemble([run, run], tmp_path / "ens")
    for threshold in (float("nan"), 0.0, 5.0):
        with pytest.raises(OptionError, match="--threshold: must be between 0 and 1"):
            build_ensemble([run, run], tmp_path / "bad", threshold=threshold)
    with pytest.raises(OptionError, match="--min-size: must be 0 or more voxels, not -5"):
        build_ensemble([run, run], tmp_path / "bad", postprocessing={"min_size": -5})
    assert not (tmp_path / "bad").exists()


def test_the_shipped_model_can_be_a_member(tiny_run, tmp_path):
    summary = build_ensemble(["pretrained", "pretrained"], tmp_path / "ens")
    assert summary["members"][0]["file"].endswith(".pt") and len(summary["members"]) == 2


def test_an_ensemble_cannot_be_trained(tiny_run, tmp_path):
    from brainseg.config import RunConfig
    from brainseg.training import train

    data, _ = tiny_run
    config = RunConfig().override({"data.root": str(data), "model.name": "ensemble"})
    with pytest.raises(OptionError, match="built from trained models"):
        train(config, tmp_path / "run", progress=False)


def test_cli_ensemble_then_evaluate(tiny_run, tmp_path):
    data, run = tiny_run
    done = subprocess.run([sys.executable, "-m", "brainseg.cli", "ensemble", str(run), str(run),
                           "--out", str(tmp_path / "ens")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 members" in done.stdout
    done = subprocess.run([sys.executable, "-m", "brainseg.cli", "evaluate", str(tmp_path / "ens"), "--data",
                           str(data), "--split", "val", "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["model"]["model"] == "ensemble"


def fold_member(run, folder, split: dict, fold: int):
    """A copy of the tiny run posing as the run of `fold` of a k-fold split."""
    from brainseg.config import save_config
    from brainseg.runs.folder import load_run_config

    folder.mkdir(parents=True)
    shutil.copy(run / "model.pt", folder / "model.pt")
    save_config(load_run_config(run).override({"data.fold": fold}), folder / "config.yaml")
    (folder / "split.json").write_text(json.dumps(split))
    return folder


def test_an_ensemble_is_never_scored_on_patients_a_member_trained_on(tiny_run, tmp_path):
    data, run = tiny_run
    a, b, c = sorted({p.name for p in data.iterdir() if p.is_dir()})
    kfold = {"test": [c], "folds": [{"train": [a], "val": [b]}, {"train": [b], "val": [a]}]}
    members = [fold_member(run, tmp_path / f"f{k}", kfold, k) for k in (0, 1)]
    summary = build_ensemble(members, tmp_path / "ens")
    # one split.json, but different folds of it: not a shared split
    assert summary["split"].startswith("members differ") and not (tmp_path / "ens" / "split.json").exists()
    assert load_model_file(tmp_path / "ens")[0]["patients_seen"] == {"trained": [a, b], "validated": [a, b]}
    (tmp_path / "kfold.json").write_text(json.dumps(kfold))
    with pytest.raises(BadInputError, match=re.escape(f"trained on 1 of the val patients (e.g. {b})")):
        evaluate(tmp_path / "ens", data, tmp_path / "val0", progress=False,
                 options=EvaluateOptions(side="val", fold=0, split_file=str(tmp_path / "kfold.json")))
    (tmp_path / "other.json").write_text(json.dumps({"train": [c], "val": [], "test": [a, b]}))
    with pytest.raises(BadInputError, match="trained or validated on 2 of the test patients"):
        evaluate(tmp_path / "ens", data, tmp_path / "other", progress=False,
                 options=EvaluateOptions(side="test", split_file=str(tmp_path / "other.json")))
    summary = evaluate(tmp_path / "ens", data, tmp_path / "test", progress=False,
                       options=EvaluateOptions(side="test", split_file=str(tmp_path / "kfold.json")))
    assert summary["data"]["patients"] == 1
