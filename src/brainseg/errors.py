"""Errors that reach the user as one line (the CLI prints them without a traceback)."""

from __future__ import annotations

from pathlib import Path


class BrainsegError(Exception):
    """Base class: the message is complete and meant for the user."""


class BadInputError(BrainsegError):
    """A file or folder the user gave cannot be used; the message names it."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class SplitLeakError(BrainsegError):
    """A split puts one patient on two sides."""


class OptionError(BrainsegError, ValueError):
    """An option or argument value that cannot be used; the message says which values can."""
