"""Typed run configuration with defaults in one place, read from and written to YAML.

A run's resolved configuration is saved beside it (config.yaml), so any run can be repeated or
resumed from its folder alone. Every CLI flag is an override of one field here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from brainseg.errors import BadInputError, OptionError

MAX_SEED = 2**32 - 1  # what numpy and scikit-learn accept as a seed
MIN_IMAGE_SIZE = 16


def check_ranges(section: str, config: Any, ranges: dict[str, str],
                 error: type[OptionError] = OptionError) -> None:
    """Raise `error` naming the first field of `config` outside its interval, e.g. "[0, 1)" or "(0, inf)"."""
    for name, interval in ranges.items():
        value = getattr(config, name)
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        inside = number and (low <= value if interval[0] == "[" else low < value) and (
            value <= high if interval[-1] == "]" else value < high)
        if inside:
            continue
        if math.isinf(high):
            wanted = f"at least {low:g}" if interval[0] == "[" else f"greater than {low:g}"
            wanted += " and finite" if isinstance(value, float) else ""
        else:
            wanted = f"in {interval}"
        raise error(f"{section}.{name} must be {wanted}, got {value!r}")


def is_probability_cut(value: Any) -> bool:
    """Whether `value` can cut a probability into tumour / not: strictly between 0 and 1 (NaN cannot)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


def check_threshold(value: Any, name: str = "--threshold") -> float:
    """`value` if it is a probability cut, else a one-line OptionError naming `name`."""
    if not is_probability_cut(value):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        shown = f"{value:g}" if number else repr(value)
        raise OptionError(f"{name}: must be between 0 and 1 (exclusive), not {shown}")
    return float(value)


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed numpy and scikit-learn accept (0 to 2**32 - 1), else an OptionError naming `name`."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise OptionError(f"{name} must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


@dataclass
class DataConfig:
    root: str = ""  # data set folder
    layout: str = "auto"  # auto, kaggle_3m or images_masks
    split: str = ""  # split JSON to use; empty: make one from the fractions below and save it
    val: float = 0.15
    test: float = 0.15
    test_patients: list[str] = field(default_factory=list)  # fixed test set (overrides `test`)
    group_by: str = ""  # split whole groups: index-block:N (images) or column:NAME (see data.splits.units_of)
    folds: int = 0  # with fold >= 0: k-fold split of the non-test patients
    fold: int = -1  # which fold to train (-1: plain train/val split)
    # Refit: train on the train and val patients together, with no validation; the epochs and LR
    # milestones come from a run that was validated (brainseg train --refit RUN), the last epoch is kept.
    refit: bool = False
    image_size: int = 256  # network input side; predictions are scored at the original size
    patch_size: int = 0  # train on random square patches of this side cut from image_size slices (0: whole)
    context: int = 0  # 2.5D: neighbouring slices stacked on each side (0 = plain 2D)
    normalize: str = "percentile"  # percentile (each channel / its 99.5th percentile per volume) or divide255
    tumour_weight: float = 3.0  # how much more often a tumour slice is drawn than another
    # Slices with a little tumour (fewer than small_tumour_pixels at the original size) are drawn
    # small_tumour_weight times as often again: small and edge lesions are where the misses are.
    small_tumour_weight: float = 1.0
    small_tumour_pixels: int = 1000
    samples_per_epoch: int = 0  # 0: as many draws as training slices
    num_workers: int = -1  # data loader workers; -1 picks from the core count
    cache: bool = True

    def __post_init__(self) -> None:
        # val and test are checked with the split itself (splits.split_patients)
        check_ranges("data", self, {
            "image_size": f"[{MIN_IMAGE_SIZE}, inf)", "context": "[0, inf)", "tumour_weight": "(0, inf)",
            "small_tumour_weight": "(0, inf)", "small_tumour_pixels": "[0, inf)",
            "samples_per_epoch": "[0, inf)", "num_workers": "[-1, inf)", "folds": "[0, inf)",
            "fold": "[-1, inf)"})
        if self.normalize not in ("percentile", "divide255"):
            raise OptionError(f"data.normalize must be percentile or divide255, got {self.normalize!r}")
        if not 0 <= self.patch_size <= self.image_size:
            raise OptionError(f"data.patch_size must be between 0 (whole slices) and data.image_size "
                              f"({self.image_size}), got {self.patch_size}")


@dataclass
class ModelConfig:
    name: str = "unet"
    base_filters: int = 16
    depth: int = 4
    dropout: float = 0.1
    batch_norm: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # extra model arguments

    def __post_init__(self) -> None:
        # depth 16 already needs inputs of 65536 pixels a side
        check_ranges("model", self, {"base_filters": "[1, inf)", "depth": "[1, 16]", "dropout": "[0, 1)"})


class AugmentConfigError(OptionError):
    """An augmentation setting is out of range."""


@dataclass
class AugmentConfig:
    """Augmentation settings; the geometric defaults follow the Keras seed notebooks."""

    geometric: bool = True  # random affine: rotation, shift, shear, zoom (not the flip)
    rotation_deg: float = 10.0  # seeds: rotation_range
    shift: float = 0.05  # width/height shift as a fraction of the side
    shear_deg: float = 5.0  # seeds: shear_range, a shear angle in degrees
    zoom: float = 0.1  # scale in [1 - zoom, 1 + zoom], per axis like Keras
    hflip: bool = True  # left-right flip with probability 0.5, independent of `geometric`
    p_geometric: float = 0.8  # probability the affine is applied
    intensity: bool = False  # brightness / contrast / gamma, each drawn with p_intensity
    brightness: float = 0.1  # additive shift in [-b, b]
    contrast: float = 0.1  # multiplicative factor in [1 - c, 1 + c]
    gamma: float = 0.2  # gamma in [1 - g, 1 + g]
    noise_std: float = 0.0  # Gaussian noise sigma drawn in [0, noise_std], with p_intensity (0 = off)
    elastic: bool = False
    p_intensity: float = 0.5
    p_elastic: float = 0.3
    # Probability that a slice's pre- and/or post-contrast channel is replaced by its FLAIR channel, as
    # kaggle_3m does for patients missing a sequence (9 of the 75 shared patients); 0 = off.
    p_missing_sequence: float = 0.0

    def __post_init__(self) -> None:
        check_ranges("augment", self, {
            "rotation_deg": "[0, 180]", "shift": "[0, 1)", "shear_deg": "[0, 90)", "zoom": "[0, 1)",
            "brightness": "[0, 1]", "contrast": "[0, 1)", "gamma": "[0, 1)", "noise_std": "[0, 1]",
            "p_geometric": "[0, 1]", "p_intensity": "[0, 1]", "p_elastic": "[0, 1]",
            "p_missing_sequence": "[0, 1]"}, AugmentConfigError)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


WEIGHT_AVERAGES = ("none", "swa", "ema")
# One vocabulary for every verb (devices.py resolves it): precision auto, 32, bf16 or 16, with
# Lightning's 32-true, bf16-mixed and 16-mixed accepted; device auto, cpu or cuda, with gpu as cuda.
PRECISION_SPELLINGS = {"auto": "auto", "32": "32", "32-true": "32", "fp32": "32", "bf16": "bf16",
                       "bf16-mixed": "bf16", "16": "16", "16-mixed": "16", "fp16": "16"}
DEVICE_SPELLINGS = {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "gpu": "cuda"}


def normalise_precision(precision: str, option: str = "--precision",
                        allowed: tuple[str, ...] = ("auto", "32", "bf16", "16")) -> str:
    """auto, 32, bf16 or 16 from any accepted spelling, else a one-line error naming `option`."""
    short = PRECISION_SPELLINGS.get(str(precision).strip().lower())
    if short not in allowed:
        raise OptionError(f"{option}: must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {precision!r}")
    return short


def normalise_device(device: str, option: str = "--device") -> str:
    """auto, cpu, cuda or cuda:N from any accepted spelling (gpu means cuda), else a one-line error."""
    text = str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in DEVICE_SPELLINGS or (index and (kind not in ("cuda", "gpu") or not index.isdigit())):
        raise OptionError(f"{option}: must be auto, cpu, cuda or cuda:N, not {device!r}")
    return DEVICE_SPELLINGS[kind] + (f":{index}" if index else "")


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    loss: str = "bce_dice"  # one of losses.LOSS_NAMES
    early_stopping_patience: int = 10  # epochs without a better validation patient Dice
    lr_patience: int = 4  # ReduceLROnPlateau patience, in epochs
    lr_factor: float = 0.5
    lr_milestones: list[int] = field(default_factory=list)  # epochs where LR *= lr_factor (else on plateau)
    min_lr: float = 1e-6
    precision: str = "auto"  # auto, 32, bf16 or 16 (see devices.py)
    channels_last: bool = True
    accelerator: str = "auto"  # auto, cpu or cuda (gpu)
    devices: int = 1  # > 1 trains with DDP
    num_nodes: int = 1  # machines, each running `devices` processes (torchrun, SLURM); > 1 trains with DDP
    max_minutes: float = 0.0  # stop after this much wall time (0: no limit)
    threshold: float = 0.5
    seed: int = 0
    val_every: int = 1  # validate every N epochs
    init_weights: str = ""  # model file or run folder to start from (fine-tuning, e.g. at a larger size)
    init_member: int = -1  # with an ensemble as init_weights: which member (0-based) to start from
    # Validate and save an average of the weights instead of the last ones, updated every step: "swa"
    # the plain mean of all of them, "ema" a moving average that keeps ema_decay of itself.
    weight_average: str = "none"  # none, swa or ema
    ema_decay: float = 0.999
    # Distillation (brainseg distill): a model file, run folder or 'pretrained[:NAME]' whose probabilities
    # the network also learns; loss = (1 - distill_weight) * loss + distill_weight * BCE(teacher's).
    teacher: str = ""
    distill_weight: float = 0.5

    def __post_init__(self) -> None:
        check_ranges("train", self, {
            "epochs": "[1, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)", "weight_decay": "[0, inf)",
            "early_stopping_patience": "[1, inf)", "lr_patience": "[0, inf)", "lr_factor": "(0, 1)",
            "min_lr": "[0, inf)", "devices": "[1, inf)", "num_nodes": "[1, inf)",
            "max_minutes": "[0, inf)", "val_every": "[1, inf)", "distill_weight": "[0, 1]",
            "init_member": "[-1, inf)"})
        check_seed(self.seed, "train.seed")
        normalise_precision(self.precision, "train.precision")
        normalise_device(self.accelerator, "train.accelerator")
        if self.weight_average not in WEIGHT_AVERAGES:
            raise OptionError(f"train.weight_average must be one of {', '.join(WEIGHT_AVERAGES)}, "
                              f"got {self.weight_average!r}")
        check_threshold(self.threshold, "train.threshold")
        if not 0 < self.ema_decay < 1:
            raise OptionError(f"train.ema_decay must be between 0 and 1, got {self.ema_decay}")
        milestones = self.lr_milestones
        if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
            raise OptionError(f"train.lr_milestones must be increasing epoch numbers of at least 1, "
                              f"got {milestones}")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # The network halves its input `depth` times, so a side must divide by 2**depth.
        factor = 2**self.model.depth
        for name in ("image_size", "patch_size"):
            side = getattr(self.data, name)
            if side % factor:
                raise OptionError(f"data.{name} must be a multiple of 2**model.depth = {factor} (a network "
                                  f"of depth {self.model.depth}), got {side}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        return _build(cls, values or {}, source, "")

    def override(self, updates: dict[str, Any]) -> RunConfig:
        """A copy with dotted keys replaced, e.g. {"train.lr": 3e-4}; values are type-checked."""
        merged = self.to_dict()
        for key, value in updates.items():
            section, _, name = key.partition(".")
            if section not in merged or not name:
                raise OptionError(f"unknown setting {key!r}; settings look like train.lr or data.image_size")
            if section == "model" and name.startswith("options."):  # one extra model argument
                if isinstance(value, str):
                    try:
                        value = yaml.safe_load(value)  # "2" -> 2, "true" -> True, as in a YAML config
                    except yaml.YAMLError as error:
                        raise OptionError(f"{key}: {value!r} is not a valid YAML value "
                                          f"({str(error).splitlines()[0]})") from None
                option = name.removeprefix("options.")
                merged["model"]["options"] = {**merged["model"]["options"], option: value}
                continue
            merged[section][name] = value
        return RunConfig.from_dict(merged, "override")


def packaged_configs() -> dict[str, Path]:
    """The recipes shipped in the package, by name (e.g. lgg_cpu)."""
    folder = Path(str(resources.files("brainseg") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML config; a bare name such as 'lgg_cpu' means the recipe shipped in the package."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and str(path) in packaged_configs():
        path = packaged_configs()[str(path)]
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        raise BadInputError(path, f"cannot read config ({error.strerror})") from None
    except UnicodeDecodeError:
        raise BadInputError(path, "not UTF-8 text; a config is a UTF-8 YAML file") from None
    except yaml.YAMLError as error:
        raise BadInputError(path, f"not valid YAML ({str(error).splitlines()[0]})") from None
    if values is not None and not isinstance(values, dict):
        raise BadInputError(path, "a config must be a mapping with sections data, model, augment, train")
    try:
        return RunConfig.from_dict(values or {}, str(path))
    except OptionError as error:  # a range check inside a section does not know the file it came from
        if str(error).startswith(f"{path}:"):
            raise
        raise BadInputError(path, str(error)) from None


def save_config(config: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def _build(cls, values: dict, source: str, prefix: str):
    if not isinstance(values, dict):
        raise OptionError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"{source}: unknown setting {prefix}{unknown[0]}; "
                          f"valid: {', '.join(prefix + k for k in sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, source, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(hint, value, f"{source}: {prefix}{name}")
    return cls(**kwargs)


_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})


def _coerce(hint, value, where: str):
    """Check a value against a field type, converting text from the command line."""
    origin = typing.get_origin(hint)
    if origin in (list, typing.List):  # noqa: UP006
        if isinstance(value, str):  # "30, 38" or, as YAML writes it, "[30, 38]"
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise OptionError(f"{where} must be a list, got {value!r}")
        item = (typing.get_args(hint) or (str,))[0]
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, dict):
            raise OptionError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise OptionError(f"{where} must be {hint.__name__}, got {value!r}") from None
    return value
