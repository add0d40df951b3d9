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


def write_pretrained(model: str | Path, out: str | Path | None = None) -> Path:
    """Store a trained model's weights in fp16 with its description, for shipping in the package."""
    import torch

    from brainseg.prediction import load_model_file

    description, weights = load_model_file(model)
    split = (Path(model) if Path(model).is_dir() else Path(model).parent) / "split.json"
    if split.exists():  # so that `brainseg evaluate pretrained --split test` needs nothing else
        import json

        description = {**description, "split": json.loads(split.read_text())}
    target = Path(out) if out else Path(str(resources.files("brainseg") / "pretrained" / PRETRAINED_FILE))
    target.parent.mkdir(parents=True, exist_ok=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    torch.save({"brainseg": description, "state_dict": half}, target)
    return target


if __name__ == "__main__":
    import sys

    print(f"wrote {write_pretrained(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)}")
