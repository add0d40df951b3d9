"""Image sets (images_masks, no patients): image vocabulary, per-class and size-band scores, compare
on any labelled folder, channel hints between LGG and Figshare-style models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainseg.config import RunConfig
from brainseg.data.dataset import channel_scales
from brainseg.errors import BadInputError, OptionError
from brainseg.evaluation.compare import compare_runs
from brainseg.evaluation.evaluate import EvaluateOptions, evaluate
from brainseg.inference import Predictor
from brainseg.training import train
from conftest import TINY_TRAINING, train_once, write_png

TYPES = ("meningioma", "glioma")


def make_image_set(root, numbers, *, size=64, seed=0):
    """Greyscale slices with a bright disc as the tumour (radius by image), and labels.csv."""
    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[:size, :size]
    for n in numbers:
        radius = 4 + n % 9
        centre = rng.integers(radius + 2, size - radius - 2, 2)
        disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
        image = rng.integers(20, 90, (size, size), dtype=np.uint8)
        image[disc] = 220
        write_png(root / "images" / f"{n}.png", image)
        write_png(root / "masks" / f"{n}.png", disc.astype(np.uint8) * 255)
        rows.append({"index": n, "label": 1 + n % 2, "label_name": TYPES[n % 2]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def brainseg_cli(args: list[str]):
    """`brainseg ARGS...` in this process, as a user would type it."""
    from typer.testing import CliRunner

    from brainseg.cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="session")
def image_run(tmp_path_factory):
    """(training images, other images, run folder): a 2-epoch model on 24 greyscale images."""
    root = tmp_path_factory.mktemp("image-run")
    data = make_image_set(root / "train", range(1, 25))
    other = make_image_set(root / "other", range(101, 109), seed=1)
    return data, other, train_once(root, data, **{"data.group_by": "index-block:4"}).run_dir


def test_an_image_set_is_scored_per_image_with_types_and_size_bands(image_run, tmp_path):
    _, other, run = image_run
    summary = evaluate(run, other, tmp_path / "ev", options=EvaluateOptions(side="all"), progress=False)
    assert summary["data"]["unit"] == "image" and "patients" not in summary["data"]
    assert summary["data"]["images"] == summary["data"]["cases"] == 8
    assert (tmp_path / "ev" / "per_image.csv").exists() and not (tmp_path / "ev" / "per_patient.csv").exists()
    assert not (tmp_path / "ev" / "per_slice.csv").exists()  # it would repeat per_image.csv
    table = pd.read_csv(tmp_path / "ev" / "per_image.csv")
    assert "image" in table and "patient" not in table and "slices" not in table
    assert {"true_pixels", "predicted_pixels"} <= set(table.columns) and "true_voxels" not in table
    assert table["image"].tolist() == sorted(table["image"])  # numbered images in their order (101..108)
    assert "pixels" in summary["conventions"]["size_band"]
    assert "volume_montage.png" not in summary["figures"]  # an image has no volume
    assert set(table["label"]) == set(TYPES) and set(table["size_band"]) == {"<5k"}
    assert set(summary["by_class"]) == set(TYPES)
    assert summary["by_class"]["glioma"]["cases"] == 4
    glioma = table.loc[table["label"] == "glioma", "dice"].mean()
    assert summary["by_class"]["glioma"]["dice"]["mean"] == pytest.approx(glioma, nan_ok=True)
    assert list(summary["by_size_band"]) == ["<5k"]
    assert all("image" in case for case in summary["cases"])


def test_evaluate_verb_speaks_of_images_and_leaves_out_what_it_cannot_count(image_run, tmp_path):
    _, other, run = image_run
    result = brainseg_cli(["evaluate", str(run), "--data", str(other), "--split", "all",
                                      "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert "Dice per image over 8 images" in result.output
    assert "tumour detection per image:" in result.output
    assert "specificity –" in result.output and "nan" not in result.output  # every image has a tumour
    assert "per_image.csv" in result.output and "per_slice.csv" not in result.output


def test_evaluate_on_all_says_how_many_cases_the_model_learnt_from(image_run, tmp_path, capsys):
    data, other, run = image_run
    unseen = evaluate(run, other, tmp_path / "other", options=EvaluateOptions(side="all"), progress=False)
    assert unseen["data"]["seen_by_model"] == 0 and "note:" not in capsys.readouterr().err
    own = evaluate(run, data, tmp_path / "own", options=EvaluateOptions(side="all"), progress=False)
    assert own["data"]["seen_by_model"] == 24  # its training and validation images
    assert "trained or was validated on 24 of these 24 images" in capsys.readouterr().err


def test_compare_takes_any_labelled_folder_as_a_test_set(image_run, tmp_path):
    data, other, run = image_run
    table = compare_runs([run, run], other, tmp_path / "cmp", side="all", progress=False)
    assert {"dice_glioma", "dice_meningioma"} <= set(table.columns)
    assert "8 images" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare_curves.png").stat().st_size > 0  # run folders: their learning curves
    with pytest.raises(BadInputError, match="trained or validated on"):  # it saw these images
        compare_runs([run], data, tmp_path / "seen", side="all", progress=False)
    grouped = compare_runs([run, run], other, tmp_path / "grouped", side="all", group_by="index-block:4",
                           progress=False)
    assert grouped["verdict"].tolist()[1:] == ["no clear change"]  # a run against itself
    assert "drawn over groups of images (index-block:4)" in (tmp_path / "grouped" / "compare.md").read_text()
    with pytest.raises(BadInputError, match="index-block:N or column:NAME"):
        compare_runs([run, run], other, tmp_path / "bad", side="all", group_by="blocks", progress=False)
    assert not (tmp_path / "bad").exists()
    by_type = compare_runs([run, run], other, tmp_path / "by_type", side="all", group_by="column:label_name",
                           progress=False)  # labels.csv's column, looked up in the index
    assert by_type["verdict"].tolist()[1:] == ["no clear change"]
    with pytest.raises(BadInputError, match="no column 'site'"):  # refused before anything is scored
        compare_runs([run, run], other, tmp_path / "nosite", side="all", group_by="column:site",
                     progress=False)
    assert not (tmp_path / "nosite").exists()


def test_compare_verb_applies_the_threshold_and_post_processing_it_is_given(image_run, tmp_path):
    _, other, run = image_run
    result = brainseg_cli(["compare", str(run), str(run), "--data", str(other), "--split", "all",
                                      "--threshold", "0.3", "--min-fraction", "0.25", "--group-by",
                                      "index-block:4", "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert table["threshold"].tolist() == [0.3, 0.3]
    summary = json.loads(next((tmp_path / "cmp").glob("*/summary.json")).read_text())
    assert summary["options"]["min_fraction"] == 0.25


def test_compare_pairs_a_kept_evaluation_whose_model_is_gone(image_run, tmp_path):
    import shutil

    _, other, run = image_run
    gone = tmp_path / "gone"
    shutil.copytree(run, gone)
    kept = tmp_path / "kept"  # what docs/results keeps of a run: its evaluation, not its model
    evaluate(gone, other, kept, options=EvaluateOptions(side="all", precision="32"), progress=False)
    both = ["--data", str(other), "--split", "all", "--group-by", "index-block:4", "--precision", "32"]
    fresh = brainseg_cli(["compare", str(gone), str(run), *both, "--out", str(tmp_path / "fresh")])
    assert fresh.exit_code == 0, fresh.output
    shutil.rmtree(gone)
    again = brainseg_cli(["compare", str(kept), str(run), *both, "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    columns = ["dice_mean", "dice_glioma", "threshold", "change_vs_first", "change_low", "change_high"]
    first, second = (pd.read_csv(tmp_path / name / "compare.csv") for name in ("fresh", "again"))
    pd.testing.assert_frame_equal(first[columns], second[columns])
    assert second["run"].tolist() == ["kept", run.name]
    # Scored otherwise, or on other cases, it is refused before anything is evaluated.
    for options, message in (
            ({"side": "all"}, r"kept: was scored with precision 32; pass --precision 32, so that every model "
                              r"is scored alike$"),
            ({"side": "all", "options": EvaluateOptions(precision="32", threshold=0.3)},
             r"kept: was scored with threshold 0.5; pass --threshold 0.5 or leave it out"),
            ({"side": "val", "options": EvaluateOptions(precision="32")},
             r"kept: scored the all side; this comparison scores val")):
        with pytest.raises(BadInputError, match=message):
            compare_runs([kept, run], other, tmp_path / "refused", progress=False, **options)
        assert not (tmp_path / "refused").exists()
    one_fewer = tmp_path / "one_fewer"
    shutil.copytree(kept, one_fewer)
    table = pd.read_csv(one_fewer / "per_image.csv")
    table.iloc[1:].to_csv(one_fewer / "per_image.csv", index=False)
    with pytest.raises(BadInputError, match=r"one_fewer: scored other cases than the all side compared here"):
        compare_runs([one_fewer, run], other, tmp_path / "refused", side="all",
                     options=EvaluateOptions(precision="32"), progress=False)


def test_tune_draws_its_intervals_over_index_blocks(image_run, tmp_path):
    data, _, run = image_run
    result = brainseg_cli(["tune", str(run), "--data", str(data), "--group-by", "index-block:4",
                                      "--out", str(tmp_path / "tune")])
    assert result.exit_code == 0, result.output
    assert "interval over groups of images (index-block:4)" in result.output
    summary = json.loads((tmp_path / "tune" / "tuning.json").read_text())
    assert summary["interval_over"] == "groups of images (index-block:4)" and summary["unit"] == "image"
    bad = brainseg_cli(["tune", str(run), "--data", str(data), "--group-by", "blocks",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "index-block:N or column:NAME" in str(bad.exception)
    assert not (tmp_path / "bad" / "tuning.csv").exists()


def test_crossval_of_an_image_set_speaks_of_images(image_run, tmp_path):
    import shutil

    import yaml

    from brainseg.evaluation.crossval import cross_validate
    from brainseg.report import write_report

    data, _, run = image_run
    split = json.loads((run / "split.json").read_text())
    images = sorted(split["train"] + split["val"], key=int)
    half = len(images) // 2
    folds = {**split, "test": [], "folds": [{"train": images[half:], "val": images[:half]},
                                            {"train": images[:half], "val": images[half:]}]}
    runs = []
    for k in (0, 1):  # the same weights stand for each fold's run
        folder = tmp_path / f"fold{k}"
        shutil.copytree(run, folder)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["data"]["fold"] = k
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        (folder / "split.json").write_text(json.dumps(folds))
        runs.append(folder)
    summary = cross_validate(runs, data, tmp_path / "cv", progress=False)
    assert summary["unit"] == "image" and summary["dice"]["images"] == len(images)
    assert "copied_sequence" not in summary and "per image" in summary["metric"]
    pooled = pd.read_csv(tmp_path / "cv" / "out_of_fold.csv")
    assert sorted(pooled["image"].astype(str), key=int) == images and "patient" not in pooled
    markdown = (tmp_path / "cv" / "crossval.md").read_text()
    assert "| images | n |" in markdown and "patient" not in markdown.lower()
    against = cross_validate(runs, data, tmp_path / "cv2", progress=False, against=tmp_path / "cv")["against"]
    assert against["images"] == len(images) and against["dice"]["mean"] == pytest.approx(0.0)
    assert "pixels |" in (tmp_path / "cv2" / "crossval.md").read_text()
    grouped = cross_validate(runs, data, tmp_path / "cv3", progress=False, against=tmp_path / "cv",
                             group_by="index-block:4")
    assert grouped["interval_over"] == "groups of images (index-block:4)"
    assert "interval over groups of images (index-block:4)" in (tmp_path / "cv3" / "crossval.md").read_text()
    with pytest.raises(BadInputError, match="index-block:N or column:NAME"):
        cross_validate(runs, data, tmp_path / "cv4", progress=False, group_by="blocks")
    with pytest.raises(BadInputError, match="no column 'site'"):  # a column too, before any scoring
        cross_validate(runs, data, tmp_path / "cv4", progress=False, group_by="column:site")
    assert not (tmp_path / "cv4").exists()
    by_type = cross_validate(runs, data, tmp_path / "cv5", progress=False, against=tmp_path / "cv",
                             group_by="column:label_name")
    assert by_type["interval_over"] == "groups of images (column:label_name)"
    page = write_report(tmp_path / "cv").read_text()
    assert f"out of fold on {len(images)} images" in page and "patient" not in page.lower()


def test_a_split_made_for_training_keeps_index_blocks_together(image_run):
    _, _, run = image_run
    split = json.loads((run / "split.json").read_text())
    assert split["grouped_by"] == "index-block:4"
    sides = {side: {(int(n) - 1) // 4 for n in split[side]} for side in ("train", "val")}
    assert not sides["train"] & sides["val"]


def test_channel_mismatches_name_the_model_that_fits(image_run, tiny_run):
    grey_model = Predictor.load(image_run[2])
    with pytest.raises(BadInputError, match="for LGG's 3-channel slices use --model pretrained"):
        grey_model.predict(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    grey = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    assert grey_model.predict(np.repeat(grey[..., None], 3, axis=-1)).shape == (64, 64)  # equal RGB is grey
    lgg_model = Predictor.load(tiny_run[1])
    with pytest.raises(BadInputError, match="use --model pretrained:figshare"):
        lgg_model.predict(grey)
    with pytest.warns(UserWarning, match="looks like a single sequence"):
        lgg_model.predict(np.repeat(grey[..., None], 3, axis=-1))


def test_divide255_is_the_seed_notebooks_normalisation_and_the_model_file_records_it(image_run, tmp_path):
    data, _, _ = image_run
    config = RunConfig().override({**TINY_TRAINING, "train.epochs": 1, "data.root": str(data),
                                   "data.normalize": "divide255"})
    run = train(config, tmp_path / "run", progress=False).run_dir
    predictor = Predictor.load(run)
    assert predictor.normalisation == "divide255"
    dim = np.full((64, 64), 100, np.uint8)
    assert channel_scales([dim], "divide255").tolist() == [255.0]
    assert channel_scales([dim]).tolist() == [100.0]  # the percentile default scales by the image itself
    assert predictor.predict_volume(dim[None]).shape == (1, 64, 64)
    with pytest.raises(OptionError, match=r"data\.normalize must be percentile or divide255"):
        RunConfig().override({"data.normalize": "zscore"})


def test_a_yaml_file_listing_folders_is_one_data_set(tmp_path):
    from brainseg.data.index import ensure_outside, scan
    from brainseg.data.splits import split_patients

    first = make_image_set(tmp_path / "a", range(1, 9))
    make_image_set(tmp_path / "b", range(9, 17), seed=1, size=96)  # another size, as figshare256 is
    manifest = tmp_path / "sets" / "both.yaml"
    manifest.parent.mkdir()
    manifest.write_text("folders: [../a, ../b]\n")
    result = scan(manifest, progress=False)
    assert len(result.table) == 16 and result.layout == "images_masks"
    assert set(result.table["label_name"]) == set(TYPES)  # each folder's labels.csv joined
    for key in result.table["image_path"]:  # every slice decodes from its own folder's store
        assert result.store.image(key).shape[:2] == result.store.mask(key).shape
    split = split_patients(result.table, val=0.25, test=0.25, group_by="index-block:4")
    blocks = {side: {(int(n) - 1) // 4 for n in split[side]} for side in ("train", "val", "test")}
    assert not (blocks["train"] & blocks["val"]) and not (blocks["train"] & blocks["test"])
    with pytest.raises(BadInputError, match="inside the data folder"):
        ensure_outside(tmp_path / "b" / "runs", manifest)
    make_image_set(tmp_path / "c", range(7, 10), seed=2)
    manifest.write_text("folders: [../a, ../c]\n")
    with pytest.raises(BadInputError, match="'7' is in both"):
        scan(manifest, progress=False)
    manifest.write_text("folders: ../a\n")
    with pytest.raises(BadInputError, match="must list the data set's folders"):
        scan(manifest, progress=False)
    assert first.exists()


def test_training_and_evaluation_take_a_data_set_file(image_run, tmp_path):
    data, other, _ = image_run
    manifest = tmp_path / "both.yaml"
    manifest.write_text(f"folders: [{data}, {other}]\n")
    trained = train_once(tmp_path, manifest, **{"data.group_by": "index-block:4", "train.epochs": 1})
    split = json.loads((trained.run_dir / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 32
    summary = evaluate(trained.run_dir, manifest, tmp_path / "ev", options=EvaluateOptions(side="val"),
                       progress=False)
    assert summary["data"]["unit"] == "image" and summary["data"]["cases"] == len(split["val"])


def test_image_set_outputs_speak_of_images_in_training_exploring_and_the_report(image_run, tmp_path):
    import re
    import shutil

    from brainseg.data.explore import explore, summary_lines
    from brainseg.report import write_report
    from brainseg.training import refit_settings

    data, _, run = image_run
    metrics = json.loads((run / "val_metrics.json").read_text())
    assert metrics["unit"] == "image" and metrics["images"] == metrics["cases"] and "patients" not in metrics
    assert "per image" in metrics["metric"] and "patient" not in metrics["metric"]
    table = pd.read_csv(run / "val_images.csv")
    assert list(table.columns) == ["image", "dice", "tumour_pixels"]
    assert not (run / "val_patients.csv").exists()
    history = pd.read_csv(run / "history.csv")
    assert history["val_image_dice"].notna().any() and "val_patient_dice" not in history
    best = int(history.loc[history["val_image_dice"].idxmax(), "epoch"])
    assert refit_settings(run)["train.epochs"] == best + 1  # a refit reads the image-named column
    refit = brainseg_cli(["train", "--refit", str(run), "--out", str(tmp_path / "refit"),
                          "--set", "train.epochs=1"])
    assert refit.exit_code == 0, refit.output
    assert "refit on its train and val images (no validation)" in refit.output
    summary = explore(data, tmp_path / "explore")
    assert summary["images"] == 24 and "patients" not in summary and "slices_per_patient" not in summary
    lines = "\n".join(summary_lines(summary))
    assert re.findall(r"patients?\b", lines.replace("no patient ids", "")) == []
    folder = tmp_path / "results"
    shutil.copytree(run, folder / "run")
    shutil.copytree(tmp_path / "explore", folder / "explore")
    page = write_report(folder).read_text()
    text = re.sub(r"<[^>]+>", " ", page)
    assert "validation Dice per image" in text and "images (" in text
    assert "slices per patient" not in text and "Dice per patient" not in text


def test_a_greyscale_network_starts_from_a_three_channel_ones_weights(image_run, tiny_run, tmp_path):
    import torch

    from brainseg.runs.model_file import load_model_file

    data, _, _ = image_run
    _, lgg_run = tiny_run  # a 3-channel model of the same architecture (TINY_TRAINING)
    run = train_once(tmp_path, data, **{"train.epochs": 1, "train.lr": 1e-9,
                                        "train.init_weights": str(lgg_run)})
    _, theirs = load_model_file(lgg_run)
    _, ours = load_model_file(run.run_dir)
    first = next(k for k, v in ours.items() if v.dim() == 4)
    assert ours[first].shape[1] == 1 and theirs[first].shape[1] == 3
    torch.testing.assert_close(ours[first].float(), theirs[first].float().sum(dim=1, keepdim=True),
                               atol=1e-4, rtol=1e-3)
