"""Several trained networks as one: the mean of their probabilities, returned as a logit.

Members may differ in architecture, 2.5D context and input size. The ensemble's input carries the
widest context at the largest size; each member reads the central neighbours it was trained on,
resized to its own size the way prediction resizes an image, and its logits are resized back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from brainseg.errors import OptionError

# logit(mean probability) must stay finite where every member is certain.
PROBABILITY_EPS = 1e-6


def resize_matrix(source: int, target: int, antialias: bool) -> torch.Tensor:
    """M with x @ M == F.interpolate(x, bilinear) along the last axis (source -> target).

    Bilinear resizing is linear and separable, so a matrix product does it exactly; unlike the
    antialiased interpolation it exports to ONNX.
    """
    basis = torch.eye(source, dtype=torch.float64)[None, None]  # row i is the unit vector e_i
    resized = F.interpolate(basis, size=(source, target), mode="bilinear", antialias=antialias,
                            align_corners=False)
    return resized[0, 0].float()


class Ensemble(nn.Module):
    def __init__(self, members: list[dict], networks: list[nn.Module], context: int = 0,
                 slice_channels: int = 3, image_size: int = 0) -> None:
        """`members`: [{"name", "kwargs", "context", "image_size"}] from the members' model files, and
        `networks` built from them (the registry's `ensemble` builds both from the description).

        With `image_size` (the ensemble's input side), a member of another size gets its input
        resized as prediction would resize an image for it, and its logits resized back.
        """
        super().__init__()
        if not members:
            raise OptionError("an ensemble needs at least one member")
        self.channel_ranges: list[tuple[int, int]] = []
        for i, member in enumerate(members):
            member_context = int(member.get("context", 0))
            if not 0 <= member_context <= context:
                raise OptionError(f"member context {member_context} is outside the ensemble's 0..{context}")
            expected = (2 * member_context + 1) * slice_channels
            if int(member["kwargs"].get("in_channels", expected)) != expected:
                raise OptionError(f"member {member['name']} takes {member['kwargs']['in_channels']} "
                                  f"channels; context {member_context} with {slice_channels}-channel "
                                  f"slices gives {expected}")
            start = (context - member_context) * slice_channels
            self.channel_ranges.append((start, start + expected))
            size = int(member.get("image_size") or image_size)
            if image_size and size != image_size:  # buffers, not weights: rebuilt from the sizes, never saved
                self.register_buffer(f"shrink_{i}", resize_matrix(image_size, size, antialias=True),
                                     persistent=False)
                self.register_buffer(f"grow_{i}", resize_matrix(size, image_size, antialias=False),
                                     persistent=False)
        self.members = nn.ModuleList(networks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = []
        for i, (network, (start, stop)) in enumerate(zip(self.members, self.channel_ranges, strict=True)):
            member_input = images[:, start:stop]
            shrink = getattr(self, f"shrink_{i}", None)  # only members of another size have one
            if shrink is None:
                logits = network(member_input).float()
            else:  # to_input's antialiased resize, then Predictor's resize of the logits
                logits = network((shrink.T @ member_input @ shrink).clamp(0.0, 1.0)).float()
                grow = getattr(self, f"grow_{i}")
                logits = grow.T @ logits @ grow
            probabilities.append(torch.sigmoid(logits))
        mean = torch.stack(probabilities).mean(dim=0)
        return torch.logit(mean, eps=PROBABILITY_EPS)
