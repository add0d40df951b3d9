"""brainseg: brain tumour segmentation in MRI with 2D U-Net-family networks.

Heavy libraries (torch, lightning, monai, matplotlib) are imported lazily by the modules
that need them, so that `import brainseg` and `brainseg --help` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public API name -> module that defines it; resolved on first access.
_LAZY = {
    "index_dataset": "brainseg.data.index",
    "check_dataset": "brainseg.data.index",
    "scan": "brainseg.data.index",
    "split_patients": "brainseg.data.splits",
    "save_split": "brainseg.data.splits",
    "load_split": "brainseg.data.splits",
    "synthesize": "brainseg.data.synth",
    "explore": "brainseg.data.explore",
    "RunConfig": "brainseg.config",
    "create_model": "brainseg.models",
    "train": "brainseg.training",
    "evaluate": "brainseg.evaluation.evaluate",
    "EvaluateOptions": "brainseg.evaluation.evaluate",
    "Predictor": "brainseg.inference",
    "load_pretrained": "brainseg.inference",
    "export_model": "brainseg.export",
    "build_ensemble": "brainseg.runs.combine",
    "tune": "brainseg.evaluation.tune",
    "cross_validate": "brainseg.evaluation.crossval",
    "compare_runs": "brainseg.evaluation.compare",
}
_ALIASES = {"split": "split_patients"}

__all__ = ["__version__", *_LAZY, *_ALIASES]


def __getattr__(name: str) -> Any:
    name = _ALIASES.get(name, name)
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'brainseg' has no attribute {name!r}")
