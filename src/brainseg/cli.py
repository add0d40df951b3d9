"""The `brainseg` command line. Each verb parses its arguments and calls one API function.

Heavy modules are imported inside the verbs so that `brainseg --help` starts quickly.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated

import typer

from brainseg import __version__
from brainseg.errors import BadInputError, BrainsegError

app = typer.Typer(
    name="brainseg",
    help="Brain tumour segmentation in MRI: check and explore data, split it by patient, train, evaluate "
         "and predict, on the command line or as a web service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DataDir = Annotated[Path, typer.Argument(help="Data set folder (kaggle_3m patient folders, or "
                                              "images/ + masks/).", show_default=False)]
Layout = Annotated[str, typer.Option(help="Layout: auto, kaggle_3m or images_masks.")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Decode every file again; do not "
                                                          "read or write the slice cache.")]
LargestComponent = Annotated[bool | None, typer.Option(
    "--largest-component/--no-largest-component",
    help="Keep only the largest 3D component (default: as the model file recommends).", show_default=False)]
MinSize = Annotated[int | None, typer.Option(
    help="Drop 3D components smaller than this, in voxels (default: the model file's).", show_default=False)]
MAX_PIXELS = 4096 * 4096  # data.io.MAX_SLICE_PIXELS, written here to keep data.io out of start-up
MaxPixels = Annotated[int, typer.Option(help="Most pixels in one decoded slice (4096x4096 by default), "
                                             "read from the file's header before decoding.")]
THRESHOLD_HELP = "Probability cut (default: the threshold stored in the model file, else 0.5)."
ScoringPrecision = Annotated[str, typer.Option(help="auto (bf16 where native), 32 or bf16.")]
MinFraction = Annotated[float | None, typer.Option(
    help="Drop 3D components smaller than this fraction of the largest, e.g. 0.25; 0 keeps all "
         "(default: the model file's).", show_default=False)]


@functools.cache
def _built_in_config():
    from brainseg.config import RunConfig

    return RunConfig()


def _configured(text: str, key: str) -> str:
    """Help for a train option that overrides config key `key`, with its built-in default."""
    section, name = key.split(".")
    default = getattr(getattr(_built_in_config(), section), name)
    return f"{text} [default: {default}, or the --config file's {key}]"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"brainseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    """Brain tumour segmentation in MRI with 2D U-Net-family networks."""


def _echo_scan(result, per_kind: int = 5) -> None:
    for note in result.notes:
        typer.echo(note, err=True)
    table = result.table
    cached = " (from cache)" if result.from_cache else ""
    typer.echo(f"{len(table)} slices, {table['patient'].nunique()} "
               f"{'patients' if result.layout == 'kaggle_3m' else 'cases'}, "
               f"{int(table['has_tumour'].sum())} with tumour{cached}", err=True)
    if not result.report.ok:
        typer.echo(f"{len(result.report.problems)} problems, "
                   f"{result.report.excluded_images()} pairs left out:", err=True)
        for line in result.report.lines(per_kind):
            typer.echo(f"  {line}", err=True)


@app.command("index", short_help="Index a data set: one CSV row per slice, problems listed.")
def index_command(
    data_dir: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Index CSV to write.")] = Path("index.csv"),
    layout: Layout = "auto",
    strict: Annotated[bool, typer.Option(help="Exit non-zero when any check finds a problem.")] = False,
    no_cache: NoCache = False,
) -> None:
    """Index a data set into a CSV with one row per slice, checking every image/mask pair.

    Broken pairs are reported with their file names and left out (or, with --strict, the
    command fails). Nothing is written into DATA_DIR.

    Example: brainseg index ../shared/data/lgg --out lgg_index.csv
    """
    from brainseg.data.index import write_index

    result = write_index(data_dir, out, layout=layout, cache=not no_cache, progress=True)
    _echo_scan(result)
    typer.echo(f"wrote {out}")
    if strict and not result.report.ok:
        raise typer.Exit(1)


@app.command("check", short_help="Check every image/mask pair and say what is broken.")
def check_command(
    data_dir: DataDir,
    layout: Layout = "auto",
    strict: Annotated[bool, typer.Option(help="Exit non-zero when any problem is found.")] = False,
    all_files: Annotated[bool, typer.Option("--all", help="List every problem, not 5 a kind.")] = False,
    no_cache: NoCache = False,
) -> None:
    """Check every image/mask pair and explain what is broken, without writing an index.

    Example: brainseg check ../shared/data/figshare --strict
    """
    from brainseg.data.index import scan

    result = scan(data_dir, layout, cache=not no_cache, progress=True, require_slices=False)
    _echo_scan(result, per_kind=10**9 if all_files else 5)
    if result.report.ok:
        typer.echo("no problems found", err=True)
    elif strict:
        raise typer.Exit(1)


@app.command("split", short_help="Split patients (never slices) into train/val/test or k folds.")
def split_command(
    data_dir: DataDir,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Split JSON to write (default: split.json in the current folder).")] = None,
    val: Annotated[float, typer.Option(help="Fraction of patients for validation.")] = 0.15,
    test: Annotated[float, typer.Option(help="Fraction of patients for testing.")] = 0.15,
    folds: Annotated[int, typer.Option(help="k-fold cross-validation over the non-test "
                                            "patients (0: a single train/val split).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    test_patients: Annotated[str, typer.Option(help="Comma-separated patients to use as the "
                                                    "test set (overrides --test).")] = "",
    group_by: Annotated[str, typer.Option(help="Keep groups on one side: index-block:N (images N in "
                                               "blocks of N consecutive indices, e.g. Figshare) or "
                                               "column:NAME (a column of labels.csv).")] = "",
    layout: Layout = "auto",
) -> None:
    """Split patients (never slices) into train/val/test or k folds, stratified by tumour volume.

    Example: brainseg split ../shared/data/lgg --val 0.15 --test 0.15 --seed 0 --out split.json
    """
    from brainseg.data.splits import make_split
    from brainseg.runs.folder import SPLIT_FILE

    split = make_split(data_dir, out or Path(SPLIT_FILE), val=val, test=test, folds=folds or None, seed=seed,
                       test_patients=[p.strip() for p in test_patients.split(",") if p.strip()],
                       group_by=group_by, layout=layout)
    if split["unit"] == "image":
        typer.echo("note: this layout has no patient ids, so the split is per image", err=True)
    counts = split["counts"]
    if "folds" in counts:
        described = f"test {counts['test']}, " + ", ".join(
            f"fold {i}: train {c['train']} / val {c['val']}" for i, c in enumerate(counts["folds"]))
    else:
        described = ", ".join(f"{side} {n}" for side, n in counts.items())
    typer.echo(f"{split['unit']}s: {described}")
    typer.echo(f"wrote {out}")


@app.command("explore", short_help="Summarise a data set in tables and figures.")
def explore_command(
    data_dir: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for summary.json and PNGs.")]
    = Path("explore"),
    seed: Annotated[int, typer.Option(help="Seed for the sample grid.")] = 0,
    samples: Annotated[int, typer.Option(help="Slices in the sample grid (at least 1).")] = 6,
    layout: Layout = "auto",
) -> None:
    """Summarise a data set (counts, shapes, intensities) and draw figures into OUT.

    Example: brainseg explore ../shared/data/lgg --out lgg_explore
    """
    from brainseg.data.explore import explore, summary_lines

    summary = explore(data_dir, out, layout=layout, seed=seed, samples=samples, progress=True)
    for line in summary_lines(summary):
        typer.echo(line)
    typer.echo(f"wrote {out}/summary.json and {', '.join(summary['figures'])}")


@app.command("synth", short_help="Write a synthetic data set to try brainseg on.")
def synth_command(
    out: Annotated[Path, typer.Argument(help="New folder for the synthetic data set.",
                                        show_default=False)],
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 6,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels, 64 to 1024.")] = 256,
    layout: Annotated[str, typer.Option(help="kaggle_3m or images_masks.")] = "kaggle_3m",
) -> None:
    """Write a synthetic data set with kaggle_3m names: FLAIR-bright lesions and their masks.

    Example: brainseg synth synthetic --patients 8 --seed 1
    """
    from brainseg.data.synth import synthesize

    folder = synthesize(out, patients=patients, seed=seed, size=size, layout=layout,
                        progress=True)
    typer.echo(f"wrote {folder}")


@app.command("train", short_help="Train a U-Net-family model into a run folder.")
def train_command(
    data: Annotated[Path | None, typer.Option(help="Data set folder.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="New run folder.")] = None,
    config: Annotated[Path | None, typer.Option(help=(
        "YAML config, a shipped recipe (lgg_cpu, figshare_cpu) or a model whose recipe to train again "
        "(a run, a model file, pretrained:figshare); flags override it."))] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder from its "
                                                     "last checkpoint.")] = None,
    refit: Annotated[Path | None, typer.Option(help="Refit this validated run on its train and val "
                                                    "patients: same config, its best epoch count and "
                                                    "LR drops, no validation.")] = None,
    model: Annotated[str | None, typer.Option(help=_configured(
        "unet, resunet, attention_unet or monai_unet.", "model.name"))] = None,
    base_filters: Annotated[int | None, typer.Option(help=_configured(
        "Filters of the first level.", "model.base_filters"))] = None,
    depth: Annotated[int | None, typer.Option(help=_configured(
        "Down-sampling steps.", "model.depth"))] = None,
    image_size: Annotated[int | None, typer.Option(help=_configured(
        "Network input side, e.g. 128 or 256.", "data.image_size"))] = None,
    context: Annotated[int | None, typer.Option(help=_configured(
        "2.5D: neighbouring slices on each side.", "data.context"))] = None,
    epochs: Annotated[int | None, typer.Option(help=_configured("Maximum epochs.", "train.epochs"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_configured(
        "Slices per batch (per process).", "train.batch_size"))] = None,
    lr: Annotated[float | None, typer.Option(help=_configured("Learning rate.", "train.lr"))] = None,
    loss: Annotated[str | None, typer.Option(help=_configured(
        "bce, dice, bce_dice, bce_dice_image (Dice per tumour image), bce_tversky (missed "
        "pixels weigh 0.7) or bce_tversky_image (Tversky per tumour image).", "train.loss"))] = None,
    precision: Annotated[str | None, typer.Option(help=_configured(
        "auto (bf16 where native), 32, bf16 or 16.", "train.precision"))] = None,
    devices: Annotated[int | None, typer.Option(help=_configured(
        "Processes per node; more than 1 uses DDP.", "train.devices"))] = None,
    num_nodes: Annotated[int | None, typer.Option(help=_configured(
        "Nodes (machines) under torchrun or SLURM, each running --devices processes; see "
        "docs/scaling.md.", "train.num_nodes"))] = None,
    accelerator: Annotated[str | None, typer.Option("--device", "--accelerator", help=_configured(
        "auto, cpu or cuda (gpu).", "train.accelerator"))] = None,
    max_minutes: Annotated[float | None, typer.Option(help=_configured(
        "Stop after this much time (0: no limit).", "train.max_minutes"))] = None,
    split: Annotated[Path | None, typer.Option(help="Split JSON to use (default: make one).")] = None,
    fold: Annotated[int | None, typer.Option(help="Fold of a k-fold split to train.")] = None,
    seed: Annotated[int | None, typer.Option(help=_configured("Random seed.", "train.seed"))] = None,
    init: Annotated[Path | None, typer.Option(help="Start from this model file's or run folder's "
                                                   "weights (fine-tuning, e.g. at a larger size).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any setting, e.g. --set augment.elastic=true (repeatable).")] = None,
) -> None:
    """Train a model with Lightning; writes config, split, history, curves, checkpoints, model.pt.

    Example: brainseg train --data ../shared/data/lgg --out runs/unet --model unet --epochs 30
    """
    options = dict(locals())  # the parameters only: brainseg distill shares them (_train_overrides)
    from brainseg.errors import OptionError
    from brainseg.training import run_training

    if resume is None and out is None:
        raise OptionError("pass --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    if resume is not None and out is not None and Path(out) != Path(resume):
        raise OptionError("--resume continues the run in its own folder; leave out --out")
    result = run_training(resume or out, config_file=config, overrides=_train_overrides(options),
                          resume=resume is not None, refit=refit,
                          echo=lambda line: typer.echo(line, err=True))
    _echo_training(result)


def _train_overrides(options: dict) -> dict:
    """The config overrides that the options of `brainseg train` (and `brainseg distill`) give."""
    from brainseg.errors import OptionError

    def text(name: str) -> str | None:
        return str(options[name]) if options[name] else None

    keys = {"data.image_size": "image_size", "data.context": "context", "data.fold": "fold",
            "model.name": "model", "model.base_filters": "base_filters", "model.depth": "depth",
            "train.epochs": "epochs", "train.batch_size": "batch_size", "train.lr": "lr",
            "train.loss": "loss", "train.precision": "precision", "train.devices": "devices",
            "train.num_nodes": "num_nodes", "train.accelerator": "accelerator",
            "train.max_minutes": "max_minutes", "train.seed": "seed"}
    overrides = {"data.root": text("data"), "data.split": text("split"), "train.init_weights": text("init"),
                 **{key: options[name] for key, name in keys.items()}}
    for item in options["set_"] or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise OptionError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        overrides[key.strip()] = value.strip()
    return overrides


def _echo_training(result) -> None:
    if result.refit:
        typer.echo(f"refit on its train and val {result.unit}s (no validation); "
                   f"kept {result.best_checkpoint}")
        typer.echo(f"wrote {result.model_file} ({result.minutes:.1f} min)")
        return
    scores = [v for v in result.val_patient_dice.values() if v == v]
    mean = f"{sum(scores) / len(scores):.4f}" if scores else "n/a"
    typer.echo(f"best checkpoint: {result.best_checkpoint}")
    from brainseg.evaluation.evaluate import SCORED_PER

    typer.echo(f"validation Dice {SCORED_PER[result.unit]}: mean {mean} over {len(scores)} {result.unit}s")
    typer.echo(f"run folder: {result.run_dir} ({result.minutes:.1f} min)")


def _with_train_options(command):
    """Give `command(own parameters, **options)` the options of `brainseg train` (those that start a new
    run), so that they are defined once, in train_command."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [p for name, p in inspect.signature(train_command, eval_str=True).parameters.items()
              if name not in ("resume", "refit")]
    command.__signature__ = inspect.Signature([*own, *shared], return_annotation=None)
    return command


@app.command("distill", short_help="Train one network on a teacher model's probabilities and the truth.")
@_with_train_options
def distill_command(
    teacher: Annotated[str, typer.Argument(help="The model to learn from: run folder, model file, "
                                                "'pretrained' or 'pretrained:NAME'.", show_default=False)],
    **options,
) -> None:
    """Train one network (any --model) on a teacher's probabilities as well as the truth, as train does.

    The loss is (1 - w) * the configured loss + w * BCE against the teacher's probabilities, with
    w = train.distill_weight (--set train.distill_weight=0.5). The teacher labels every training slice
    once, before training; its maps follow each slice's spatial augmentation. Start the student from one
    member of an ensemble with --init pretrained --set train.init_member=N.
    Refused: a teacher with other input channels or normalisation than the data, or one that trained
    or was validated on any of the run's test patients. Continue a run with brainseg train --resume.

    Example: brainseg distill pretrained --config lgg_cpu --data ../shared/data/lgg --out runs/student
    """
    from brainseg.training import distill

    result = distill(teacher, options["out"], config_file=options["config"],
                     overrides=_train_overrides(options), echo=lambda line: typer.echo(line, err=True))
    _echo_training(result)


@app.command("evaluate", short_help="Score a model per patient volume and per slice.")
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="Run folder, model.pt or checkpoint.", show_default=False)],
    data: Annotated[Path, typer.Option(help="Data set folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the results.")] = Path("evaluation"),
    split: Annotated[str, typer.Option(help="Which patients: test, val, train or all.")] = "test",
    split_file: Annotated[Path | None, typer.Option(help="Split JSON (default: the run's).")] = None,
    fold: Annotated[int, typer.Option(help="Fold, for a k-fold split's train/val.")] = -1,
    threshold: Annotated[float | None, typer.Option(help=THRESHOLD_HELP)] = None,
    largest_component: LargestComponent = None,
    min_size: MinSize = None,
    min_fraction: MinFraction = None,
    tta: Annotated[bool, typer.Option(help="Average with a left-right flipped prediction.")] = False,
    flair_replaces: Annotated[str, typer.Option(
        help="Robustness check: overwrite post-contrast ('post') or pre- and post-contrast ('pre+post') "
             "with FLAIR before predicting, as kaggle_3m does for a missing sequence.")] = "",
    seed: Annotated[int, typer.Option(help="Seed for the slices in the prediction grid.")] = 0,
    precision: ScoringPrecision = "auto",
    layout: Layout = "auto",
) -> None:
    """Score a model per patient volume and per slice; write summary.json, CSVs and figures.

    Example: brainseg evaluate runs/unet --data ../shared/data/lgg --split test --out runs/unet/test
    """
    from brainseg.data.splits import DETECTED_PER
    from brainseg.evaluation.evaluate import CASE_TABLES, SCORED_PER, SLICE_TABLES, EvaluateOptions, evaluate
    from brainseg.report import score_text

    options = EvaluateOptions(side=split, split_file=str(split_file or ""), fold=fold, threshold=threshold,
                              largest_component=largest_component, min_size=min_size,
                              min_fraction=min_fraction, tta_flip=tta, seed=seed,
                              precision=precision, flair_replaces=flair_replaces)
    summary = evaluate(model, data, out, layout=layout, options=options)
    dice, unit = summary["per_patient"]["dice"], summary["data"]["unit"]
    if dice["n"]:
        typer.echo(f"Dice {SCORED_PER[unit]} over {summary['data']['cases']} {unit}s ({split}): "
                   f"mean {dice['mean']:.4f}, median {dice['median']:.4f}, min {dice['min']:.4f}")
    for key in ("by_class", "by_size_band"):
        for name, group in (summary.get(key) or {}).items():
            if group["dice"]["n"]:
                typer.echo(f"  {name}: {group['cases']} {unit}s, Dice mean {group['dice']['mean']:.4f}, "
                           f"recall mean {group['recall']['mean']:.4f}")
    detection = {key: score_text(value) for key, value in summary["detection"].items()}
    typer.echo(f"tumour detection per {DETECTED_PER[unit]}: accuracy {detection['accuracy']}, "
               f"sensitivity {detection['sensitivity']}, specificity {detection['specificity']}")
    files = ", ".join(filter(None, (CASE_TABLES[unit], SLICE_TABLES[unit], *summary["figures"])))
    typer.echo(f"wrote {out}/summary.json, {files}")


IntervalGroups = Annotated[str, typer.Option(
    "--group-by", help="Draw the changes' bootstrap intervals over groups of cases: index-block:N (e.g. "
                       "index-block:16 for Figshare images, whose neighbouring indices are mostly one "
                       "patient) or column:NAME (a column of labels.csv); empty: over cases.")]


@app.command("tune", short_help="Choose threshold and post-processing on validation or out of fold.")
def tune_command(
    models: Annotated[list[Path], typer.Argument(
        help="Run folder or model.pt; or the run folders (or checkpoints inside them) of a k-fold "
             "split's folds, each tuned on its own validation patients and pooled (out of fold).",
        show_default=False)],
    data: Annotated[Path, typer.Option(help="Data set folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for tuning.csv and tuning.json.")]
    = Path("tuning"),
    split: Annotated[str, typer.Option(help="Split side to tune on (never test).")] = "val",
    store: Annotated[bool, typer.Option(help="Store the best threshold and post-processing (without TTA) "
                                             "in the model file for predict and evaluate.")] = False,
    group_by: IntervalGroups = "",
) -> None:
    """Measure thresholds, largest-component, small-component removal and flip TTA on validation.

    Example: brainseg tune runs/unet --data ../shared/data/lgg --store
    """
    from brainseg.evaluation.tune import tune

    summary = tune(models, data, out, side=split, store=store, group_by=group_by)  # one run: tuned alone
    base = summary["baseline"]
    typer.echo(f"{summary['metric']} on {summary['patients']} {summary['side']} {summary['unit']}s "
               f"(baseline, threshold {base['threshold']:g}): {base['dice_mean']:.4f}")
    typer.echo("  option             mean    change [95% bootstrap interval over "
               f"{summary['interval_over']}]")
    for name, row in summary["each_option_alone"].items():
        typer.echo(f"  {name:<18} {row['dice_mean']:.4f} {_change_text(row, base)}"
                   + (f" at threshold {row['threshold']:g}" if name == "tuned_threshold" else ""))
    for name in ("best_combination", "recommended"):
        row = summary[name]
        typer.echo(f"  {name.replace('_', ' ')}: {row['dice_mean']:.4f} {_change_text(row, base)} "
                   f"({_settings_text(row)})")
    typer.echo(f"  recommended: {summary['recommended_because']}")
    if store:
        typer.echo(f"stored {_settings_text(summary['recommended'])} in {summary['stored_in']}")


def _change_text(row: dict, base: dict) -> str:
    """'(+0.0041) [+0.0024, +0.0061] gain': a tuning option's change against the baseline."""
    change = row.get("change", {})
    interval = (f" [{change['low']:+.4f}, {change['high']:+.4f}] {change['verdict']}" if change.get("n")
                else "")
    return f"({row['dice_mean'] - base['dice_mean']:+.4f}){interval}"


def _settings_text(row: dict) -> str:
    return (f"threshold {row['threshold']:g}, largest component {row['largest_component']}, "
            f"min fraction {row['min_fraction']:g}, min size {row['min_size']}, flip TTA {row['tta_flip']}")


@app.command("compare", short_help="Score several models on the same patients, side by side.")
def compare_command(
    runs: Annotated[list[Path], typer.Argument(
        help="Run folders or model files to compare; or an earlier `brainseg evaluate` folder, whose "
             "per-case scores are read again (its model may be gone).", show_default=False)],
    data: Annotated[Path, typer.Option(help="Data set folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the comparison.")] = Path("comparison"),
    split: Annotated[str, typer.Option(help="Split side to score: test, val, or all (any labelled folder "
                                            "none of the runs saw).")] = "test",
    split_file: Annotated[Path | None, typer.Option(help="Split JSON (default: the first run's).")] = None,
    threshold: Annotated[float | None, typer.Option(help=THRESHOLD_HELP)] = None,
    largest_component: LargestComponent = None,
    min_fraction: MinFraction = None,
    tta: Annotated[bool, typer.Option(help="Average with a left-right flipped prediction.")] = False,
    precision: ScoringPrecision = "auto",
    group_by: IntervalGroups = "",
) -> None:
    """Score several runs on the same patients; write compare.csv, compare.md and compare.png.

    Example: brainseg compare runs/unet runs/resunet --data ../shared/data/lgg --out comparison
    """
    from brainseg.evaluation.compare import compare_runs
    from brainseg.evaluation.evaluate import EvaluateOptions

    options = EvaluateOptions(threshold=threshold, largest_component=largest_component,
                              min_fraction=min_fraction, tta_flip=tta, precision=precision)
    table = compare_runs(runs, data, out, side=split, split_file=split_file, options=options,
                         group_by=group_by)
    typer.echo((out / "compare.md").read_text())
    curves = ", compare_curves.png" if (out / "compare_curves.png").exists() else ""
    typer.echo(f"wrote {out}/compare.csv, compare.md, compare.png{curves} ({len(table)} runs)")


@app.command("crossval", short_help="Pool k fold runs into out-of-fold scores.")
def crossval_command(
    runs: Annotated[list[Path], typer.Argument(
        help="One run folder per fold of a k-fold split, or a model file or checkpoint inside one "
             "(RUN/checkpoints/last.ckpt scores the last epoch), or an ensemble of one fold's runs; or "
             "one earlier crossval folder, read again without its models (to pair it with --against).",
        show_default=False)],
    data: Annotated[Path, typer.Option(help="Data set folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the results.")] = Path("crossval"),
    threshold: Annotated[float | None, typer.Option(help=THRESHOLD_HELP)] = None,
    largest_component: LargestComponent = None,
    min_fraction: MinFraction = None,
    flair_replaces: Annotated[str, typer.Option(
        help="Robustness check: overwrite 'post' or 'pre+post' with FLAIR before predicting.")] = "",
    precision: ScoringPrecision = "auto",
    layout: Layout = "auto",
    against: Annotated[Path | None, typer.Option(
        help="An earlier crossval folder (another recipe, same folds): report the paired change in Dice "
             "and recall per patient, by tumour size too, with 95% bootstrap intervals.")] = None,
    group_by: IntervalGroups = "",
) -> None:
    """Score each fold's run on its own validation patients and pool them (out-of-fold Dice).

    Example: brainseg crossval runs/fold0 runs/fold1 runs/fold2 --data ../shared/data/lgg --out cv
    """
    from brainseg.evaluation.crossval import cross_validate
    from brainseg.evaluation.evaluate import EvaluateOptions

    options = EvaluateOptions(threshold=threshold, largest_component=largest_component,
                              min_fraction=min_fraction, flair_replaces=flair_replaces, precision=precision)
    cross_validate(runs, data, out, options=options, layout=layout, against=against, group_by=group_by)
    typer.echo((out / "crossval.md").read_text())
    folders = ", one folder per fold" if any(out.glob("fold*")) else ""  # none for a saved table read again
    typer.echo(f"wrote {out}/out_of_fold.csv, crossval.json, crossval.md, crossval.png{folders}")


@app.command("predict", short_help="Predict tumour masks for images, patient folders, NIfTI and DICOM.")
def predict_command(
    inputs: Annotated[list[Path], typer.Argument(help="Image files, folders of images, kaggle_3m patient "
                                                      "folders, NIfTI volumes, DICOM files or DICOM study/"
                                                      "series folders.", show_default=False)],
    model: Annotated[str, typer.Option(help="Run folder, model.pt, checkpoint, .onnx, or 'pretrained'.")]
    = "pretrained",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for masks, overlays, predictions.csv.")]
    = Path("predictions"),
    backend: Annotated[str, typer.Option(help="torch or onnx (ONNX Runtime).")] = "torch",
    device: Annotated[str, typer.Option(
        help="auto (cuda where there is a GPU), cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Slices per network call.")] = 16,
    probabilities: Annotated[bool, typer.Option(help="Also write probability maps.")] = False,
    overlays: Annotated[bool, typer.Option(help="Write overlay PNGs.")] = True,
    largest_component: LargestComponent = None,
    min_size: MinSize = None,
    min_fraction: MinFraction = None,
    tta: Annotated[bool, typer.Option(help="Average with a left-right flipped prediction.")] = False,
    threshold: Annotated[float | None, typer.Option(help=THRESHOLD_HELP)] = None,
    axis: Annotated[int, typer.Option(help="NIfTI slicing axis (0, 1 or 2).")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace the predictions already in --out.")] = False,
    channels: Annotated[str | None, typer.Option(
        help="DICOM: series of each study fed to the model's channels, by part of the SeriesDescription "
             "or start of the SeriesInstanceUID: 'pre=T1,flair=FLAIR,post=T1 post' (a 1-channel model: "
             "'FLAIR').")] = None,
    anonymize: Annotated[bool, typer.Option(
        help="DICOM: write SEGs without patient-identifying attributes (PS3.15 basic profile, UIDs "
             "kept).")] = False,
    shard: Annotated[str | None, typer.Option(
        help="K/N: predict only the K-th of N shares of the cases (dealt in order of case name), so that "
             "N machines or a SLURM array split a batch; join them with brainseg merge.")] = None,
    max_pixels: MaxPixels = MAX_PIXELS,
) -> None:
    """Predict tumour masks for new images and volumes; masks keep each input's size.

    Patient folders (kaggle_3m) are predicted as one volume, so 3D post-processing applies; NIfTI
    masks keep the input's affine. A DICOM series (one per SeriesInstanceUID in a folder) gets a DICOM
    SEG (seg.dcm) and mask.nii.gz with its geometry, and areas in mm² and volumes in ml; with
    --channels, the series of each DICOM study named there feed the model's channels as one case.
    Bad files are reported and skipped; the exit code is 1 if any failed.
    --out must not hold any input, nor earlier predictions unless --overwrite.

    Example: brainseg predict ../shared/data/lgg/kaggle_3m/TCGA_CS_4941_19960909 --model runs/unet
    """
    from brainseg.predict import predict_paths

    table = predict_paths(model, inputs, out, backend=backend, device=device, batch_size=batch_size,
                          save_probabilities=probabilities, overlays=overlays,
                          largest_component=largest_component, min_size=min_size,
                          min_fraction=min_fraction, tta_flip=tta,
                          threshold=threshold, axis=axis, overwrite=overwrite, channels=channels,
                          anonymize=anonymize, shard=shard, max_pixels=max_pixels,
                          echo=lambda line: typer.echo(line, err=True))
    failed = int((table["status"] != "ok").sum())
    typer.echo(f"{len(table) - failed} cases predicted, {failed} failed; wrote {out}/predictions.csv")
    if failed:
        raise typer.Exit(1)


@app.command("merge", short_help="Join the shards of one sharded prediction batch.")
def merge_command(
    folders: Annotated[list[Path], typer.Argument(help="The --out folders of brainseg predict --shard K/N, "
                                                       "one per shard.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged predictions.csv and "
                                                          "predictions.json.")],
    allow_missing: Annotated[bool, typer.Option(help="Merge the shards given even if some of 1..N are "
                                                     "missing (listed in predictions.json).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the predictions already in --out.")] = False,
) -> None:
    """Join the shards of one prediction batch into one predictions.csv and predictions.json.

    The masks stay in the shards' folders; the merged table lists where each one is. Refused, naming
    what: shards of different batches or settings, a case in two shards, a missing shard.

    Example: brainseg merge preds/shard1 preds/shard2 preds/shard3 --out preds/all
    """
    from brainseg.predict_merge import merge_predictions

    summary = merge_predictions(folders, out, allow_missing=allow_missing, overwrite=overwrite)
    for note in summary.get("notes", []):
        typer.echo(f"warning: {note}", err=True)
    if summary["missing_shards"]:
        typer.echo(f"warning: shards {', '.join(summary['missing_shards'])} missing", err=True)
    typer.echo(f"{summary['cases']} cases ({summary['failed']} failed) from {len(summary['shards'])} shards; "
               f"wrote {out}/predictions.csv")


@app.command("ensemble", short_help="Combine trained models into one averaging model file.")
def ensemble_command(
    models: Annotated[list[Path], typer.Argument(help="Run folders or model files (two or more).",
                                                 show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the ensemble's model.pt.")],
    threshold: Annotated[float | None, typer.Option(
        help="Probability cut on the mean probability [default: 0.5].", show_default=False)] = None,
    settings_from: Annotated[Path | None, typer.Option(
        help="Copy the threshold and post-processing stored in this model file or run (e.g. the "
             "validated ensemble that these refit members replace).")] = None,
    largest_component: Annotated[bool | None, typer.Option(
        "--largest-component/--no-largest-component",
        help="Store this post-processing (default: none, or what --settings-from copies).",
        show_default=False)] = None,
    min_size: MinSize = None,
    min_fraction: MinFraction = None,
) -> None:
    """Combine trained models into one model that averages their probabilities.

    Members may differ in network, 2.5D context and input size (a smaller member sees its input
    resized down and its logits resized back). The folder works wherever a run folder does
    (evaluate, tune, compare, predict, export).

    Example: brainseg ensemble runs/unet runs/unet_ctx1 --out runs/ensemble
    """
    from brainseg.runs.combine import build_ensemble

    summary = build_ensemble(models, out, threshold=threshold, settings_from=settings_from,
                             postprocessing={"largest_component": largest_component, "min_size": min_size,
                                             "min_fraction": min_fraction})
    typer.echo(f"wrote {summary['model']} ({len(summary['members'])} members, context {summary['context']}, "
               f"threshold {summary['threshold']:g}; split: {summary['split']})")


@app.command("export", short_help="Export a model to ONNX, checked against torch.")
def export_command(
    model: Annotated[str, typer.Argument(help="Run folder, model.pt, checkpoint or 'pretrained'.",
                                         show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="Export format.")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File to write (default: model.onnx "
                                                                 "beside the model; pretrained.onnx "
                                                                 "here for 'pretrained').")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
) -> None:
    """Export a model to ONNX with a dynamic batch size, checked against torch.

    Example: brainseg export runs/unet --format onnx
    """
    from brainseg.export import export_model

    result = export_model(model, out, fmt=fmt, opset=opset)
    typer.echo(f"wrote {result['path']} (opset {result['opset']}, input {result['input']}); "
               f"max |logit difference| vs torch: {result['max_abs_logit_difference']:.2e}")


@app.command("explain", short_help="Saliency maps (gradient x input, Grad-CAM) of predictions.")
def explain_command(
    model: Annotated[str, typer.Argument(help="Run folder, model.pt, checkpoint, 'pretrained' or "
                                              "'pretrained:figshare'.", show_default=False)],
    images: Annotated[list[Path], typer.Argument(help="Image files (slices).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the saliency figures and "
                                                          "explain.csv.")] = Path("explain"),
) -> None:
    """Saliency maps (gradient x input, Grad-CAM) of the tumour prediction, one figure per image.

    Example: brainseg explain pretrained:figshare scans/1.png scans/2.png --out explain
    """
    from brainseg.explain import explain

    table = explain(model, images, out)
    typer.echo(f"wrote {table} and one *_saliency.png per image in {out}")


@app.command("serve", short_help="Serve the web viewer and JSON API on this machine.")
def serve_command(
    model: Annotated[str, typer.Option(help="Run folder, model.pt, or 'pretrained'.")] = "pretrained",
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted.")] = 50.0,
    max_slices: Annotated[int, typer.Option(help="Most slices in one uploaded volume.")] = 200,
    max_pixels: MaxPixels = MAX_PIXELS,
) -> None:
    """Serve the web viewer and the JSON API (POST /api/predict, GET /api/health, /docs).

    Example: brainseg serve --model runs/unet --port 8000, then open http://127.0.0.1:8000
    """
    from brainseg.serve import serve

    serve(model, host=host, port=port, max_upload_mb=max_upload_mb, max_slices=max_slices,
          max_pixels=max_pixels)


@app.command("demo", short_help="Run the whole pipeline on synthetic data, with an HTML report.")
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the demo writes.")]
    = Path("demo-out"),
    patients: Annotated[int | None, typer.Option(help="Synthetic patients (default 10).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    quick: Annotated[bool, typer.Option(help="A reduced run in seconds (tiny images and model).")] = False,
) -> None:
    """Run the whole pipeline on synthetic data and write an HTML report (OUT/index.html).

    Synthesize, index, split, explore, train for about two minutes, evaluate on unseen patients,
    predict, run the pretrained model, report.

    Example: brainseg demo --out demo-out
    """
    from brainseg.demo import run_demo

    run_demo(out, patients=patients, seed=seed, quick=quick, echo=typer.echo)


@app.command("report", short_help="Write an HTML report of every result in a folder.")
def report_command(
    folder: Annotated[Path, typer.Argument(help="A run folder (or any folder of brainseg results).",
                                           show_default=False)],
) -> None:
    """Write FOLDER/index.html describing every result found in the folder.

    Example: brainseg report runs/unet
    """
    from brainseg.report import write_report

    if not folder.is_dir():
        raise BadInputError(folder, "not a folder" if folder.exists() else "does not exist")
    typer.echo(f"wrote {write_report(folder, title=f'brainseg report: {folder.name}')}")


def _os_error_line(error: OSError) -> str:
    """One line for an OSError, naming the file that stands where a folder is wanted."""
    if isinstance(error, (FileExistsError, NotADirectoryError)) and error.filename:
        # mkdir of OUT or OUT/x where OUT is a file says only "File exists" or "Not a directory"
        path = Path(error.filename)
        blocking = next((p for p in (path, *path.parents) if p.is_file()), None)
        if blocking is not None:
            return f"{blocking}: is a file, not a folder"
    name = f"{error.filename}: " if error.filename else ""
    return f"{name}{error.strerror or error}"


def main() -> None:
    """Entry point: user errors become one line on stderr, never a traceback."""
    try:
        app()
    except BrainsegError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except OSError as error:  # e.g. an output folder that cannot be written
        typer.echo(f"error: {_os_error_line(error)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
