"""Accelerator, device and precision choice for training and inference, free of Lightning.

Every verb takes one vocabulary: precision auto, 32, bf16 or 16 (Lightning's 32-true, bf16-mixed and
16-mixed are accepted too), device auto, cpu or cuda (gpu is accepted as cuda). Lightning's names are
made here, for the Trainer only. 'auto' is one rule: bf16 where the hardware runs it natively, else
fp32 (fp16 on older GPUs).
"""

from __future__ import annotations

import os

import torch

from brainseg.config import normalise_device, normalise_precision
from brainseg.errors import OptionError


def native_bf16_cpu() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX)."""
    cpu = torch.backends.cpu
    return getattr(cpu, "get_cpu_capability", lambda: "")() in ("AVX512", "AMX") and (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


_LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning's precision name for training: 'auto' is bf16 where the hardware runs it natively,
    fp16 on older GPUs, else fp32."""
    short = normalise_precision(precision, "train.precision")
    if short == "auto":
        if accelerator == "gpu":
            short = "bf16" if torch.cuda.is_bf16_supported() else "16"
        else:
            short = "bf16" if native_bf16_cpu() else "32"
    return _LIGHTNING_PRECISION[short]


def inference_precision(precision: str, device: str) -> str:
    """Inference precision: 32 or bf16; 'auto' follows the training rule for the device."""
    short = normalise_precision(precision, allowed=("auto", "32", "bf16"))
    if short != "auto":
        return short
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    return "bf16" if resolve_precision("auto", accelerator).startswith("bf16") else "32"


def resolve_accelerator(accelerator: str) -> str:
    """Lightning's accelerator (cpu or gpu) for a device name; auto picks a CUDA GPU if there is one."""
    device = normalise_device(accelerator, "train.accelerator")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("train.accelerator is cuda (gpu) but no CUDA GPU is available")
    return "gpu" if device.startswith("cuda") else "cpu"


def default_workers(accelerator: str) -> int:
    # On a 2-core CPU a loader worker would take a core from the network itself.
    cores = os.cpu_count() or 1
    if accelerator == "cpu":
        return 0 if cores <= 4 else min(4, cores // 4)
    return min(8, max(0, cores - 2))


def check_device(device: str) -> str:
    """`device` if this torch can run on it (cpu, cuda or cuda:N; auto picks cuda where there is a GPU),
    else a one-line error."""
    device = normalise_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise OptionError(f"--device: must be cpu, cuda or cuda:N, not {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: this torch has no CUDA (or sees no GPU); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise OptionError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    return device
