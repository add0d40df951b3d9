"""The run folder: its file names, its config and split, and which patients a model has seen.

A run folder holds config.yaml, split.json, history.csv, learning_curves.png, checkpoints/ (best and
last, for resuming), model.pt (the best weights with everything needed to predict),
val_metrics.json / val_patients.csv (val_images.csv) and run_info.json (processes, nodes and
effective batch size of each training session). Every other module asks this one for those names and lookups.
"""

from __future__ import annotations

from pathlib import Path

from brainseg.config import RunConfig, load_config
from brainseg.data.splits import load_split, seen_patients, validate_split
from brainseg.errors import BadInputError, BrainsegError
from brainseg.runs.pretrained import is_pretrained, pretrained_path

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.csv"
# How each training session ran: processes, nodes, effective batch size, LR policy (appended on resume).
RUN_INFO_FILE = "run_info.json"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
ONNX_FILE = "model.onnx"
# Sides of a split whose patients a model learnt from (refit_val: validation patients a refit trained on).
TRAINED_KEYS = ("train", "refit_val")


def resolve_model_path(path: str | Path) -> Path:
    """The file or folder a model argument names; 'pretrained[:NAME]' is a model shipped in the package."""
    return pretrained_path(str(path)) if is_pretrained(path) else Path(path)


def model_file(path: str | Path) -> Path:
    """The file a model argument names: a run folder's model.pt, or the file itself."""
    path = resolve_model_path(path)
    return path / MODEL_FILE if path.is_dir() else path


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LAST_CHECKPOINT


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise BadInputError(run_dir, f"not a brainseg run folder (no {CONFIG_FILE})")
    return load_config(path)


def run_folder_of(model: Path) -> Path:
    """The run folder of a run folder, of its model.pt or of one of its checkpoints/*.ckpt."""
    if model.is_dir():
        return model
    if not model.exists():
        raise BadInputError(model, "does not exist")
    for folder in (model.parent, model.parent.parent):
        if (folder / CONFIG_FILE).exists():
            return folder
    raise BadInputError(model, "is not inside a run folder, so its fold is unknown")


def fold_of(run: Path, fold: int | None = None) -> tuple[int, dict]:
    """The fold a run trained on and its k-fold split (refused for a run of a plain split). `fold`: the
    fold when the folder has no config of its own (an ensemble of one fold's runs records it)."""
    fold = load_run_config(run).data.fold if fold is None else fold
    if not (run / SPLIT_FILE).exists():
        raise BadInputError(run, f"no {SPLIT_FILE} in the run folder")
    split = load_split(run / SPLIT_FILE)
    if fold < 0 or "folds" not in split:
        raise BadInputError(run, "not a run of a k-fold split (train it with --set data.fold=K on a "
                                 "split made with brainseg split --folds)")
    return fold, split


def split_file_beside(model_path: Path) -> Path | None:
    """The run's split.json: in the run folder, beside its model file, or one level up (checkpoints/)."""
    run_dir = model_path if model_path.is_dir() else model_path.parent
    return next((c for c in (run_dir / SPLIT_FILE, run_dir.parent / SPLIT_FILE) if c.exists()), None)


def split_for(model_path: Path, side: str, split_file: str | Path = "",
              description: dict | None = None) -> dict | None:
    """The split to score `side` on: `split_file`, the run's split.json, or the one stored in the
    model file; None for side 'all'."""
    if side == "all":
        return None
    if split_file:
        return load_split(split_file)
    if (beside := split_file_beside(model_path)) is not None:
        return load_split(beside)
    if description and description.get("split"):
        validate_split(description["split"], str(model_path))
        return description["split"]
    raise BadInputError(model_path, f"no {SPLIT_FILE} beside the model to find the {side} patients; "
                                    "pass --split-file or --split all")


def stored_split(model: Path, description: dict) -> dict | None:
    """A model's split (beside it or stored in it), or None when it has none."""
    try:
        return split_for(model, "val", "", description)
    except BadInputError:
        return None


def patients_seen(model_path: Path, description: dict) -> dict | None:
    """{"trained": [...], "validated": [...]}: the patients an ensemble's members learnt from or were
    selected on, or None for a single model (its own split keeps its sides apart)."""
    if "patients_seen" in description:
        return description["patients_seen"]
    if description.get("model", {}).get("name") != "ensemble":
        return None
    # An ensemble built before its members' patients were recorded: its own split (shared by the
    # members, or the one stored in it), every fold of it, since the members' folds are unknown.
    try:
        split = split_for(model_path, "test", "", description)
    except BadInputError:
        return None
    return {"trained": sorted(seen_patients(split, keys=TRAINED_KEYS)),
            "validated": sorted(seen_patients(split, keys=("val",)))}


def member_patients_seen(model: Path, description: dict) -> dict | None:
    """The patients a model trained on and was validated on (of its own fold in a k-fold split), or
    None when its split cannot be found; an ensemble's are those of its members."""
    if (seen := patients_seen(model, description)) is not None:
        return seen
    split = stored_split(model, description)
    if split is None:
        return None
    fold = member_fold(model) if split.get("folds") else None  # unknown: count every fold
    return {"trained": sorted(seen_patients(split, fold, TRAINED_KEYS)),
            "validated": sorted(seen_patients(split, fold, ("val",)))}


def member_fold(model: Path) -> int | None:
    """The fold of a k-fold split that the run holding `model` trained on; None for a run of a plain
    split, or a model file away from its run folder."""
    try:
        fold = load_run_config(run_folder_of(model)).data.fold
    except BrainsegError:
        return None
    return fold if fold >= 0 else None


def check_unseen(model_path: Path, description: dict, patients, side: str) -> None:
    """Refuse to score an ensemble on patients a member trained on (or, for the test side, was
    validated on): the output would call them unseen. The train side and --split all say what they are."""
    seen = patients_seen(model_path, description)
    if seen is None or side in ("train", "all"):
        return
    learnt = set(seen.get("trained", [])) | (set(seen.get("validated", [])) if side == "test" else set())
    leaked = sorted(learnt & set(patients))
    if leaked:
        how = "trained or validated" if side == "test" else "trained"
        raise BadInputError(model_path, f"a member of this ensemble {how} on {len(leaked)} of the {side} "
                                        f"patients (e.g. {leaked[0]}); score it on patients no member saw")
