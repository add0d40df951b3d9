"""Several trained networks as one: the mean of their probabilities, returned as a logit.

Members may differ in architecture and in 2.5D context. The ensemble's input carries the widest
context; each member reads the central neighbours it was trained on.
"""

from __future__ import annotations

import torch
from torch import nn

from brainseg.errors import OptionError

# logit(mean probability) must stay finite where every member is certain.
PROBABILITY_EPS = 1e-6


class Ensemble(nn.Module):
    def __init__(self, members: list[dict], context: int = 0, slice_channels: int = 3) -> None:
        """`members`: [{"name", "kwargs", "context"}] as recorded in the members' model files."""
        super().__init__()
        from brainseg.models.registry import create_model

        if not members:
            raise OptionError("an ensemble needs at least one member")
        self.channel_ranges: list[tuple[int, int]] = []
        networks = []
        for member in members:
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
            networks.append(create_model(member["name"], **member["kwargs"]))
        self.members = nn.ModuleList(networks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = [torch.sigmoid(network(images[:, start:stop]).float())
                         for network, (start, stop) in zip(self.members, self.channel_ranges, strict=True)]
        mean = torch.stack(probabilities).mean(dim=0)
        return torch.logit(mean, eps=PROBABILITY_EPS)
