"""`brainseg crossval`: the runs of a k-fold split, each scored on its own fold's validation
patients (or images), pooled into one out-of-fold table (every non-test case scored by a model that
never trained on it), with summaries overall, per fold and, for LGG patients, apart for those with a
copied sequence."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from brainseg import plots
from brainseg.data.index import ensure_outside, index_for_groups
from brainseg.data.splits import SCORED_PER, SIZE_UNIT, case_groups, drawn_over
from brainseg.errors import BadInputError
from brainseg.evaluation.bootstrap import mean_interval, paired_change
from brainseg.evaluation.evaluate import SIZE_BANDS, EvaluateOptions, cases_table, evaluate
from brainseg.runs.folder import CONFIG_FILE, MODEL_FILE, SPLIT_FILE, fold_of, run_folder_of
from brainseg.runs.model_file import load_model_file


def check_folds(runs: list[str | Path]) -> tuple[dict[int, Path], int]:
    """({fold: model} sorted by fold, the split's fold count) for runs that are distinct folds of one
    k-fold split. A model is a run folder, or a model file or checkpoint inside one (e.g.
    RUN/checkpoints/last.ckpt, to score the last epoch instead of the best), or the folder of an
    ensemble of one fold's runs."""
    if not runs:
        raise BadInputError("crossval", "give the run folder of at least one fold")
    folds: dict[int, Path] = {}
    first_split = None
    for run in map(Path, runs):
        fold, split = _fold_and_split(run)
        if first_split is None:
            first_split = split
        elif split["folds"] != first_split["folds"]:
            raise BadInputError(run, f"its k-fold split differs from {runs[0]}'s")
        if fold in folds:
            raise BadInputError(run, f"fold {fold} is given twice (also {folds[fold]})")
        folds[fold] = run
    return dict(sorted(folds.items())), len(first_split["folds"])


def _fold_and_split(run: Path) -> tuple[int, dict]:
    """A fold run's fold and split; for an ensemble of one fold's runs, the fold it recorded."""
    if run.is_dir() and not (run / CONFIG_FILE).exists() and (run / MODEL_FILE).exists():
        description, _ = load_model_file(run)
        if "fold" not in description:
            raise BadInputError(run, "has no fold: neither a fold's run folder (no config.yaml) nor an "
                                     "ensemble built from the runs of one fold")
        return fold_of(run, description["fold"])
    return fold_of(run_folder_of(run))


def cross_validate(runs: list[str | Path], data: str | Path, out: str | Path, *,
                   options: EvaluateOptions | None = None, layout: str = "auto",
                   progress: bool = True, against: str | Path | None = None, group_by: str = "") -> dict:
    """Evaluate each fold's run on that fold's validation patients; write out_of_fold.csv,
    crossval.json, crossval.md and crossval.png to `out` (each fold's evaluation in out/foldK).

    `runs` may instead be one earlier crossval folder, whose pooled table is read again (no models
    needed), e.g. to pair it with a recipe scored later.
    `against`: an earlier crossval folder (another recipe on the same folds); the summary then holds
    the paired change in Dice and recall per patient, overall and by tumour size band, each with its
    95% bootstrap interval and verdict. The intervals are drawn over cases, or over groups of them with
    `group_by` (e.g. index-block:16 for Figshare images, whose neighbours are mostly one patient)."""
    out = Path(out)
    ensure_outside(out, data)
    baseline = _read_out_of_fold(Path(against)) if against is not None else None
    saved = _saved_crossval(runs, out, options)
    if saved is None:
        folds, fold_count = check_folds(runs)  # every run is checked before anything is evaluated
    else:
        pooled, folds, fold_count, base, unit = saved
    # column:NAME groups come from the index; a bad --group-by is refused before anything is evaluated
    index = index_for_groups(data, group_by, layout)
    if group_by:
        case_groups([] if index is None else index["patient"], group_by, index)
    if saved is None:
        pooled, base, unit = _score_folds(folds, data, out, options or EvaluateOptions(), layout, progress)
    out.mkdir(parents=True, exist_ok=True)
    pooled.to_csv(out / "out_of_fold.csv", index=False)
    summary = _summary(pooled, folds, fold_count, base, unit, group_by, index)
    if baseline is not None:
        changes = paired_changes(pooled, baseline, unit, group_by, index)
        summary["against"] = {"folder": str(against), **changes}
    (out / "crossval.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "crossval.md").write_text(_markdown(summary))
    per_fold = {f"fold {fold}": pooled.loc[pooled["fold"] == fold, "dice"].to_numpy() for fold in folds}
    plots.compare_models({**per_fold, "all": pooled["dice"].to_numpy()}, out / "crossval.png",
                         f"Out-of-fold Dice {SCORED_PER[unit]} ({len(pooled)} {unit}s)", unit)
    return summary


def _score_folds(folds: dict[int, Path], data: str | Path, out: Path, base: EvaluateOptions, layout: str,
                 progress: bool) -> tuple[pd.DataFrame, EvaluateOptions, str]:
    """Each fold's run evaluated on its fold's validation cases (out/foldK), pooled."""
    tables, unit = [], "patient"
    for fold, run in folds.items():
        fold_options = EvaluateOptions(**{**base.__dict__, "side": "val", "fold": fold,
                                          "split_file": str(run_folder_of(run) / SPLIT_FILE)})
        scored = evaluate(run, data, out / f"fold{fold}", layout=layout, options=fold_options,
                          progress=progress)
        unit = scored["data"]["unit"]
        table = pd.read_csv(cases_table(out / f"fold{fold}"), dtype={unit: str})
        tables.append(table.assign(fold=fold, run=str(run)))
    return pd.concat(tables, ignore_index=True), base, unit


def _saved_crossval(runs: list[str | Path], out: Path, options: EvaluateOptions | None
                    ) -> tuple[pd.DataFrame, dict[int, Path], int, EvaluateOptions, str] | None:
    """An earlier crossval folder given in place of the runs: its pooled table, folds, fold count,
    options and unit, so that it can be paired again (--against) once its models are gone; else None."""
    if len(runs) != 1 or not (Path(runs[0]) / "out_of_fold.csv").is_file():
        return None
    folder = Path(runs[0])
    if out.resolve() == folder.resolve():
        raise BadInputError(out, "is the crossval folder being read; write the new summary to another folder")
    if options is not None and options != EvaluateOptions():
        raise BadInputError(folder, "holds predictions already scored with its own settings (crossval.json); "
                                    "the threshold and post-processing cannot change without its models")
    try:
        earlier = json.loads((folder / "crossval.json").read_text())
        unit = earlier["unit"]
        folds = {int(fold): Path(run) for fold, run in earlier["folds"].items()}
        fold_count = len(folds) + len(earlier["missing_folds"])
        base = EvaluateOptions(**earlier["options"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise BadInputError(folder, "has out_of_fold.csv but no readable crossval.json beside it") from None
    return pd.read_csv(folder / "out_of_fold.csv", dtype={unit: str}), folds, fold_count, base, unit


def _read_out_of_fold(folder: Path) -> pd.DataFrame:
    table = folder / "out_of_fold.csv"
    if not table.is_file():
        raise BadInputError(folder, "is not a crossval folder (no out_of_fold.csv)")
    return pd.read_csv(table, dtype={"patient": str, "image": str})


def paired_changes(new: pd.DataFrame, base: pd.DataFrame, unit: str = "patient", group_by: str = "",
                   index: pd.DataFrame | None = None) -> dict:
    """Per-case change new - base in Dice and recall, overall and by size band (from `base`, the
    truth is the same), with bootstrap intervals; cases only one side scored are counted apart."""
    if unit not in base:
        raise BadInputError("--against", f"its out-of-fold table scores other cases than {unit}s")
    both = new.merge(base, on=unit, suffixes=("", "_base"))
    if both.empty:
        raise BadInputError("--against", f"shares no {unit} with these runs' out-of-fold table")

    def changes(rows: pd.DataFrame) -> dict:
        groups = case_groups(rows[unit], group_by, index)
        return {metric: paired_change(rows[metric], rows[f"{metric}_base"], groups=groups)
                for metric in ("dice", "recall")}

    bands = [name for _, name in SIZE_BANDS if name != "none"]
    return {f"{unit}s": len(both), "unpaired": int(len(new) + len(base) - 2 * len(both)), **changes(both),
            "by_size_band": {band: changes(both[both["size_band"] == band]) for band in bands
                             if (both["size_band"] == band).any()}}


def _stats(values: pd.Series, unit: str = "patient") -> dict:
    finite = values.dropna()
    if finite.empty:
        return {f"{unit}s": 0, "mean": None, "median": None, "min": None}
    return {f"{unit}s": len(finite), "mean": float(finite.mean()), "median": float(finite.median()),
            "min": float(finite.min())}


def _summary(pooled: pd.DataFrame, folds: dict[int, Path], fold_count: int, options: EvaluateOptions,
             unit: str = "patient", group_by: str = "", index: pd.DataFrame | None = None) -> dict:
    sequences = {}
    if unit == "patient" and "equal_channels" in pooled:
        # kaggle_3m copies FLAIR over a sequence a patient lacks: such patients are scored apart.
        equal = pooled["equal_channels"]  # read back from CSV: NaN where no channels are equal
        copied = equal.notna() & (equal.astype(str) != "")
        sequences = {"copied_sequence": _stats(pooled.loc[copied, "dice"]),
                     "all_sequences": _stats(pooled.loc[~copied, "dice"])}
    return {
        "metric": f"Dice {SCORED_PER[unit]}, each {unit} scored by the run that held it out (out of fold)",
        "unit": unit,
        "folds": {str(fold): str(run) for fold, run in sorted(folds.items())},
        "missing_folds": [k for k in range(fold_count) if k not in folds],
        "options": {key: value for key, value in options.__dict__.items()
                    if key in ("threshold", "largest_component", "min_size", "min_fraction", "tta_flip",
                               "flair_replaces", "precision")},
        "dice": _stats(pooled["dice"], unit),
        # 95% percentile bootstrap over cases (or their groups): how far the out-of-fold mean could move
        "dice_mean_interval": mean_interval(pooled["dice"],
                                            groups=case_groups(pooled[unit], group_by, index)),
        "interval_over": drawn_over(unit, group_by),
        "per_fold": {str(fold): _stats(pooled.loc[pooled["fold"] == fold, "dice"], unit)
                     for fold in sorted(folds)},
        **sequences,
        "worst": pooled.nsmallest(5, "dice")[[unit, "fold", "dice"]].to_dict(orient="records"),
    }


def _markdown(summary: dict) -> str:
    unit = summary.get("unit", "patient")

    def row(name: str, stats: dict) -> str:
        if not stats[f"{unit}s"]:
            return f"| {name} | 0 | – | – | – |"
        return (f"| {name} | {stats[f'{unit}s']} | {stats['mean']:.4f} | {stats['median']:.4f} "
                f"| {stats['min']:.4f} |")

    lines = ["# Cross-validation (out of fold)", "", summary["metric"] + ".", ""]
    if summary["missing_folds"]:
        lines += [f"Folds not given: {', '.join(map(str, summary['missing_folds']))}.", ""]
    lines += [f"| {unit}s | n | mean | median | min |", "|---|---|---|---|---|", row("all", summary["dice"])]
    lines += [row(f"fold {fold}", stats) for fold, stats in summary["per_fold"].items()]
    if "copied_sequence" in summary:
        lines += [row("a sequence copied from another", summary["copied_sequence"]),
                  row("all three sequences recorded", summary["all_sequences"])]
    lines.append("")
    interval = summary["dice_mean_interval"]
    if interval["n"]:
        lines += [f"Mean Dice {interval['mean']:.4f}, 95% bootstrap interval over {summary['interval_over']} "
                  f"[{interval['low']:.4f}, {interval['high']:.4f}].", ""]
    if "against" in summary:
        lines += _against_lines(summary["against"], unit, summary["interval_over"])
    return "\n".join(lines)


def _against_lines(against: dict, unit: str, over: str) -> list[str]:
    def cell(change: dict) -> str:
        if not change["n"]:
            return "–"
        return f"{change['mean']:+.4f} [{change['low']:+.4f}, {change['high']:+.4f}] {change['verdict']}"

    def row(name: str, rows: dict) -> str:
        return f"| {name} | {rows['dice']['n']} | {cell(rows['dice'])} | {cell(rows['recall'])} |"

    lines = [f"## Change against {against['folder']}", "",
             f"Paired over {against[f'{unit}s']} {unit}s (mean change, 95% bootstrap interval over {over}, "
             "verdict).", "", f"| {unit}s | n | Dice | recall |", "|---|---|---|---|", row("all", against)]
    lines += [row(f"tumour {band} {SIZE_UNIT[unit]}", rows) for band, rows in against["by_size_band"].items()]
    return [*lines, ""]

