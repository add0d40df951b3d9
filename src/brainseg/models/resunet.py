"""Deep residual U-Net after Zhang, Liu & Wang (2018), "Road extraction by deep residual U-Net"."""

from __future__ import annotations

import torch
from torch import nn

from brainseg.models._common import (
    check_common_args,
    check_input_size,
    conv3x3,
    he_normal_init,
    norm2d,
)

UPSAMPLE_MODES = ("bilinear", "transpose")


class ResidualUnit(nn.Module):
    """Pre-activation residual unit: (BN→ReLU→conv3×3)×2 plus a shortcut.

    With `first=True` the leading BN→ReLU is dropped, as in the paper's first encoder
    unit, which sees the raw image. The shortcut is a 1×1 conv + BN only where the
    channel count or the stride changes; otherwise it is the identity.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        batch_norm: bool = True,
        first: bool = False,
    ) -> None:
        super().__init__()
        bias = not batch_norm  # BN follows every conv in the main path
        pre: list[nn.Module] = [] if first else [norm2d(in_ch, batch_norm), nn.ReLU()]
        self.body = nn.Sequential(
            *pre,
            conv3x3(in_ch, out_ch, stride=stride, bias=bias),
            norm2d(out_ch, batch_norm),
            nn.ReLU(inplace=True),
            conv3x3(out_ch, out_ch, bias=bias),
        )
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=bias),
                norm2d(out_ch, batch_norm),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResUNet(nn.Module):
    """Residual U-Net returning logits (B, out_channels, H, W).

    Encoder level 0 keeps full resolution; levels 1..depth-1 and the bridge each halve it
    with a stride-2 first conv, so there are `depth` down-sampling steps in total.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        base_filters: int = 16,
        depth: int = 4,
        dropout: float = 0.1,
        batch_norm: bool = True,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        check_common_args(in_channels, out_channels, base_filters, depth, dropout)
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.depth = depth
        filters = [base_filters * 2**i for i in range(depth + 1)]

        self.encoders = nn.ModuleList(
            [ResidualUnit(in_channels, filters[0], stride=1, batch_norm=batch_norm, first=True)]
        )
        for i in range(1, depth):
            self.encoders.append(ResidualUnit(filters[i - 1], filters[i], 2, batch_norm))
        self.bridge = ResidualUnit(filters[depth - 1], filters[depth], 2, batch_norm)
        self.dropout = nn.Dropout(dropout)

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for f_skip, f_in in zip(reversed(filters[:-1]), reversed(filters[1:]), strict=True):
            if upsample == "bilinear":
                # Parameter-free; align_corners=False maps cleanly to ONNX Resize.
                up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
                dec_in = f_in + f_skip
            else:
                up = nn.ConvTranspose2d(f_in, f_skip, kernel_size=2, stride=2)
                dec_in = 2 * f_skip
            self.ups.append(up)
            self.decoders.append(ResidualUnit(dec_in, f_skip, 1, batch_norm))
        self.head = nn.Conv2d(filters[0], out_channels, kernel_size=1)
        he_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.depth)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        x = self.dropout(self.bridge(x))
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = self.dropout(torch.cat([up(x), skip], dim=1))
            x = dec(x)
        return self.head(x)
