"""The model file: a self-describing torch file (weights plus the description needed to predict).

Written by training (from its best or last checkpoint), by `brainseg ensemble` and for the shipped
models; read by inference, export, evaluation and tuning. Tuned settings (threshold, post-processing)
are stored in its description.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from brainseg.config import RunConfig, is_probability_cut
from brainseg.errors import BadInputError, BrainsegError
from brainseg.files import replacing
from brainseg.models import create_model
from brainseg.runs.folder import MODEL_FILE, SPLIT_FILE, model_file, resolve_model_path
from brainseg.runs.pretrained import PRETRAINED_FILES, pretrained_folder, pretrained_name

CHECKPOINT_FORMAT = "brainseg-checkpoint/1"
# Description formats this version reads. Training and ensemble have written it into every model file,
# the shipped one and ONNX metadata included, so a file without it was not written by brainseg.
READABLE_FORMATS = (CHECKPOINT_FORMAT,)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_model_file(path: str | Path) -> tuple[dict, dict]:
    """(description, state_dict) from a run folder, a model.pt, a Lightning .ckpt or 'pretrained'."""
    path = resolve_model_path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).exists():
            raise BadInputError(path, f"run folder has no {MODEL_FILE} (did training finish?)")
        path = path / MODEL_FILE
    if not path.exists():
        raise BadInputError(path, "model file does not exist")
    try:
        # weights_only: a model file from elsewhere must not be able to run code when loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # every format fails its own way; all mean "not one of ours"
        raise BadInputError(path, "not a brainseg checkpoint (cannot be read as a PyTorch file)") from None
    if not isinstance(state, dict) or "brainseg" not in state or "state_dict" not in state:
        raise BadInputError(path, "not a brainseg checkpoint (no 'brainseg' description)")
    if not isinstance(state["state_dict"], dict) or not all(
            isinstance(v, torch.Tensor) for v in state["state_dict"].values()):
        raise BadInputError(path, "not a brainseg checkpoint (its weights are not a dict of tensors)")
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    if any(k.startswith("model.") for k in weights):  # a Lightning checkpoint of SegmentationModule
        weights = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    return check_description(path, state["brainseg"]), weights


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(value, low: int) -> bool:
    return _number(value) and isinstance(value, int) and value >= low


def check_description(path: str | Path, description) -> dict:
    """The description of a model file if a hand edit left it usable, else a one-line error naming it.

    Checked once on loading, so that a bad entry is not met later as a KeyError or a torch error."""
    def bad(problem: str) -> BadInputError:
        return BadInputError(path, f"model description: {problem}")

    if not isinstance(description, dict):
        raise bad("not a mapping")
    if description.get("format") not in READABLE_FORMATS:
        found = f"format {description['format']!r}" if "format" in description else "no format"
        raise bad(f"{found}; this version of brainseg reads {', '.join(READABLE_FORMATS)}")
    spec = description.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
            or not isinstance(spec.get("kwargs"), dict):
        raise bad("'model' needs a name and kwargs")
    preprocessing = description.get("preprocessing")
    if not isinstance(preprocessing, dict):
        raise bad("no 'preprocessing' entry")
    context = preprocessing.get("context", 0)
    if not whole(context, 0):
        raise bad(f"preprocessing.context must be a whole number of 0 or more, not {context!r}")
    channels = preprocessing.get("in_channels")
    if not whole(channels, 1) or channels % (2 * context + 1):
        raise bad(f"preprocessing.in_channels must be a positive multiple of {2 * context + 1}, "
                  f"not {channels!r}")
    depth = spec["kwargs"].get("depth", 0)
    minimum = 2 ** depth if whole(depth, 0) and depth < 16 else 1  # each level halves the input
    size = preprocessing.get("image_size")
    if not whole(size, minimum):
        raise bad(f"preprocessing.image_size must be a whole number of at least {minimum}, not {size!r}")
    threshold = description.get("threshold", 0.5)
    if not _number(threshold) or not is_probability_cut(threshold):
        raise bad(f"threshold must be a number between 0 and 1, not {threshold!r}")
    if not whole(description.get("fold", 0), 0):
        raise bad(f"fold must be a whole number of 0 or more, not {description['fold']!r}")
    stored = description.get("postprocessing", {})
    if not isinstance(stored, dict):
        raise bad("'postprocessing' must be a mapping")
    checks = {"largest_component": lambda v: isinstance(v, bool),
              "min_size": lambda v: whole(v, 0),
              "min_fraction": lambda v: _number(v) and 0 <= v <= 1}
    for key, valid in checks.items():
        if stored.get(key) is not None and not valid(stored[key]):
            raise bad(f"postprocessing.{key} cannot be {stored[key]!r}")
    return description


def build_network(path: str | Path, description: dict, weights: dict) -> torch.nn.Module:
    """The network a (checked) description names, with its weights; a mismatch is a one-line error."""
    spec = description["model"]
    try:
        network = create_model(spec["name"], **spec["kwargs"])
    except BrainsegError as error:
        raise BadInputError(path, f"model description: {error}") from None
    except (TypeError, ValueError, KeyError, RuntimeError) as error:  # kwargs the model cannot take
        detail = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]
        raise BadInputError(path, f"model description: cannot build {spec['name']!r} from its kwargs "
                                  f"({detail})") from None
    expected = network.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        if reshaped:
            key = reshaped[0]
            first = (f"{key} is {tuple(weights[key].shape)} in the file, "
                     f"{tuple(expected[key].shape)} in the description")
        else:
            first = f"{missing[0]} missing" if missing else f"{unexpected[0]} unexpected"
        raise BadInputError(path, f"weights do not match the model description ({first}; "
                                  f"{len(missing)} missing, {len(unexpected)} unexpected, "
                                  f"{len(reshaped)} of another shape)")
    network.load_state_dict(weights)
    return network


def save_model_file(description: dict, weights: dict, out: Path, **extra) -> Path:
    """Write a model file: the description and the weights (plus `extra` entries, e.g. the epoch)."""
    torch.save({"brainseg": description, "state_dict": weights, **extra}, out)
    return out


def model_file_from_checkpoint(checkpoint: Path, out: Path) -> Path:
    """A compact file to predict with: fp32 model weights plus the checkpoint's description."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    return save_model_file(state["brainseg"], weights, out, epoch=state.get("epoch"))


def write_pretrained(model: str | Path, out: str | Path | None = None, name: str = "pretrained") -> Path:
    """Store a trained model's weights in fp16 with its description, for shipping in the package."""
    description, weights = load_model_file(model)
    split = (Path(model) if Path(model).is_dir() else Path(model).parent) / SPLIT_FILE
    if split.exists():  # so that `brainseg evaluate pretrained --split test` needs nothing else
        description = {**description, "split": json.loads(split.read_text())}
    target = Path(out) if out else pretrained_folder() / PRETRAINED_FILES[pretrained_name(name)]
    target.parent.mkdir(parents=True, exist_ok=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    return save_model_file(description, half, target)


def trained_config(model: str | Path) -> RunConfig:
    """The config a model was trained with (its recipe: network, augmentation, loss, schedule, start
    weights), without the data folder and split file it named, which were paths where it trained."""
    description, _ = load_model_file(model)
    config = description.get("config")
    if not isinstance(config, dict):
        raise BadInputError(model, "holds no training config (an ensemble's members each have their own: "
                                   "give one member's run)")
    values = copy.deepcopy(config)
    values.setdefault("data", {}).update(root="", split="")
    return RunConfig.from_dict(values, str(model))


def tuned_settings(model: str | Path) -> dict:
    """The threshold and post-processing stored in a model file, to give to another model trained
    the same way (a refit or an ensemble of refits), which has no validation patients of its own."""
    description, _ = load_model_file(model)
    settings = {key: description[key] for key in ("threshold", "threshold_source", "postprocessing")
                if key in description}
    return {**settings, "settings_from": str(model)}


def store_settings(model: Path, settings: dict) -> Path:
    """Update the description in a model file (or a run's model.pt) with these entries.

    The new file is written beside the old one and moved over it whole, so a failed write (a full
    disk, a read-only folder) leaves the model as it was."""
    path = model_file(model)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["brainseg"].update(settings)
    try:
        with replacing(path) as partial:
            torch.save(state, partial)
    except (OSError, RuntimeError) as error:  # torch reports a failed write as a RuntimeError
        reason = f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}".splitlines()[0]
        raise BadInputError(path, f"cannot store the settings; the model file is unchanged ({reason})"
                            ) from None
    return path


if __name__ == "__main__":
    import sys

    print(f"wrote {write_pretrained(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)}")
