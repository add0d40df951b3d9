"""One progress bar for every long job: tqdm on stderr, or the plain iterable when switched off."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress(items: Iterable, *, desc: str, unit: str, enabled: bool = True, total: int | None = None):
    if not enabled:
        return items
    return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


class _Silent:
    """What `counter` gives when progress is off: the same calls, doing nothing but passing messages on."""

    n = 0

    def __init__(self, echo) -> None:
        self.echo = echo

    def update(self, count: int = 1) -> None:
        self.n += count

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def counter(total: int, *, desc: str, unit: str, enabled: bool = True, echo=print):
    """A bar updated by hand (`update(n)`, `set_postfix_str(name)`), with `say(message)` printing a
    message on its own line above it; off, the same calls print only the messages through `echo`."""
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) if enabled \
        else _Silent(echo)
    bar.say = (lambda message: tqdm.write(message, file=sys.stderr)) if enabled else echo
    return bar
