"""`brainseg compare`: several runs scored on the same patients, as one table and one plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg import plots
from brainseg.data.index import ensure_outside, index_for_groups, scan
from brainseg.data.splits import (
    case_groups,
    drawn_over,
    load_split,
    save_split,
    seen_patients,
    validate_split,
)
from brainseg.errors import BadInputError
from brainseg.evaluation.bootstrap import paired_change
from brainseg.evaluation.evaluate import SCORED_PER, EvaluateOptions, cases_table, evaluate
from brainseg.runs.folder import HISTORY_FILE, MODEL_FILE, SPLIT_FILE, resolve_model_path, split_file_beside
from brainseg.runs.model_file import load_model_file
from brainseg.runs.pretrained import is_pretrained


def _model(run: str | Path) -> tuple[Path, dict | None, Path | None]:
    """(model path, its split or None, the split's file) for one input; a bad one is refused."""
    path = resolve_model_path(run)  # 'pretrained' is the shipped model, as in evaluate and predict
    if not path.exists():
        raise BadInputError(run, "does not exist")
    if path.suffix.lower() == ".onnx":  # compare has no --backend: the torch model scores the same
        raise BadInputError(run, "is an ONNX model; compare scores run folders, model files or "
                                 "pretrained: give the run it was exported from")
    description, _ = load_model_file(path)
    if (beside := split_file_beside(path)) is not None:  # as evaluate finds it
        return path, load_split(beside), beside
    if description.get("split"):  # the shipped model carries its split
        validate_split(description["split"], str(run))
        return path, description["split"], None
    return path, None, None


# What a saved evaluation's scores depend on besides the model: compare must score the others alike.
# The value is compare's option for it (None: compare has none, so only the default pairs).
SCORING_SETTINGS = {"threshold": "--threshold", "largest_component": "--largest-component",
                    "min_size": None, "min_fraction": "--min-fraction", "tta_flip": "--tta",
                    "flair_replaces": None, "precision": "--precision"}


def _saved_evaluation(run: str | Path) -> dict | None:
    """An earlier `brainseg evaluate` folder given in place of a model (its summary.json and per-case
    table, no model): its summary, so that a model gone with its run folder can still be paired; else None."""
    folder = Path(run)
    if is_pretrained(run) or not folder.is_dir() or (folder / MODEL_FILE).exists() \
            or not (folder / "summary.json").is_file():
        return None
    try:
        summary = json.loads((folder / "summary.json").read_text())
        complete = {"side", "seen_by_model", "unit"} <= set(summary["data"]) and "model" in summary["model"] \
            and set(SCORING_SETTINGS) <= set(summary["options"])
    except (OSError, ValueError, KeyError, TypeError):
        complete = False
    if not complete:
        raise BadInputError(folder, "has a summary.json that is not one brainseg evaluate wrote")
    if not cases_table(folder).is_file():
        raise BadInputError(folder, "has summary.json but no per_patient.csv or per_image.csv beside it")
    return summary


def _check_saved(folder: str | Path, summary: dict, side: str, options: EvaluateOptions) -> None:
    """A saved evaluation pairs with the others only if it scored the same side, none of it seen by its
    model, with the settings the others are scored with (given explicitly, or its own where left out)."""
    scored = summary["data"]
    if scored["side"] != side:
        raise BadInputError(folder, f"scored the {scored['side']} side; this comparison scores {side}")
    if scored["seen_by_model"]:
        raise BadInputError(folder, f"its model trained or was validated on {scored['seen_by_model']} of "
                                    "the cases it scored")
    for name, flag in SCORING_SETTINGS.items():
        wanted, saved = getattr(options, name), summary["options"][name]
        if wanted != saved and (wanted is not None or name == "precision"):
            if flag is None:
                raise BadInputError(folder, f"was scored with {name} {saved}, which compare cannot apply to "
                                            "the other models")
            given = (flag if saved else f"--no-{flag[2:]}") if isinstance(saved, bool) else f"{flag} {saved}"
            leave_out = "" if name == "precision" else " or leave it out"
            raise BadInputError(folder, f"was scored with {name} {saved}; pass {given}{leave_out}, so that "
                                        "every model is scored alike")


def _check_unseen(run: str | Path, split: dict | None, patients: set[str]) -> None:
    """A model must not be scored on patients it trained or was selected on."""
    if split is None:
        raise BadInputError(run, f"has no {SPLIT_FILE} beside it and no split stored in it; compare needs "
                                 "each model's split to check it never saw the compared patients")
    leaked = sorted(seen_patients(split) & patients)
    if leaked:
        raise BadInputError(run, f"trained or validated on {len(leaked)} of the compared patients "
                                 f"(e.g. {leaked[0]}); compare runs on patients none of them saw")


def compare_runs(runs: list[str | Path], data: str | Path, out: str | Path, *, side: str = "test",
                 split_file: str | Path | None = None, options: EvaluateOptions | None = None,
                 group_by: str = "", progress: bool = True) -> pd.DataFrame:
    """Evaluate each run on one split side (the first run's unless `split_file`), then tabulate. Each
    run's change against the first has a paired bootstrap interval over the cases, or over groups of
    them with `group_by` (as `brainseg split --group-by`: e.g. index-block:16 for Figshare images,
    whose neighbouring indices are mostly one patient)."""
    if not runs:
        raise BadInputError("compare", "give at least one run folder")
    out = Path(out)
    ensure_outside(out, data)
    # Every input is checked before any is evaluated, so that a bad last one leaves no half comparison.
    saved = {index: summary for index, run in enumerate(runs) if (summary := _saved_evaluation(run))}
    models = [(Path(run), None, None) if index in saved else _model(run) for index, run in enumerate(runs)]
    base = options or EvaluateOptions()
    for index, summary in saved.items():
        _check_saved(runs[index], summary, side, base)
    if side == "all":  # any labelled folder as a test set: every case, none seen by any model
        result = scan(data, progress=progress)
        patients, split, split_path = set(result.table["patient"].astype(str)), None, None
    else:
        if split_file:
            split_path, split = Path(split_file), load_split(split_file)
        else:
            split, split_path = models[0][1:]
            if split is None:
                what = "is a saved evaluation" if 0 in saved else \
                    f"has no {SPLIT_FILE} beside it and no split stored in it"
                raise BadInputError(runs[0], f"{what}; pass --split-file or --split all")
        if side not in split:
            raise BadInputError(split_path or runs[0], f"has no {side!r} side")
        patients = set(split[side])
    if side in ("all", "test"):  # unseen cases only; a saved evaluation was checked by its summary
        for index, (run, (_, run_split, _)) in enumerate(zip(runs, models, strict=True)):
            if index not in saved:
                _check_unseen(run, run_split, patients)
    kept_scores = {index: pd.read_csv(cases_table(Path(runs[index])), dtype={"patient": str, "image": str})
                   for index in saved}
    for index, scores in kept_scores.items():
        if set(scores.iloc[:, 0].astype(str)) != patients:
            raise BadInputError(runs[index], f"scored other cases than the {side} side compared here")
    # column:NAME groups come from the index; a bad --group-by is refused before any run is evaluated
    grouped_index = index_for_groups(data, group_by)
    case_groups(sorted(patients), group_by, grouped_index)
    rows, per_patient, histories, cases = [], {}, {}, None
    paths = [path for path, _, _ in models]
    names = _unique_names([str(run) if is_pretrained(run) else path
                           for run, path in zip(runs, paths, strict=True)])
    for index, (run, name) in enumerate(zip(paths, names, strict=True)):
        if index and split_path is None and split is not None:  # the first model's split lives only in
            split_path = save_split(split, out / SPLIT_FILE)  # its model file, which its evaluation read
        if index in saved:  # read again, not scored: its model may be gone
            summary, scores = saved[index], kept_scores[index]
        else:
            run_options = EvaluateOptions(**{**base.__dict__, "side": side,
                                             "split_file": str(split_path or "")})
            summary = evaluate(run, data, out / name, options=run_options, progress=progress)
            scores = pd.read_csv(cases_table(out / name), dtype={"patient": str, "image": str})
        ids = scores.iloc[:, 0].astype(str).tolist()  # the case column: patient or image
        if cases is not None and ids != cases:
            raise BadInputError(run, "scored other cases than the first run, so changes cannot be paired")
        cases = ids
        per_patient[name] = scores["dice"].to_numpy()
        history = _history(run)
        if history is not None:
            histories[name] = history
        rows.append(_row(name, history, summary))
    groups = case_groups(cases, group_by, grouped_index)
    for row in rows[1:]:  # each model's change against the first, paired over the same cases
        change = paired_change(per_patient[row["run"]], per_patient[rows[0]["run"]], groups=groups)
        row.update({"change_vs_first": change["mean"], "change_low": change["low"],
                    "change_high": change["high"], "verdict": change["verdict"]})
    table = pd.DataFrame(rows)
    for column in ("epochs", "base_filters", "in_channels"):  # whole numbers, though some models have none
        table[column] = pd.to_numeric(table[column]).astype("Int64")
    table.to_csv(out / "compare.csv", index=False)
    unit = summary["data"]["unit"]
    (out / "compare.md").write_text(_markdown(table, side, len(patients), unit, group_by))
    plots.compare_models(per_patient, out / "compare.png",
                         f"Dice {SCORED_PER[unit]} ({side}, {len(patients)} {unit}s)", unit)
    if histories:  # run folders: their learning curves side by side, against training time
        plots.compare_curves(histories, out / "compare_curves.png", unit)
    return table


def _unique_names(runs: list[str | Path]) -> list[str]:
    names: list[str] = []
    for run in runs:
        name = run if isinstance(run, str) else run.name if run.is_dir() else run.parent.name
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def _history(run: Path) -> pd.DataFrame | None:
    """The learning curve of a run folder, or of the run folder a model file lies in, if it has one."""
    path = (run if run.is_dir() else run.parent) / HISTORY_FILE
    return pd.read_csv(path) if path.exists() else None


def _row(name: str, history: pd.DataFrame | None, summary: dict) -> dict:
    model = summary["model"]
    minutes = epochs = None
    if history is not None:
        minutes = round(float(plots.training_minutes(history["seconds"])[-1]), 1) if len(history) else None
        epochs = len(history)
    dice = summary["per_patient"]["dice"]
    detection = summary["detection"]
    return {
        "run": name, "model": model["model"], "base_filters": model["kwargs"].get("base_filters"),
        "in_channels": model["kwargs"].get("in_channels"), "epochs": epochs, "train_minutes": minutes,
        f"{summary['data']['unit']}s": summary["data"]["cases"], "dice_mean": dice["mean"],
        "dice_median": dice["median"],
        "dice_min": dice["min"], "iou_mean": summary["per_patient"]["iou"]["mean"],
        "hd95_median": summary["per_patient"]["hd95"]["median"],
        "sensitivity": detection["sensitivity"], "specificity": detection["specificity"],
        "threshold": summary["options"]["threshold"],
        **{f"dice_{name}": group["dice"]["mean"] for name, group in (summary.get("by_class") or {}).items()},
    }


ONE_DECIMAL = ("hd95", "minutes")  # columns in pixels or minutes
WHOLE = ("epochs", "base_filters", "in_channels", "images", "patients")  # counts; other numbers are scores


def _cell(value, column: str = "") -> str:
    """Scores with 4 decimals, HD95 (pixels) and minutes with 1, counts whole, missing as a dash."""
    if value is pd.NA or value is None:
        return "–"
    if isinstance(value, float):
        if np.isnan(value):
            return "–"
        if column in WHOLE:
            return f"{value:.0f}"
        return f"{value:.1f}" if any(word in column for word in ONE_DECIMAL) else f"{value:.4f}"
    return str(value)


def _markdown(table: pd.DataFrame, side: str, patients: int, unit: str = "patient",
              group_by: str = "") -> str:
    per = "per image" if unit == "image" else "per patient volume (slices stacked)"
    lines = [f"# Model comparison: {side} side, {patients} {unit}s", "",
             f"Dice {per}, scored at the original resolution. Changes against the first run are paired, "
             f"with 95% bootstrap intervals drawn over {drawn_over(unit, group_by)}.", ""]
    headers = list(table.columns)
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for _, row in table.iterrows():
        cells = [_cell(value, column) for column, value in row.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
