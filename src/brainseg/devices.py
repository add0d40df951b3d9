"""Accelerator, device and precision choice for training and inference, free of Lightning.

Training speaks Lightning's precision names (32-true, bf16-mixed); inference speaks 32 or bf16.
Both come from one rule: bf16 where the hardware runs it natively, else fp32 (fp16 on older GPUs).
"""

from __future__ import annotations

import os

import torch

from brainseg.errors import OptionError


def native_bf16_cpu() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX)."""
    cpu = torch.backends.cpu
    return getattr(cpu, "get_cpu_capability", lambda: "")() in ("AVX512", "AMX") and (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(precision: str, accelerator: str) -> str:
    """Training precision: 'auto' is bf16 where the hardware runs it natively, fp16 on older GPUs,
    else fp32."""
    if precision != "auto":
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if native_bf16_cpu() else "32-true"


def inference_precision(precision: str, device: str) -> str:
    """Inference precision: 32 or bf16; 'auto' follows the training rule for the device."""
    if precision != "auto":
        return precision
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    return "bf16" if resolve_precision("auto", accelerator).startswith("bf16") else "32"


def resolve_accelerator(accelerator: str) -> str:
    if accelerator == "auto":  # the others (cpu, gpu) are checked by TrainConfig
        return "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise OptionError("train.accelerator is gpu but no CUDA GPU is available")
    return accelerator


def default_workers(accelerator: str) -> int:
    # On a 2-core CPU a loader worker would take a core from the network itself.
    cores = os.cpu_count() or 1
    if accelerator == "cpu":
        return 0 if cores <= 4 else min(4, cores // 4)
    return min(8, max(0, cores - 2))


def check_device(device: str) -> str:
    """`device` if this torch can run on it (cpu, cuda or cuda:N), else a one-line error."""
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
