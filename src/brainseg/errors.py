"""Errors that reach the user as one line (the CLI prints them without a traceback)."""

from __future__ import annotations

from pathlib import Path


class BrainsegError(Exception):
    """Base class: the message is complete and meant for the user."""

    exit_code = 2


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


class TrainingStopped(BrainsegError):
    """A training run ended without writing its model file; the message says how to continue it."""

    def __init__(self, run_dir: str | Path, problem: str, *, signalled: bool = False) -> None:
        self.exit_code = 143 if signalled else 1  # 128 + SIGTERM, as a shell reports a killed job
        super().__init__(f"{run_dir}: {problem}")
