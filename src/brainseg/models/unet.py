"""Plain U-Net: a PyTorch port of the classic Keras brain-MRI seed network."""

from __future__ import annotations

import torch
from torch import nn

from brainseg.errors import OptionError
from brainseg.models._common import (
    check_common_args,
    check_input_size,
    conv3x3,
    he_normal_init,
    norm2d,
)


class ConvBlock(nn.Sequential):
    """Two 3×3 convs, each followed by BatchNorm (optional) and ReLU."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool = True) -> None:
        # A conv bias is redundant when BatchNorm follows (BN subtracts the mean).
        bias = not batch_norm
        super().__init__(
            conv3x3(in_ch, out_ch, bias=bias),
            norm2d(out_ch, batch_norm),
            nn.ReLU(inplace=True),
            conv3x3(out_ch, out_ch, bias=bias),
            norm2d(out_ch, batch_norm),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net returning logits (B, out_channels, H, W); H and W must divide by 2**depth.

    With `deep_supervision=K`, the K decoder levels below the top each get a 1×1 head too (nnU-Net's
    deep supervision): `forward_with_auxiliary` returns their logits at 1/2, 1/4, ... of the input
    side for training losses; `forward` (prediction, export) returns the full-size logits alone."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        base_filters: int = 16,
        depth: int = 4,
        dropout: float = 0.1,
        batch_norm: bool = True,
        deep_supervision: int = 0,
    ) -> None:
        super().__init__()
        check_common_args(in_channels, out_channels, base_filters, depth, dropout)
        if not 0 <= deep_supervision < depth:
            raise OptionError(f"deep_supervision must be 0 to depth - 1 = {depth - 1} decoder levels, "
                             f"got {deep_supervision}")
        self.depth = depth
        self.deep_supervision = deep_supervision
        filters = [base_filters * 2**i for i in range(depth + 1)]

        self.encoders = nn.ModuleList()
        ch = in_channels
        for f in filters[:-1]:
            self.encoders.append(ConvBlock(ch, f, batch_norm))
            ch = f
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.bottleneck = ConvBlock(ch, filters[-1], batch_norm)

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for f_skip, f_in in zip(reversed(filters[:-1]), reversed(filters[1:]), strict=True):
            self.ups.append(nn.ConvTranspose2d(f_in, f_skip, kernel_size=2, stride=2))
            self.decoders.append(ConvBlock(2 * f_skip, f_skip, batch_norm))
        self.head = nn.Conv2d(filters[0], out_channels, kernel_size=1)
        # one head per decoder level below the top, nearest the top first (1/2, 1/4, ... of the side)
        self.auxiliary_heads = nn.ModuleList(nn.Conv2d(f, out_channels, kernel_size=1)
                                             for f in filters[1:1 + deep_supervision])
        he_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, auxiliary=False)[0]

    def forward_with_auxiliary(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(full-size logits, [logits at 1/2, 1/4, ... of the side]) for deep supervision."""
        return self._run(x, auxiliary=True)

    def _run(self, x: torch.Tensor, auxiliary: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        check_input_size(x, self.depth)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.dropout(self.pool(x))
        x = self.bottleneck(x)
        levels = []
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = self.dropout(torch.cat([up(x), skip], dim=1))
            x = dec(x)
            if auxiliary:  # a plain forward keeps no decoder level alive
                levels.append(x)
        if not auxiliary:
            return self.head(x), []
        below_top = levels[-2::-1]  # decoder outputs at 1/2, 1/4, ... of the side
        heads = zip(self.auxiliary_heads, below_top, strict=False)  # the K levels nearest the top
        return self.head(x), [head(level) for head, level in heads]
