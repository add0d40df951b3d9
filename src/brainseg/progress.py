"""One progress bar for every long job: tqdm on stderr, or the plain iterable when switched off."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress(items: Iterable, *, desc: str, unit: str, enabled: bool = True, total: int | None = None):
    if not enabled:
        return items
    return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
