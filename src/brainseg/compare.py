"""`brainseg compare`: several runs scored on the same patients, as one table and one plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.errors import BadInputError
from brainseg.evaluation import EvaluateOptions, evaluate


def _run_split(run: Path) -> dict:
    from brainseg.data.splits import load_split

    path = (run if run.is_dir() else run.parent) / "split.json"
    if not path.exists():
        raise BadInputError(run, "no split.json in the run folder; compare needs run folders")
    return load_split(path)


def _check_unseen(run: Path, patients: set[str]) -> None:
    """A model must not be scored on patients it trained or was selected on."""
    split = _run_split(run)
    seen: set[str] = set()
    for group in [split, *split.get("folds", [])]:
        seen |= set(group.get("train", [])) | set(group.get("val", []))
    leaked = sorted(seen & patients)
    if leaked:
        raise BadInputError(run, f"trained or validated on {len(leaked)} of the compared patients "
                                 f"(e.g. {leaked[0]}); compare runs on patients none of them saw")


def compare_runs(runs: list[str | Path], data: str | Path, out: str | Path, *, side: str = "test",
                 split_file: str | Path | None = None, options: EvaluateOptions | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """Evaluate each run on one split side (the first run's unless `split_file`), then tabulate."""
    from brainseg import plots
    from brainseg.data.splits import load_split

    if not runs:
        raise BadInputError("compare", "give at least one run folder")
    runs = [Path(r) for r in runs]
    for run in runs:
        if not run.exists():
            raise BadInputError(run, "does not exist")
    out = Path(out)
    split_path = Path(split_file) if split_file else (runs[0] / "split.json")
    split = load_split(split_path)
    if side not in split:
        raise BadInputError(split_path, f"has no {side!r} side")
    patients = set(split[side])
    if side == "test":
        for run in runs:
            _check_unseen(run, patients)
    rows, per_patient = [], {}
    names = _unique_names(runs)
    for run, name in zip(runs, names, strict=True):
        base = options or EvaluateOptions()
        run_options = EvaluateOptions(**{**base.__dict__, "side": side, "split_file": str(split_path)})
        summary = evaluate(run, data, out / name, options=run_options, progress=progress)
        scores = pd.read_csv(out / name / "per_patient.csv")
        per_patient[name] = scores["dice"].to_numpy()
        rows.append(_row(name, run, summary))
    table = pd.DataFrame(rows)
    table.to_csv(out / "compare.csv", index=False)
    (out / "compare.md").write_text(_markdown(table, side, len(patients)))
    plots.compare_models(per_patient, out / "compare.png", f"Dice per patient volume ({side}, "
                                                            f"{len(patients)} patients)")
    return table


def _unique_names(runs: list[Path]) -> list[str]:
    names: list[str] = []
    for run in runs:
        name = run.name if run.is_dir() else run.parent.name
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def _row(name: str, run: Path, summary: dict) -> dict:
    model = summary["model"]
    folder = run if run.is_dir() else run.parent
    minutes = epochs = None
    if (folder / "history.csv").exists():
        history = pd.read_csv(folder / "history.csv")
        minutes = round(float(history["seconds"].iloc[-1]) / 60, 1) if len(history) else None
        epochs = len(history)
    dice = summary["per_patient"]["dice"]
    detection = summary["detection"]
    return {
        "run": name, "model": model["model"], "base_filters": model["kwargs"].get("base_filters"),
        "in_channels": model["kwargs"].get("in_channels"), "epochs": epochs, "train_minutes": minutes,
        "patients": summary["data"]["patients"], "dice_mean": dice["mean"], "dice_median": dice["median"],
        "dice_min": dice["min"], "iou_mean": summary["per_patient"]["iou"]["mean"],
        "hd95_median": summary["per_patient"]["hd95"]["median"],
        "sensitivity": detection["sensitivity"], "specificity": detection["specificity"],
        "threshold": summary["options"]["threshold"],
    }


def _markdown(table: pd.DataFrame, side: str, patients: int) -> str:
    lines = [f"# Model comparison: {side} side, {patients} patients", "",
             "Dice per patient volume (slices stacked), scored at the original resolution.", ""]
    headers = list(table.columns)
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for _, row in table.iterrows():
        cells = [f"{v:.4f}" if isinstance(v, float) and not np.isnan(v) and abs(v) < 10 else str(v)
                 for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
