"""Helpers shared by the benchmark scripts: the machine header and a plain table printer."""

from __future__ import annotations

import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BRAINSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_header() -> str:
    lines = [f"cpu: {cpu_model()} ({os.cpu_count()} logical cores)",
             f"python: {platform.python_version()}"]
    try:
        import torch

        lines.append(f"torch: {torch.__version__}, threads: {torch.get_num_threads()}")
    except ImportError:
        pass
    return "\n".join(lines)


def print_table(headers: list[str], rows: list[list]) -> None:
    """A Markdown table, so the output can be pasted into docs/benchmarks.md as it is."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
