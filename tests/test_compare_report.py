"""compare: 'pretrained' as an input, and every input checked before any is evaluated."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from brainseg.errors import BadInputError
from brainseg.evaluation.compare import compare_runs


@pytest.fixture
def shipped(tiny_run, tmp_path, monkeypatch):
    """'pretrained' stands for a copy of the tiny run written as the package ships it (split inside)."""
    import brainseg.runs.pretrained
    from brainseg.runs.model_file import write_pretrained

    name = brainseg.runs.pretrained.PRETRAINED_FILES["lgg"]
    path = write_pretrained(tiny_run[1], tmp_path / "package" / name)
    monkeypatch.setattr(brainseg.runs.pretrained, "pretrained_folder", lambda: path.parent)
    return path


def test_compare_takes_pretrained_and_the_split_stored_in_it(tiny_run, tmp_path, shipped):
    data, run = tiny_run
    out = tmp_path / "cmp"
    table = compare_runs(["pretrained", run], data, out, side="val", progress=False)
    assert table["run"].tolist() == ["pretrained", "run"]
    epochs = (out / "compare.md").read_text().splitlines()[-2:]  # the shipped model has no history
    assert [row.split(" | ")[4] for row in epochs] == ["–", str(len(pd.read_csv(run / "history.csv")))]
    markdown = (out / "compare.md").read_text()
    assert "None" not in markdown and "| 3.0000 |" not in markdown  # whole numbers stay whole
    assert table["dice_mean"].iloc[0] == pytest.approx(table["dice_mean"].iloc[1], abs=1e-2, nan_ok=True)
    # The first model's split came from inside its file; the others were scored on the same patients.
    assert json.loads((out / "split.json").read_text()) == json.loads((run / "split.json").read_text())
    split = json.loads((run / "split.json").read_text())
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps({**split, "test": split["train"][:1], "train": split["train"][1:]}))
    with pytest.raises(BadInputError, match=r"^pretrained: trained or validated on 1 of the compared"):
        compare_runs(["pretrained"], data, tmp_path / "cmp2", split_file=leaky, progress=False)


def test_compare_checks_every_input_before_evaluating_any(tiny_run, tmp_path):
    data, run = tiny_run
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "alone").mkdir()
    shutil.copy(run / "model.pt", tmp_path / "alone" / "model.pt")
    out = tmp_path / "cmp"
    for second, side, message in (
            (tmp_path / "m.onnx", "val", r"m\.onnx: is an ONNX model; compare scores run folders, model "
                                         r"files or pretrained: give the run it was exported from$"),
            (tmp_path / "unfinished", "val", r"unfinished: run folder has no model\.pt"),
            (tmp_path / "missing", "val", r"missing: does not exist$"),
            (tmp_path / "alone", "test", r"alone: has no split\.json beside it and no split stored in it")):
        with pytest.raises(BadInputError, match=message):
            compare_runs([run, second], data, out, side=side, progress=False)
        assert not out.exists()  # the first run was not evaluated


def test_compare_counts_training_minutes_across_a_resume(tiny_run, tmp_path):
    data, run = tiny_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    history = pd.read_csv(resumed / "history.csv")
    history = pd.concat([history.iloc[:1]] * 3, ignore_index=True)
    history = history.assign(epoch=[0, 1, 2], seconds=[60, 120, 30])
    history.to_csv(resumed / "history.csv", index=False)  # the clock restarted when epoch 2 resumed
    table = compare_runs([run, resumed], data, tmp_path / "cmp", side="val", progress=False)
    assert table["train_minutes"].iloc[1] == 2.5 and table["epochs"].iloc[1] == 3


def test_compare_markdown_formats_each_column_alike():
    from brainseg.evaluation.compare import _cell

    assert [_cell(5.0, "hd95_median"), _cell(12.0, "hd95_median")] == ["5.0", "12.0"]  # pixels, not scores
    assert [_cell(0.5, "dice_mean"), _cell(113.66, "train_minutes"), _cell(61.0, "epochs")] == \
        ["0.5000", "113.7", "61"]
    assert _cell(float("nan"), "dice_mean") == "–"
