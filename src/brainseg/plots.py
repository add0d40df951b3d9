"""Figures written as PNG files. matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from brainseg.data.splits import DETECTED_PER, SCORED_PER, validation_score_column

OVERLAY_COLOUR = (1.0, 0.0, 0.0)
# Outlines in the report's figures: named in every legend, and far apart for red-green colour blindness
# too (magenta against a yellow-green that differs in lightness).
PREDICTION_OUTLINE = ("red", "red")
TRUTH_OUTLINE = ("#7CFC00", "green")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def display_image(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> something imshow draws: RGB as is, one channel as greyscale."""
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.25) -> np.ndarray:
    """The mask over an image in red: a light fill and a solid 2-pixel outline, so it reads as red over
    any colour scan; returns float RGB in [0, 1]."""
    rgb = image.astype(np.float32) / 255.0
    if rgb.ndim == 2 or rgb.shape[-1] == 1:
        rgb = np.repeat(rgb.reshape(*rgb.shape[:2], 1), 3, axis=-1)
    where = mask.astype(bool)
    colour = np.asarray(OVERLAY_COLOUR, np.float32)
    rgb[where] = (1 - alpha) * rgb[where] + alpha * colour
    rgb[where & ~ndimage.binary_erosion(where, iterations=2)] = colour
    return rgb


def overlay_rgb8(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`overlay` as 8-bit RGB, for a PNG."""
    return (overlay(image, mask) * 255).round().astype(np.uint8)


def _outline(ax, mask: np.ndarray, colour: str, width: float = 1.0) -> None:
    if np.asarray(mask).any():
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors=[colour], linewidths=width)


def outlined(ax, image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray,
             width: float = 1.0) -> None:
    """The image in grey with the truth's outline (green) and the prediction's outline (red) over it."""
    picture = display_image(image)
    ax.imshow(picture, cmap="gray", vmin=0, vmax=255 if picture.dtype == np.uint8 else 1)
    if truth is not None:
        _outline(ax, truth, TRUTH_OUTLINE[0], width)
    _outline(ax, prediction, PREDICTION_OUTLINE[0], width)


def outline_legend(with_truth: bool = True) -> str:
    prediction = f"{PREDICTION_OUTLINE[1]}: prediction outline"
    return f"{prediction}, {TRUTH_OUTLINE[1]}: truth outline" if with_truth else prediction


def sample_grid(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], titles: Sequence[str],
                path: Path) -> Path:
    """One row per slice: image | mask | overlay."""
    plt = _pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for row, (image, mask, title) in enumerate(zip(images, masks, titles, strict=True)):
        panels = [(display_image(image), "image"), (mask.astype(np.uint8) * 255, "mask"),
                  (overlay(image, mask), "overlay")]
        for col, (picture, name) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(picture, cmap="gray", vmin=0, vmax=255 if picture.dtype == np.uint8 else 1)
            ax.set_axis_off()
            ax.set_title(title if col == 0 else name, fontsize=8)
    return _save(fig, path)


def bar_per_patient(names: Sequence[str], stacks: dict[str, Sequence[float]], ylabel: str,
                    title: str, path: Path) -> Path:
    """Stacked bars, one per patient, e.g. slices with and without tumour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(names) + 2), 4))
    bottom = np.zeros(len(names))
    for label, values in stacks.items():
        ax.bar(range(len(names)), values, bottom=bottom, label=label, width=0.85)
        bottom += np.asarray(values, dtype=float)
    ax.set_xlabel(f"patient ({len(names)}, sorted)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks([])
    if len(stacks) > 1:
        ax.legend()
    return _save(fig, path)


def histogram(values: Sequence[float], xlabel: str, title: str, path: Path, *, bins: int = 40,
              log_x: bool = False) -> Path:
    plt = _pyplot()
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    if log_x and len(values) and values.min() > 0:
        edges = np.logspace(np.log10(values.min()), np.log10(values.max() + 1), bins)
        ax.hist(values, bins=edges, color="tab:red", alpha=0.8)
        ax.set_xscale("log")
    else:
        ax.hist(values, bins=bins, color="tab:red", alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    if len(values):
        median = float(np.median(values))
        ax.axvline(median, color="black", linestyle="--", linewidth=1, label=f"median {median:.3g}")
        ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def learning_curves(history, path: Path, best_epoch: int | None = None, unit: str = "patient") -> Path:
    """Train and validation loss per epoch on a log scale (left), train and validation Dice (right); the
    validation Dice is per patient volume, or per image for an image set (`unit`)."""
    plt = _pyplot()
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = history["epoch"]
    for column, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        if column in history and history[column].notna().any():
            loss_ax.plot(epochs, history[column], marker="o", markersize=3, label=label)
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss (log scale)")
    loss_ax.set_title("Learning curves")
    score = validation_score_column(history)
    for column, label in ((score, f"validation Dice {SCORED_PER[unit]}"),
                          ("val_dice", f"validation Dice ({DETECTED_PER[unit]}s, micro)"),
                          ("train_dice", "train Dice")):
        if column and column in history and history[column].notna().any():
            dice_ax.plot(epochs, history[column], marker="o", markersize=3, label=label)
    dice_ax.set_xlabel("epoch")
    dice_ax.set_ylabel("Dice")
    dice_ax.set_ylim(0, 1)
    validated = any(c and c in history and history[c].notna().any() for c in (score, "val_dice"))
    dice_ax.set_title("Dice" if validated else "Training Dice (no validation scores)")
    if best_epoch is not None:
        for ax in (loss_ax, dice_ax):
            ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1,
                       label=f"best epoch {best_epoch}")
    _plain_epoch_axes(loss_ax, dice_ax)
    loss_ax.legend()
    dice_ax.legend(loc="lower right")
    return _save(fig, path)


def _plain_epoch_axes(loss_ax, dice_ax) -> None:
    """Whole epochs on x whatever their number, and loss ticks as plain numbers (not 1.461x10^0)."""
    plt = _pyplot()  # pyplot re-exports the tickers
    for ax in (loss_ax, dice_ax):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    plain = plt.FormatStrFormatter("%.3g")
    loss_ax.yaxis.set_major_formatter(plain)
    loss_ax.yaxis.set_minor_formatter(plain)


def prediction_grid(rows: Sequence[dict], path: Path, threshold: float = 0.5) -> Path:
    """One row per slice: image | truth | probability | binary at the threshold.

    Each row is a dict with image (H, W, C) uint8, truth and probability (H, W) and a title; the last
    panel outlines the binary prediction in red and the truth in green over the image.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        binary = row["probability"] >= threshold
        panels = [(display_image(row["image"]), "image", "gray", 255),
                  (row["truth"].astype(np.float32), "truth", "gray", 1),
                  (row["probability"], "probability", "magma", 1),
                  (None, f"≥ {threshold:g}: red prediction,\ngreen truth", None, 1)]
        for c, (picture, name, cmap, vmax) in enumerate(panels):
            ax = axes[r][c]
            if picture is None:
                outlined(ax, row["image"], row["truth"], binary)
            else:
                ax.imshow(picture, cmap=cmap, vmin=0, vmax=vmax)
            ax.set_axis_off()
            ax.set_title(row["title"] if c == 0 else name, fontsize=8)
    return _save(fig, path)


def saliency_figure(image: np.ndarray, mask: np.ndarray, gradient_x_input: np.ndarray, grad_cam: np.ndarray,
                    path: Path, title: str) -> Path:
    """image | prediction overlay | gradient x input | Grad-CAM (maps in [0, 1] over the image)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    grey = display_image(image)
    axes[0].imshow(grey, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(title, fontsize=9)
    axes[1].imshow(overlay(image, mask))
    axes[1].set_title("prediction (red)", fontsize=9)
    maps = ((axes[2], gradient_x_input, "gradient × input"), (axes[3], grad_cam, "Grad-CAM"))
    for ax, saliency, name in maps:
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        shown = ax.imshow(saliency, cmap="inferno", vmin=0, vmax=1, alpha=0.6)
        ax.set_title(name, fontsize=9)
    fig.colorbar(shown, ax=axes[3], fraction=0.046, pad=0.02, label="saliency (scaled to 1)")
    for ax in axes:
        ax.set_axis_off()
    return _save(fig, path)


NAMED_BARS = 60  # beyond this many cases a bar each would be too thin to name


def patient_scores(names: Sequence[str], dice: Sequence[float], path: Path, title: str,
                   unit: str = "patient") -> Path:
    """Sorted Dice per case as bars, with the mean and median marked; each bar is named up to
    NAMED_BARS cases, beyond that the figure keeps its width and the axis counts the cases."""
    plt = _pyplot()
    values = np.asarray(dice, dtype=float)
    order = np.argsort(np.nan_to_num(values, nan=-1))
    named = len(values) <= NAMED_BARS
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(values) + 2) if named else 9.0, 4))
    ax.bar(range(len(values)), np.nan_to_num(values[order]), color="tab:blue", width=0.8 if named else 1.0)
    if named:
        ax.set_xticks(range(len(values)), [names[i] for i in order], rotation=90, fontsize=6)
    else:
        ax.set_xlabel(f"{len(values)} {unit}s, sorted by Dice")
    ax.set_ylim(0, 1)
    ax.set_ylabel(title.split(" (")[0])
    ax.set_title(title)
    if np.isfinite(values).any():
        mean = float(np.nanmean(values))
        ax.axhline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.3f}")
        ax.axhline(np.nanmedian(values), color="black", linestyle=":",
                   label=f"median {np.nanmedian(values):.3f}")
        ax.legend(loc="lower right")
    return _save(fig, path)


def volume_montage(images: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray, path: Path,
                   title: str, columns: int = 8, numbers: Sequence[int] | None = None) -> Path:
    """Slices of a volume with the prediction's outline in red and the truth's in green (None: no truth),
    each labelled with its slice number (1-based; `numbers` when the slices are a selection)."""
    plt = _pyplot()
    count = len(images)
    numbers = list(numbers) if numbers is not None else list(range(1, count + 1))
    columns = max(1, min(columns, count))
    rows = int(np.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.0 * rows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i >= count:
            continue
        outlined(ax, images[i], None if truth is None else truth[i], prediction[i], width=0.9)
        ax.text(0.03, 0.97, f"slice {numbers[i]}", transform=ax.transAxes, ha="left", va="top", fontsize=9,
                color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
    fig.suptitle(f"{title}\n{outline_legend(truth is not None)}", fontsize=11)
    return _save(fig, path)


def compare_models(scores: dict[str, np.ndarray], path: Path, title: str, unit: str = "patient") -> Path:
    """Dice per case of several models: a box per model with every patient (or image) as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(scores) + 2), 4.5))
    names = list(scores)
    values = [np.asarray(scores[n], dtype=float)[np.isfinite(scores[n])] for n in names]
    ax.boxplot(values, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    rng = np.random.default_rng(0)
    for i, v in enumerate(values, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=12, alpha=0.7, color="tab:blue")
        if len(v):
            ax.annotate(f"mean {v.mean():.3f}", (i, 1.02), ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel(f"Dice {SCORED_PER[unit]}")
    ax.set_title(title)
    return _save(fig, path)


def training_minutes(seconds) -> np.ndarray:
    """Cumulative training minutes from history.csv's `seconds`, which restarts at 0 when a run resumes."""
    seconds = np.asarray(seconds, dtype=float)
    steps = np.diff(seconds, prepend=0.0)
    steps = np.where(steps >= 0, steps, seconds)  # after a resume the clock counts from 0 again
    return np.cumsum(steps) / 60


def compare_curves(histories: dict, path: Path, unit: str = "patient") -> Path:
    """Learning curves of several runs against training time, so that a slower network is judged by what
    it reached in the same minutes: training loss (left) and validation Dice per case (right)."""
    plt = _pyplot()
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        minutes = training_minutes(history["seconds"])
        line, = loss_ax.plot(minutes, history["train_loss"], label=name)
        score = validation_score_column(history)
        if score and history[score].notna().any():
            scored = history[score].notna().to_numpy()
            dice_ax.plot(minutes[scored], history[score][scored], color=line.get_color(), label=name)
    loss_ax.set_ylabel("training loss")  # linear: a log axis over less than a decade shows one tick
    dice_ax.set_ylabel(f"validation Dice {SCORED_PER[unit]}")
    dice_ax.set_ylim(0, 1)
    for ax, title in ((loss_ax, "Training loss"), (dice_ax, "Validation Dice")):
        ax.set_xlabel("training minutes")
        ax.set_title(title)
        ax.legend(loc="lower right" if ax is dice_ax else "upper right")
    return _save(fig, path)
