"""Refusals that protect files: export over its own model, a failed tune --store, a report into data."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from brainseg.errors import BadInputError, BrainsegError, OptionError
from brainseg.export import export_model
from brainseg.report import write_report
from brainseg.runs.model_file import load_model_file, store_settings
from conftest import tree_state


@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the tiny run that a test may change."""
    return shutil.copytree(tiny_run[1], tmp_path / "run")


def test_export_refuses_to_write_over_its_model_or_another_file(run):
    model = (run / "model.pt").read_bytes()
    (run / "notes.txt").write_text("mine")
    for out, message in ((run / "model.pt", "is the model being exported"),
                         (run / ".." / "run" / "model.pt", "is the model being exported"),
                         (run / "notes.txt", "exists and is not an .onnx file")):
        with pytest.raises(BadInputError, match=message):
            export_model(run, out)
    with pytest.raises(BadInputError, match="is the model being exported"):
        export_model(run / "model.pt", run / "model.pt")
    assert (run / "model.pt").read_bytes() == model and (run / "notes.txt").read_text() == "mine"
    export_model(run)  # the default, run/model.onnx, and again over it
    assert export_model(run)["path"] == str(run / "model.onnx")
    assert sorted(p.name for p in run.iterdir() if "partial" in p.name) == []


def test_an_exported_file_gets_the_mode_a_new_file_gets_or_keeps_the_one_it_replaces(run):
    import os

    previous = os.umask(0o027)
    try:
        export_model(run, run / "m.onnx")
    finally:
        os.umask(previous)
    assert (run / "m.onnx").stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, not mkstemp's 0600
    (run / "m.onnx").chmod(0o644)
    export_model(run, run / "m.onnx")
    assert (run / "m.onnx").stat().st_mode & 0o777 == 0o644


def test_export_refuses_a_folder_as_out_and_names_it(run, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(BadInputError, match=rf"^{folder}: is a folder; give --out a file name"):
        export_model(run, folder)
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("opset", [0, 6, 21, 999])
def test_export_refuses_an_opset_torch_cannot_write(run, opset):
    with pytest.raises(OptionError, match=rf"--opset: this torch exports opsets 7 to \d+, not {opset}$"):
        export_model(run, run / "m.onnx", opset=opset)
    assert not (run / "m.onnx").exists()


def test_a_failed_store_leaves_the_model_as_it_was(run, monkeypatch):
    before = (run / "model.pt").read_bytes()
    real_save = torch.save

    def disk_full(state, path):
        real_save(state, path)
        with open(path, "r+b") as handle:  # half of it reached the disk
            handle.truncate(len(before) // 2)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 39680 vs 39576")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(BrainsegError, match=r"model\.pt: cannot store the settings; the model file is "
                                            r"unchanged \(RuntimeError: .*unexpected pos") as error:
        store_settings(run, {"threshold": 0.3})
    assert "\n" not in str(error.value)
    assert (run / "model.pt").read_bytes() == before
    assert load_model_file(run)[0]["threshold"] == 0.5  # it still loads
    assert sorted(p.name for p in run.iterdir() if "partial" in p.name) == []
    monkeypatch.setattr(torch, "save", real_save)
    (run / "model.pt").chmod(0o640)
    store_settings(run, {"threshold": 0.3})
    assert load_model_file(run)[0]["threshold"] == 0.3
    assert (run / "model.pt").stat().st_mode & 0o777 == 0o640  # the file keeps its permissions


def test_a_store_into_a_folder_that_cannot_be_written_is_one_line(run, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    before = (run / "model.pt").read_bytes()
    with pytest.raises(BadInputError, match=r"unchanged \(PermissionError: Permission denied\)"):
        store_settings(run / "model.pt", {"threshold": 0.3})
    assert (run / "model.pt").read_bytes() == before


def test_report_refuses_a_data_set(tiny_run, tmp_path):
    data, _ = tiny_run
    before = tree_state(data)
    with pytest.raises(BadInputError, match=r"is a data set \(kaggle_3m layout\)"):
        write_report(data)
    images_masks = tmp_path / "pairs"
    (images_masks / "images").mkdir(parents=True)
    (images_masks / "masks").mkdir()
    with pytest.raises(BadInputError, match=r"is a data set \(images_masks layout\)"):
        write_report(images_masks)
    # A folder inside a data set is refused as well: a patient folder, images/ or masks/.
    patient = sorted(p for p in data.iterdir() if p.is_dir())[0]
    for folder, root in ((patient, data), (images_masks / "images", images_masks),
                         (images_masks / "masks", images_masks)):
        with pytest.raises(BadInputError, match=rf"^{folder}: is part of the data set {root}, not a folder"):
            write_report(folder)
    assert tree_state(data) == before and not list(images_masks.rglob("index.html"))


def test_report_leaves_out_a_malformed_file_with_a_warning_and_reports_the_rest(run, tmp_path):
    broken = tmp_path / "results"
    shutil.copytree(run, broken / "run")
    (broken / "run" / "config.yaml").write_text("model: [unclosed\n")
    (broken / "run" / "val_metrics.json").write_text("")
    (broken / "eval").mkdir()
    (broken / "eval" / "summary.json").write_text("{'not': json}")
    (broken / "other").mkdir()
    (broken / "other" / "summary.json").write_text(json.dumps({"per_patient": {}}))  # entries missing
    warnings: list[str] = []
    report = write_report(broken, warn=warnings.append)
    assert len(warnings) == 4 and all(w.startswith("warning: ") and "\n" not in w for w in warnings)
    for name in ("config.yaml", "val_metrics.json", "eval/summary.json"):
        assert any(f"{name}: " in w for w in warnings), name
    assert any("other/summary.json: KeyError" in w for w in warnings)
    text = report.read_text()
    assert "learning_curves.png" in text  # the rest of the run is still reported


def test_report_shows_tumour_overlays_in_slice_order(tmp_path):
    """A patient's overlays in the report are slices with predicted tumour, in numeric (not string) order."""

    folder = tmp_path / "predictions"
    tumour_slices = {2, 9, 10, 11, 12, 13, 14, 20}
    for n in range(1, 25):
        mask = np.zeros((8, 8), np.uint8)
        if n in tumour_slices:
            mask[2:4, 2:4] = 255
        (folder / "masks" / "P1").mkdir(parents=True, exist_ok=True)
        (folder / "overlays" / "P1").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(folder / "masks" / "P1" / f"P1_{n}_mask.png")
        Image.fromarray(np.stack([mask] * 3, -1)).save(folder / "overlays" / "P1" / f"P1_{n}.png")
    row = {"case": "P1", "kind": "patient", "slices": 24, "tumour_pixels": 32, "status": "ok"}
    pd.DataFrame([row]).to_csv(folder / "predictions.csv", index=False)
    text = write_report(folder).read_text()
    shown = [int(n) for n in re.findall(r'src="overlays/P1/P1_(\d+)\.png"', text)]
    assert shown == sorted(shown) and len(shown) == 6 and set(shown) <= tumour_slices
    assert shown[0] == 2 and shown[-1] == 20  # spread over the tumour slices, ends included
    assert "6 of the 8 overlays with predicted tumour" in text and "4 tumour pixels predicted" in text


def test_overlay_outlines_the_mask_in_pure_red_and_keeps_the_rest():
    from brainseg.plots import overlay

    image = np.full((32, 32, 3), 120, np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    rgb = overlay(image, mask)
    assert (rgb[8, 8:24] == [1, 0, 0]).all() and (rgb[23, 8:24] == [1, 0, 0]).all()  # the edge
    inside = rgb[16, 16]
    assert inside[0] > inside[1] == inside[2] > 0.3  # tinted, the scan still visible
    assert np.allclose(rgb[~mask], 120 / 255)


def test_report_shows_saliency_figures_from_explain(tmp_path):
    folder = tmp_path / "results" / "explain"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "scan_saliency.png")
    rows = [{"image": "/data/scan.png", "figure": "scan_saliency.png", "tumour_pixels": 5,
             "gradient_x_input_inside": 0.2, "grad_cam_inside": 0.9, "problem": ""},
            {"image": "/data/bad.png", "figure": "", "tumour_pixels": "", "gradient_x_input_inside": "",
             "grad_cam_inside": "", "problem": "unreadable"}]
    pd.DataFrame(rows).to_csv(folder / "explain.csv", index=False)
    text = write_report(tmp_path / "results").read_text()
    assert "<h2>Saliency: explain</h2>" in text and 'src="explain/scan_saliency.png"' in text
    assert "unreadable" in text and text.count("<figure>") == 1
