"""`brainseg predict` speed of several models on the same shared LGG patient folders.

Usage: python benchmarks/predict_models.py [MODEL ...] [--patients 3] [--rounds 3] [--png-level 6 1]
       (default models: pretrained, and a plain eager fp32 U-Net F=16 at 256² as the baseline)

Each model predicts the first N test patients of the shipped model's split (masks, overlays and the
table written, as the CLI does) through the API the CLI calls, in one process, alternating models
round by round: the interpreter's start-up and imports are excluded, each call's model loading is
included. Prints slices/s (median of the rounds) and each model's speed as a ratio of the first's.
With --png-level, each model runs once per zlib level of the mask and overlay PNGs (brainseg writes at
level 1; Pillow's default is 6).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import brainseg.files
from _common import SHARED_DATA, machine_header, print_table
from brainseg.inference import Predictor
from brainseg.predict import predict_paths
from brainseg.runs.model_file import load_model_file, model_file

BASELINE = "eager-unet16"


def eager_baseline() -> torch.nn.Module:
    from brainseg.models import create_model

    torch.manual_seed(0)
    return create_model("unet", in_channels=3, base_filters=16, depth=4).eval()


def time_eager(network: torch.nn.Module, slices: int, size: int = 256, batch: int = 16) -> float:
    """Seconds for a plain fp32 eager pass over `slices` slices (network only, no I/O)."""
    inputs = torch.rand(batch, 3, size, size)
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, slices, batch):
            network(inputs[: min(batch, slices - start)])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["pretrained"])
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--png-level", type=int, nargs="+", default=[brainseg.files.PNG_COMPRESS_LEVEL],
                        help="zlib levels of the PNGs to compare (each model runs at each)")
    args = parser.parse_args()
    print(machine_header())
    lgg = SHARED_DATA / "lgg" / "kaggle_3m"
    if not lgg.is_dir():
        print(f"no shared LGG data at {lgg}; nothing to measure")
        return
    description, _ = load_model_file(model_file("pretrained"))
    folders = [lgg / p for p in sorted(description["split"]["test"])[: args.patients]]
    slices = sum(len(list(f.glob("*_mask.tif"))) for f in folders)
    for model in args.models:  # a first load outside the timing warms the file cache and imports
        Predictor.load(model)
    baseline = eager_baseline()
    rows = [(model, level) for model in args.models for level in args.png_level]

    def label(model: str, level: int) -> str:
        return f"{model} (PNG level {level})" if len(args.png_level) > 1 else model

    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(args.rounds):
            for model, level in rows:
                name = label(model, level)
                out = Path(root) / f"{round_}-{len(rates.get(name, []))}-{Path(str(model)).name}-{level}"
                brainseg.files.PNG_COMPRESS_LEVEL = level
                started = time.perf_counter()
                predict_paths(model, folders, out, progress=False, echo=lambda *_: None)
                rates.setdefault(name, []).append(slices / (time.perf_counter() - started))
            rates.setdefault(BASELINE, []).append(slices / time_eager(baseline, slices))
    first_name = label(*rows[0])
    first = statistics.median(rates[first_name])
    print(f"\n`brainseg predict` on {len(folders)} test patient folders ({slices} slices), median of "
          f"{args.rounds} rounds; {BASELINE}: a plain eager fp32 U-Net F=16 at 256², network only")
    print_table(["model", "slices/s", f"× {first_name}"],
                [[name, f"{statistics.median(r):.1f}", f"{statistics.median(r) / first:.2f}"]
                 for name, r in rates.items()])


if __name__ == "__main__":
    main()
