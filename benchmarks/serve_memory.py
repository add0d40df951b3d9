"""Memory of `brainseg serve` under hostile and careless uploads, measured from outside the server.

Usage: python benchmarks/serve_memory.py [--model pretrained] [--limit-mb 1500]
Starts `brainseg serve` as its own process on 127.0.0.1, sends one normal 256x256 slice, then each
hostile case once (small files declaring huge images or volumes, malformed zips, and the largest
uploads the default limits let through), each followed by a normal slice. For every case it prints
the answer, the server's resident memory (VmRSS) after it, and its peak so far (VmHWM), read from
/proc, so the numbers are the server's alone. Exit 1 if the peak passes --limit-mb.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import tifffile
from PIL import Image

from _common import machine_header, print_table
from brainseg.data.io import MAX_SLICE_PIXELS
from brainseg.data.synth import (
    jpeg_declaring,
    malformed_zips,
    nifti_declaring,
    png_declaring,
    tiff_declaring,
    zip_of,
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _nifti(shape: tuple[int, ...]) -> bytes:
    # smooth content compresses like a real scan does, so the upload stays under the 50 MB limit
    volume = (np.indices(shape).sum(axis=0) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    image = nib.Nifti1Image(volume, np.eye(4))
    image.to_file_map({"image": nib.FileHolder(fileobj=buffer), "header": nib.FileHolder(fileobj=buffer)})
    import gzip

    return gzip.compress(buffer.getvalue(), compresslevel=1)


def cases() -> list[tuple[str, str, bytes]]:
    """(what, file name, content) of every upload sent, the largest allowed ones last."""
    rng = np.random.default_rng(0)
    slice_tif = io.BytesIO()
    tifffile.imwrite(slice_tif, rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    side = int(MAX_SLICE_PIXELS ** 0.5)
    biggest = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    listed = [("PNG declaring 13000x13000", "bomb.png", png_declaring(13000, 13000)),
              ("JPEG declaring 60000x60000", "bomb.jpg", jpeg_declaring(60000, 60000)),
              ("TIFF declaring 16000x16000", "bomb.tif", tiff_declaring(16000, 16000)),
              ("NIfTI declaring 2048x2048x256", "bomb.nii.gz", nifti_declaring((2048, 2048, 256))),
              ("NIfTI declaring 1024x1024x150x3", "bomb4d.nii.gz", nifti_declaring((1024, 1024, 150, 3))),
              ("NIfTI with no slices", "empty.nii.gz", nifti_declaring((64, 64, 0))),
              ("zip of a TIFF bomb", "bombs.zip", zip_of({"p/p_1.tif": tiff_declaring(16000, 16000)}))]
    listed += [(f"zip: {name[:-4].replace('_', ' ')}", name, content)
               for name, content in malformed_zips("p/p_1.tif", slice_tif.getvalue()).items()]
    listed += [(f"largest slice allowed: {side}x{side} RGB PNG", "big.png", _png(biggest)),
               ("largest 3D volume allowed: 512x512x200 NIfTI", "volume.nii.gz", _nifti((512, 512, 200))),
               ("largest 4D volume allowed: 512x512x85x3 NIfTI", "volume4d.nii.gz",
                _nifti((512, 512, 85, 3)))]
    return listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pretrained")
    parser.add_argument("--limit-mb", type=float, default=1500.0)
    args = parser.parse_args()
    print(machine_header())
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "brainseg.cli", "serve", "--model", args.model,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        with httpx.Client(timeout=300) as client:
            for _ in range(600):
                try:
                    if client.get(f"{url}/api/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            # equal channels: a 1-channel model takes it as greyscale, a 3-channel one as a single sequence
            grey = np.random.default_rng(1).integers(0, 255, (256, 256, 1), dtype=np.uint8)
            normal = _png(np.repeat(grey, 3, axis=-1))

            def send(name: str, content: bytes) -> tuple[str, float]:
                started = time.perf_counter()
                response = client.post(f"{url}/api/predict", files={"file": (name, content)})
                detail = "" if response.status_code == 200 else response.json().get("detail", "")
                return f"{response.status_code} {detail}"[:60], time.perf_counter() - started

            answer, _ = send("slice.png", normal)
            rss, peak = _memory_mb(server.pid)
            rows.append(["normal 256x256 slice (first)", "-", answer, f"{rss:.0f}", f"{peak:.0f}", "-"])
            for what, name, content in cases():
                answer, seconds = send(name, content)
                rss, peak = _memory_mb(server.pid)
                after, _ = send("slice.png", normal)
                after_rss, _ = _memory_mb(server.pid)
                rows.append([what, f"{len(content) / 1024:.0f} KB", f"{answer} ({seconds:.1f} s)",
                             f"{rss:.0f}", f"{peak:.0f}", f"{after.split()[0]}, {after_rss:.0f} MB"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\nmodel: {args.model}; server pid {server.pid}; memory read from /proc/PID/status\n")
    print_table(["upload", "size", "answer (time)", "RSS after, MB", "peak so far, MB",
                 "next normal slice: status, RSS"], rows)
    peak = max(float(row[4]) for row in rows)
    verdict = "ok" if peak <= args.limit_mb else "OVER"
    print(f"\nserver peak {peak:.0f} MB; limit {args.limit_mb:.0f} MB: {verdict}")
    if peak > args.limit_mb:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
