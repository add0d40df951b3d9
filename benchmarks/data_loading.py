"""Time indexing and reading a data set: first (uncached) read, cached reads, CLI start-up.

Usage: python benchmarks/data_loading.py [DATA_DIR]   (default: ../shared/data/lgg)
Each timing runs in a fresh process, so the cached read includes opening the cache from disk.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, machine_header, print_table

READ = ("import sys, time; t = time.perf_counter(); from brainseg.data.index import scan; "
        "r = scan(sys.argv[1]); s = r.store; "
        "n = sum(int(s.image(k)[0, 0, 0]) + int(s.mask(k)[0, 0]) >= 0 for k in r.table.image_path); "
        "print(time.perf_counter() - t, r.from_cache, len(r.table), n)")


def timed_read(data: Path, cache: Path) -> tuple[float, bool, int]:
    env = {**os.environ, "BRAINSEG_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", READ, str(data)], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return float(out[0]), out[1] == "True", int(out[2])


def timed_help() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "brainseg.cli", "--help"], capture_output=True, check=True)
    return time.perf_counter() - started


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else SHARED_DATA / "lgg"
    if not data.exists():
        sys.exit(f"no data at {data}: pass a data folder")
    print(machine_header())
    print(f"data: {data}\n")
    with tempfile.TemporaryDirectory() as cache:
        first, cached, slices = timed_read(data, Path(cache))
        assert not cached
        again = [timed_read(data, Path(cache)) for _ in range(5)]
        assert all(hit for _, hit, _ in again)
    helps = [timed_help() for _ in range(5)]
    rows = [["first read (decode every file, build the cache)", f"{first:.2f}", slices],
            ["second read (cache, median of 5)", f"{statistics.median(t for t, _, _ in again):.2f}", slices],
            ["`brainseg --help` start-up (median of 5)", f"{statistics.median(helps):.2f}", "-"]]
    print_table(["what", "seconds", "slices"], rows)


if __name__ == "__main__":
    main()
