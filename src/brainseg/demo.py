"""`brainseg demo`: the main job, end to end, on synthetic data made on the spot.

synthesize -> index and check -> split by patient -> explore -> train (a fixed schedule of epochs,
about 1.5 min on a CPU) -> evaluate on the unseen test patients -> predict a patient folder -> run the
shipped pretrained model on the synthetic slices -> HTML report (demo-out/index.html).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from brainseg.config import RunConfig
from brainseg.data.explore import explore
from brainseg.data.index import write_index
from brainseg.data.splits import make_split
from brainseg.data.synth import synthesize
from brainseg.errors import BadInputError
from brainseg.evaluation.evaluate import EvaluateOptions, evaluate
from brainseg.predict import predict_paths
from brainseg.report import write_report
from brainseg.runs.folder import SPLIT_FILE
from brainseg.runs.pretrained import pretrained_path
from brainseg.training import train

# A fixed schedule (epochs x draws), not a time cap: the demo does the same work on a busy machine as on
# an idle one, and so gets the same model; about a minute and a half of training on a 2-core CPU.
FULL = {"patients": 10, "size": 256, "train": {"data.image_size": 128, "model.base_filters": 16,
                                               "train.epochs": 12, "data.samples_per_epoch": 320,
                                               "train.batch_size": 16, "train.early_stopping_patience": 12}}
QUICK = {"patients": 4, "size": 64, "train": {"data.image_size": 64, "model.base_filters": 4,
                                              "model.depth": 3, "train.epochs": 1, "train.batch_size": 8,
                                              "data.samples_per_epoch": 16, "train.precision": "32-true"}}


def run_demo(out: str | Path = "demo-out", *, patients: int | None = None, seed: int = 0, quick: bool = False,
             echo: Callable[[str], object] = print) -> Path:
    """Run every stage on synthetic data and write the report; returns the report's path."""

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the demo prints its own steps
    recipe = QUICK if quick else FULL
    patients = patients or recipe["patients"]
    out = Path(out)
    _clear_earlier_demo(out)
    started = time.perf_counter()
    data = out / "data"

    echo(f"[1/8] synthesizing {patients} patients (seed {seed}) into {data}")
    synthesize(data, patients=patients, seed=seed, size=recipe["size"])
    echo("[2/8] indexing and checking every image/mask pair")
    result = write_index(data, out / "index.csv")
    echo(f"      {len(result.table)} slices, {int(result.table['has_tumour'].sum())} with tumour, "
         f"{len(result.report.problems)} problems")
    echo("[3/8] splitting by patient")
    split = make_split(data, out / SPLIT_FILE, val=0.2, test=0.2, seed=seed)
    echo("      " + ", ".join(f"{side} {n}" for side, n in split["counts"].items()))
    echo("[4/8] exploring")
    explore(data, out / "explore", seed=seed)
    schedule = recipe["train"]
    echo(f"[5/8] training a U-Net for {schedule['train.epochs']} epoch(s) of "
         f"{schedule['data.samples_per_epoch']} slices")
    config = RunConfig().override({**recipe["train"], "data.root": str(data),
                                   "data.split": str(out / SPLIT_FILE), "train.seed": seed})
    trained = train(config, out / "run", progress=not quick)
    scores = [v for v in trained.val_patient_dice.values() if v == v]
    if scores:
        echo(f"      validation Dice per patient volume: mean {sum(scores) / len(scores):.3f}")
    echo("[6/8] evaluating on the test patients (never seen in training)")
    summary = evaluate(out / "run", data, out / "run" / "evaluation", options=EvaluateOptions(side="test"),
                       progress=False)
    dice = summary["per_patient"]["dice"]
    if dice["n"]:
        echo(f"      test Dice per patient volume: mean {dice['mean']:.3f}, median {dice['median']:.3f}, "
             f"min {dice['min']:.3f}")
    echo("[7/8] predicting a patient folder with the new model")
    test_patient = split["test"][0]
    predict_paths(out / "run", [data / test_patient], out / "predictions", progress=False, echo=echo)
    notes = ["All data in this report is synthetic (made by brainseg synth): the numbers show that the "
             "pipeline works, not how well a model segments real MRI."]
    echo("[8/8] running the shipped pretrained model on synthetic slices, then writing the report")
    notes.append(_pretrained(data / test_patient, out / "pretrained", quick, echo))
    report = write_report(out, title="brainseg demo", notes=notes)
    echo(f"done in {time.perf_counter() - started:.0f} s; open {report}")
    return report


def _pretrained(patient: Path, out: Path, quick: bool, echo) -> str:
    try:
        pretrained_path()
    except BadInputError as error:
        echo(f"      skipped: {error}")
        return "The pretrained model is not in this installation, so it was not run."
    table = predict_paths("pretrained", [patient], out, progress=False, echo=echo)
    pixels = int(table["tumour_pixels"].fillna(0).sum())
    return (f"The shipped pretrained model (trained on real LGG FLAIR data) was run on one synthetic patient "
            f"folder and marked {pixels} pixels as tumour; synthetic heads are not real MRI, so expect it to "
            "do worse there than on real scans.")


def _clear_earlier_demo(out: Path) -> None:
    """Only a folder that an earlier demo wrote (or an empty one) may be replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BadInputError(out, "exists and is not a folder")
    if any(out.iterdir()) and not (out / "index.csv").exists():
        raise BadInputError(out, "is not empty and is not an earlier demo output; choose another --out")
    shutil.rmtree(out)
