"""Writing a file so that a failure never leaves it half written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; moved over `path` only when the block completes, with
    the replaced file's mode (or a new file's under the umask). If the block fails, `path` is as it was
    and the temporary file is gone."""
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    partial = Path(partial)
    try:
        yield partial
        os.chmod(partial, _new_file_mode(path))  # mkstemp makes it private (0600)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _new_file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
