"""Evaluation and prediction end to end on a tiny trained run, post-processing, bad model files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from brainseg.errors import BadInputError, OptionError
from brainseg.evaluation.evaluate import EvaluateOptions, evaluate, select_rows
from brainseg.evaluation.postprocess import (
    largest_component,
    postprocess,
    remove_minor_components,
    remove_small_components,
)
from brainseg.inference import Predictor
from brainseg.runs.model_file import load_model_file


def test_evaluate_writes_tables_figures_and_matches_training_validation(tiny_run, tmp_path):
    data, run = tiny_run
    summary = evaluate(run, data, tmp_path / "eval", options=EvaluateOptions(side="val", precision="32"),
                       progress=False)
    out = tmp_path / "eval"
    for name in ("summary.json", "per_patient.csv", "per_slice.csv", *summary["figures"]):
        assert (out / name).stat().st_size > 0, name
    assert set(summary["figures"]) == {"prediction_grid.png", "worst_patients.png", "patient_dice.png",
                                       "volume_montage.png"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["conventions"]["headline"].startswith("mean Dice per patient volume")
    assert saved["model"]["model"] == "unet" and len(saved["model"]["sha256_16"]) == 16
    per_patient = pd.read_csv(out / "per_patient.csv")
    split = json.loads((run / "split.json").read_text())
    assert sorted(per_patient["patient"]) == sorted(split["val"])
    # The same model, data and threshold give the same per-patient Dice as training's validation.
    during_training = pd.read_csv(run / "val_patients.csv").set_index("patient")["dice"]
    for _, row in per_patient.iterrows():
        assert row["dice"] == pytest.approx(during_training[row["patient"]], abs=1e-6, nan_ok=True)
    per_slice = pd.read_csv(out / "per_slice.csv")
    assert per_slice.groupby("patient")["true_pixels"].sum().to_dict() == \
        per_patient.set_index("patient")["true_voxels"].to_dict()


def test_evaluate_all_and_postprocessing_options(tiny_run, tmp_path):
    data, run = tiny_run
    options = EvaluateOptions(side="all", largest_component=True, min_size=5, tta_flip=True, threshold=0.4)
    summary = evaluate(run / "model.pt", data, tmp_path / "eval", options=options, progress=False)
    assert summary["data"]["patients"] == 3
    assert summary["options"]["threshold"] == 0.4
    assert summary["options"]["largest_component"] is True


@pytest.mark.parametrize(("replaces", "replaced"), [("", ()), ("post", (2,)), ("pre+post", (0, 2))])
def test_flair_replaces_overwrites_those_channels_before_prediction(tiny_run, tmp_path, monkeypatch,
                                                                    replaces, replaced):
    data, run = tiny_run
    seen = []
    original = Predictor.predict_volume

    def spy(self, images, *args, **kwargs):
        seen.append(np.array(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_volume", spy)
    options = EvaluateOptions(side="all", precision="32", flair_replaces=replaces)
    summary = evaluate(run, data, tmp_path / "eval", options=options, progress=False)
    # once per patient: the volume montage reuses its mask
    assert summary["options"]["flair_replaces"] == replaces and len(seen) == 3
    for images in seen:
        assert images.shape[-1] == 3
        for channel in (0, 2):
            assert np.array_equal(images[..., channel], images[..., 1]) == (channel in replaced)
    # the synthetic channels differ, so no patient has equal channels in the data itself
    assert pd.read_csv(tmp_path / "eval" / "per_patient.csv")["equal_channels"].isna().all()


def test_flair_replaces_refuses_an_unknown_pattern(tiny_run, tmp_path):
    data, run = tiny_run
    with pytest.raises(BadInputError, match="flair-replaces"):
        evaluate(run, data, tmp_path / "eval", options=EvaluateOptions(side="all", flair_replaces="pre"),
                 progress=False)
    assert not (tmp_path / "eval").exists()


def test_flair_replaces_needs_three_channels():
    from brainseg.evaluation.evaluate import _replace_with_flair

    grey = np.zeros((2, 8, 8, 1), np.uint8)
    assert _replace_with_flair(grey, "", "scan.png") is grey  # nothing asked, nothing checked
    with pytest.raises(BadInputError, match=r"scan\.png.*3-channel"):
        _replace_with_flair(grey, "post", "scan.png")


def test_evaluate_needs_a_split_for_test_side(tiny_run, tmp_path):
    data, run = tiny_run
    model = tmp_path / "elsewhere" / "model.pt"
    model.parent.mkdir()
    model.write_bytes((run / "model.pt").read_bytes())
    with pytest.raises(BadInputError, match=r"no split\.json"):
        evaluate(model, data, tmp_path / "eval", progress=False)


def test_predictor_from_run_folder_and_checkpoint(tiny_run):
    _, run = tiny_run
    from_run = Predictor.from_checkpoint(run, precision="32")
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    from_ckpt = Predictor.from_checkpoint(best, precision="32")
    image = np.random.default_rng(0).integers(0, 255, (80, 72, 3), dtype=np.uint8)
    mask = from_run.predict(image)
    assert mask.shape == (80, 72) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask, from_ckpt.predict(image))
    with pytest.raises(BadInputError, match="1 channel"):
        from_run.predict(image[..., 0])
    with pytest.raises(BadInputError, match="too small"):
        from_run.predict(image[:4, :4])


@pytest.mark.parametrize("content", [b"not a model", None])
def test_a_file_that_is_not_a_brainseg_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "model.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(BadInputError, match="not a brainseg checkpoint"):
        load_model_file(path)
    with pytest.raises(BadInputError, match="does not exist"):
        load_model_file(tmp_path / "missing.pt")


def test_postprocessing_components():
    volume = np.zeros((3, 10, 10), bool)
    volume[0:2, 1:4, 1:4] = True  # 18 voxels across two slices: one 3D component
    volume[2, 7:9, 7:9] = True  # 4 voxels
    volume[0, 8, 0] = True  # 1 voxel
    assert largest_component(volume).sum() == 18
    assert remove_small_components(volume, 4).sum() == 22
    assert postprocess(volume, min_size=2).sum() == 22
    # Shares of the largest (18 voxels): 4 voxels are 0.22 of it, 1 voxel 0.06.
    assert remove_minor_components(volume, 0.2).sum() == 22
    assert remove_minor_components(volume, 0.25).sum() == 18
    assert remove_minor_components(volume, 0.0).sum() == 23
    twin = volume.copy()
    twin[2, 0:3, 5:9] = True  # a second lesion nearly as large: the largest component alone would drop it
    assert remove_minor_components(twin, 0.25).sum() == 18 + 12
    assert postprocess(twin, min_fraction=0.25, min_size=2).sum() == 18 + 12
    assert not largest_component(np.zeros((4, 4), bool)).any()


def test_compare_two_runs_on_the_same_patients(tiny_run, tmp_path):

    from brainseg.evaluation.compare import compare_runs

    data, run = tiny_run
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    table = compare_runs([run, twin], data, tmp_path / "cmp", side="val", progress=False)
    assert table["run"].tolist() == ["run", "twin"]
    assert table["dice_mean"].iloc[0] == pytest.approx(table["dice_mean"].iloc[1], nan_ok=True)
    for name in ("compare.csv", "compare.md", "compare.png"):
        assert (tmp_path / "cmp" / name).exists()
    # Scoring on patients a run trained on is refused.
    split = json.loads((run / "split.json").read_text())
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps({**split, "test": split["train"][:1], "train": split["train"][1:]}))
    with pytest.raises(BadInputError, match="trained or validated on 1 of the compared patients"):
        compare_runs([run], data, tmp_path / "cmp2", side="test", split_file=leaky, progress=False)


def test_tune_measures_options_and_stores_its_choice(tiny_run, tmp_path):

    from brainseg.evaluation.tune import tune

    data, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    summary = tune(copy, data, tmp_path / "tuning", store=True, progress=False)
    table = pd.read_csv(tmp_path / "tuning" / "tuning.csv")
    assert len(table) == 2 * 5 * 3 * 13  # flip TTA, which components, min size, threshold
    assert set(summary["each_option_alone"]) == {"largest_component", "min_fraction_0.1", "min_fraction_0.25",
                                                 "min_fraction_0.5", "min_size_20", "min_size_100",
                                                 "tta_flip", "tuned_threshold"}
    best = summary["tuned_threshold"]
    assert best["dice_mean"] >= summary["baseline"]["dice_mean"] or np.isnan(summary["baseline"]["dice_mean"])
    for option in summary["each_option_alone"].values():  # each change, paired over the patients
        change = option["change"]
        assert change["verdict"] in ("gain", "loss", "no clear change")
        if change["n"]:
            assert change["low"] <= change["mean"] <= change["high"]
    with pytest.raises(BadInputError, match="leak them into model selection"):  # the rule is tune's own
        tune(copy, data, tmp_path / "t2", side="test", progress=False)
    chosen = summary["recommended"]
    assert not chosen["tta_flip"]
    assert summary["recommended_because"]  # each choice a gain alone, or the baseline (tested below)
    predictor = Predictor.from_checkpoint(copy)
    assert predictor.cutoff == pytest.approx(chosen["threshold"])
    assert predictor.postprocessing == {"largest_component": chosen["largest_component"],
                                        "min_size": chosen["min_size"],
                                        "min_fraction": chosen["min_fraction"]}
    # The caller's choice wins over the stored one.
    override = Predictor.from_checkpoint(copy, largest_component=not chosen["largest_component"], min_size=7,
                                         min_fraction=0.5)
    assert override.postprocessing == {"largest_component": not chosen["largest_component"], "min_size": 7,
                                       "min_fraction": 0.5}


def test_tune_recommends_only_choices_whose_interval_is_above_zero():
    """A post-processing that gains on every patient is kept; a threshold whose gain is noise is not,
    though the noise makes one combination with it the best of all."""
    import itertools

    from brainseg.evaluation.tune import COMPONENTS, MIN_SIZES, THRESHOLDS, _summary

    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.9, 40)
    scores = {}
    for combo in itertools.product((False, True), COMPONENTS, MIN_SIZES, THRESHOLDS):
        tta, (largest, fraction), size, threshold = combo
        value = base - 0.01 * (tta or largest or size > 0 or fraction not in (0.0, 0.1))
        value = value + 0.02 * (fraction == 0.1)  # a gain on every patient
        if threshold == 0.3:  # +0.005 on average, but noise: up on some patients, down on others
            value = value + np.where(np.arange(40) % 2 == 0, 0.1, -0.09)
        scores[combo] = list(value)
    table = pd.DataFrame([{"tta_flip": tta, "largest_component": largest, "min_fraction": fraction,
                           "min_size": size, "threshold": threshold, "dice_mean": float(np.mean(values)),
                           "dice_median": float(np.median(values)), "dice_min": float(np.min(values))}
                          for (tta, (largest, fraction), size, threshold), values in scores.items()])
    summary = _summary(table, scores, 0.5, "val", 40)
    assert summary["best_combination"]["threshold"] == pytest.approx(0.3)
    assert summary["each_option_alone"]["tuned_threshold"]["change"]["verdict"] == "no clear change"
    chosen = summary["recommended"]
    assert (chosen["threshold"], chosen["min_fraction"], chosen["tta_flip"]) == (0.5, 0.1, False)
    assert chosen["change"]["verdict"] == "gain" and "min_fraction_0.1" in summary["recommended_because"]


def test_tune_reads_the_split_stored_in_a_model_file_away_from_its_run(tiny_run, tmp_path):
    from brainseg.evaluation.tune import tune

    data, run = tiny_run
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    state["brainseg"]["split"] = json.loads((run / "split.json").read_text())  # as the shipped model has
    alone = tmp_path / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    torch.save(state, alone)
    summary = tune(alone, data, tmp_path / "tuning", progress=False)
    assert summary["patients"] == len(state["brainseg"]["split"]["val"])


def _as_fold(run, folder, fold: int, split: dict):
    """A copy of `run` that says it trained fold `fold` of `split` (a k-fold split)."""

    import yaml

    shutil.copytree(run, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["data"]["fold"] = fold
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "split.json").write_text(json.dumps(split))
    return folder


def _two_folds(run) -> dict:
    """A 2-fold split of the tiny run's patients."""
    patients = sorted(pd.read_csv(run / "val_patients.csv")["patient"].tolist()
                      + json.loads((run / "split.json").read_text())["train"])
    return {"test": [], "folds": [{"train": patients[1:], "val": patients[:1]},
                                  {"train": patients[:1], "val": patients[1:]}]}


def test_crossval_pools_each_fold_on_its_own_validation_patients(tiny_run, tmp_path):
    from brainseg.evaluation.crossval import cross_validate

    data, run = tiny_run
    split = _two_folds(run)
    patients = sorted(split["folds"][0]["train"] + split["folds"][0]["val"])
    runs = [_as_fold(run, tmp_path / f"fold{k}", k, split) for k in (1, 0)]
    summary = cross_validate(runs, data, tmp_path / "cv", options=EvaluateOptions(precision="32"),
                             progress=False)
    pooled = pd.read_csv(tmp_path / "cv" / "out_of_fold.csv")
    assert sorted(pooled["patient"]) == patients  # every patient once, by the fold that held it out
    for k in (0, 1):
        assert sorted(pooled.loc[pooled["fold"] == k, "patient"]) == split["folds"][k]["val"]
        alone = pd.read_csv(tmp_path / "cv" / f"fold{k}" / "per_patient.csv")
        assert summary["per_fold"][str(k)]["mean"] == pytest.approx(alone["dice"].mean())
    assert summary["dice"]["mean"] == pytest.approx(pooled["dice"].mean())
    assert summary["missing_folds"] == []
    assert summary["all_sequences"]["patients"] + summary["copied_sequence"]["patients"] == len(patients)
    assert "| all | 3 |" in (tmp_path / "cv" / "crossval.md").read_text()
    assert (tmp_path / "cv" / "crossval.png").stat().st_size > 0
    from brainseg.report import write_report

    page = write_report(tmp_path / "cv").read_text()
    assert "Cross-validation (out of fold)" in page and 'href="out_of_fold.csv"' in page
    assert "<td>all three sequences recorded</td>" in page and "out of fold on 3 patients" in page
    assert 'src="fold1/patient_dice.png"' in page  # each fold's own evaluation is in the report too
    # At a glance, each line names the subfolder its result comes from; the report's own, none.
    assert "; <code>fold1</code>)</li>" in page and "<code>.</code>" not in page

    # Runs that are not folds, or that repeat a fold, are refused before anything is scored.
    with pytest.raises(BadInputError, match="not a run of a k-fold split"):
        cross_validate([run], data, tmp_path / "cv2", progress=False)
    with pytest.raises(BadInputError, match="fold 0 is given twice"):
        cross_validate([runs[1], _as_fold(run, tmp_path / "again", 0, split)], data, tmp_path / "cv3",
                       progress=False)
    other = {"test": [], "folds": list(reversed(split["folds"]))}
    with pytest.raises(BadInputError, match="k-fold split differs"):
        cross_validate([runs[1], _as_fold(run, tmp_path / "other", 1, other)], data, tmp_path / "cv4",
                       progress=False)
    assert not any((tmp_path / name).exists() for name in ("cv2", "cv3", "cv4"))
    with pytest.raises(BadInputError, match="not inside a run folder"):
        cross_validate([tmp_path / "cv" / "crossval.png"], data, tmp_path / "cv5", progress=False)


def test_crossval_takes_a_checkpoint_inside_each_fold_run(tiny_run, tmp_path):
    from brainseg.evaluation.crossval import cross_validate

    data, run = tiny_run
    split = _two_folds(run)
    runs = [_as_fold(run, tmp_path / f"fold{k}", k, split) for k in (0, 1)]
    # Another model in one fold's checkpoints folder: the other fold's weights, so its scores differ.
    (runs[0] / "checkpoints").mkdir(exist_ok=True)
    other = runs[0] / "checkpoints" / "other.pt"
    shutil.copy(run / "model.pt", other)
    saved = torch.load(other, weights_only=True)
    saved["state_dict"] = {k: torch.zeros_like(v) if v.is_floating_point() else v
                           for k, v in saved["state_dict"].items()}
    torch.save(saved, other)
    options = EvaluateOptions(precision="32")
    folders = cross_validate(runs, data, tmp_path / "cv_folders", options=options, progress=False)
    files = cross_validate([other, runs[1] / "model.pt"], data, tmp_path / "cv_files", options=options,
                           progress=False)
    assert files["per_fold"]["1"] == folders["per_fold"]["1"]  # model.pt is what the folder scores
    assert files["per_fold"]["0"] != folders["per_fold"]["0"]  # the given file, not the folder's model
    pooled = pd.read_csv(tmp_path / "cv_files" / "out_of_fold.csv")
    assert sorted(pooled.loc[pooled["fold"] == 0, "patient"]) == split["folds"][0]["val"]
    # Against another recipe on the same folds: the paired change per patient, with its interval.
    against = cross_validate(runs, data, tmp_path / "cv_against", options=options, progress=False,
                             against=tmp_path / "cv_files")["against"]
    new, old = (pd.read_csv(tmp_path / f, dtype={"patient": str}).set_index("patient")["dice"]
                for f in ("cv_against/out_of_fold.csv", "cv_files/out_of_fold.csv"))
    assert against["patients"] == len(new) and against["dice"]["n"] == int((new - old).notna().sum())
    assert against["dice"]["mean"] == pytest.approx(float((new - old).dropna().mean()))
    assert against["dice"]["low"] <= against["dice"]["mean"] <= against["dice"]["high"]
    assert "## Change against" in (tmp_path / "cv_against" / "crossval.md").read_text()
    with pytest.raises(BadInputError, match="is not a crossval folder"):
        cross_validate(runs, data, tmp_path / "cv_bad", options=options, against=tmp_path)
    # A saved crossval folder in place of the runs (their models gone): the same pairing, read again.
    shutil.rmtree(runs[0])
    again = cross_validate([tmp_path / "cv_folders"], data, tmp_path / "cv_again", progress=False,
                           against=tmp_path / "cv_files")
    assert again["against"] == against and again["options"]["precision"] == "32"
    saved = [tmp_path / "cv_folders"]
    with pytest.raises(BadInputError, match="cannot change without its models"):
        cross_validate(saved, data, tmp_path / "cv_x", options=EvaluateOptions(threshold=0.3))
    with pytest.raises(BadInputError, match="write the new summary to another folder"):
        cross_validate(saved, data, saved[0], against=tmp_path / "cv_files")


def test_crossval_pools_ensembles_of_one_folds_runs(tiny_run, tmp_path):
    from brainseg.evaluation.crossval import cross_validate
    from brainseg.runs.combine import build_ensemble

    data, run = tiny_run
    split = _two_folds(run)
    options = EvaluateOptions(precision="32")
    singles = [_as_fold(run, tmp_path / f"fold{k}", k, split) for k in (0, 1)]
    twins = [_as_fold(run, tmp_path / f"twin{k}", k, split) for k in (0, 1)]
    # Each fold's run twice over (as two recipes of one fold would be): the same probabilities.
    pairs = []
    for k in (0, 1):
        summary = build_ensemble([singles[k], twins[k] / "model.pt"], tmp_path / f"pair{k}")
        assert summary["fold"] == k
        pairs.append(tmp_path / f"pair{k}")
    alone = cross_validate(singles, data, tmp_path / "cv_alone", options=options, progress=False)
    paired = cross_validate(pairs, data, tmp_path / "cv_pairs", options=options, progress=False)
    assert paired["per_fold"] == alone["per_fold"]
    pooled = pd.read_csv(tmp_path / "cv_pairs" / "out_of_fold.csv")
    assert sorted(pooled.loc[pooled["fold"] == 1, "patient"]) == split["folds"][1]["val"]
    # Runs of different folds make an ensemble without a fold, which crossval refuses.
    build_ensemble([singles[0], singles[1]], tmp_path / "mixed")
    with pytest.raises(BadInputError, match="nor an ensemble built from the runs of one fold"):
        cross_validate([tmp_path / "mixed", pairs[1]], data, tmp_path / "cv_mixed", progress=False)


def test_crossval_scores_copied_sequence_patients_apart():
    from brainseg.evaluation.crossval import _summary

    pooled = pd.DataFrame({"patient": ["a", "b", "c", "d"], "fold": [0, 0, 1, 1],
                           "dice": [0.9, 0.5, 0.7, np.nan],
                           "equal_channels": [np.nan, "0=1 0=2 1=2", "", "0=2"]})
    summary = _summary(pooled, {0: "r0", 1: "r1"}, 3, EvaluateOptions())
    assert summary["copied_sequence"] == {"patients": 1, "mean": 0.5, "median": 0.5, "min": 0.5}
    assert summary["all_sequences"]["mean"] == pytest.approx(0.8)
    assert summary["missing_folds"] == [2]
    assert summary["per_fold"]["1"]["patients"] == 1  # a patient with no Dice is left out


def test_tune_pools_fold_runs_out_of_fold(tiny_run, tmp_path):
    from brainseg.evaluation.crossval import cross_validate
    from brainseg.evaluation.tune import tune

    data, run = tiny_run
    split = _two_folds(run)
    runs = [_as_fold(run, tmp_path / f"fold{k}", k, split) for k in (0, 1)]
    summary = tune(runs, data, tmp_path / "tuning", progress=False)
    assert summary["side"] == "val out of fold" and summary["patients"] == 3
    assert summary["runs"] == [str(r) for r in runs]
    # Its baseline (threshold 0.5, nothing else) is the out-of-fold mean that crossval reports.
    pooled = cross_validate(runs, data, tmp_path / "cv", progress=False)
    assert summary["baseline"]["dice_mean"] == pytest.approx(pooled["dice"]["mean"], abs=1e-6)
    with pytest.raises(BadInputError, match="not several fold runs"):
        tune(runs, data, tmp_path / "stored", store=True, progress=False)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_tune_scores_each_setting_as_postprocess_then_dice_would(seed):
    from brainseg.evaluation.tune import COMPONENTS, MIN_SIZES, THRESHOLDS, dice_by_setting
    from brainseg.metrics import count, dice

    rng = np.random.default_rng(seed)
    probability = rng.random((3, 12, 12)) ** 3  # sparse blobs of high probability
    truth = rng.random((3, 12, 12)) < 0.2
    scores = dice_by_setting(probability, truth)
    assert len(scores) == len(COMPONENTS) * len(MIN_SIZES) * len(THRESHOLDS)
    for ((largest, min_fraction), min_size, threshold), value in scores.items():
        mask = postprocess(probability >= threshold, largest=largest, min_size=min_size,
                           min_fraction=min_fraction)
        assert value == pytest.approx(dice(count(mask, truth)), nan_ok=True)


def test_a_slice_with_the_wrong_channel_count_is_named_by_its_file(tiny_run, tmp_path):
    from conftest import write_png

    _, run = tiny_run
    rng = np.random.default_rng(0)
    for name in ("case1", "case2"):  # grey scans: the model reads three sequences
        scan = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        write_png(tmp_path / "grey" / "images" / f"{name}.png", scan)
        write_png(tmp_path / "grey" / "masks" / f"{name}.png", np.zeros((64, 64), np.uint8))
    options = EvaluateOptions(side="all")
    with pytest.raises(BadInputError, match=r"case1\.png: has 1 channel\(s\); the model expects 3"):
        evaluate(run, tmp_path / "grey", tmp_path / "eval", options=options, progress=False)


@pytest.mark.parametrize(("split", "fold", "message"), [
    ({"train": ["A"], "val": ["B"], "test": []}, 0, "has no folds"),
    ({"train": ["A"], "val": ["B"], "test": []}, -2, r"must be in 0\.\.0, not -2"),
    ({"test": [], "folds": [{"train": ["A"], "val": ["B"]}] * 2}, 2, r"must be in 0\.\.1, not 2"),
    ({"test": [], "folds": [{"train": ["A"], "val": ["B"]}] * 2}, -1, "pass --fold"),
])
def test_a_fold_that_the_split_lacks_is_refused(split, fold, message):
    table = pd.DataFrame({"patient": ["A", "B"], "image_path": ["a.tif", "b.tif"]})
    with pytest.raises(BadInputError, match=message):
        select_rows(table, split, EvaluateOptions(side="val", fold=fold))
    if fold == -1:
        assert select_rows(table, split, EvaluateOptions(side="val", fold=1))["patient"].tolist() == ["B"]


def test_evaluate_refuses_a_seed_numpy_cannot_take(tmp_path):
    with pytest.raises(OptionError, match="--seed"):
        evaluate("no-model", tmp_path, tmp_path / "out", options=EvaluateOptions(seed=-1))


def test_an_ensemble_without_recorded_members_is_checked_against_its_own_split(tmp_path):
    from brainseg.runs.folder import check_unseen

    ensemble = {"model": {"name": "ensemble"}}
    refit = {**ensemble, "split": {"train": ["A", "B"], "val": [], "refit_val": ["B"], "test": ["C"]}}
    check_unseen(tmp_path / "m.pt", refit, ["C"], "test")  # the shipped model
    with pytest.raises(BadInputError, match="trained or validated on 1 of the test patients"):
        check_unseen(tmp_path / "m.pt", refit, ["B", "C"], "test")
    kfold = {**ensemble, "split": {"test": ["C"], "folds": [{"train": ["A"], "val": ["B"]},
                                                           {"train": ["B"], "val": ["A"]}]}}
    with pytest.raises(BadInputError, match="trained on 1 of the val patients"):
        check_unseen(tmp_path / "m.pt", kfold, ["B"], "val")
    check_unseen(tmp_path / "m.pt", kfold, ["B"], "train")  # says what it is
    check_unseen(tmp_path / "m.pt", {"model": {"name": "unet"}}, ["B"], "test")


def test_data_without_slices_on_the_side_names_data_not_an_option_tune_lacks():
    table = pd.DataFrame({"patient": ["A"], "image_path": ["a.tif"]})
    with pytest.raises(BadInputError, match=r"^--data: no slices of this data set are on the val side"):
        select_rows(table, {"train": ["A"], "val": ["B"], "test": []}, EvaluateOptions(side="val"))


def test_a_split_with_nothing_on_the_side_points_to_scoring_on_unseen_data():
    table = pd.DataFrame({"patient": ["A"], "image_path": ["a.tif"]})
    trained_on_all = {"unit": "image", "train": ["A"], "val": [], "test": []}
    with pytest.raises(BadInputError, match=r"^--split: the model's split has no test images; .*--split all"):
        select_rows(table, trained_on_all, EvaluateOptions(side="test"))
