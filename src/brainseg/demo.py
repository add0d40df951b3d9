"""`brainseg demo`: the main job, end to end, on synthetic data made on the spot."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from brainseg.errors import BadInputError


def run_demo(out: str | Path = "demo-out", *, patients: int = 8, seed: int = 0,
             echo: Callable[[str], object] = print) -> Path:
    """Synthesize a small kaggle_3m data set, then index, check, split and explore it.

    Everything is written under `out`, which is replaced if it holds an earlier demo.
    """
    from brainseg.data.explore import explore, summary_lines
    from brainseg.data.index import write_index
    from brainseg.data.splits import make_split
    from brainseg.data.synth import synthesize

    out = Path(out)
    _clear_earlier_demo(out)
    started = time.perf_counter()
    data = out / "data"
    echo(f"[1/4] synthesizing {patients} patients (seed {seed}) into {data}")
    synthesize(data, patients=patients, seed=seed)
    echo("[2/4] indexing and checking every image/mask pair")
    result = write_index(data, out / "index.csv")
    echo(f"      {len(result.table)} slices, {int(result.table['has_tumour'].sum())} with tumour, "
         f"{len(result.report.problems)} problems")
    echo("[3/4] splitting by patient")
    split = make_split(data, out / "split.json", val=0.25, test=0.25, seed=seed)
    echo("      " + ", ".join(f"{side} {n}" for side, n in split["counts"].items()))
    echo("[4/4] exploring")
    summary = explore(data, out / "explore", seed=seed)
    for line in summary_lines(summary):
        echo(f"      {line}")
    echo(f"done in {time.perf_counter() - started:.1f} s; results in {out}/")
    return out


def _clear_earlier_demo(out: Path) -> None:
    """Only a folder that an earlier demo wrote (or an empty one) may be replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BadInputError(out, "exists and is not a folder")
    if any(out.iterdir()) and not (out / "index.csv").exists():
        raise BadInputError(out, "is not empty and is not an earlier demo output; choose another --out")
    shutil.rmtree(out)
