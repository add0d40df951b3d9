"""brainseg predict and export: every input kind, outputs at the input's size, ONNX parity, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainseg.export import export_model
from brainseg.inference import Predictor
from brainseg.predict import predict_paths
from conftest import write_png


@pytest.fixture
def inputs(tiny_run, tmp_path):
    data, _ = tiny_run
    patient = sorted(p for p in data.iterdir() if p.is_dir())[0]
    rng = np.random.default_rng(0)
    files = tmp_path / "files"
    write_png(files / "a.png", rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(files / "b.jpg")
    (files / "broken.png").write_bytes(b"\x89PNG broken")
    write_png(files / "grey.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))  # wrong channel count
    write_png(files / "tiny.png", rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))  # too small
    (tmp_path / "empty").mkdir()
    volume = np.stack([np.asarray(Image.open(p)) for p in sorted(patient.glob("*_[0-9].tif"))[:4]], axis=2)
    affine = np.diag([0.9, 0.9, 5.0, 1.0])
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(tmp_path / "scan.nii.gz"))
    return {"patient": patient, "files": files, "empty": tmp_path / "empty",
            "nifti": tmp_path / "scan.nii.gz", "affine": affine}


def test_predict_every_input_kind(tiny_run, inputs, tmp_path):
    _, run = tiny_run
    out = tmp_path / "out"
    messages: list[str] = []
    table = predict_paths(run, [inputs["patient"], inputs["files"], inputs["nifti"], inputs["empty"]], out,
                          save_probabilities=True, largest_component=True, progress=False,
                          echo=messages.append)
    by_case = table.set_index("case")
    assert by_case.loc[inputs["patient"].name, "kind"] == "patient"
    slices = len(list(inputs["patient"].glob("*_[0-9]*.tif"))) // 2  # images and masks
    assert by_case.loc[inputs["patient"].name, "slices"] == slices
    assert by_case.loc["a", "status"] == "ok" and by_case.loc["b", "status"] == "ok"
    assert "unreadable" in by_case.loc["broken", "status"]
    assert "1 channel" in by_case.loc["grey", "status"]
    assert "too small" in by_case.loc["tiny", "status"]
    assert "empty folder" in by_case.loc["empty", "status"]
    assert len(messages) == 4 and all(m.startswith("error: ") and "\n" not in m for m in messages)
    assert Image.open(out / "masks" / "a.png").size == (96, 80)  # the input's own size
    assert Image.open(out / "overlays" / "a.png").size == (96, 80)
    assert (out / "probabilities" / "b.png").exists()
    settings = json.loads((out / "predictions.json").read_text())  # what ran, beside the results
    assert settings["largest_component"] is True and settings["min_size"] == 0
    assert settings["failed"] == 4 and settings["cases"] == len(table)
    slice_masks = sorted((out / "masks" / inputs["patient"].name).glob("*_mask.png"))
    assert len(slice_masks) == by_case.loc[inputs["patient"].name, "slices"]
    mask = nib.load(str(out / "masks" / "scan_mask.nii.gz"))
    np.testing.assert_allclose(mask.affine, inputs["affine"], rtol=1e-6)  # stored as float32
    assert mask.shape == (64, 64, 4) and mask.get_data_dtype() == np.uint8
    assert by_case.loc["scan", "tumour_volume_ml"] == pytest.approx(
        by_case.loc["scan", "tumour_pixels"] * 0.9 * 0.9 * 5.0 / 1000, abs=1e-3)
    saved = pd.read_csv(out / "predictions.csv")
    assert len(saved) == len(table)


def test_progress_counts_slices_and_names_the_case(tiny_run, inputs, tmp_path, capsys):
    """The bar counts slices (a patient folder is many), shows the case, and ends at the total; errors
    print on lines of their own."""
    _, run = tiny_run
    slices = len(list(inputs["patient"].glob("*_[0-9]*.tif"))) // 2
    predict_paths(run, [inputs["patient"], inputs["files"]], tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    total = slices + len([p for p in inputs["files"].iterdir() if p.is_file()])
    final = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("predicting:")][-1]
    assert f"{total}/{total}" in final and "slice/s" in final
    assert inputs["patient"].name in err
    assert any(line.startswith("error: ") and "predicting" not in line for line in err.splitlines())


def test_a_patient_with_flair_copied_into_a_sequence_gets_a_note(tiny_run, inputs, tmp_path):
    import tifffile

    _, run = tiny_run
    copied = tmp_path / "copied"
    copied.mkdir()
    for path in inputs["patient"].glob("*.tif"):
        image = tifffile.imread(path)
        if image.ndim == 3:  # slices, not masks: post-contrast replaced by FLAIR, as kaggle_3m does
            image = image.copy()
            image[..., 2] = image[..., 1]
        tifffile.imwrite(copied / path.name, image)
    messages: list[str] = []
    table = predict_paths(run, [inputs["patient"], copied], tmp_path / "out", progress=False,
                          echo=messages.append).set_index("case")
    assert table.loc["copied", "equal_channels"] == "1=2" and table.loc["copied", "status"] == "ok"
    assert table.loc[inputs["patient"].name, "equal_channels"] == ""
    assert messages == ["note: copied: channels 1=2 are identical in every slice (a sequence replaced by "
                        "FLAIR?); the model may miss tumour on such scans"]


def test_onnx_export_and_backend_give_the_same_masks(tiny_run, inputs, tmp_path):
    _, run = tiny_run
    result = export_model(run, tmp_path / "model.onnx")
    assert result["max_abs_logit_difference"] < 1e-3
    torch_predictor = Predictor.load(run, precision="32")
    onnx_predictor = Predictor.load(tmp_path / "model.onnx", backend="onnx")
    images = np.random.default_rng(1).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    torch_masks = torch_predictor.predict_volume(images) >= 0.5
    onnx_masks = onnx_predictor.predict_volume(images) >= 0.5
    assert (torch_masks == onnx_masks).mean() > 0.999
    table = predict_paths(tmp_path / "model.onnx", [inputs["patient"]], tmp_path / "onnx_out", backend="onnx",
                          progress=False)
    assert table["status"].tolist() == ["ok"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainseg.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_bad_model_and_partial_failure_exit_codes(tiny_run, inputs, tmp_path):
    _, run = tiny_run
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"junk")
    bad = run_cli("predict", str(inputs["files"]), "--model", str(not_a_model), "--out", str(tmp_path / "o1"))
    assert bad.returncode == 2
    expected = f"error: {not_a_model}: not a brainseg checkpoint (cannot be read as a PyTorch file)"
    assert bad.stderr.strip() == expected
    partial = run_cli("predict", str(inputs["files"]), "--model", str(run), "--out", str(tmp_path / "o2"))
    assert partial.returncode == 1
    assert "Traceback" not in partial.stderr
    assert "2 cases predicted, 3 failed" in partial.stdout
    empty = run_cli("evaluate", str(not_a_model), "--data", str(tiny_run[0]), "--out", str(tmp_path / "o3"))
    assert empty.returncode == 2 and "not a brainseg checkpoint" in empty.stderr
    exported = run_cli("export", str(run), "--out", str(tmp_path / "m.onnx"))
    assert exported.returncode == 0 and "max |logit difference|" in exported.stdout


def test_stored_post_processing_applies_unless_overridden():
    import torch

    from brainseg.inference import Predictor

    probability = np.zeros((3, 16, 16), np.float32)
    probability[0:2, 2:8, 2:8] = 0.9  # a large component over two slices
    probability[2, 12:14, 12:14] = 0.6  # a small one elsewhere
    description = {"threshold": 0.5, "postprocessing": {"largest_component": True, "min_size": 0}}
    stored = Predictor(torch.nn.Identity(), description)
    assert stored.postprocessing == {"largest_component": True, "min_size": 0, "min_fraction": 0.0}
    assert stored.masks(probability).sum() == 2 * 36
    plain = Predictor(torch.nn.Identity(), description, largest_component=False)
    assert plain.masks(probability).sum() == 2 * 36 + 4
    older = Predictor(torch.nn.Identity(), {"threshold": 0.5})  # files from before post-processing was stored
    assert older.postprocessing == {"largest_component": False, "min_size": 0, "min_fraction": 0.0}
    assert Predictor(torch.nn.Identity(), {"threshold": 0.5}, min_size=5).masks(probability).sum() == 2 * 36
    # A share of the largest: 4 voxels are 1/18 of it, so 0.05 keeps them and 0.25 drops them.
    shares = {"threshold": 0.5, "postprocessing": {"largest_component": False, "min_fraction": 0.25}}
    assert Predictor(torch.nn.Identity(), shares).masks(probability).sum() == 2 * 36
    assert Predictor(torch.nn.Identity(), shares, min_fraction=0.05).masks(probability).sum() == 2 * 36 + 4


def test_inputs_of_the_same_name_get_outputs_of_their_own(tiny_run, tmp_path):
    _, run = tiny_run
    rng = np.random.default_rng(2)
    sizes = {"a/x.png": (64, 64), "b/x.png": (72, 80), "a/x.jpg": (96, 64), "a/y.png": (80, 88)}
    for name, size in sizes.items():
        write_png(tmp_path / "in" / name, rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    out = tmp_path / "out"
    table = predict_paths(run, [tmp_path / "in" / name for name in sizes], out, save_probabilities=True,
                          progress=False)
    assert table["case"].tolist() == ["a_x", "b_x", "a_x_2", "y"]  # a unique name is kept
    assert table["mask"].nunique() == len(sizes)
    saved = pd.read_csv(out / "predictions.csv")
    for (name, (height, width)), row in zip(sizes.items(), saved.itertuples(), strict=True):
        assert row.input == str(tmp_path / "in" / name)
        assert Image.open(row.mask).size == (width, height)  # each mask is its own input's
        assert Image.open(out / "overlays" / f"{row.case}.png").size == (width, height)
        assert Image.open(out / "probabilities" / f"{row.case}.png").size == (width, height)


def test_an_output_inside_the_folder_of_a_data_set_file_is_refused(tiny_run, tmp_path):
    from brainseg.errors import BadInputError
    from conftest import tree_state

    data, run = tiny_run
    patient = sorted(p for p in data.iterdir() if p.is_dir())[0]
    before = tree_state(data)
    slice_file = sorted(patient.glob("*_[0-9].tif"))[0]
    for out in (patient / "sub", patient):
        with pytest.raises(BadInputError, match="inside the data folder"):
            predict_paths(run, [slice_file], out, progress=False)
    assert tree_state(data) == before
    # A patient folder given as input protects its whole data set, not only itself.
    for out in (data, data / "predictions"):
        with pytest.raises(BadInputError, match=rf"^{out}: is inside the data folder {data}"):
            predict_paths(run, [patient], out, progress=False)
    assert tree_state(data) == before
    # The LGG download nests the patients in kaggle_3m/: the folder holding it is the data folder.
    download = tmp_path / "lgg"
    shutil.copytree(data, download / "kaggle_3m")
    nested = download / "kaggle_3m" / patient.name
    with pytest.raises(BadInputError, match=rf"is inside the data folder {download};"):
        predict_paths(run, [nested], download / "predictions", progress=False)
    assert sorted(p.name for p in download.iterdir()) == ["kaggle_3m"]
    # Unlabelled slices (no _mask files) are no data set: writing beside their folder stays allowed.
    scans = tmp_path / "scans" / "case"
    scans.mkdir(parents=True)
    for path in sorted(patient.glob("*_[0-9].tif"))[:2]:
        (scans / path.name).write_bytes(path.read_bytes())
    table = predict_paths(run, [scans], tmp_path / "scans" / "predictions", progress=False)
    assert table["status"].tolist() == ["ok"]
    # A loose image is not a data set: writing beside it stays allowed (predict scan.png -o predictions).
    write_png(tmp_path / "scan.png", np.zeros((64, 64, 3), np.uint8))
    table = predict_paths(run, [tmp_path / "scan.png"], tmp_path / "predictions", progress=False)
    assert table["status"].tolist() == ["ok"]


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "--batch-size: must be 1 or more, not 0"),
    ({"batch_size": -1}, "--batch-size: must be 1 or more, not -1"),
    ({"device": "foo"}, "--device: must be auto, cpu, cuda or cuda:N, not 'foo'"),
    ({"threshold": float("nan")}, "--threshold: must be between 0 and 1 (exclusive), not nan"),
    ({"threshold": -1.0}, "--threshold: must be between 0 and 1 (exclusive), not -1"),
    ({"threshold": 2.0}, "--threshold: must be between 0 and 1 (exclusive), not 2"),
    ({"min_size": -5}, "--min-size: must be 0 or more voxels, not -5"),
    ({"precision": "foo"}, "--precision: must be auto, 32 or bf16, not 'foo'"),
    ({"backend": "onnx", "device": "cuda"}, "--device cuda: the onnx backend runs on the CPU"),
])
def test_bad_options_are_one_line_option_errors(tiny_run, options, message):
    from brainseg.errors import OptionError

    _, run = tiny_run
    with pytest.raises(OptionError) as error:
        Predictor.load(run, **options)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_max_pixels_refuses_larger_images_by_row_and_bad_values_in_one_line(tiny_run, tmp_path):
    from brainseg.errors import OptionError

    _, run = tiny_run
    write_png(tmp_path / "scans" / "small.png", np.zeros((64, 64, 3), np.uint8))
    write_png(tmp_path / "scans" / "large.png", np.zeros((128, 128, 3), np.uint8))
    table = predict_paths(run, [tmp_path / "scans"], tmp_path / "out", progress=False, max_pixels=64 * 64)
    status = table.set_index("case")["status"]
    assert status["small"] == "ok" and "128x128 pixels is more than the limit of 4,096" in status["large"]
    with pytest.raises(OptionError, match=r"^--max-pixels: must be a whole number of at least 1, not 0$"):
        predict_paths(run, [tmp_path / "scans"], tmp_path / "out2", progress=False, max_pixels=0)
    assert not (tmp_path / "out2").exists()


def test_cuda_on_a_torch_without_cuda_is_an_option_error(tiny_run, monkeypatch):
    import torch

    from brainseg.errors import OptionError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="this torch has no CUDA"):
        Predictor.load(tiny_run[1], device="cuda")


def _edited(run, path, edit):
    """A copy of the run's model file with its description or weights changed by `edit`."""
    import torch

    state = torch.load(run / "model.pt", weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["brainseg"]["model"]["kwargs"].update(base_filters=8),
     r"weights do not match the model description \(\S+ is \(.*\) in the file, \(.*\) in the description"),
    (lambda s: s.update(state_dict={}), r"weights do not match the model description \(\S+ missing"),
    (lambda s: s["brainseg"].pop("preprocessing"), "model description: no 'preprocessing' entry"),
    (lambda s: s["brainseg"].update(threshold="abc"), "threshold must be a number between 0 and 1"),
    (lambda s: s["brainseg"]["preprocessing"].update(image_size=0), "image_size must be a whole number"),
    (lambda s: s["brainseg"]["model"]["kwargs"].update(colour=1), "model description: unknown argument"),
    (lambda s: s["brainseg"].update(postprocessing={"min_size": -3}), "postprocessing.min_size cannot be -3"),
    (lambda s: s["brainseg"].update(format="other/9"),
     r"model description: format 'other/9'; this version of brainseg reads brainseg-checkpoint/1$"),
    (lambda s: s["brainseg"].pop("format"), r"model description: no format; this version of brainseg reads"),
])
def test_hand_edited_model_files_are_one_line_errors_naming_the_file(tiny_run, tmp_path, edit, message):
    from brainseg.errors import BadInputError

    path = _edited(tiny_run[1], tmp_path / "edited.pt", edit)
    with pytest.raises(BadInputError, match=message) as error:
        Predictor.load(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)
    with pytest.raises(BadInputError, match=message):
        export_model(path, tmp_path / "edited.onnx")
    assert not (tmp_path / "edited.onnx").exists()


def test_the_formats_training_and_the_shipped_model_write_are_readable():
    from brainseg.runs.model_file import CHECKPOINT_FORMAT, READABLE_FORMATS, load_model_file

    assert CHECKPOINT_FORMAT in READABLE_FORMATS
    assert load_model_file("pretrained")[0]["format"] == CHECKPOINT_FORMAT


def test_a_bad_slice_in_a_volume_is_named_by_its_file(tiny_run):
    from brainseg.errors import BadInputError

    predictor = Predictor.load(tiny_run[1])
    grey = np.zeros((2, 64, 64), np.uint8)
    with pytest.raises(BadInputError, match=r"^P1_2\.tif: has 1 channel\(s\); the model expects 3 \(pre-"):
        predictor.predict_volume(grey, ["P1_2.tif", "P1_3.tif"])


def test_onnx_backend_on_a_torch_model_exports_it_afresh_unless_its_export_is_beside_it(tiny_run, tmp_path,
                                                                                           monkeypatch):
    import shutil
    import tempfile

    from brainseg.runs.model_file import store_settings

    run = tmp_path / "run"
    shutil.copytree(tiny_run[1], run)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    fresh = Predictor.load(run, backend="onnx")
    assert fresh.identity["backend"] == "onnxruntime" and fresh.identity["file"] == str(run / "model.pt")
    assert not any((tmp_path / "temp").iterdir())  # the temporary export is gone once loaded
    export_model(run)  # run/model.onnx, from this model.pt
    assert Predictor.load(run, backend="onnx").identity["file"] == str(run / "model.onnx")
    store_settings(run, {"threshold": 0.3})  # the model changed after its export
    again = Predictor.load(run, backend="onnx")
    assert again.identity["file"] == str(run / "model.pt") and again.cutoff == 0.3  # not the stale export
