"""Model registry: build any network by name, and record how to rebuild it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from brainseg.errors import OptionError
from brainseg.models._common import SizeChecked, check_common_args
from brainseg.models.ensemble import Ensemble
from brainseg.models.resunet import ResUNet
from brainseg.models.unet import UNet


class ModelConfigError(OptionError):
    """Unknown model name or constructor argument; the message lists what is valid."""


def _monai_channels(base_filters: int, depth: int) -> tuple[int, ...]:
    return tuple(base_filters * 2**i for i in range(depth + 1))


def attention_unet(
    in_channels: int = 3,
    out_channels: int = 1,
    base_filters: int = 16,
    depth: int = 4,
    dropout: float = 0.1,
    batch_norm: bool = True,
) -> nn.Module:
    """MONAI AttentionUnet (2D), wrapped with the input size check."""
    check_common_args(in_channels, out_channels, base_filters, depth, dropout)
    if not batch_norm:
        # MONAI's AttentionUnet hard-codes BatchNorm; refuse rather than silently ignore.
        raise ModelConfigError(
            "attention_unet always uses batch norm (MONAI's AttentionUnet cannot turn it off); "
            "remove batch_norm=False or pick another model"
        )
    from monai.networks.nets import AttentionUnet  # lazy: monai is slow to import

    net = AttentionUnet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=_monai_channels(base_filters, depth),
        strides=(2,) * depth,
        dropout=dropout,
    )
    return SizeChecked(net, depth)


def monai_unet(
    in_channels: int = 3,
    out_channels: int = 1,
    base_filters: int = 16,
    depth: int = 4,
    dropout: float = 0.1,
    batch_norm: bool = True,
) -> nn.Module:
    """MONAI UNet with two residual units per level, wrapped with the input size check."""
    check_common_args(in_channels, out_channels, base_filters, depth, dropout)
    from monai.networks.nets import UNet as MonaiUNet  # lazy: monai is slow to import

    net = MonaiUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=_monai_channels(base_filters, depth),
        strides=(2,) * depth,
        num_res_units=2,
        norm="BATCH" if batch_norm else None,  # None: MONAI adds no norm layer
        dropout=dropout,
    )
    return SizeChecked(net, depth)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "attention_unet": attention_unet,
    "monai_unet": monai_unet,
    "resunet": ResUNet,
    "unet": UNet,
}


def ensemble(members: list[dict], context: int = 0, slice_channels: int = 3,
             image_size: int = 0) -> nn.Module:
    """An Ensemble of registry networks, one per member description."""
    networks = [create_model(member["name"], **member["kwargs"]) for member in members]
    return Ensemble(members, networks, context, slice_channels, image_size)


# Built from trained members (`brainseg ensemble`), never trained as a whole.
_COMBINATIONS: dict[str, Callable[..., nn.Module]] = {"ensemble": ensemble}


def available_models() -> list[str]:
    """Canonical names of the trainable models, sorted."""
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    """Normalise a user-given name ('ResUNet', 'attention-unet') to its registry key."""
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY and key not in _COMBINATIONS:
        raise ModelConfigError(
            f"unknown model {name!r}; choose one of: {', '.join(available_models())}"
        )
    return key


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model `name`; the result carries `brainseg_spec` to rebuild it later.

    `create_model(m.brainseg_spec["name"], **m.brainseg_spec["kwargs"])` gives the same
    architecture (same state_dict keys and shapes).
    """
    key = canonical_name(name)
    factory = _REGISTRY.get(key) or _COMBINATIONS[key]
    signature = inspect.signature(factory)
    accepted = list(signature.parameters)
    unknown = [k for k in kwargs if k not in signature.parameters]
    if unknown:
        raise ModelConfigError(
            f"unknown argument(s) for model {key!r}: {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )
    bound = signature.bind(**kwargs)
    bound.apply_defaults()
    resolved = dict(bound.arguments)
    model = factory(**resolved)
    model.brainseg_spec = {"name": key, "kwargs": resolved}
    return model
