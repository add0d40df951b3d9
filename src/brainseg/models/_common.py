"""Building blocks shared by the brainseg networks."""

from __future__ import annotations

import torch
from torch import nn

from brainseg.errors import OptionError


def check_input_size(x: torch.Tensor, depth: int) -> None:
    """Raise ValueError unless H and W of `x` are divisible by 2**depth.

    Uses plain ints from `x.shape`, so it costs nothing under torch.compile and
    torch.export. Skipped while TorchScript-tracing (legacy ONNX export): the check
    cannot be recorded in a traced graph and would only emit TracerWarnings.
    """
    if torch.jit.is_tracing():
        return
    h, w = x.shape[-2], x.shape[-1]
    factor = 2**depth
    if h % factor != 0 or w % factor != 0:
        raise ValueError(
            f"input size {h}x{w} is not divisible by 2**depth = {factor}; "
            "use a size such as 128 or 256"
        )


def check_common_args(
    in_channels: int, out_channels: int, base_filters: int, depth: int, dropout: float
) -> None:
    """Reject nonsensical constructor arguments early, with a message naming them.

    An OptionError (a ValueError too): these come from the user's model settings."""
    for name, value in (
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("base_filters", base_filters),
        ("depth", depth),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OptionError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise OptionError(f"dropout must be in [0, 1), got {dropout!r}")


def norm2d(channels: int, batch_norm: bool) -> nn.Module:
    """BatchNorm2d, or Identity when batch norm is switched off."""
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=bias)


def he_normal_init(module: nn.Module) -> None:
    """He-normal conv weights and zero biases, as Keras' he_normal in the original seed."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SizeChecked(nn.Module):
    """Thin wrapper that validates the input size, then calls `net` (used for MONAI nets)."""

    def __init__(self, net: nn.Module, depth: int) -> None:
        super().__init__()
        self.net = net
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.depth)
        return self.net(x)
