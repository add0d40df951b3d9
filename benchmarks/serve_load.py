"""Load check of `brainseg serve` on loopback: N concurrent clients for a bounded time.

Usage: python benchmarks/serve_load.py [--model pretrained] [--clients 4] [--seconds 20] [--bombs 2]
Starts the server in this process on 127.0.0.1 (a free port), uploads one 256x256 synthetic slice
per request, and prints requests/s, p50/p95 latency and errors. With --bombs N, a mixed run follows:
N more clients send small files declaring huge sizes (a 13000x13000 PNG, a 16000x16000 TIFF, a
2048x2048x256 NIfTI) beside the normal clients; it reports the normal requests' p95, how the bombs
were answered, and the process's peak RSS. Traffic never leaves loopback.
"""

from __future__ import annotations

import argparse
import io
import resource
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image

from _common import machine_header, print_table
from brainseg.data.synth import nifti_declaring, png_declaring, synthesize, tiff_declaring
from brainseg.serve import ServeSettings, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_png() -> bytes:
    with tempfile.TemporaryDirectory() as root:
        data = synthesize(Path(root) / "data", patients=1, seed=0)
        patient = next(p for p in data.iterdir() if p.is_dir())
        slices = sorted(p for p in patient.glob("*.tif") if not p.stem.endswith("_mask"))
        image = np.asarray(Image.open(slices[len(slices) // 2]))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


BOMBS = [("bomb.png", png_declaring(13000, 13000)), ("bomb.tif", tiff_declaring(16000, 16000)),
         ("bomb.nii.gz", nifti_declaring((2048, 2048, 256)))]


def bomb_loop(url: str, deadline: float, answers: list[str]) -> None:
    with httpx.Client(timeout=120) as client:
        while time.perf_counter() < deadline:
            for name, content in BOMBS:
                try:
                    answers.append(str(client.post(url, files={"file": (name, content)}).status_code))
                except httpx.HTTPError as error:
                    answers.append(type(error).__name__)


def client_loop(url: str, payload: bytes, deadline: float, latencies: list[float], errors: list[str]) -> None:
    with httpx.Client(timeout=60) as client:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                response = client.post(url, files={"file": ("slice.png", payload, "image/png")})
                if response.status_code != 200:
                    errors.append(str(response.status_code))
                    continue
            except httpx.HTTPError as error:
                errors.append(type(error).__name__)
                continue
            latencies.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pretrained")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--bombs", type=int, default=0,
                        help="Clients sending oversized uploads in a mixed run.")
    args = parser.parse_args()
    print(machine_header())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServeSettings(model=args.model)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/api/predict"
    payload = sample_png()
    rows = []
    try:
        runs = [(clients, 0) for clients in args.clients]
        if args.bombs:
            runs.append((max(args.clients), args.bombs))
        for clients, bombers in runs:
            latencies: list[float] = []
            errors: list[str] = []
            answers: list[str] = []
            started = time.perf_counter()
            deadline = started + args.seconds
            workers = [threading.Thread(target=client_loop, args=(url, payload, deadline, latencies, errors))
                       for _ in range(clients)]
            workers += [threading.Thread(target=bomb_loop, args=(url, deadline, answers))
                        for _ in range(bombers)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            elapsed = time.perf_counter() - started
            ordered = sorted(latencies)
            p95 = ordered[max(0, int(0.95 * len(ordered)) - 1)] if ordered else float("nan")
            bombs = ", ".join(f"{answers.count(a)}x {a}" for a in sorted(set(answers))) or "-"
            rows.append([clients, len(latencies), f"{len(latencies) / elapsed:.2f}",
                         f"{1000 * statistics.median(ordered):.0f}" if ordered else "-", f"{1000 * p95:.0f}",
                         len(errors), bombers, bombs])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    print(f"\nmodel: {args.model}; one 256x256 slice per request, {args.seconds:g} s per row\n")
    print_table(["clients", "requests", "requests/s", "p50 ms", "p95 ms", "errors", "bomb clients",
                 "bomb answers"], rows)
    print(f"\npeak RSS of this process (server and clients): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
