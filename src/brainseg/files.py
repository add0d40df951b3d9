"""Writing a file so that a failure never leaves it half written, and the PNGs that predictions write."""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from brainseg.errors import BadInputError

# `replacing` names its temporary file .NAME.PID.RANDOM.partial, so that one left by a killed process
# can be told from one that a running process is still writing.
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.partial$")


class WriteError(BadInputError):
    """A file could not be written (a full disk, no permission): the message names the file meant,
    never a temporary one."""

    def __init__(self, path: str | Path, error: OSError) -> None:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        super().__init__(path, f"could not write ({reason.splitlines()[0]})")


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """`path`, with any OSError while the block writes it made a WriteError naming it."""
    try:
        yield path
    except OSError as error:
        raise WriteError(path, error) from None


# zlib level 1: a 256x256 RGB overlay encodes about 4x faster than at Pillow's default (6), for a file
# about 15% larger; with one network, encoding at 6 took longer than predicting.
PNG_COMPRESS_LEVEL = 1


def png_bytes(array: np.ndarray) -> bytes:
    """`array` (H x W greyscale or H x W x 3 RGB, uint8) as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_png(path: Path, array: np.ndarray) -> None:
    """Write `array` as a PNG at `path` (its folder made if needed); a failure names `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        path.write_bytes(png_bytes(array))


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; moved over `path` only when the block completes, with
    the replaced file's mode (or a new file's under the umask). If the block fails, `path` is as it was
    and the temporary file is gone."""
    remove_stale_partials(path.parent)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial",
                                       dir=path.parent)
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


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the temporary files that `replacing` left in `folder` when its process was killed (those of
    a process still running are kept); returns the files removed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if match and not _running(int(match["pid"])):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True
