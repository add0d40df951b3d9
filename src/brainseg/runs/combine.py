"""`brainseg ensemble`: combine trained models into one self-describing model file (an ensemble).

The result is a run-like folder (model.pt, split.json, ensemble.json) that evaluate, tune,
compare, predict, export and the pretrained packaging accept like any trained run.
"""

from __future__ import annotations

import json
from pathlib import Path

from brainseg import __version__
from brainseg.config import check_threshold
from brainseg.data.splits import save_split
from brainseg.errors import BadInputError, OptionError
from brainseg.evaluation.postprocess import check_min_fraction, check_min_size
from brainseg.models import create_model
from brainseg.runs.folder import (
    MODEL_FILE,
    SPLIT_FILE,
    member_fold,
    member_patients_seen,
    model_file,
    stored_split,
)
from brainseg.runs.model_file import (
    CHECKPOINT_FORMAT,
    file_digest,
    load_model_file,
    save_model_file,
    tuned_settings,
)


def build_ensemble(models: list[str | Path], out: str | Path, *, threshold: float | None = None,
                   settings_from: str | Path | None = None, postprocessing: dict | None = None) -> dict:
    """Write `out`/model.pt averaging the members' probabilities; returns the ensemble's summary.

    `settings_from` copies the threshold and post-processing stored in another model file, e.g. the
    validated ensemble whose members these are refits of (a refit has no patients left to tune on).
    `postprocessing` ({largest_component, min_size, min_fraction}, any of them) overrides the copied
    post-processing, e.g. with what cross-validation chose (brainseg tune on the fold runs)."""
    if len(models) < 2:
        raise OptionError("an ensemble needs at least two models")
    settings: dict = {"threshold": 0.5}
    if settings_from is not None:
        if threshold is not None:
            raise OptionError("give --threshold or --settings-from, not both")
        settings = tuned_settings(settings_from)
    threshold = settings["threshold"] if threshold is None else threshold
    copied = {key: value for key, value in settings.items() if key != "threshold"}
    given = {key: value for key, value in (postprocessing or {}).items() if value is not None}
    if given:
        unknown = sorted(set(given) - {"largest_component", "min_size", "min_fraction"})
        if unknown:
            raise OptionError(f"unknown post-processing setting(s): {', '.join(unknown)}")
        check_min_fraction(float(given.get("min_fraction", 0.0)))
        check_min_size(given.get("min_size", 0))
        copied["postprocessing"] = {**copied.get("postprocessing", {}), **given,
                                    "source": "given to brainseg ensemble"}
    check_threshold(threshold)
    out = Path(out)
    if (out / MODEL_FILE).exists():
        raise BadInputError(out, f"already holds a {MODEL_FILE}; choose a new --out")
    members, weights, sources, splits, seen, folds = [], {}, [], [], [], set()
    for i, model in enumerate(models):
        path = model_file(model)  # 'pretrained' is the shipped file
        description, state = load_model_file(path)
        preprocessing = description["preprocessing"]
        members.append({"name": description["model"]["name"], "kwargs": description["model"]["kwargs"],
                        "context": int(preprocessing.get("context", 0)),
                        "image_size": int(preprocessing["image_size"]), "preprocessing": preprocessing})
        weights.update({f"members.{i}.{key}": value for key, value in state.items()})
        sources.append({"file": str(path), "sha256_16": file_digest(path),
                        "model": description["model"]["name"], "context": members[-1]["context"]})
        splits.append(stored_split(path, description))
        seen.append(member_patients_seen(path, description))
        folds.add(member_fold(path))

    first = members[0]["preprocessing"]
    for member, source in zip(members, sources, strict=True):
        value = member["preprocessing"].get("normalisation")
        if value != first.get("normalisation"):
            raise BadInputError(source["file"], f"normalisation {value!r} differs from the first model's "
                                                f"{first.get('normalisation')!r}")
    context = max(m["context"] for m in members)
    image_size = max(m["image_size"] for m in members)  # smaller members get their input resized down
    slice_channels = int(first["in_channels"]) // (2 * members[0]["context"] + 1)
    kwargs = {"members": [{k: m[k] for k in ("name", "kwargs", "context", "image_size")} for m in members],
              "context": context, "slice_channels": slice_channels, "image_size": image_size}
    description = {
        "format": CHECKPOINT_FORMAT,
        "brainseg_version": __version__,
        "model": {"name": "ensemble", "kwargs": kwargs},
        "preprocessing": {"image_size": image_size,
                          "in_channels": (2 * context + 1) * slice_channels,
                          "context": context, "normalisation": first["normalisation"],
                          "channels_last": all(m["preprocessing"].get("channels_last", False)
                                               for m in members)},
        **copied,
        "threshold": threshold,
        "members": sources,
        # evaluate and tune refuse to score the ensemble on these patients (see check_unseen)
        "patients_seen": {kind: sorted({name for member in seen if member for name in member[kind]})
                          for kind in ("trained", "validated")},
    }
    unknown = [source["file"] for source, member in zip(sources, seen, strict=True) if member is None]
    if unknown:
        description["patients_seen"]["unknown_for"] = unknown
    # Members of different folds of one k-fold split hold the same split.json but learnt from
    # different patients: they do not share a split.
    shared_split = (splits[0] if splits[0] and all(s == splits[0] for s in splits)
                    and all(m == seen[0] for m in seen) else None)
    fold = next(iter(folds)) if shared_split and len(folds) == 1 else None
    if fold is not None:  # one fold's runs (e.g. two recipes): crossval can pool such ensembles
        description["fold"] = fold
    create_model("ensemble", **kwargs).load_state_dict(weights)  # fails here, not at predict time
    out.mkdir(parents=True, exist_ok=True)
    save_model_file(description, weights, out / MODEL_FILE)
    if shared_split:
        save_split(shared_split, out / SPLIT_FILE)
    summary = {"model": str(out / MODEL_FILE), "members": sources, "context": context,
               "threshold": threshold, **copied, "split": "shared by all members" if shared_split else
               "members differ: pass --split-file to evaluate (patients a member trained on are refused)",
               **({"fold": fold} if fold is not None else {}),
               "patients_seen": {kind: len(value) if isinstance(value, list) else value
                                 for kind, value in description["patients_seen"].items()}}
    (out / "ensemble.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
