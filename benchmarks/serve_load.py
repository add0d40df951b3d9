"""Load check of `brainseg serve` on loopback: N concurrent clients for a bounded time.

Usage: python benchmarks/serve_load.py [--model pretrained] [--clients 4] [--seconds 20]
Starts the server in this process on 127.0.0.1 (a free port), uploads one 256x256 synthetic slice
per request, and prints requests/s, p50/p95 latency and errors. Traffic never leaves loopback.
"""

from __future__ import annotations

import argparse
import io
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
from brainseg.data.synth import synthesize
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
        for clients in args.clients:
            latencies: list[float] = []
            errors: list[str] = []
            started = time.perf_counter()
            deadline = started + args.seconds
            workers = [threading.Thread(target=client_loop, args=(url, payload, deadline, latencies, errors))
                       for _ in range(clients)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            elapsed = time.perf_counter() - started
            ordered = sorted(latencies)
            p95 = ordered[max(0, int(0.95 * len(ordered)) - 1)] if ordered else float("nan")
            rows.append([clients, len(latencies), f"{len(latencies) / elapsed:.2f}",
                         f"{1000 * statistics.median(ordered):.0f}" if ordered else "-", f"{1000 * p95:.0f}",
                         len(errors)])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    print(f"\nmodel: {args.model}; one 256x256 slice per request, {args.seconds:g} s per row\n")
    print_table(["clients", "requests", "requests/s", "p50 ms", "p95 ms", "errors"], rows)


if __name__ == "__main__":
    main()
