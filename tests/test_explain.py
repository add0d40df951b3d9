"""Saliency maps: highest inside the predicted tumour on a synthetic case; files a person can open."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from brainseg.errors import BadInputError
from brainseg.explain import explain, last_decoder_conv, saliency
from brainseg.inference import Predictor
from conftest import write_png


def bright_spot_network() -> nn.Module:
    """A network whose tumour logit is high where the input is bright (a 3x3 smoothing, then a cut)."""
    network = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1))
    with torch.no_grad():
        network[0].weight.fill_(1 / 9)
        network[0].bias.copy_(torch.tensor([-0.5, -0.6]))
        network[2].weight.fill_(20.0)
        network[2].bias.fill_(-1.0)
    return network.eval()


def bright_spot_predictor() -> Predictor:
    description = {"model": {"name": "custom", "kwargs": {"depth": 2}}, "threshold": 0.5,
                   "preprocessing": {"image_size": 64, "in_channels": 1, "context": 0,
                                     "normalisation": "volume_p99.5"}}
    return Predictor(bright_spot_network(), description)


def spot_image() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(10, 60, (64, 64), dtype=np.uint8)
    spot = np.zeros((64, 64), bool)
    spot[20:32, 36:48] = True
    image[spot] = 250
    return image, spot


def test_saliency_is_highest_inside_the_predicted_tumour():
    predictor = bright_spot_predictor()
    image, spot = spot_image()
    maps = saliency(predictor, image)
    predicted = predictor.masks(maps.probability)
    assert predicted[spot].mean() > 0.9 and predicted[~spot].mean() < 0.05
    for which in ("gradient_x_input", "grad_cam"):
        values = getattr(maps, which)
        assert values.shape == (64, 64) and values.max() == pytest.approx(1.0)
        peak = np.unravel_index(np.argmax(values), values.shape)
        assert predicted[peak], which
        assert maps.share_inside(predicted, which) > 0.5, which
    assert last_decoder_conv(predictor.model) is predictor.model[0]


def test_explain_writes_a_figure_and_a_table_per_image(tmp_path, monkeypatch):
    image, _ = spot_image()
    path = write_png(tmp_path / "scans" / "case1.png", image)
    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, *a, **k: bright_spot_predictor()))
    table = pd.read_csv(explain("model", [path], tmp_path / "out", progress=False))
    assert table["figure"].tolist() == ["case1_saliency.png"]
    assert table["gradient_x_input_inside"].iloc[0] > 0.5
    with Image.open(tmp_path / "out" / "case1_saliency.png") as figure:
        assert figure.width > 3 * figure.height
    with pytest.raises(BadInputError, match="does not exist"):
        explain("model", [tmp_path / "missing.png"], tmp_path / "out2", progress=False)
