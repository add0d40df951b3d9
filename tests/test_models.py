"""Tests for brainseg.models: shapes, gradients, registry, size checks, specs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from brainseg.errors import OptionError
from brainseg.models import ModelConfigError, available_models, create_model

MODELS = available_models()
SMALL = {"base_filters": 8, "depth": 3}


def test_registered_names() -> None:
    assert MODELS == ["attention_unet", "monai_unet", "resunet", "unet"]


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_finite_gradients(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels, **SMALL).train()
    x = torch.randn(2, in_channels, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 1, 64, 64)
    target = (torch.rand_like(logits) > 0.5).float()
    nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_and_bfloat16_autocast(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **SMALL).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert ref.shape == low.shape == (1, 1, 32, 32)
    assert torch.isfinite(low.float()).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.1


def test_unknown_name_lists_valid_names() -> None:
    msg = "unknown model 'x'; choose one of: attention_unet, monai_unet, resunet, unet"
    with pytest.raises(ValueError, match=re.escape(msg)):
        create_model("x")


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("ResUNet", "resunet"), ("attention-unet", "attention_unet"), ("UNET", "unet")],
)
def test_name_lookup_is_case_and_dash_insensitive(given: str, canonical: str) -> None:
    model = create_model(given, **SMALL)
    assert model.brainseg_spec["name"] == canonical


@pytest.mark.parametrize("name", ["unet", "monai_unet"])
def test_unknown_kwarg_is_named(name: str) -> None:
    with pytest.raises(ModelConfigError, match="n_filters") as err:
        create_model(name, n_filters=16)
    assert isinstance(err.value, ValueError)
    assert "base_filters" in str(err.value)  # lists what is accepted


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kwargs", [{"depth": 0}, {"base_filters": -1}, {"dropout": 1.5}])
def test_bad_argument_values(name: str, kwargs: dict) -> None:
    # an OptionError, so the CLI prints one line; still a ValueError for older callers
    with pytest.raises(OptionError, match=next(iter(kwargs))):
        create_model(name, **kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_indivisible_input_size_is_rejected(name: str) -> None:
    model = create_model(name, base_filters=4, depth=3)
    msg = "input size 60x60 is not divisible by 2**depth = 8; use a size such as 128 or 256"
    with pytest.raises(ValueError, match=re.escape(msg)):
        model(torch.randn(1, 3, 60, 60))


@pytest.mark.parametrize("name", MODELS)
def test_spec_round_trip(name: str) -> None:
    model = create_model(name, in_channels=1, base_filters=4, depth=2, dropout=0.2)
    spec = model.brainseg_spec
    assert spec["name"] == name
    assert spec["kwargs"]["in_channels"] == 1
    assert spec["kwargs"]["batch_norm"] is True  # defaults are resolved too
    spec = json.loads(json.dumps(spec))  # as a checkpoint would store it
    rebuilt = create_model(spec["name"], **spec["kwargs"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())


@pytest.mark.parametrize("name", ["unet", "resunet", "monai_unet"])
def test_without_batch_norm(name: str) -> None:
    model = create_model(name, batch_norm=False, **SMALL)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1, 32, 32)


def test_attention_unet_refuses_batch_norm_off() -> None:
    with pytest.raises(ValueError, match="batch_norm"):
        create_model("attention_unet", batch_norm=False)


def test_resunet_transpose_upsampling() -> None:
    model = create_model("resunet", upsample="transpose", **SMALL)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


# Regression guard; the Keras seed with n_filters=16 has about 1.9 M parameters.
@pytest.mark.parametrize(("name", "expected"), [("unet", 1_942_577), ("resunet", 2_074_865)])
def test_parameter_count(name: str, expected: int) -> None:
    model = create_model(name, in_channels=3, base_filters=16, depth=4)
    n = sum(p.numel() for p in model.parameters())
    print(f"{name} base_filters=16 depth=4: {n:,} parameters")
    assert 0.8 * expected <= n <= 1.2 * expected


def test_import_does_not_import_monai() -> None:
    code = "import sys, brainseg.models; assert 'monai' not in sys.modules"
    # Same sys.path as this process, so it finds brainseg however pytest found it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_unet_deep_supervision_heads_give_lower_resolution_logits() -> None:
    model = create_model("unet", in_channels=1, base_filters=4, depth=3, deep_supervision=2).eval()
    x = torch.rand(2, 1, 32, 32)
    logits, auxiliary = model.forward_with_auxiliary(x)
    assert [tuple(a.shape) for a in auxiliary] == [(2, 1, 16, 16), (2, 1, 8, 8)]
    assert torch.equal(logits, model(x))  # prediction sees the full-size logits alone
    with pytest.raises(ValueError, match="deep_supervision must be 0 to depth - 1 = 2"):
        create_model("unet", depth=3, deep_supervision=3)
    plain = create_model("unet", in_channels=1, base_filters=4, depth=3)
    assert plain.forward_with_auxiliary(x)[1] == [] and not list(plain.auxiliary_heads)
