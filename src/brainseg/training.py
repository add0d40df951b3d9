"""Training with Lightning: the module, the data module, callbacks and `train(config, out)`.

The run folder it writes is described in brainseg.runs.folder.

A refit run (`data.refit`, made by `brainseg train --refit RUN`) trains on a validated run's train
and val patients together for the epochs and LR milestones that run chose on validation, with no
validation of its own; its model file holds the last epoch and its split lists val as empty.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    WeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from brainseg import __version__, plots
from brainseg.config import RunConfig, TrainConfig, load_config, save_config
from brainseg.data.dataset import NORMALISATIONS, SliceDataset, collate
from brainseg.data.index import ensure_outside, scan
from brainseg.data.splits import (
    VALIDATION_SCORE,
    load_split,
    save_split,
    select,
    split_patients,
    split_unit,
    validation_score_column,
)
from brainseg.data.transforms import build_transforms, seed_worker
from brainseg.devices import default_workers, resolve_accelerator, resolve_precision
from brainseg.errors import BadInputError, OptionError, TrainingStopped
from brainseg.files import WriteError, remove_stale_partials, replacing
from brainseg.losses import DistillationLoss, create_loss
from brainseg.metrics import Counts, batch_scores, dice
from brainseg.models import available_models, create_model
from brainseg.models.registry import canonical_name
from brainseg.progress import counter
from brainseg.runs.folder import (
    CHECKPOINTS,
    CONFIG_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    RUN_INFO_FILE,
    SPLIT_FILE,
    last_checkpoint,
    load_run_config,
    member_patients_seen,
    model_file,
)
from brainseg.runs.model_file import (
    CHECKPOINT_FORMAT,
    build_network,
    file_digest,
    load_model_file,
    model_file_from_checkpoint,
    store_settings,
    trained_config,
    tuned_settings,
)
from brainseg.runs.pretrained import is_pretrained

# Lightning 2.6 on torch 2.13 warns about its own use of a deprecated pytree API on every step.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Lightning 2.6 prints an advert for its cloud logger at the start of every fit; not ours to show.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip"))
MONITOR = "val_patient_dice"
BEST_PREFIX = "best-epoch"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all: to a temporary file beside the checkpoint (so on its
    filesystem), flushed to disk and renamed over it. Lightning's own save copies a file from the system
    temp folder into place, which a kill can leave half copied when the run folder is on another
    filesystem. A failed write (a full disk) names the checkpoint, not a temporary file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        write_atomically(Path(path), lambda file: torch.save(checkpoint, file))


def write_atomically(path: Path, write) -> Path:
    """Call `write(file)` on an open temporary file beside `path`, flush it to disk, and rename it over
    `path`; any failure leaves `path` as it was and raises WriteError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as partial, partial.open("wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except (OSError, RuntimeError) as error:  # torch reports a failed write as a RuntimeError
        raise WriteError(path, error) from None
    return path


def patient_dice(counts: torch.Tensor) -> torch.Tensor:
    """Dice per patient volume from (P, 3) tp/fp/fn; NaN where truth and prediction are empty."""
    tp, fp, fn = counts.unbind(-1)
    return dice(Counts(tp, fp, fn, torch.zeros_like(tp)))


class Teacher:
    """A trained model whose probabilities a student learns (`brainseg distill`): frozen and in eval
    mode, and not a submodule of the student, so it stays out of its parameters, checkpoints and
    train() switch. It takes the student's batch and gives logits at its size: a teacher of another
    input size gets the batch resized as prediction resizes an image (antialiased, clipped to [0, 1])
    and its logits resized back (bilinear); an ensemble resizes for each of its members itself.

    It labels the training slices once, before training (`label`): running it on every augmented
    batch made a step ~5x dearer with the five-member LGG ensemble, and its maps move with the
    slice's spatial augmentation instead (intensity augmentation does not change them)."""

    def __init__(self, network: torch.nn.Module, image_size: int, identity: dict) -> None:
        self.network = network.eval().requires_grad_(False)
        self.image_size = image_size
        self.identity = identity  # stored in the student's model file

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        network = self.network.to(images.device)  # moves once; a no-op after
        side = tuple(images.shape[-2:])
        inputs = images.float()
        if side != (self.image_size, self.image_size):
            inputs = F.interpolate(inputs, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False).clamp(0.0, 1.0)
        logits = network(inputs).float()
        if tuple(logits.shape[-2:]) != side:
            logits = F.interpolate(logits, size=side, mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def label(self, dataset: SliceDataset, *, device: str = "cpu", bf16: bool = False, batch_size: int = 16,
              progress: bool = True, echo=print) -> torch.Tensor:
        """The teacher's probabilities for every slice of `dataset` as it is before augmentation,
        (N, 1, S, S) uint8 with 255 meaning 1: a quarter of float32's memory, and steps of 1/255 are
        far finer than the differences a soft target carries."""
        transform, dataset.transform = dataset.transform, None  # the plain slices, as prediction sees them
        side = dataset.image_size
        maps = torch.empty((len(dataset), 1, side, side), dtype=torch.uint8)
        bar = counter(len(dataset), desc="teacher labels", unit="slice", enabled=progress, echo=echo)
        try:
            for start in range(0, len(dataset), batch_size):
                stop = min(start + batch_size, len(dataset))
                images = torch.stack([dataset[i]["image"] for i in range(start, stop)]).to(device)
                with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                    probabilities = torch.sigmoid(self.logits(images).float())
                maps[start:stop] = probabilities.mul(255.0).round_().to(torch.uint8).cpu()
                bar.update(stop - start)
        finally:
            dataset.transform = transform
            bar.close()
        return maps


def load_teacher(config: RunConfig, in_channels: int, split: dict) -> Teacher:
    """The teacher `train.teacher` names (model file, run folder or 'pretrained[:NAME]'), refused in one
    line before anything is written if it reads other inputs than the student's data gives (input
    channels, 2.5D context, normalisation) or if it trained or was validated on any of the student's
    test patients. Having trained on the student's train or val patients is allowed."""
    source, data = config.train.teacher, config.data
    if data.patch_size:
        raise OptionError("distillation trains on whole slices (the teacher sees what the student sees); "
                          "leave data.patch_size at 0")
    path = model_file(source)
    description, weights = load_model_file(path)
    preprocessing = description["preprocessing"]

    def refuse(problem: str) -> BadInputError:
        return BadInputError(source, f"cannot be the teacher: {problem}")

    theirs = (int(preprocessing["in_channels"]), int(preprocessing.get("context", 0)))
    if theirs != (in_channels, data.context):
        raise refuse(f"it takes {theirs[0]} input channels (context {theirs[1]}), the student's data gives "
                     f"{in_channels} (context {data.context})")
    normalisation = NORMALISATIONS[data.normalize]
    if preprocessing.get("normalisation") != normalisation:
        raise refuse(f"its inputs were normalised as {preprocessing.get('normalisation')!r}, the student's "
                     f"as {normalisation!r} (data.normalize={data.normalize})")
    seen = member_patients_seen(path, description)
    if seen is None or seen.get("unknown_for"):
        raise refuse("the patients it trained on are unknown (no split.json beside it or stored in it), so "
                     "it may have seen the student's test patients")
    test = set(split.get("test", []))
    leaked = sorted((set(seen.get("trained", [])) | set(seen.get("validated", []))) & test)
    if leaked:
        raise refuse(f"it trained or was validated on {len(leaked)} of the student's test patients (e.g. "
                     f"{leaked[0]}); distil on a split whose test patients the teacher never saw")
    network = build_network(path, description, weights)
    identity = {"source": str(source), "file": str(path), "sha256_16": file_digest(path),
                "model": description["model"]["name"], "image_size": int(preprocessing["image_size"]),
                "distill_weight": config.train.distill_weight}
    return Teacher(network, int(preprocessing["image_size"]), identity)


def deep_supervision_loss(loss_fn, main: torch.Tensor, auxiliary: list[torch.Tensor],
                          mask: torch.Tensor) -> torch.Tensor:
    """nnU-Net's deep supervision: the full-size loss and each lower decoder level's loss against the
    mask shrunk to its size, weighted 1, 1/2, 1/4, ... and normalised to sum to 1. The mask shrinks
    by max-pooling, so a small tumour stays visible at every level."""
    if not auxiliary:
        return main
    weights = [0.5 ** level for level in range(len(auxiliary) + 1)]
    total = main * weights[0]
    for weight, logits in zip(weights[1:], auxiliary, strict=True):
        shrunk = F.adaptive_max_pool2d(mask.float(), tuple(logits.shape[-2:]))
        total = total + weight * loss_fn(logits.float(), shrunk)
    return total / sum(weights)


class SegmentationModule(L.LightningModule):
    """A registry model trained on logits with BCE/Dice losses and per-patient validation Dice; with a
    teacher, on the distillation loss (losses.DistillationLoss). The teacher labelled the training
    slices before training, so the module keeps only its identity (for the model file), not its
    network."""

    def __init__(self, config: dict, in_channels: int, val_patients: list[str],
                 teacher_identity: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher_identity"])
        self.run_config = RunConfig.from_dict(config)
        model = self.run_config.model
        self.model = create_model(model.name, in_channels=in_channels, base_filters=model.base_filters,
                                  depth=model.depth, dropout=model.dropout, batch_norm=model.batch_norm,
                                  **model.options)
        if self.run_config.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss = create_loss(self.run_config.train.loss)
        self.teacher_identity = teacher_identity
        self.distillation = DistillationLoss(self.loss, self.run_config.train.distill_weight) \
            if teacher_identity is not None else None
        self.val_patients = list(val_patients)
        # A plain tensor, not a buffer: weight averaging swaps buffers with the averaged copy's.
        self.val_counts = torch.zeros(len(val_patients), 3, dtype=torch.float64)
        self.last_patient_dice: dict[str, float] = {}
        threshold = self.run_config.train.threshold
        self.logit_threshold = math.log(threshold / (1 - threshold))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self._memory_format(images))

    def _memory_format(self, images: torch.Tensor) -> torch.Tensor:
        if self.run_config.train.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss) of a training batch: the configured loss against the truth or, with a
        teacher, the distillation loss against the truth and the teacher's probabilities (labelled
        before training, augmented with the slice)."""
        if getattr(self.model, "deep_supervision", 0):
            logits, auxiliary = self.model.forward_with_auxiliary(self._memory_format(batch["image"]))
        else:
            logits, auxiliary = self(batch["image"]), []
        if self.distillation is None:
            loss = self.loss(logits.float(), batch["mask"])
        else:
            loss = self.distillation(logits.float(), batch["mask"], batch["teacher"])
        return logits, deep_supervision_loss(self.loss, loss, auxiliary, batch["mask"])

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        logits, loss = self.training_loss(batch)
        size = len(batch["image"])
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size,
                 sync_dist=True)
        scores = batch_scores(logits.detach(), batch["mask"], self.run_config.train.threshold)
        self.log_dict({f"train_{k}": v for k, v in scores.items()}, on_step=False, on_epoch=True,
                      batch_size=size, sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_counts = torch.zeros(len(self.val_patients), 3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_index: int) -> None:
        logits = self(batch["image"]).float()
        size = len(batch["image"])
        self.log("val_loss", self.loss(logits, batch["mask"]), on_epoch=True, batch_size=size,
                 sync_dist=True)
        scores = batch_scores(logits, batch["mask"], self.run_config.train.threshold)
        self.log_dict({f"val_{k}": v for k, v in scores.items()}, on_epoch=True, batch_size=size,
                      sync_dist=True)
        self.val_counts.index_add_(0, batch["patient"], self._full_size_counts(logits, batch))

    def _full_size_counts(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """tp/fp/fn per slice, scored at the original mask size (logits resized up if needed)."""
        truths = batch.get("mask_full", batch["mask"])
        rows = []
        for i in range(len(logits)):
            truth = truths[i].bool()
            logit = logits[i: i + 1]
            if logit.shape[-2:] != truth.shape[-2:]:
                logit = F.interpolate(logit, size=truth.shape[-2:], mode="bilinear", align_corners=False)
            pred = logit[0] > self.logit_threshold
            rows.append(torch.stack([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()]))
        return torch.stack(rows).to(self.val_counts.dtype)

    def on_validation_epoch_end(self) -> None:
        counts = self.val_counts
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        scores = patient_dice(counts)
        mean = torch.nanmean(scores) if (~scores.isnan()).any() else torch.tensor(0.0, dtype=scores.dtype)
        self.log(MONITOR, mean.float(), prog_bar=True)
        self.last_patient_dice = dict(zip(self.val_patients, scores.tolist(), strict=True))

    def configure_optimizers(self):
        train = self.run_config.train
        optimizer = torch.optim.Adam(self.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        if train.lr_milestones:
            steps = torch.optim.lr_scheduler.MultiStepLR(optimizer, train.lr_milestones,
                                                         gamma=train.lr_factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": steps, "interval": "epoch"}}
        if self.run_config.data.refit:  # nothing to plateau on
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=train.lr_factor, patience=train.lr_patience, min_lr=train.min_lr)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": MONITOR, "interval": "epoch",
                                 "frequency": train.val_every}}

    def describe(self) -> dict:
        """What a checkpoint needs to rebuild the model and preprocess inputs (plain types only)."""
        spec = getattr(self.model, "brainseg_spec", None) or {}
        data = self.run_config.data
        return {
            "format": CHECKPOINT_FORMAT,
            "brainseg_version": __version__,
            "model": {"name": spec.get("name", self.run_config.model.name),
                      "kwargs": dict(spec.get("kwargs", {}))},
            "preprocessing": {"image_size": data.image_size, "in_channels": self.hparams.in_channels,
                              "context": data.context, "normalisation": NORMALISATIONS[data.normalize],
                              "channels_last": self.run_config.train.channels_last},
            "threshold": self.run_config.train.threshold,
            "config": self.run_config.to_dict(),
            **({"teacher": dict(self.teacher_identity)} if self.teacher_identity is not None else {}),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["brainseg"] = self.describe()


class SliceDataModule(L.LightningDataModule):
    """Train/val loaders over one split of an indexed data set."""

    def __init__(self, config: RunConfig, train_table: pd.DataFrame, val_table: pd.DataFrame, store,
                 workers: int) -> None:
        super().__init__()
        data = config.data
        self.config = config
        augment = build_transforms(config.augment, train=True, seed=config.train.seed,
                                   patch_size=data.patch_size)
        normalisation = NORMALISATIONS[data.normalize]
        self.train_set = SliceDataset(train_table, store, image_size=data.image_size, context=data.context,
                                      normalisation=normalisation,
                                      transform=augment)
        self.val_set = SliceDataset(val_table, store, image_size=data.image_size, context=data.context,
                                    normalisation=normalisation,
                                    keep_full_mask=True)
        self.workers = workers

    def _loader(self, dataset, **options) -> DataLoader:
        extra = {"persistent_workers": True, "worker_init_fn": seed_worker} if self.workers else {}
        return DataLoader(dataset, batch_size=self.config.train.batch_size, num_workers=self.workers,
                          collate_fn=collate, **extra, **options)

    def _rank(self) -> tuple[int, int]:
        """(this process's rank, the number of processes) once a Trainer runs the module; (0, 1) before."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        data, seed = self.config.data, self.config.train.seed
        # Every process draws the same weighted sample (the run's seed) and Lightning's
        # DistributedSamplerWrapper deals each process its own share of it; augmentation and loader
        # workers get a random stream per process, so that processes do not repeat each other's.
        sampler = self.train_set.sampler(data.tumour_weight, data.samples_per_epoch, seed,
                                         data.small_tumour_weight, data.small_tumour_pixels)
        rank, processes = self._rank()
        extra = {}
        if processes > 1:
            stream = (seed + rank) % 2**32
            if hasattr(self.train_set.transform, "set_random_state"):
                self.train_set.transform.set_random_state(seed=stream)
            extra["generator"] = torch.Generator().manual_seed(stream)
        return self._loader(self.train_set, sampler=sampler, drop_last=len(self.train_set) > 1, **extra)

    def val_dataloader(self) -> DataLoader:
        rank, processes = self._rank()
        if 1 < processes <= len(self.val_set):
            # Each process scores slices of its own and none twice: Lightning's default sampler pads the
            # shares to one length with repeated slices, which would count in the patients' Dice.
            sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=processes, rank=rank,
                                                   shuffle=False)
            return self._loader(self.val_set, sampler=sampler)
        return self._loader(self.val_set, shuffle=False)


class HistoryCallback(Callback):
    """Writes history.csv after every epoch and learning_curves.png when training ends."""

    def __init__(self, run_dir: Path, unit: str) -> None:
        self.path = run_dir / HISTORY_FILE
        self.run_dir = run_dir
        self.score_column = VALIDATION_SCORE[unit]  # the logged MONITOR, named for patients or images
        self.started = time.perf_counter()

    def on_train_start(self, trainer, module) -> None:
        # A checkpoint saved at validation end (as best-*.ckpt are, and last.ckpt was before it was saved
        # at every epoch's end) resumes straight into that epoch's end, with no epoch start before it.
        self.on_train_epoch_start(trainer, module)
        if trainer.is_global_zero and self.path.exists():  # resuming: drop epochs that will rerun
            history = pd.read_csv(self.path)
            history[history["epoch"] < trainer.current_epoch].to_csv(self.path, index=False)

    def on_train_epoch_start(self, trainer, module) -> None:
        # Read here: Lightning steps an epoch-interval schedule (not a plateau one) before epoch end.
        self.epoch_lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}
        row = {"epoch": trainer.current_epoch, "seconds": round(time.perf_counter() - self.started, 1),
               "lr": self.epoch_lr}
        # Lightning keeps the last validation's metrics between validations (val_every > 1): only an
        # epoch that validated gets val_* values, the others are left empty.
        validated = getattr(self, "validated_epoch", None) == trainer.current_epoch
        for name in ("train_loss_epoch", "train_dice", "train_iou", "train_accuracy", "val_loss", "val_dice",
                     "val_iou", "val_accuracy", MONITOR):
            fresh = validated or not name.startswith("val")
            column = self.score_column if name == MONITOR else name.replace("_epoch", "")
            row[column] = metrics.get(name, float("nan")) if fresh else float("nan")
        frame = pd.DataFrame([row])
        frame.to_csv(self.path, mode="a", header=not self.path.exists(), index=False)

    def on_fit_end(self, trainer, module) -> None:
        if trainer.is_global_zero and self.path.exists():
            write_learning_curves(self.run_dir)


def write_learning_curves(run_dir: Path) -> Path | None:
    history = pd.read_csv(run_dir / HISTORY_FILE)
    if history.empty:
        return None
    best = None
    score = validation_score_column(history)
    if score and history[score].notna().any():
        best = int(history.loc[history[score].idxmax(), "epoch"])
    split = run_dir / SPLIT_FILE
    unit = load_split(split).get("unit", "patient") if split.exists() else "patient"
    return plots.learning_curves(history, run_dir / "learning_curves.png", best, unit)


LR_SCALING = "none: train.lr is used as set, whatever the effective batch size"


class RunInfoCallback(Callback):
    """How the run is spread over processes. Refuses, on every process at once, a run folder that some
    process cannot see; says on the console (several processes) and in run_info.json (a session per
    start or resume) how many processes on how many nodes train, the batch one optimiser step sees, and
    that the learning rate is not scaled with it."""

    def __init__(self, run_dir: Path, resumed_from: Path | None, echo, samples_per_epoch: int) -> None:
        self.run_dir, self.resumed_from, self.echo = run_dir, resumed_from, echo
        self.samples_per_epoch = samples_per_epoch

    def setup(self, trainer, module, stage: str) -> None:
        if stage != "fit" or trainer.world_size == 1:
            return
        # Rank 0 alone writes the run folder, but every process reads checkpoints back from it (resume,
        # the best epoch's validation), so it must be one folder that every node mounts.
        if not trainer.strategy.reduce_boolean_decision((self.run_dir / CONFIG_FILE).exists(), all=True):
            raise OptionError(f"not every process sees the run folder {self.run_dir} (a disk of each node's "
                              "own?); put --out on a filesystem that every node mounts")

    def on_train_start(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        train_cfg = module.run_config.train
        environment = getattr(trainer.strategy, "cluster_environment", None)
        session = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "first_epoch": trainer.current_epoch,
            "nodes": trainer.num_nodes,
            "processes_per_node": trainer.num_devices,
            "processes": trainer.world_size,
            "launcher": type(environment).__name__ if environment is not None else "none (one process)",
            "accelerator": type(trainer.accelerator).__name__,
            "batch_size_per_process": train_cfg.batch_size,
            "effective_batch_size": train_cfg.batch_size * trainer.world_size,
            "samples_per_epoch": self.samples_per_epoch,  # all processes together
            "steps_per_epoch": int(trainer.num_training_batches),  # each process
            "lr": train_cfg.lr,
            "lr_scaling": LR_SCALING,
        }
        if trainer.world_size > 1:
            self.echo(f"{trainer.world_size} processes on {trainer.num_nodes} node(s) "
                      f"({session['launcher']}): "
                      f"effective batch size {train_cfg.batch_size} x {trainer.world_size} = "
                      f"{session['effective_batch_size']}, {session['steps_per_epoch']} steps per epoch; "
                      f"learning rate {train_cfg.lr} as set (not scaled with the batch size)")
        path = self.run_dir / RUN_INFO_FILE
        sessions = []
        if self.resumed_from is not None and path.exists():
            try:
                sessions = list(json.loads(path.read_text()).get("sessions", []))
            except (ValueError, AttributeError):  # a damaged file: this session starts it again
                sessions = []
        text = json.dumps({**session, "sessions": [*sessions, session]}, indent=2) + "\n"
        write_atomically(path, lambda file: file.write(text.encode()))


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path | None
    model_file: Path | None
    val_patient_dice: dict[str, float]
    minutes: float
    refit: bool = False  # trained on train+val without validation: the checkpoint is the last epoch
    resumed_from: Path | None = None  # the checkpoint a resumed run continued from
    unit: str = "patient"  # what the split divides: patients, or images for an image set


# The ranks a launcher gives the processes it starts: torchrun (RANK, LOCAL_RANK, GROUP_RANK), SLURM's
# srun (SLURM_PROCID) and Lightning's own launcher for --devices N (LOCAL_RANK, NODE_RANK).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def _is_rank_zero() -> bool:
    """Whether this process writes the run folder, told before Lightning sets up the process group: no
    rank a launcher set is other than 0. Every other process (another GPU, another node) reruns the
    same command and only reads."""
    return all(os.environ.get(name, "0").strip() == "0" for name in RANK_VARIABLES)


def check_launch(train_cfg: TrainConfig) -> None:
    """Refuse, before anything is written, --devices and --num-nodes that do not match the processes
    torchrun or SLURM started (Lightning would find out only once the run folder is written), and a run
    for one process in a process that a launcher started several of (each would train a model of its
    own into the same folder)."""
    devices, nodes = train_cfg.devices, train_cfg.num_nodes
    hint = "--devices is the processes on each node, --num-nodes the number of nodes"
    if TorchElasticEnvironment.detect():
        started, per_node = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
        if devices * nodes != started:
            raise OptionError(f"torchrun started {started} processes ({per_node} per node) but --devices "
                              f"{devices} x --num-nodes {nodes} is {devices * nodes}; {hint} (here "
                              f"--devices {per_node} --num-nodes {max(1, started // per_node)})")
        return
    if devices * nodes > 1 and SLURMEnvironment.detect():
        for variable, value, option in (("SLURM_NTASKS_PER_NODE", devices, "--devices"),
                                        ("SLURM_NNODES", nodes, "--num-nodes")):
            if variable in os.environ and os.environ[variable].strip() != str(value):
                raise OptionError(f"SLURM runs {variable}={os.environ[variable]} but {option} is {value}; "
                                  f"{hint}")
    if devices * nodes == 1 and not _is_rank_zero():
        raise OptionError(f"this is one of several processes that a launcher (torchrun, srun) started, "
                          f"but the run is for one process; {hint}")


def prepare_split(config: RunConfig, table: pd.DataFrame) -> dict:
    """The run's split: the given split file, or a new seeded split by patient."""
    data = config.data
    if data.split:
        return load_split(data.split)
    return split_patients(table, val=data.val, test=data.test, folds=data.folds or None,
                          seed=config.train.seed, test_patients=data.test_patients, group_by=data.group_by)


def _train_and_val(split: dict, fold: int) -> dict:
    """The split's train/val patient lists, or those of `fold` in a k-fold split."""
    if "folds" not in split:
        if fold >= 0:
            raise OptionError(f"data.fold is {fold} but the split has no folds; make a k-fold split "
                              "(data.folds, or brainseg split --folds K) or leave out the fold")
        return split
    if not 0 <= fold < len(split["folds"]):
        raise OptionError(f"data.fold must be in 0..{len(split['folds']) - 1} for this k-fold split")
    return split["folds"][fold]


def split_tables(table: pd.DataFrame, split: dict, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    group = _train_and_val(split, fold)
    return select(table, group, "train"), select(table, group, "val")


def refit_split(split: dict, fold: int) -> dict:
    """The split a refit run trains on: the validation patients (of `fold`) moved into training."""
    group = _train_and_val(split, fold)
    kept = {key: value for key, value in split.items() if key not in ("train", "val", "folds")}
    return {**kept, "train": sorted([*group["train"], *group["val"]]), "val": [],
            "refit_val": sorted(group["val"])}


def refit_settings(run_dir: str | Path) -> dict:
    """Overrides that refit a validated run on its train and val patients together.

    The refit keeps the run's config and runs as many epochs as the run needed to reach its best
    validation score, lowering the LR at the epochs where the run's plateau schedule lowered it."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if config.data.refit:
        raise BadInputError(run_dir, "is itself a refit; refit the validated run it came from")
    history_file = run_dir / HISTORY_FILE
    history = pd.read_csv(history_file) if history_file.exists() else pd.DataFrame()
    score = validation_score_column(history)
    scored = history.dropna(subset=[score]) if score else history.iloc[0:0]
    if scored.empty or not (run_dir / SPLIT_FILE).exists():
        raise BadInputError(run_dir, f"has no validated epoch ({HISTORY_FILE} with a validation Dice) "
                                     f"and {SPLIT_FILE} to refit from")
    best = int(scored.loc[scored[score].idxmax(), "epoch"])
    lr = history.set_index("epoch")["lr"]
    milestones = [int(e) for e in lr.index if 0 < e <= best and e - 1 in lr.index and lr[e] < lr[e - 1]]
    return {"data.refit": True, "data.split": str((run_dir / SPLIT_FILE).resolve()),
            "train.epochs": best + 1, "train.lr_milestones": milestones, "train.max_minutes": 0.0}


def resume_checkpoint(run_dir: str | Path) -> tuple[Path, int, list[str]]:
    """The newest checkpoint of a run that loads (last.ckpt, unless a kill or a full disk damaged it, then
    the newest best-epoch checkpoint), the epoch it was saved at, and a note for each damaged one
    skipped. None loading is a one-line error naming the newest."""
    run_dir = Path(run_dir)
    last = last_checkpoint(run_dir)
    folder = last.parent
    bests = sorted(folder.glob(f"{BEST_PREFIX}*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = ([last] if last.exists() else []) + bests
    if not candidates:
        raise BadInputError(run_dir, f"no {CHECKPOINTS}/{last.name} to resume from")
    skipped: list[str] = []
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            epoch = int(state["epoch"])
            if "optimizer_states" not in state or "state_dict" not in state:
                raise KeyError("no optimizer state")
        except Exception as error:  # a truncated or foreign file raises whatever its first bad byte does
            reason = "empty file" if path.stat().st_size == 0 else _first_line(error)
            skipped.append(f"{path}: damaged checkpoint ({reason})")
            continue
        return path, epoch, skipped
    raise BadInputError(candidates[0], f"damaged checkpoint ({skipped[0].split('(', 1)[1][:-1]}); no "
                                       f"checkpoint in {folder} loads, so the run cannot be resumed")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:120]


def remove_stale_checkpoints(folder: Path, keep: Path | None) -> list[Path]:
    """Remove the best-epoch checkpoints other than `keep` (left by a kill or a resume) and temporary
    files of killed writes."""
    removed = remove_stale_partials(folder)
    for path in folder.glob(f"{BEST_PREFIX}*.ckpt"):
        if keep is None or path.resolve() != keep.resolve():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def train(config: RunConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          echo=print) -> TrainResult:
    """Train one model as `config` says and write the run folder `out`. Resuming continues from the
    newest checkpoint that loads (see :func:`resume_checkpoint`) and says which through `echo`."""
    check_launch(config.train)
    run_dir = Path(out)
    last = last_checkpoint(run_dir)
    resumed_from = None
    if resume:
        resumed_from, resumed_epoch, skipped = resume_checkpoint(run_dir)
        if _is_rank_zero():
            for note in skipped:
                echo(f"note: skipping {note}")
            echo(f"resuming from {resumed_from} (saved at epoch {resumed_epoch})")
            remove_stale_partials(run_dir)
            remove_stale_partials(last.parent)
            _trim_metrics(run_dir / "logs" / "metrics.csv", resumed_epoch)
    elif _is_rank_zero() and (run_dir / CONFIG_FILE).exists():  # DDP children rerun this command
        raise BadInputError(run_dir, "already holds a run; use --resume to continue it or choose a new --out")
    if not config.data.root:
        raise OptionError("no data folder: pass --data DIR (or set data.root in the config)")
    ensure_outside(run_dir, config.data.root)
    if canonical_name(config.model.name) not in available_models():
        raise OptionError(f"{config.model.name!r} is built from trained models (brainseg ensemble), not "
                          f"trained; choose one of: {', '.join(available_models())}")
    started = time.perf_counter()
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    accelerator = resolve_accelerator(config.train.accelerator)
    precision = resolve_precision(config.train.precision, accelerator)

    result = scan(config.data.root, config.data.layout, cache=config.data.cache, progress=progress)
    ensure_outside(run_dir, result.root)
    split = prepare_split(config, result.table)
    unit = split.get("unit", "patient")  # what the split divides: patients, or images for an image set
    refit = config.data.refit
    fold = config.data.fold
    if refit:  # a plain split from here on, with the fold's patients
        split, fold = refit_split(split, fold), -1
    train_table, val_table = split_tables(result.table, split, fold)
    if train_table.empty or (val_table.empty and not refit):
        raise OptionError("the split leaves no training or no validation slices; check data.val / data.split")
    workers = config.data.num_workers if config.data.num_workers >= 0 else default_workers(accelerator)
    datamodule = SliceDataModule(config, train_table, val_table, result.store, workers)
    in_channels = datamodule.train_set.in_channels
    teacher = load_teacher(config, in_channels, split) if config.train.teacher else None
    if teacher is not None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if accelerator == "gpu" else "cpu"
        datamodule.train_set.soft_targets = teacher.label(
            datamodule.train_set, device=device,
            bf16=precision.startswith("bf16"), batch_size=config.train.batch_size,
            progress=progress and _is_rank_zero(), echo=echo)
    module = SegmentationModule(config.to_dict(), in_channels, datamodule.val_set.patients,
                                teacher_identity=teacher.identity if teacher is not None else None)
    del teacher  # its maps are labelled; its network is not needed while the student trains
    if config.train.init_weights and not resume:  # a resumed run has its own weights in last.ckpt
        note = load_initial_weights(module.model, config.train.init_weights,
                                    NORMALISATIONS[config.data.normalize], config.train.init_member)
        if note and _is_rank_zero():
            echo(f"note: {config.train.init_weights}: {note}")
    if _is_rank_zero():  # written only once the run is known to start, so a refused run leaves nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)
        save_split(split, run_dir / SPLIT_FILE)

    # last.ckpt is written every epoch by a callback of its own: Lightning 2.6 refreshes a monitored
    # callback's last.ckpt only when the best improves, and would make --resume restart from there.
    # It saves at every epoch's end: by default Lightning saves at validation only, so with
    # train.val_every > 1 a kill lost up to that many epochs.
    latest = ModelCheckpoint(dirpath=last.parent, filename=last.stem, save_top_k=1,
                             enable_version_counter=False, save_on_train_epoch_end=True)
    callbacks = [HistoryCallback(run_dir, unit), LearningRateMonitor("epoch")]
    if refit:  # no validation: keep the last epoch, stop at train.epochs
        checkpoint = latest
    else:
        checkpoint = ModelCheckpoint(dirpath=last.parent, filename=BEST_PREFIX + "{epoch:03d}",
                                     auto_insert_metric_name=False, monitor=MONITOR, mode="max", save_top_k=1)
        callbacks += [checkpoint,
                      EarlyStopping(MONITOR, mode="max", patience=config.train.early_stopping_patience)]
    # After the best-epoch callback: both save at an epoch's end, in list order, and last.ckpt must hold
    # the best as of its own epoch, or a resume would forget that epoch's best.
    callbacks.append(latest)
    train_cfg = config.train
    samples = config.data.samples_per_epoch or len(datamodule.train_set)
    processes = train_cfg.devices * train_cfg.num_nodes  # each steps through its share of the samples
    callbacks += [*weight_averaging(train_cfg), RunInfoCallback(run_dir, resumed_from, echo, samples)]
    trainer = L.Trainer(
        accelerator=accelerator, devices=train_cfg.devices, num_nodes=train_cfg.num_nodes,
        plugins=[AtomicCheckpointIO()], strategy="ddp" if processes > 1 else "auto",
        precision=precision, max_epochs=train_cfg.epochs,
        max_time={"minutes": train_cfg.max_minutes} if train_cfg.max_minutes > 0 else None,
        check_val_every_n_epoch=train_cfg.val_every, limit_val_batches=0 if refit else None,
        callbacks=callbacks, logger=_logger(run_dir),
        default_root_dir=run_dir, enable_progress_bar=progress, num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(10, len(datamodule.train_dataloader()) // processes)),
        enable_model_summary=False,
    )
    precision = str(trainer.precision)  # what Lightning runs: it turns 16-mixed on CPU into bf16-mixed
    if train_cfg.num_nodes > 1 and _is_rank_zero():
        where = f" at {os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '')}".rstrip(":") \
            if os.environ.get("MASTER_ADDR") else ""
        echo(f"waiting for {train_cfg.num_nodes} nodes of {train_cfg.devices} process(es) each to "
             f"join{where}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resumed_from)
    except SIGTERMException:  # Lightning's handler ends the fit with SystemExit(None): status 0
        raise TrainingStopped(run_dir, f"stopped by a signal in epoch {trainer.current_epoch} of "
                                       f"{train_cfg.epochs}; continue it with: brainseg train --resume "
                                       f"{run_dir}", signalled=True) from None

    patient_scores: dict[str, float] = {}
    model_file = None
    if refit:
        final = Path(latest.best_model_path) if latest.best_model_path else None  # unmonitored: the newest
        if final is not None and final.exists() and trainer.is_global_zero:
            remove_stale_checkpoints(last.parent, keep=None)
            model_file = _write_model_file(final, run_dir / MODEL_FILE)
        return TrainResult(run_dir, final, model_file, {}, (time.perf_counter() - started) / 60, refit=True,
                           resumed_from=resumed_from, unit=unit)
    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    found = best is not None and best.exists()
    if trainer.world_size > 1:  # rank 0's view decides, so that every process validates or none does
        found = trainer.strategy.broadcast(found)
    if trainer.is_global_zero and found:
        remove_stale_checkpoints(last.parent, keep=best)
    if found:
        trainer.validate(module, datamodule=datamodule, ckpt_path=str(best), verbose=False)
        patient_scores = module.last_patient_dice
        if trainer.is_global_zero:
            model_file = _write_model_file(best, run_dir / MODEL_FILE)
            _write_val_metrics(run_dir, best, patient_scores, val_table, precision, trainer)
    if not found:
        raise TrainingStopped(run_dir, f"no epoch was validated (validation every {train_cfg.val_every} "
                                       f"epochs, {trainer.current_epoch} of {train_cfg.epochs} run), so no "
                                       f"{MODEL_FILE} was written; continue it with more epochs or time: "
                                       f"brainseg train --resume {run_dir} --epochs N")
    minutes = (time.perf_counter() - started) / 60
    return TrainResult(run_dir, best, model_file, patient_scores, minutes, resumed_from=resumed_from,
                       unit=unit)


def _write_model_file(checkpoint: Path, path: Path) -> Path:
    """model.pt from a checkpoint, written beside its place and renamed: a kill or a full disk leaves the
    previous one (or none), never half a file."""
    return write_atomically(path, lambda file: model_file_from_checkpoint(checkpoint, file))


def weight_averaging(train_cfg: TrainConfig) -> list[Callback]:
    """The callback that validates and checkpoints averaged weights (Lightning swaps them in)."""
    if train_cfg.weight_average == "swa":  # Lightning's default: the plain mean of every step's weights
        return [WeightAveraging()]
    if train_cfg.weight_average == "ema":
        return [EMAWeightAveraging(decay=train_cfg.ema_decay)]
    return []


def load_initial_weights(model: torch.nn.Module, source: str | Path, normalisation: str,
                         member: int = -1) -> str:
    """Start `model` from a trained model's weights, or from one `member` of an ensemble's; the layers must
    match, the input size need not. A greyscale network may start from a multi-channel one: its first
    convolution gets the sum of theirs over the input channels (grey copied into every channel gives
    the same response). Returns a note saying so, or ''."""
    description, weights = load_model_file(source)
    theirs = description["preprocessing"].get("normalisation")
    if theirs != normalisation:
        raise BadInputError(source, f"its inputs were normalised as {theirs!r}, not {normalisation!r}")
    network = description["model"]
    if network["name"] == "ensemble":
        members = network["kwargs"]["members"]
        listed = ", ".join(f"{i}: {m['name']} at {m['image_size']}²" for i, m in enumerate(members))
        if not 0 <= member < len(members):
            raise BadInputError(source, f"is an ensemble; start from one member with --set "
                                        f"train.init_member=N ({listed})")
        prefix = f"members.{member}."
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        network = members[member]
    elif member >= 0:
        raise BadInputError(source, f"is not an ensemble, so train.init_member={member} has no member "
                                    "to pick")
    ours = model.state_dict()
    note = ""
    first = next((k for k, v in ours.items() if v.dim() == 4), None)  # the input convolution
    theirs_first = weights.get(first)
    if theirs_first is not None and ours[first].shape[1] == 1 < theirs_first.shape[1] \
            and theirs_first.sum(dim=1, keepdim=True).shape == ours[first].shape:
        note = (f"its first convolution takes {theirs_first.shape[1]} channels; this greyscale network "
                "starts from their sum")
        weights = {**weights, first: theirs_first.sum(dim=1, keepdim=True)}
    mismatched = sorted(set(ours) ^ set(weights)) or [k for k in ours if ours[k].shape != weights[k].shape]
    if mismatched:
        wanted = getattr(model, "brainseg_spec", {}).get("kwargs", {})
        raise BadInputError(source, f"its network ({network['name']}, {network['kwargs']}) does not fit "
                                    f"this run's ({wanted}); first differing weight: {mismatched[0]}")
    model.load_state_dict(weights)
    return note


def _logger(run_dir: Path):
    try:
        import tensorboard  # noqa: F401

        return TensorBoardLogger(run_dir, name="logs", version="")
    except ImportError:
        return _AppendingCSVLogger(run_dir, name="logs", version="")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run's writer
    keeps it (its header too) and appends to it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])


class _AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _trim_metrics(path: Path, epoch: int) -> None:
    """Drop the rows of epochs after `epoch` from a metrics.csv: a resumed run logs them again."""
    if not path.is_file():
        return
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        fields = reader.fieldnames or []
        rows = [row for row in reader if not _float(row.get("epoch")) > epoch]
    with replacing(path) as partial, partial.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("-inf")


def _write_val_metrics(run_dir: Path, best: Path, scores: dict[str, float], val_table: pd.DataFrame,
                       precision: str, trainer) -> None:
    """val_metrics.json and the per-case table: val_patients.csv, or val_images.csv for an image set."""
    unit = split_unit(val_table)
    volumes = val_table.groupby("patient")["tumour_pixels"].sum()
    rows = pd.DataFrame({unit: list(scores), "dice": list(scores.values())})
    rows["tumour_pixels" if unit == "image" else "tumour_voxels"] = rows[unit].map(volumes).astype("int64")
    rows.to_csv(run_dir / f"val_{unit}s.csv", index=False)
    values = np.array([v for v in scores.values() if not math.isnan(v)])
    summary = {
        "best_checkpoint": best.name,
        "epochs_run": trainer.current_epoch,
        "precision": precision,
        "metric": ("Dice per image (2|A∩B|/(|A|+|B|)), at the original resolution, threshold from the "
                   "config; images with no tumour and no prediction are excluded from the mean")
        if unit == "image" else
        ("Dice per patient volume (slices stacked; 2|A∩B|/(|A|+|B|)), at the original resolution, "
         "threshold from the config; patients with no tumour and no prediction are excluded from the mean"),
        "unit": unit, "cases": len(scores), f"{unit}s": len(scores),
        "mean": float(values.mean()) if len(values) else None,
        "median": float(np.median(values)) if len(values) else None,
        "min": float(values.min()) if len(values) else None,
    }
    (run_dir / "val_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


def recipe(config: str | Path) -> RunConfig:
    """What --config names: a YAML file, a shipped recipe ('lgg_cpu'), or a model (a run folder, a model
    file, 'pretrained:figshare') whose file holds the config it was trained with."""
    path = Path(config)
    if is_pretrained(path) or path.suffix in (".pt", ".ckpt") or path.is_dir():
        return trained_config(path)
    return load_config(path)


def run_training(out: str | Path, *, config_file: str | Path | None = None,
                 overrides: dict | None = None, resume: bool = False, refit: str | Path | None = None,
                 progress: bool = True, echo=print) -> TrainResult:
    """The `brainseg train` job: defaults <- config file (or the run's own, when resuming `out` or
    refitting `refit`) <- overrides. A resumed or refit run has its own config, so a config file
    given with either is refused rather than ignored."""
    if refit and (resume or config_file):
        raise OptionError("--refit takes the run's own config; do not combine it with --resume or --config")
    if resume and config_file:
        raise OptionError("--resume continues the run with its own config; do not combine it with --config")
    if resume:
        base = load_run_config(out)
    elif refit:
        base = load_run_config(refit).override(refit_settings(refit))
    elif config_file:
        base = recipe(config_file)
    else:
        base = RunConfig()
    config = base.override({k: v for k, v in (overrides or {}).items() if v is not None})
    result = train(config, out, resume=resume, progress=progress, echo=echo)
    if refit and result.model_file is not None and (Path(refit) / MODEL_FILE).exists():
        # the run's tuned threshold and post-processing were chosen on its validation patients
        store_settings(result.model_file, tuned_settings(refit))
    return result


def distill(teacher: str | Path, out: str | Path | None, *, config_file: str | Path | None = None,
            overrides: dict | None = None, progress: bool = True, echo=print) -> TrainResult:
    """The `brainseg distill` job: a new run in `out`, configured as `brainseg train` configures one
    (defaults <- config file <- overrides), whose network learns `teacher`'s probabilities as well as
    the truth (train.teacher, train.distill_weight; see load_teacher for what is refused)."""
    if out is None:
        raise OptionError("pass --out RUN_DIR, the new run folder of the distilled network")
    overrides = dict(overrides or {})
    given = overrides.get("train.teacher")
    if given and str(given) != str(teacher):
        raise OptionError(f"the teacher is {teacher}; leave out train.teacher={given}")
    overrides["train.teacher"] = str(teacher)
    return run_training(out, config_file=config_file, overrides=overrides, progress=progress, echo=echo)
