"""The shipped pretrained model: loads from the package, and scores as its model card says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import brainseg
from brainseg.runs.pretrained import pretrained_path

CARD = Path(__file__).resolve().parents[1] / "MODEL_CARD.md"


def card_value(name: str) -> float:
    """A number from the model card's machine-readable block."""
    block = re.search(r"```json\n(.*?)\n```", CARD.read_text(), re.S)
    assert block, "MODEL_CARD.md keeps its measured numbers in a ```json block"
    return json.loads(block.group(1))[name]


def test_pretrained_loads_and_predicts_a_slice():
    predictor = brainseg.load_pretrained(precision="32")
    assert predictor.identity["file"] == str(pretrained_path())
    image = np.zeros((256, 256, 3), np.uint8)
    image[80:170, 80:170] = 90
    mask = predictor.predict(image)
    assert mask.shape == (256, 256) and mask.dtype == np.uint8


@pytest.mark.shared
def test_pretrained_validation_dice_matches_the_model_card(shared_data, tmp_path):
    from brainseg.evaluation.evaluate import EvaluateOptions, evaluate

    # The shipped model was refit on its validation patients too, so evaluate refuses to call them
    # val (unseen at selection); they are scored as what they now are, training patients.
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": card_value("val_patients"), "val": [], "test": []}))
    summary = evaluate(pretrained_path(), shared_data / "lgg", tmp_path / "eval", progress=False,
                       options=EvaluateOptions(side="train", split_file=str(split), precision="32"))
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(card_value("val_dice_mean"), abs=0.01)


@pytest.mark.shared
def test_pretrained_test_dice_matches_the_model_card(shared_data, tmp_path):
    """The headline number, on patients the shipped model never saw, from the split stored in it."""
    from brainseg.evaluation.evaluate import EvaluateOptions, evaluate

    summary = evaluate("pretrained", shared_data / "lgg", tmp_path / "eval", progress=False,
                       options=EvaluateOptions(side="test", precision="32"))
    assert summary["data"]["patients"] == 7
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(card_value("test_dice_mean"), abs=0.01)


def test_pretrained_exports_to_onnx_in_the_working_folder(tmp_path, monkeypatch):
    from brainseg.export import export_model

    monkeypatch.chdir(tmp_path)  # never beside the shipped file, inside the installed package
    result = export_model("pretrained")
    assert Path(result["path"]) == Path("pretrained.onnx") and (tmp_path / "pretrained.onnx").exists()
    assert result["input"] == [None, 3, 256, 256]
    assert not pretrained_path().with_suffix(".onnx").exists()


def test_the_figshare_model_is_shipped_for_greyscale_slices():
    predictor = brainseg.load_pretrained("figshare", precision="32")
    assert predictor.identity["file"] == str(pretrained_path("pretrained:figshare"))
    assert predictor.slice_channels == 1
    image = np.full((512, 512), 30, np.uint8)
    image[200:260, 220:300] = 200
    assert predictor.predict(image).shape == (512, 512)


def test_the_shipped_models_fit_the_package_limit():
    total = sum(pretrained_path(f"pretrained:{name}").stat().st_size for name in ("lgg", "figshare"))
    assert total <= 25 * 1024 * 1024


@pytest.mark.shared
def test_the_figshare_model_learnt_from_every_shared_original_and_fits_them_as_noted(shared_data, tmp_path):
    """It has no test images (its estimate is its recipe's, F2's, on 114 originals F2 left out): it
    must say that it saw all 240 originals and fit them as the model card records."""
    from brainseg.evaluation.evaluate import EvaluateOptions, evaluate

    summary = evaluate("pretrained:figshare", shared_data / "figshare", tmp_path / "eval", progress=False,
                       options=EvaluateOptions(side="all", precision="32"))
    assert summary["data"]["unit"] == "image" and summary["data"]["images"] == 240
    assert summary["data"]["seen_by_model"] == 240
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(card_value("figshare_seen_dice_mean"),
                                                                    abs=0.01)
