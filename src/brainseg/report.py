"""An HTML report of whatever a folder holds: data exploration, training run, evaluations,
comparisons and predictions. Every image and table it links is a file beside it."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from brainseg.data.index import detect_layout, natural_key
from brainseg.data.io import read_mask
from brainseg.data.splits import DETECTED_PER, SIZE_UNIT
from brainseg.errors import BadInputError, BrainsegError
from brainseg.evaluation.evaluate import CASE_FIGURES, SCORED_PER, cases_table
from brainseg.predict import data_set_root
from brainseg.runs.folder import CONFIG_FILE, HISTORY_FILE

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #c33; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
.gallery { display: flex; flex-wrap: wrap; gap: 0 1.5em; }
.gallery figure { width: 30%; min-width: 220px; }
.gallery figcaption { overflow-wrap: anywhere; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: .5em 1em; }
code { background: #f3f3f3; padding: 1px 4px; }
"""


def _figure(root: Path, path: Path, caption: str) -> str:
    if not path.exists():
        return ""
    src = html.escape(path.relative_to(root).as_posix())
    return (f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(frame: pd.DataFrame, digits: int = 4, limit: int = 60) -> str:
    shown = frame.head(limit)
    out = shown.to_html(index=False, float_format=lambda v: f"{v:.{digits}f}", na_rep="–", border=0,
                        escape=True)
    if len(frame) > limit:
        out += f"<p>… {len(frame) - limit} more rows in the CSV.</p>"
    return out


def _link(root: Path, path: Path, text: str | None = None) -> str:
    if not path.exists():
        return ""
    href = html.escape(path.relative_to(root).as_posix())
    return f'<a href="{href}">{html.escape(text or path.name)}</a>'


class _Parts:
    """Builds each part of the report from its file; a file that cannot be read or lacks what the part
    needs (hand-edited, half-written) is left out with one warning line, and the rest is reported."""

    def __init__(self, warn) -> None:
        self.warn = warn
        self.skipped: set[Path] = set()

    def build(self, path: Path, make, *args) -> str:
        if path in self.skipped:
            return ""
        try:
            return make(*args)
        # Bad JSON, YAML or CSV are ValueErrors or YAMLErrors; missing or mistyped entries the others.
        except (OSError, ValueError, LookupError, TypeError, AttributeError, yaml.YAMLError) as error:
            self.skipped.add(path)
            detail = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]
            self.warn(f"warning: {path}: {detail}; left out of the report")
            return ""

    def kind(self, path: Path) -> dict:
        """The keys of a summary.json (which command wrote it), or nothing when it is unreadable."""
        value = self.build(path, lambda: json.loads(path.read_text()))
        return value if isinstance(value, dict) else {}


def _data_section(root: Path, folder: Path) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    unit = summary["unit"]
    count = summary.get("cases", summary.get("patients"))  # "patients" alone: an older summary.json
    rows = [("data set", f"{summary['root']} ({summary['layout']})"), (f"{unit}s", count)]
    if unit == "patient":
        rows.append(("slices", summary["slices"]))
    rows += [(f"{'slices' if unit == 'patient' else 'images'} with tumour",
              f"{summary['tumour_slices']} ({100 * summary['tumour_slice_fraction']:.1f}%)"),
             ("image shapes", ", ".join(f"{k} ({v})" for k, v in summary["image_shapes"].items()))]
    if "slices_per_patient" in summary:
        rows.append(("slices per patient (min / median / max)",
                     " / ".join(str(summary["slices_per_patient"][k]) for k in ("min", "median", "max"))))
    facts = pd.DataFrame(rows, columns=["", "value"])
    parts = ["<h2>Data</h2>", _table(facts)]
    captions = {"sample_grid.png": "Random slices (seeded): image | mask | overlay",
                "slices_per_patient.png": "Slices per patient, with and without tumour",
                "tumour_area.png": "Tumour area per slice (slices with tumour)",
                "tumour_fraction_per_patient.png": "Fraction of slices with tumour per patient"}
    parts += [_figure(root, folder / name, caption) for name, caption in captions.items()]
    return "\n".join(parts)


def _settings_paragraph(root: Path, config: Path) -> str:
    values = yaml.safe_load(config.read_text())
    model, train, data = values["model"], values["train"], values["data"]
    return (f"<p>Model <code>{html.escape(model['name'])}</code>, base filters "
            f"{model['base_filters']}, depth {model['depth']}; input {data['image_size']}², "
            f"context {data['context']}; loss {html.escape(train['loss'])}, "
            f"batch {train['batch_size']}, learning rate {train['lr']}. "
            f"Full settings: {_link(root, config)}.</p>")


def _validation_paragraph(root: Path, metrics: Path) -> str:
    values = json.loads(metrics.read_text())
    if values.get("mean") is None:
        return ""
    unit = values.get("unit", "patient")  # runs from before image sets had a unit were patient runs
    count = values.get("cases", values.get("patients"))
    return (f"<p>Best checkpoint <code>{html.escape(values['best_checkpoint'])}</code>: "
            f"validation Dice {SCORED_PER[unit]} mean {values['mean']:.4f}, median "
            f"{values['median']:.4f}, min {values['min']:.4f} over {count} "
            f"{unit}s ({_link(root, metrics.parent / f'val_{unit}s.csv', f'per {unit}')}).</p>")


def _training_section(root: Path, folder: Path, reader: _Parts) -> str:
    parts = [f"<h2>Training: {html.escape(folder.name)}</h2>"]
    config = folder / CONFIG_FILE
    if config.exists():  # a bad config.yaml leaves out its paragraph, not the learning curves
        parts.append(reader.build(config, _settings_paragraph, root, config))
    metrics = folder / "val_metrics.json"
    if metrics.exists():
        parts.append(reader.build(metrics, _validation_paragraph, root, metrics))
    parts.append(_figure(root, folder / "learning_curves.png",
                         "Learning curves: loss (log scale) and validation Dice; dashed line: best epoch"))
    history = folder / HISTORY_FILE
    if history.exists():
        parts.append(f"<p>Per-epoch history: {_link(root, history)}.</p>")
    return "\n".join(parts)


def _evaluation_section(root: Path, folder: Path) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    dice = summary["per_patient"]
    rows = [{"metric": name, **{k: dice[name][k] for k in ("mean", "median", "min", "max")}}
            for name in ("dice", "iou", "precision", "recall", "hd95")]
    detection = summary["detection"]
    side = summary["data"]["side"]
    where = folder.relative_to(root).as_posix()
    where = f" <code>{html.escape(where)}</code>" if where != "." else ""
    unit = summary["data"].get("unit", "patient")
    per = SCORED_PER[unit]
    parts = [f"<h2>Evaluation: {html.escape(side)} {unit}s ({summary['data']['cases']}){where}</h2>",
             f"<p>Model <code>{html.escape(str(summary['model'].get('model')))}</code>, threshold "
             f"{summary['options']['threshold']:g}. Scores {per}:</p>",
             _table(pd.DataFrame(rows)),
             f"<p>Tumour detection per {DETECTED_PER[unit]}: accuracy {score_text(detection['accuracy'])}, "
             f"sensitivity {score_text(detection['sensitivity'])}, "
             f"specificity {score_text(detection['specificity'])}.</p>"]
    bands = f"By tumour size ({SIZE_UNIT[unit]} of the truth)"
    for key, title in (("by_class", "By tumour type"), ("by_size_band", bands)):
        groups = summary.get(key) or {}
        if groups:
            parts.append(f"<h3>{title}</h3>")
            parts.append(_table(pd.DataFrame([
                {"group": name, "cases": g["cases"], "dice mean": score_text(g["dice"]["mean"]),
                 "dice median": score_text(g["dice"]["median"]),
                 "recall mean": score_text(g["recall"]["mean"])}
                for name, g in groups.items()])))
    cases = cases_table(folder)
    if cases.exists():
        parts.append(_table(pd.read_csv(cases)))
    worst = "The worst images" if unit == "image" else "The worst patients (their largest-tumour slice)"
    worst_figure, dice_figure = CASE_FIGURES[unit]
    captions = {"prediction_grid.png": f"Random {'images' if unit == 'image' else 'slices'}: "
                                       "image | truth | probability | binary",
                worst_figure: worst,
                dice_figure: f"Dice {per}",
                "volume_montage.png": "One patient's volume (the median patient)"}
    parts += [_figure(root, folder / name, caption) for name, caption in captions.items()]
    parts.append("<p>Files: " + ", ".join(filter(None, (
        _link(root, folder / n) for n in ("summary.json", cases.name, "per_slice.csv")))) + ".</p>")
    conventions = summary.get("conventions", {})
    if conventions:
        parts.append("<details><summary>Metric conventions</summary><ul>" + "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in conventions.items()) +
            "</ul></details>")
    return "\n".join(parts)


def score_text(value) -> str:
    """A score to 4 decimals, or "–" where there was nothing to count (None, or NaN before JSON)."""
    return "–" if value is None or value != value else f"{value:.4f}"


SHOWN_OVERLAYS = 6


def _predicted_pixels(folder: Path, overlay: Path) -> int:
    """Tumour pixels of the mask written beside an overlay (overlays/CASE/STEM.png or overlays/STEM.png)."""
    relative = overlay.relative_to(folder / "overlays")
    masks = folder / "masks"
    for mask in (masks / relative.parent / f"{overlay.stem}_mask.png", masks / relative):
        if mask.is_file():
            return int(np.count_nonzero(read_mask(mask)))
    return 0


def _shown_overlays(folder: Path) -> tuple[list[tuple[Path, int]], str]:
    """Up to six overlays with predicted tumour, spread evenly over them in slice order, and a sentence
    saying which; with no tumour anywhere, the first six."""
    if not (folder / "overlays").exists():
        return [], ""
    overlays = sorted((folder / "overlays").rglob("*.png"),
                      key=lambda p: natural_key(p.relative_to(folder / "overlays").as_posix()))
    counted = [(path, _predicted_pixels(folder, path)) for path in overlays]
    with_tumour = [(path, pixels) for path, pixels in counted if pixels > 0]
    if not with_tumour:
        first = counted[:SHOWN_OVERLAYS]
        return first, f"No tumour was predicted; the first {len(first)} of {len(counted)} overlays are shown."
    picks = sorted({round(i * (len(with_tumour) - 1) / max(SHOWN_OVERLAYS - 1, 1))
                    for i in range(min(SHOWN_OVERLAYS, len(with_tumour)))})
    shown = [with_tumour[i] for i in picks]
    return shown, (f"{len(shown)} of the {len(with_tumour)} overlays with predicted tumour, evenly spaced in "
                   f"slice order ({len(counted)} overlays in all); the prediction is outlined in red.")


def _predictions_section(root: Path, folder: Path, title: str) -> str:
    table = pd.read_csv(folder / "predictions.csv")
    parts = [f"<h2>{html.escape(title)}</h2>", _table(table.drop(columns=["mask"], errors="ignore"))]
    shown, sentence = _shown_overlays(folder)
    if sentence:
        parts.append(f"<p>{html.escape(sentence)}</p>")
    figures = [_figure(root, path, f"{path.stem}: {pixels} tumour pixels predicted")
               for path, pixels in shown]
    parts.append(f'<div class="gallery">{"".join(figures)}</div>')
    return "\n".join(parts)


def _explain_section(root: Path, folder: Path) -> str:
    """`brainseg explain` results: the table, and each image's saliency figure."""
    table = pd.read_csv(folder / "explain.csv", keep_default_na=False)
    where = folder.relative_to(root).as_posix()
    panels = "image | prediction | gradient x input | Grad-CAM"
    figures = [_figure(root, folder / name, f"{Path(image).name}: {panels}")
               for image, name in zip(table["image"], table["figure"], strict=True) if name]
    return "\n".join([f"<h2>Saliency{'' if where == '.' else ': ' + html.escape(where)}</h2>",
                      "<p>Where the network looked: gradient x input and Grad-CAM, each scaled to 1; "
                      "*_inside is the share of a map's mass inside the predicted tumour.</p>",
                      _table(table.drop(columns=["figure"])), *figures])


def _comparison_section(root: Path, folder: Path) -> str:
    table = pd.read_csv(folder / "compare.csv")
    per = SCORED_PER["image" if "images" in table else "patient"]
    return "\n".join(["<h2>Model comparison</h2>", _table(table),
                      _figure(root, folder / "compare.png", f"Dice {per} per model"),
                      _figure(root, folder / "compare_curves.png",
                              "Learning curves against training minutes")])


def _crossval_section(root: Path, folder: Path) -> str:
    summary = json.loads((folder / "crossval.json").read_text())
    groups = [("all", summary["dice"]), *((f"fold {k}", v) for k, v in summary["per_fold"].items())]
    if "copied_sequence" in summary:  # LGG patients only
        groups += [("a sequence copied from another", summary["copied_sequence"]),
                   ("all three sequences recorded", summary["all_sequences"])]
    table = pd.DataFrame([{"group": name, **stats} for name, stats in groups])
    missing = summary["missing_folds"]
    per = SCORED_PER[summary.get("unit", "patient")]
    parts = ["<h2>Cross-validation (out of fold)</h2>", f"<p>{html.escape(summary['metric'])}.</p>",
             f"<p>Folds not given: {', '.join(map(str, missing))}.</p>" if missing else "", _table(table),
             _figure(root, folder / "crossval.png", f"Out-of-fold Dice {per}, per fold"),
             f"<p>{_link(root, folder / 'out_of_fold.csv', 'out_of_fold.csv')}</p>"]
    return "\n".join(parts)


def _crossval_line(root: Path, crossval: Path) -> str:
    summary = json.loads(crossval.read_text())
    dice, unit = summary["dice"], summary.get("unit", "patient")
    if dice["mean"] is None:
        return ""
    return (f"<li><b>{dice['mean']:.3f}</b> mean Dice {SCORED_PER[unit]} out of fold on "
            f"{dice[f'{unit}s']} {unit}s (median {dice['median']:.3f}, min {dice['min']:.3f}"
            f"{_subfolder(root, crossval.parent)})</li>")


def _subfolder(root: Path, folder: Path) -> str:
    """'; <code>sub/folder</code>' naming where a result lies in the report, nothing for the root."""
    where = folder.relative_to(root).as_posix()
    return f"; <code>{html.escape(where)}</code>" if where != "." else ""


def _evaluation_line(root: Path, summary_path: Path) -> str:
    summary = json.loads(summary_path.read_text())
    dice = summary.get("per_patient", {}).get("dice")
    if not dice or dice.get("mean") is None:
        return ""
    unit = summary["data"].get("unit", "patient")
    return (f"<li><b>{dice['mean']:.3f}</b> mean Dice {SCORED_PER[unit]} on "
            f"{summary['data']['cases']} {html.escape(summary['data']['side'])} {unit}s "
            f"(median {dice['median']:.3f}, min {dice['min']:.3f}"
            f"{_subfolder(root, summary_path.parent)})</li>")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _refuse_data_set(root: Path) -> None:
    data_set = data_set_root(root)  # a patient folder, or images/ or masks/, is part of one too
    if data_set is not None:
        raise BadInputError(root, f"is part of the data set {data_set}, not a folder of results; the report "
                                  "would be written into it (give a run or results folder)")
    try:
        layout, _ = detect_layout(root)
    except BrainsegError:
        return
    raise BadInputError(root, f"is a data set ({layout} layout), not a folder of results; the report would "
                              "be written into it (give a run or results folder)")


def write_report(folder: str | Path, out: str | Path | None = None, *, title: str = "brainseg report",
                 notes: list[str] | None = None, warn=_stderr) -> Path:
    """Write index.html (default: inside `folder`) for every result found below `folder`.

    A data set is refused (nothing is written into data); `warn` gets one line per file left out."""
    root = Path(folder)
    target = Path(out) if out else root / "index.html"
    if target.parent.resolve() != root.resolve():
        raise ValueError("the report must sit in the folder it describes so that its links work")
    _refuse_data_set(root)
    parts = _Parts(warn)
    summaries = {path: parts.kind(path) for path in sorted(root.rglob("summary.json"))}
    sections = []
    for summary, kind in summaries.items():
        if "intensity_per_channel" in kind:
            sections.append(parts.build(summary, _data_section, root, summary.parent))
    for config in sorted(root.rglob(CONFIG_FILE)):
        if (config.parent / HISTORY_FILE).exists():
            sections.append(_training_section(root, config.parent, parts))
    crossvals = sorted(root.rglob("crossval.json"))
    for crossval in crossvals:  # the pooled result before each fold's
        sections.append(parts.build(crossval, _crossval_section, root, crossval.parent))
    for summary, kind in summaries.items():
        if "per_patient" in kind:
            sections.append(parts.build(summary, _evaluation_section, root, summary.parent))
    for compare in sorted(root.rglob("compare.csv")):
        sections.append(parts.build(compare, _comparison_section, root, compare.parent))
    for explained in sorted(root.rglob("explain.csv")):
        sections.append(parts.build(explained, _explain_section, root, explained.parent))
    for predictions in sorted(root.rglob("predictions.csv")):
        name = predictions.parent.relative_to(root).as_posix()
        sections.append(parts.build(predictions, _predictions_section, root, predictions.parent,
                                    "Predictions" if name == "." else f"Predictions: {name}"))
    sections = [section for section in sections if section]
    lines = [parts.build(path, _crossval_line, root, path) for path in crossvals]
    lines += [parts.build(path, _evaluation_line, root, path) for path in summaries]
    headline = f"<h2>At a glance</h2><ul>{''.join(lines)}</ul>" if any(lines) else ""
    intro = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes or []) + headline
    body = "\n".join(sections) or "<p>No results found in this folder.</p>"
    target.write_text(f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
                      f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
                      f"<h1>{html.escape(title)}</h1>{intro}{body}</body></html>\n")
    return target
