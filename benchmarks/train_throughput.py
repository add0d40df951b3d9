"""Training throughput: the project's Lightning training step against a plain eager fp32 loop.

Usage: python benchmarks/train_throughput.py [--steps 6] [--batch 16] [--quick]
       [--model resunet] [--option upsample=transpose] [--dropout 0.1] [--also-dropout 0]

For every row, the same network, batch and input size run in the same process, alternating:
  * baseline: plain eager PyTorch, fp32, NCHW: zero_grad, forward, BCE+Dice loss, backward, Adam step;
  * project:  brainseg's SegmentationModule under a Lightning Trainer, with the row's precision and
              memory format (the configuration `brainseg train` would pick on this machine).
With --also-dropout X, one more row runs the project's default configuration with dropout X (drawing
dropout's random masks is a large share of a CPU step). It also times the data pipeline alone
(memory-mapped slice cache -> tensors -> default augmentation) and sets its images/s against what the
project's training step consumes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from _common import machine_header, print_table
from brainseg.config import RunConfig
from brainseg.devices import resolve_precision
from brainseg.losses import create_loss
from brainseg.models import create_model
from brainseg.training import SegmentationModule


class RandomSlices(Dataset):
    def __init__(self, count: int, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(count, 3, size, size, generator=generator)
        self.masks = (torch.rand(count, 1, size, size, generator=generator) > 0.9).float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i], "patient": 0, "position": i}


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        self.times.append(time.perf_counter() - self._start)


def baseline_seconds(model_name: str, options: dict, filters: int, size: int, batch: int, steps: int,
                     warmup: int, dropout: float) -> list[float]:
    torch.manual_seed(0)
    model = create_model(model_name, in_channels=3, base_filters=filters, depth=4, dropout=dropout, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = create_loss("bce_dice")
    data = RandomSlices(batch, size)
    images, masks = data.images, data.masks
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), masks)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def fit_with_timer(module, loader, precision: str, steps: int) -> StepTimer:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=root, callbacks=[timer])
        trainer.fit(module, loader)
    return timer


def project_step_seconds(model_name: str, options: dict, filters: int, size: int, batch: int, steps: int,
                         warmup: int, precision: str, channels_last: bool, dropout: float) -> list[float]:
    torch.manual_seed(0)
    # val_every beyond the run: the LR scheduler waits for a validation that never comes.
    config = RunConfig().override({"model.name": model_name, "model.options": options,
                                   "model.base_filters": filters, "model.depth": 4, "model.dropout": dropout,
                                   "train.val_every": 1000,
                                   "train.channels_last": channels_last, "data.image_size": size})
    module = SegmentationModule(config.to_dict(), 3, ["p"])
    loader = DataLoader(RandomSlices(batch, size), batch_size=batch, sampler=[0] * batch * (warmup + steps))
    timer = fit_with_timer(module, loader, precision, warmup + steps)
    return timer.times[warmup:]


def pipeline_images_per_second(size: int, count: int = 300) -> float | None:
    """Slices through the real path: cache -> SliceDataset -> default augmentation, one process."""
    from brainseg.data.dataset import SliceDataset
    from brainseg.data.index import scan
    from brainseg.data.synth import synthesize
    from brainseg.data.transforms import build_transforms

    with tempfile.TemporaryDirectory() as root:
        data = synthesize(f"{root}/data", patients=4, seed=0)
        result = scan(data)
        transform = build_transforms(RunConfig().augment, train=True, seed=0)
        dataset = SliceDataset(result.table, result.store, image_size=size, transform=transform)
        for i in range(10):
            dataset[i % len(dataset)]
        started = time.perf_counter()
        for i in range(count):
            dataset[i % len(dataset)]
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating baseline/project rounds")
    parser.add_argument("--quick", action="store_true", help="only the 128x128 rows")
    parser.add_argument("--model", default="unet", help="registry name of the network")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra model argument, e.g. upsample=transpose (repeatable)")
    parser.add_argument("--dropout", type=float, default=RunConfig().model.dropout,
                        help="the network's dropout, in both loops (default: the recipes')")
    parser.add_argument("--also-dropout", type=float, default=None,
                        help="add a row: the project's default configuration with this dropout")
    args = parser.parse_args()
    # Parsed as `--set model.options.KEY=VALUE` is, so "2" becomes 2 here too.
    options = RunConfig().override({f"model.options.{key}": value for key, value in
                                    (item.split("=", 1) for item in args.option)}).model.options
    auto = resolve_precision("auto", "cpu")
    print(machine_header())
    print(f"model {args.model} {options or ''}, dropout {args.dropout}")
    print(f"batch {args.batch}; {args.steps} timed steps after {args.warmup} warm-up, {args.rounds} "
          f"alternating rounds; medians. Precision 'auto' resolves to {auto} on this machine.\n")

    rows_to_run = [(16, 128), (32, 128)] + ([] if args.quick else [(16, 256), (32, 256)])
    variants = [("32-true", False, args.dropout), ("32-true", True, args.dropout),
                ("bf16-mixed", False, args.dropout), ("bf16-mixed", True, args.dropout)]
    if args.also_dropout is not None:
        variants.append((auto, True, args.also_dropout))
    table = []
    consumed = {}
    for filters, size in rows_to_run:
        base: list[float] = []
        project: dict[tuple[str, bool, float], list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            base += baseline_seconds(args.model, options, filters, size, args.batch, args.steps, args.warmup,
                                     args.dropout)
            for precision, channels_last, dropout in variants:
                project[(precision, channels_last, dropout)] += project_step_seconds(
                    args.model, options, filters, size, args.batch, args.steps, args.warmup, precision,
                    channels_last, dropout)
        base_rate = args.batch / statistics.median(base)
        table.append([f"F={filters}", f"{size}²", "baseline: eager fp32 NCHW", f"{base_rate:.1f}", "1.00"])
        for (precision, channels_last, dropout), times in project.items():
            rate = args.batch / statistics.median(times)
            layout = "channels_last" if channels_last else "NCHW"
            other = f", dropout {dropout}" if dropout != args.dropout else ""
            label = f"brainseg {precision} {layout}{other}"
            table.append([f"F={filters}", f"{size}²", label, f"{rate:.1f}", f"{rate / base_rate:.2f}"])
            if precision == auto and channels_last and dropout == args.dropout:
                consumed[(filters, size)] = rate
    print_table(["filters", "input", "training step", "images/s", "× baseline"], table)

    print("\nData pipeline alone (cache -> tensors -> default augmentation, one process):")
    rows = []
    for size in sorted({s for _, s in rows_to_run}):
        rate = pipeline_images_per_second(size)
        for (filters, s), need in sorted(consumed.items()):
            if s == size:
                rows.append([f"{size}²", f"{rate:.0f}", f"F={filters}: {need:.1f}", f"{rate / need:.1f}"])
    print_table(["input", "pipeline images/s", "step consumes images/s", "pipeline / step"], rows)


if __name__ == "__main__":
    main()
