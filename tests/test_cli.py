"""The command line as a user meets it: help, version, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from brainseg import __version__
from brainseg.cli import app
from conftest import make_kaggle_tree

runner = CliRunner()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainseg.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).output.strip() == f"brainseg {__version__}"
    help_text = runner.invoke(app, ["--help"], terminal_width=80).output
    verbs = [command.name for command in typer.main.get_command(app).commands.values()]
    assert {"train", "evaluate", "predict", "serve", "merge", "demo"} <= set(verbs)
    for verb in verbs:  # every verb listed with a whole summary, never cut with "..."
        line = next(line for line in help_text.splitlines() if line.strip().startswith(verb + " "))
        assert "..." not in line and "…" not in line, line
        result = runner.invoke(app, [verb, "--help"], terminal_width=100)
        assert result.exit_code == 0 and "Example:" in result.output, verb


def test_every_option_of_every_verb_shows_its_default():
    """A value option shows its default, says where it comes from, or is required; flags show both."""
    for command in typer.main.get_command(app).commands.values():
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "help" or (param.is_flag and
                                                                                param.secondary_opts):
                continue
            described = param.help or ""
            shown = (param.show_default and param.default is not None) or "default" in described.lower() \
                or param.required or param.is_flag or param.multiple
            assert shown, f"{command.name} {param.opts[0]}: no default in its help"


def test_max_pixels_defaults_to_the_readers_limit():
    from brainseg.cli import MAX_PIXELS
    from brainseg.data.io import MAX_SLICE_PIXELS

    assert MAX_PIXELS == MAX_SLICE_PIXELS


def test_one_vocabulary_for_precision_and_device():
    from brainseg.devices import inference_precision, normalise_device, normalise_precision, resolve_precision

    for spelling in ("32", "32-true", "fp32"):
        assert normalise_precision(spelling) == "32" and resolve_precision(spelling, "cpu") == "32-true"
    assert resolve_precision("bf16", "cpu") == resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert inference_precision("bf16-mixed", "cpu") == "bf16"
    assert inference_precision("32-true", "cpu") == "32"
    assert normalise_device("gpu") == "cuda" and normalise_device("GPU:1") == "cuda:1"
    for bad, message in ((["train", "--out", "/tmp/x", "--precision", "64"],
                          "train.precision: must be auto, 32, bf16 or 16, not '64'"),
                         (["predict", "x.png", "--device", "tpu"],
                          "--device: must be auto, cpu, cuda or cuda:N")):
        result = run_cli(*bad)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from brainseg.cli import app; "
            "heavy = [m for m in ('torch', 'lightning', 'monai', 'matplotlib', 'pandas', 'sklearn') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args, message", [
    (["index", "/no/such/folder"], "error: /no/such/folder: folder does not exist"),
    (["explore", "/no/such/folder"], "error: /no/such/folder: folder does not exist"),
    (["split", "/no/such/folder"], "error: /no/such/folder: folder does not exist"),
    (["train", "--refit", "/no/such/run", "--out", "/tmp/never"],
     "error: /no/such/run: not a brainseg run folder (no config.yaml)"),
    (["train", "--refit", "/no/such/run", "--resume", "/no/such/run"],
     "error: --refit takes the run's own config; do not combine it with --resume or --config"),
    (["evaluate", "pretrained", "--data", "/no/such/data", "--out", "/tmp/never-eval", "--min-fraction", "2"],
     "error: --min-fraction: must be between 0 and 1, not 2"),
    (["crossval", "/no/such/run", "--data", "/no/such/data", "--out", "/tmp/never-cv"],
     "error: /no/such/run: does not exist"),
    (["explore", "/no/such/folder", "--samples", "0"],
     "error: samples (slices in the sample grid) must be at least 1, got 0"),
    (["explore", "/no/such/folder", "--seed", "-1"],
     "error: seed must be a whole number from 0 to 4294967295, got -1"),
    (["evaluate", "pretrained", "--data", "/no/such/data", "--out", "/tmp/never-eval", "--seed", "-1"],
     "error: --seed must be a whole number from 0 to 4294967295, got -1"),
    (["compare", "/no/such/run", "--data", "/no/such/data", "--out", "/tmp/never-cmp"],
     "error: /no/such/run: does not exist"),
    (["report", "/no/such/run"], "error: /no/such/run: does not exist"),
    (["synth", "/tmp/never-synth", "--size", "100000"],
     "error: size must be from 64 to 1024 pixels, got 100000"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert "Traceback" not in result.stderr


def test_an_output_where_a_file_stands_names_the_file(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {"TCGA_AA_0001_20000101": 2})
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    for args in (["synth", str(afile / "new")], ["explore", str(root), "--out", str(afile)],
                 ["index", str(root), "--out", str(afile / "index.csv")]):
        result = run_cli(*args)
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]  # after any progress lines
        assert last == f"error: {afile}: is a file, not a folder"  # was "File exists" / "Not a directory"
        assert "Traceback" not in result.stderr


def test_output_inside_data_folder_is_refused(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {"TCGA_AA_0001_20000101": 2})
    result = run_cli("index", str(root), "--out", str(root / "index.csv"))
    assert result.returncode == 2
    assert "inside the data folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (root / "index.csv").exists()


def test_index_split_explore_commands(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {f"TCGA_AA_{i:04d}_20000101": 6 for i in range(8)})
    out = tmp_path / "out"
    assert runner.invoke(app, ["index", str(root), "-o", str(out / "index.csv")]).exit_code == 0
    split = runner.invoke(app, ["split", str(root), "-o", str(out / "split.json"), "--folds", "3",
                                "--test", "0.25"])
    assert split.exit_code == 0, split.output
    assert "fold 2:" in split.output
    explored = runner.invoke(app, ["explore", str(root), "-o", str(out / "explore"), "--samples", "2"])
    assert explored.exit_code == 0, explored.output
    assert "patients:       8" in explored.output
    assert (out / "explore" / "sample_grid.png").exists()
