"""The pretrained models shipped inside the package (no download), by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from brainseg.errors import BadInputError

# name -> file in brainseg/pretrained/; the first is what a plain 'pretrained' means
PRETRAINED_FILES = {"lgg": "lgg_unet.pt", "figshare": "figshare_unet.pt"}
PREFIX = "pretrained"


def is_pretrained(name: str | Path) -> bool:
    """Whether a model argument names a shipped model: 'pretrained' or 'pretrained:NAME'."""
    text = str(name)
    return text == PREFIX or text.startswith(PREFIX + ":")


def pretrained_name(name: str | Path) -> str:
    """'pretrained' -> the default model's name; 'pretrained:NAME' -> NAME, checked."""
    _, _, chosen = str(name).partition(":")
    chosen = chosen or next(iter(PRETRAINED_FILES))
    if chosen not in PRETRAINED_FILES:
        raise BadInputError(name, f"no such pretrained model; choose one of: "
                                  f"{', '.join(PREFIX + ':' + n for n in PRETRAINED_FILES)}")
    return chosen


def pretrained_folder() -> Path:
    return Path(str(resources.files("brainseg") / "pretrained"))


def pretrained_path(name: str = "pretrained") -> Path:
    """The shipped model file that 'pretrained' or 'pretrained:NAME' names."""
    path = pretrained_folder() / PRETRAINED_FILES[pretrained_name(name)]
    if not path.exists():
        raise BadInputError(path, "the pretrained model is not in this installation")
    return path
