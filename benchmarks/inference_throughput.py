"""Inference throughput and memory: brainseg's backends against plain eager fp32 PyTorch.

Usage: python benchmarks/inference_throughput.py [--filters 32 --size 256] [--skip-memory] [--skip-e2e]

* slices/s at batch 1 and 16 for: a plain eager fp32 PyTorch baseline (NCHW, inference_mode), and
  brainseg's Predictor with fp32, channels_last + bf16 autocast (the default where the CPU runs bf16
  natively) and ONNX Runtime; measured alternately in one process, medians of several rounds;
* each as a fraction of this machine's peak FLOP/s, measured with a large matmul in this script
  (fp32, and bf16 for the bf16 path), using the network's FLOPs per slice (counted by torch);
* peak memory of `brainseg predict` on 100 vs 10,000 slices (a small model, separate processes);
* end to end: `brainseg predict` on shared LGG patient folders with this F/size model.
Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import SHARED_DATA, machine_header, print_table
from brainseg.models import create_model


def write_model(path: Path, filters: int, size: int, depth: int = 4) -> Path:
    """A self-describing model file with random weights, as `brainseg train` would write it."""
    from brainseg import __version__
    from brainseg.data.dataset import NORMALISATION

    torch.manual_seed(0)
    model = create_model("unet", in_channels=3, base_filters=filters, depth=depth)
    description = {"format": "brainseg-checkpoint/1", "brainseg_version": __version__,
                   "model": model.brainseg_spec,
                   "preprocessing": {"image_size": size, "in_channels": 3, "context": 0,
                                     "normalisation": NORMALISATION, "channels_last": True},
                   "threshold": 0.5, "config": {}}
    torch.save({"brainseg": description, "state_dict": model.state_dict()}, path)
    return path


def flops_per_slice(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, 3, size, size))
    return float(counter.get_total_flops())


def peak_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 8) -> float:
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - started)
    return 2 * n**3 / min(times)


def time_calls(call, batch: torch.Tensor, repeats: int) -> float:
    call(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        call(batch)
    return len(batch) * repeats / (time.perf_counter() - started)


def throughput_rows(model_file: Path, filters: int, size: int, rounds: int) -> tuple[list, dict]:
    from brainseg.export import export_model
    from brainseg.inference import Predictor

    baseline = create_model("unet", in_channels=3, base_filters=filters, depth=4)
    baseline.load_state_dict(torch.load(model_file, weights_only=True)["state_dict"])
    baseline.eval()

    def plain(batch):
        with torch.inference_mode():
            return baseline(batch)

    onnx_file = Path(export_model(model_file, model_file.with_suffix(".onnx"))["path"])
    backends = {
        "baseline: eager fp32 NCHW": plain,
        "brainseg torch fp32 channels_last": Predictor.load(model_file, precision="32")._logits,
        "brainseg torch bf16 channels_last": Predictor.load(model_file, precision="bf16")._logits,
        "brainseg ONNX Runtime fp32": Predictor.load(onnx_file, backend="onnx")._logits,
    }
    rates: dict[tuple[str, int], list[float]] = {}
    for batch_size in (1, 16):
        batch = torch.rand(batch_size, 3, size, size)
        repeats = max(2, 32 // batch_size) if size >= 256 else max(4, 64 // batch_size)
        for _ in range(rounds):
            for name, call in backends.items():
                rates.setdefault((name, batch_size), []).append(time_calls(call, batch, repeats))
    return rates, {"fp32": peak_flops(torch.float32), "bf16": peak_flops(torch.bfloat16)}


def run_measured(command: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MB) of a command, run under its own helper process.

    RUSAGE_CHILDREN keeps a running maximum over all children ever waited for, so each
    measurement gets a fresh parent.
    """
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *command], check=True, capture_output=True,
                         text=True).stdout
    return time.perf_counter() - started, int(out.strip()) / 1024


def predict_command(model: Path, inputs: list[Path], out: Path, batch: int = 16) -> list[str]:
    return [sys.executable, "-m", "brainseg.cli", "predict", *map(str, inputs), "--model", str(model),
            "--out", str(out), "--batch-size", str(batch)]


def memory_rows(workdir: Path) -> list[list]:
    """Peak memory of predicting 100 vs 10,000 slices (64x64 synthetic slices, F=8 model)."""
    from brainseg.data.synth import synthesize

    model = write_model(workdir / "small.pt", 8, 64, depth=3)
    rows = []
    for patients, slices in ((1, 100), (100, 100)):
        data = synthesize(workdir / f"data{patients}", patients=patients, seed=0, size=64,
                          slices=(slices, slices))
        seconds, peak = run_measured(predict_command(model, [data], workdir / f"out{patients}"))
        rows.append([patients * slices, f"{peak:.0f}", f"{patients * slices / seconds:.0f}"])
    return rows


def end_to_end_rows(model: Path, workdir: Path, patients: int) -> list[list]:
    lgg = SHARED_DATA / "lgg" / "kaggle_3m"
    if not lgg.is_dir():
        return []
    folders = sorted(p for p in lgg.iterdir() if p.is_dir())[:patients]
    slices = sum(len(list(f.glob("*_mask.tif"))) for f in folders)
    seconds, peak = run_measured(predict_command(model, folders, workdir / "e2e"))
    rate = slices / seconds
    return [[f"{patients} patient folders", slices, f"{rate:.2f}", f"{rate / 1.77:.1f}", f"{peak:.0f}"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=3, help="LGG patient folders for end to end")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    print(machine_header())
    with tempfile.TemporaryDirectory() as root:
        workdir = Path(root)
        model_file = write_model(workdir / "model.pt", args.filters, args.size)
        model = create_model("unet", in_channels=3, base_filters=args.filters, depth=4).eval()
        flops = flops_per_slice(model, args.size)
        print(f"U-Net F={args.filters} at {args.size}²: {flops / 1e9:.1f} GFLOP per slice "
              "(torch FlopCounter)")
        rates, peaks = ({}, {}) if args.skip_throughput else throughput_rows(
            model_file, args.filters, args.size, args.rounds)
        if peaks:
            print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
                  f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s (a share above 100% means the convolution "
                  "library does fewer operations than a direct convolution, e.g. Winograd)\n")
        rows = []
        for batch_size in (1, 16) if rates else ():
            base = statistics.median(rates[("baseline: eager fp32 NCHW", batch_size)])
            for (name, b), values in rates.items():
                if b != batch_size:
                    continue
                rate = statistics.median(values)
                peak = peaks["bf16"] if "bf16" in name else peaks["fp32"]
                share = f"{100 * rate * flops / peak:.0f}%"
                rows.append([name, b, f"{rate:.2f}", f"{rate / base:.2f}", share])
        if rows:
            print_table(["backend", "batch", "slices/s", "× baseline", "of peak FLOP/s"], rows)
        if not args.skip_memory:
            print("\nPeak memory of `brainseg predict` (F=8 U-Net, 64² synthetic slices, one process each):")
            print_table(["slices", "peak RSS MB", "slices/s"], memory_rows(workdir))
        if not args.skip_e2e:
            rows = end_to_end_rows(model_file, workdir, args.patients)
            if rows:
                print(f"\nEnd to end: `brainseg predict` on shared LGG patient folders, F={args.filters} "
                      f"{args.size}² (default backend), masks + overlays written:")
                print_table(["input", "slices", "slices/s", "× anchor 1.77", "peak RSS MB"], rows)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
