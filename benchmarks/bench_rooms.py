"""Throughput of the procedural room generator at 128 x 128.

Usage: .venv/bin/python benchmarks/bench_rooms.py [--images N] [--workers W ...]

Prints images/s for rendering alone and for the full generator (render + PNG
+ box files) with each worker count. On a busy machine the wall-clock rates
drop; the per-CPU-second rates of the single-process runs do not, and times
the number of idle cores bound what the workers can reach.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from space.data.rooms import generate_rooms, image_seed, render_room  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    render_room(np.random.default_rng(0), image_size=args.image_size)  # warm up
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(args.images):
        render_room(np.random.default_rng(image_seed(0, "train", i)), image_size=args.image_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"render only, 1 process: {args.images / wall:7.1f} images/s wall, "
          f"{args.images / cpu:7.1f} images/s per CPU second")

    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            wall, cpu = time.perf_counter(), time.process_time()
            generate_rooms(Path(tmp) / "rooms", image_size=args.image_size, num_train=args.images, num_val=0,
                           num_test=0, num_workers=workers, progress=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        # With workers the parent's CPU time says nothing: report wall clock only.
        per_cpu = f", {args.images / cpu:7.1f} images/s per CPU second" if workers == 1 else ""
        print(f"generate_rooms, {workers} worker(s): {args.images / wall:7.1f} images/s wall{per_cpu} "
              f"(PNG + box files included)")


if __name__ == "__main__":
    main()
