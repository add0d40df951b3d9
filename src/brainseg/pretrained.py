"""The pretrained model shipped inside the package (no download)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from brainseg.errors import BadInputError

PRETRAINED_FILE = "lgg_unet.pt"


def pretrained_path() -> Path:
    path = Path(str(resources.files("brainseg") / "pretrained" / PRETRAINED_FILE))
    if not path.exists():
        raise BadInputError(path, "the pretrained model is not in this installation")
    return path


def load_pretrained(**options):
    """A Predictor for the shipped model (see MODEL_CARD.md for its data, recipe and scores)."""
    from brainseg.prediction import Predictor

    return Predictor.from_checkpoint(pretrained_path(), **options)
