"""Training end to end on synthetic data: the run folder, resume, overfitting, DDP."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from brainseg.config import RunConfig
from brainseg.data.dataset import SliceDataset, collate
from brainseg.data.index import scan
from brainseg.data.synth import synthesize
from brainseg.training import SegmentationModule, patient_dice, run_training, train

SMALL = {"data.image_size": 64, "model.base_filters": 4, "model.depth": 3, "train.batch_size": 8,
         "data.val": 0.34, "data.test": 0.0, "data.samples_per_epoch": 16, "train.precision": "32-true"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth") / "data", patients=3, seed=0, size=64,
                      slices=(6, 8))


def small_config(root, **extra) -> RunConfig:
    return RunConfig().override({**SMALL, "data.root": str(root), **extra})


def small_train_command(root, run, *options: str) -> list[str]:
    """`brainseg train` of a small run, as a separate process runs it."""
    settings = [item for key, value in SMALL.items() for item in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "brainseg.cli", "train", "--data", str(root), "--out", str(run), *options,
            *settings]


def test_one_epoch_writes_a_complete_run_folder(synthetic, tmp_path):
    result = train(small_config(synthetic, **{"train.epochs": 1}), tmp_path / "run", progress=False)
    run = result.run_dir
    for name in ("config.yaml", "split.json", "history.csv", "learning_curves.png", "model.pt",
                 "val_metrics.json", "val_patients.csv", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    assert result.best_checkpoint is not None and result.best_checkpoint.exists()
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [0]
    assert {"train_loss", "val_loss", "val_patient_dice", "lr"} <= set(history.columns)
    saved = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    description = saved["brainseg"]
    assert description["model"]["name"] == "unet"
    assert description["model"]["kwargs"]["in_channels"] == 3
    assert description["preprocessing"]["image_size"] == 64
    assert description["preprocessing"]["normalisation"] == "volume_p99.5"
    assert description["threshold"] == 0.5
    from brainseg.models import create_model

    model = create_model(description["model"]["name"], **description["model"]["kwargs"])
    model.load_state_dict(saved["state_dict"])  # one file is enough to rebuild the network
    with pytest.raises(Exception, match="already holds a run"):
        train(small_config(synthetic, **{"train.epochs": 1}), run, progress=False)


def test_lightning_cloud_logger_advert_is_filtered_out():
    from lightning.pytorch.trainer.connectors.logger_connector import logger_connector

    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger_connector.rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
        logger_connector.rank_zero_info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [record.getMessage() for record in records] == ["GPU available: False, used: False"]


def test_bf16_mixed_trains_with_finite_losses(synthetic, tmp_path):
    result = train(small_config(synthetic, **{"train.epochs": 2, "train.precision": "bf16-mixed"}),
                   tmp_path / "run", progress=False)
    history = pd.read_csv(result.run_dir / "history.csv")
    assert history["train_loss"].notna().all() and (history["train_loss"] < 10).all()
    assert history["val_loss"].notna().all()
    assert '"precision": "bf16-mixed"' in (result.run_dir / "val_metrics.json").read_text()


def test_auto_precision_picks_fp16_on_gpus_without_bf16(monkeypatch):
    from brainseg.devices import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_precision("auto", "gpu") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", "gpu") == "bf16-mixed"


def test_the_recorded_precision_is_the_one_lightning_ran(synthetic, tmp_path):
    # Lightning has no fp16 autocast on CPU and runs bf16-mixed instead; the run must say so.
    result = train(small_config(synthetic, **{"train.epochs": 1, "train.precision": "16-mixed"}),
                   tmp_path / "run", progress=False)
    assert '"precision": "bf16-mixed"' in (result.run_dir / "val_metrics.json").read_text()


def test_resume_continues_from_the_saved_epoch(synthetic, tmp_path):
    run = tmp_path / "run"
    # A threshold this high keeps validation Dice at 0, so the first epoch stays the best one...
    train(small_config(synthetic, **{"train.epochs": 2, "train.threshold": 0.9999}), run, progress=False)
    assert [p.name for p in (run / "checkpoints").glob("best-*")] == ["best-epoch000.ckpt"]
    # ...and last.ckpt must still hold the last epoch (two steps an epoch)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    run_training(run, overrides={"train.epochs": 3}, resume=True, progress=False)
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2  # Lightning stores the index of the last finished epoch


def test_last_checkpoint_holds_every_epoch_when_validation_is_sparse(synthetic, tmp_path):
    run = tmp_path / "run"
    train(small_config(synthetic, **{"train.epochs": 3, "train.val_every": 2}), run, progress=False)
    # Epoch 2 did not validate; a kill after it must not lose it.
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2


def test_resume_from_a_checkpoint_saved_at_validation_end(synthetic, tmp_path):
    run = tmp_path / "run"
    train(small_config(synthetic, **{"train.epochs": 2, "train.val_every": 2}), run, progress=False)
    # With validation every other epoch, best-*.ckpt is written at validation end, inside its epoch;
    # last.ckpt was too, before it was saved at every epoch's end. Resuming from such a checkpoint
    # enters that epoch's end with no epoch start.
    checkpoints = run / "checkpoints"
    shutil.copy(checkpoints / "best-epoch001.ckpt", checkpoints / "last.ckpt")
    run_training(run, overrides={"train.epochs": 3}, resume=True, progress=False)
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["lr"].notna().all()
    assert (run / "model.pt").exists()


def test_last_checkpoint_knows_its_own_epochs_best(synthetic, tmp_path):
    run = tmp_path / "run"
    train(small_config(synthetic, **{"train.epochs": 1}), run, progress=False)
    states = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    best = [state["best_model_path"] for key, state in states.items()
            if key.startswith("ModelCheckpoint") and "val_patient_dice" in key]
    assert best == [str(run / "checkpoints" / "best-epoch000.ckpt")]
    # so a resume with no epochs left finishes the run: model.pt again from the best epoch
    (run / "model.pt").unlink()
    result = run_training(run, resume=True, progress=False)
    assert result.model_file == run / "model.pt" and result.model_file.exists()


def test_a_run_with_no_validated_epoch_says_so_instead_of_ending_quietly(synthetic, tmp_path):
    from brainseg.errors import TrainingStopped

    with pytest.raises(TrainingStopped, match=r"no epoch was validated .* --resume") as stopped:
        train(small_config(synthetic, **{"train.epochs": 1, "train.val_every": 2}), tmp_path / "run",
              progress=False)
    assert stopped.value.exit_code == 1 and not (tmp_path / "run" / "model.pt").exists()


def test_a_signal_stops_training_with_a_reason_and_a_non_zero_status(synthetic, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    process = subprocess.Popen(small_train_command(synthetic, run, "--epochs", "500"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # what a batch scheduler or `kill` sends
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {run}: stopped by a signal in epoch ")
    assert last_line.endswith(f"continue it with: brainseg train --resume {run}")
    assert "Traceback" not in stderr and not (run / "model.pt").exists()


@pytest.fixture(scope="module")
def one_epoch_run(synthetic, tmp_path_factory):
    """A finished small run to start other runs from."""
    return train(small_config(synthetic, **{"train.epochs": 1}), tmp_path_factory.mktemp("source") / "run",
                 progress=False)


def test_fine_tuning_starts_from_the_given_weights_at_another_size(synthetic, one_epoch_run, tmp_path):
    source = one_epoch_run
    # A learning rate of 1e-9 keeps Adam's steps negligible, so the weights must still be the source's.
    tuned = train(small_config(synthetic, **{"train.epochs": 1, "data.image_size": 96, "train.lr": 1e-9,
                                             "train.init_weights": str(source.run_dir)}),
                  tmp_path / "tuned", progress=False)
    before = torch.load(source.model_file, weights_only=True)["state_dict"]
    after = torch.load(tuned.model_file, weights_only=True)
    assert after["brainseg"]["preprocessing"]["image_size"] == 96
    convolutions = [k for k, v in before.items() if v.dim() == 4]
    assert convolutions
    for key in convolutions:
        torch.testing.assert_close(after["state_dict"][key], before[key], atol=1e-6, rtol=0)


def test_fine_tuning_starts_from_one_member_of_an_ensemble(synthetic, one_epoch_run, tmp_path):
    from brainseg.errors import BadInputError
    from brainseg.runs.combine import build_ensemble

    build_ensemble([one_epoch_run.run_dir, one_epoch_run.run_dir], tmp_path / "ens")
    ensemble = tmp_path / "ens"
    config = {"train.epochs": 1, "train.lr": 1e-9, "train.init_weights": str(ensemble)}
    with pytest.raises(BadInputError, match="is an ensemble; start from one member with"):
        train(small_config(synthetic, **config), tmp_path / "unpicked", progress=False)
    tuned = train(small_config(synthetic, **config, **{"train.init_member": 1}), tmp_path / "tuned",
                  progress=False)
    before = torch.load(one_epoch_run.model_file, weights_only=True)["state_dict"]
    after = torch.load(tuned.model_file, weights_only=True)["state_dict"]
    for key in [k for k, v in before.items() if v.dim() == 4]:  # fp16 in the ensemble file
        torch.testing.assert_close(after[key], before[key], atol=2e-3, rtol=1e-2)
    with pytest.raises(BadInputError, match="is not an ensemble"):
        train(small_config(synthetic, **{**config, "train.init_weights": str(one_epoch_run.run_dir),
                                         "train.init_member": 0}), tmp_path / "plain", progress=False)


def test_refit_settings_follow_the_validated_runs_best_epoch_and_lr_drops(tmp_path):
    from brainseg.config import save_config
    from brainseg.errors import BadInputError
    from brainseg.training import refit_settings

    run = tmp_path / "run"
    save_config(RunConfig().override({"train.max_minutes": 30}), run / "config.yaml")
    (run / "split.json").write_text("{}")
    pd.DataFrame({"epoch": range(7), "lr": [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 1.25e-4],
                  "val_patient_dice": [0.5, 0.6, 0.7, 0.72, 0.71, 0.70, 0.75 - 0.1]}
                 ).to_csv(run / "history.csv", index=False)
    settings = refit_settings(run)
    # best at epoch 3: four epochs, with the drop at epoch 2 (the one at epoch 4 came after the best)
    assert settings["train.epochs"] == 4 and settings["train.lr_milestones"] == [2]
    assert settings["data.refit"] is True and settings["train.max_minutes"] == 0.0
    assert settings["data.split"] == str((run / "split.json").resolve())
    (run / "history.csv").write_text("epoch,lr,val_patient_dice\n")
    with pytest.raises(BadInputError, match="no validated epoch"):
        refit_settings(run)


def test_refit_trains_on_train_and_val_patients_without_validation(synthetic, one_epoch_run, tmp_path):
    from brainseg.errors import BadInputError
    from brainseg.evaluation.evaluate import EvaluateOptions, evaluate
    from brainseg.evaluation.tune import store_postprocessing
    from brainseg.inference import Predictor

    source = shutil.copytree(one_epoch_run.run_dir, tmp_path / "source")
    store_postprocessing(source, {"threshold": 0.6, "largest_component": True, "min_size": 0})
    result = run_training(tmp_path / "refit", refit=source, progress=False,
                          overrides={"train.epochs": 3, "train.lr_milestones": [1, 2]})
    assert result.refit and result.val_patient_dice == {} and result.model_file.exists()
    assert result.unit == "patient"  # the CLI says what the refit trained on
    refit = Predictor.load(result.model_file)  # keeps the threshold tuned on the run's validation
    assert refit.cutoff == 0.6 and refit.postprocessing["largest_component"] is True
    run = result.run_dir
    before, after = (json.loads((folder / "split.json").read_text()) for folder in (source, run))
    assert after["val"] == [] and after["refit_val"] == before["val"]
    assert after["train"] == sorted(before["train"] + before["val"]) and after["test"] == before["test"]
    history = pd.read_csv(run / "history.csv")
    assert history["lr"].tolist() == pytest.approx([1e-3, 5e-4, 2.5e-4])  # the LR each epoch trained at
    assert history["val_patient_dice"].isna().all() and not (run / "val_metrics.json").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    kept = torch.load(result.model_file, weights_only=True)["state_dict"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in kept.items():  # model.pt holds the last epoch's weights
        torch.testing.assert_close(value, last[f"model.{key}"])
    with pytest.raises(BadInputError, match="refit on its validation patients"):
        evaluate(run, synthetic, tmp_path / "eval", options=EvaluateOptions(side="val"), progress=False)
    with pytest.raises(BadInputError, match="is itself a refit"):
        run_training(tmp_path / "again", refit=run, progress=False)


def test_a_models_recipe_trains_again_on_other_data(synthetic, one_epoch_run, tmp_path):
    """--config MODEL: the config stored in a model file, less the data and split it trained on."""
    from brainseg.config import load_config
    from brainseg.errors import BadInputError
    from brainseg.runs.combine import build_ensemble
    from brainseg.training import recipe

    stored = recipe(one_epoch_run.model_file)
    trained = load_config(one_epoch_run.run_dir / "config.yaml")
    assert stored.data.root == stored.data.split == "" and trained.data.root == str(synthetic)
    assert stored.override({"data.root": trained.data.root, "data.split": trained.data.split}) == trained
    result = run_training(tmp_path / "again", config_file=one_epoch_run.run_dir, progress=False,
                          overrides={"data.root": str(synthetic)})
    assert load_config(result.run_dir / "config.yaml").model == trained.model
    assert recipe("pretrained:figshare").model.base_filters == 16  # the shipped recipe, by name
    assert recipe("lgg_cpu") == load_config("lgg_cpu")  # a recipe's name or a YAML file, as before
    build_ensemble([one_epoch_run.run_dir, one_epoch_run.run_dir], tmp_path / "ensemble")
    with pytest.raises(BadInputError, match="holds no training config"):
        recipe(tmp_path / "ensemble")  # each member has its own


def test_fine_tuning_refuses_weights_of_another_network(synthetic, one_epoch_run, tmp_path):
    from brainseg.errors import BadInputError

    source = one_epoch_run
    wider = small_config(synthetic, **{"train.epochs": 1, "model.base_filters": 8,
                                       "train.init_weights": str(source.model_file)})
    with pytest.raises(BadInputError, match="does not fit this run's"):
        train(wider, tmp_path / "wider", progress=False)
    assert not (tmp_path / "wider").exists()  # a refused run leaves no folder behind


def test_patient_dice_convention():
    counts = torch.tensor([[5.0, 0, 0], [0, 0, 0], [1, 2, 3]], dtype=torch.float64)
    dice = patient_dice(counts)
    assert dice[0] == 1 and torch.isnan(dice[1]) and dice[2] == pytest.approx(2 / 7)


def test_history_leaves_validation_empty_in_epochs_that_did_not_validate(synthetic, tmp_path):
    from conftest import train_once

    train_once(tmp_path, synthetic, **{"train.epochs": 3, "train.val_every": 2})
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2] and history["train_loss"].notna().all()
    assert history["val_patient_dice"].isna().tolist() == [True, False, True]  # validated after epoch 1 only


def test_sampler_draws_small_tumour_slices_more_often(synthetic):
    result = scan(synthetic)
    table = result.table
    dataset = SliceDataset(table, result.store, image_size=64)
    pixels = table["tumour_pixels"].to_numpy()
    cut = int(np.median(pixels[pixels > 0]))  # half the tumour slices count as small
    plain = np.asarray(dataset.sampler(3.0).weights)
    small = np.asarray(dataset.sampler(3.0, small_weight=2.0, small_pixels=cut).weights)
    assert set(plain[pixels == 0]) == {1.0} and set(plain[pixels > 0]) == {3.0}
    assert set(small[(pixels > 0) & (pixels < cut)]) == {6.0} and set(small[pixels >= cut]) == {3.0}
    assert set(small[pixels == 0]) == {1.0}


def test_overfitting_four_slices_reaches_dice_above_0_9(synthetic):
    L.seed_everything(0, workers=True, verbose=False)
    result = scan(synthetic)
    table = result.table[result.table["has_tumour"]].groupby("patient").head(2).head(4)
    config = small_config(synthetic, **{"train.lr": 3e-3, "model.dropout": 0.0, "train.val_every": 6})
    dataset = SliceDataset(table, result.store, image_size=64)
    module = SegmentationModule(config.to_dict(), dataset.in_channels, dataset.patients)
    # 50 steps an epoch: Lightning's per-epoch overhead would dominate 300 one-step epochs.
    sampler = RandomSampler(dataset, replacement=True, num_samples=200)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate)
    trainer = L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=6)
    trainer.fit(module, loader, DataLoader(dataset, batch_size=4, collate_fn=collate))
    assert trainer.callback_metrics["val_patient_dice"] > 0.9


def test_two_process_ddp_on_cpu_writes_one_checkpoint(synthetic, tmp_path):
    run = tmp_path / "ddp"
    args = small_train_command(synthetic, run, "--epochs", "1", "--devices", "2", "--accelerator", "cpu")
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "model.pt").exists()
    assert "validation Dice per patient volume" in done.stdout


def test_two_and_a_half_d_context_stacks_neighbours(synthetic, tmp_path):
    import numpy as np

    from brainseg.data.dataset import neighbour_positions
    from brainseg.inference import Predictor

    table = pd.DataFrame({"patient": ["b", "a", "a", "a", "b"], "slice": [2, 3, 1, 2, 1]})
    # Rows of a: slice 1 -> row 2, slice 2 -> row 3, slice 3 -> row 1; edges repeat the end slice.
    assert neighbour_positions(table, 1).tolist() == [[4, 0, 0], [3, 1, 1], [2, 2, 3], [2, 3, 1], [4, 4, 0]]

    result = scan(synthetic)
    dataset = SliceDataset(result.table, result.store, image_size=64, context=1)
    sample = dataset[0]
    assert dataset.in_channels == 9 and sample["image"].shape == (9, 64, 64)
    middle = sample["image"][3:6]
    np.testing.assert_allclose(middle, SliceDataset(result.table, result.store, image_size=64)[0]["image"])

    run = train(small_config(synthetic, **{"train.epochs": 1, "data.context": 1}), tmp_path / "run",
                progress=False)
    predictor = Predictor.from_checkpoint(run.run_dir, precision="32")
    assert predictor.context == 1 and predictor.in_channels == 9
    volume = np.stack([result.store.image(k) for k in result.table["image_path"][:5]])
    assert predictor.predict_volume(volume).shape == (5, 64, 64)


@pytest.mark.parametrize("average", ["swa", "ema"])
def test_weight_averaging_validates_and_saves_the_average(synthetic, tmp_path, average):
    run = tmp_path / "run"
    # A threshold this low marks every pixel as tumour, so validation Dice cannot be 0 if it is counted.
    config = small_config(synthetic, **{"train.epochs": 2, "train.weight_average": average,
                                        "train.threshold": 1e-4})
    train(config, run, progress=False)
    assert (pd.read_csv(run / "history.csv")["val_patient_dice"] > 0).all()
    run_training(run, overrides={"train.epochs": 3}, resume=True, progress=False)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2
    # 16 draws an epoch in batches of 8: two steps an epoch, each one averaged; resume kept counting.
    assert int(last["averaging_state"]["n_averaged"]) == 6
    averaged, current = last["state_dict"], last["current_model_state"]
    key = next(k for k, v in averaged.items() if v.dim() == 4)
    assert not torch.equal(averaged[key], current[key])
    best = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), map_location="cpu", weights_only=False)
    exported = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(exported[key.removeprefix("model.")], best["state_dict"][key])


def test_unknown_weight_average_is_a_one_line_error():
    from brainseg.errors import OptionError

    with pytest.raises(OptionError, match="weight_average must be one of none, swa, ema"):
        RunConfig().override({"train.weight_average": "mean"})
    with pytest.raises(OptionError, match="ema_decay"):
        RunConfig().override({"train.ema_decay": 1.0})
    with pytest.raises(OptionError, match=r"train\.threshold: must be between 0 and 1"):
        RunConfig().override({"train.threshold": 1.0})


def test_a_run_folder_inside_the_data_set_is_refused_before_anything_is_written(synthetic):
    from brainseg.errors import BadInputError

    before = sorted(synthetic.rglob("*"))
    with pytest.raises(BadInputError, match="is inside the data folder"):
        run_training(synthetic / "run", overrides={**SMALL, "data.root": str(synthetic)}, progress=False)
    assert sorted(synthetic.rglob("*")) == before


def test_a_fold_of_a_split_without_folds_is_refused(synthetic, tmp_path):
    from brainseg.errors import OptionError
    from brainseg.training import refit_split

    with pytest.raises(OptionError, match=r"data\.fold is 1 but the split has no folds"):
        train(small_config(synthetic, **{"data.fold": 1}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    plain = {"train": ["A", "B"], "val": ["C"], "test": []}
    assert refit_split(plain, -1)["train"] == ["A", "B", "C"]  # a refit of a plain run has no fold


def test_deep_supervision_weighs_lower_levels_against_the_shrunk_mask():
    from brainseg.losses import create_loss
    from brainseg.training import deep_supervision_loss

    loss_fn = create_loss("bce_dice")
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, 0, 5, 5] = 1  # one tumour pixel: max-pooling keeps it at every level
    main = torch.tensor(0.3)
    shrunk = [torch.nn.functional.adaptive_max_pool2d(mask, side) for side in (16, 8)]
    right = [torch.where(target.bool(), 20.0, -20.0) for target in shrunk]
    assert deep_supervision_loss(loss_fn, main, right, mask).item() == pytest.approx(0.3 / 1.75, abs=1e-3)
    wrong = [-logits for logits in right]  # weights 1, 1/2, 1/4 over 1.75
    expected = (0.3 + 0.5 * loss_fn(wrong[0], shrunk[0]) + 0.25 * loss_fn(wrong[1], shrunk[1])) / 1.75
    actual = deep_supervision_loss(loss_fn, main, wrong, mask)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-5)
    assert deep_supervision_loss(loss_fn, main, [], mask) is main  # off: the loss as it was


def test_deep_supervision_trains_and_predicts_from_its_model_file(synthetic, tmp_path):
    from brainseg.inference import Predictor

    result = train(small_config(synthetic, **{"train.epochs": 1, "model.options.deep_supervision": 2}),
                   tmp_path / "run", progress=False)
    history = pd.read_csv(result.run_dir / "history.csv")
    assert np.isfinite(history["train_loss"]).all()
    predictor = Predictor.from_checkpoint(result.run_dir)
    assert predictor.description["model"]["kwargs"]["deep_supervision"] == 2
    assert len(predictor.model.auxiliary_heads) == 2  # trained heads, unused in prediction
    assert predictor.predict(np.zeros((64, 64, 3), np.uint8)).shape == (64, 64)
