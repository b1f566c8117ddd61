"""How much of a training step the glimpse networks take, and the speed-up that leaves possible.

Usage: .venv/bin/python benchmarks/bench_glimpse.py [--configs 3d_room_small atari_spaceinvaders]
           [--batch 12] [--steps 3] [--threads 2]

z_what_net (the glimpse encoder) and glimpse_dec run on every one of the B * G * G cells, on every
path alike: they are the SPEC's own computation, not overhead the fast path can remove. This script
times, in one process and alternating: a reference training step, a fast+lowmem training step, and
the forward and backward of the two glimpse networks alone on B * G * G glimpses (in chunks of
``space.fastpath.GLIMPSE_CHUNK``, as fast+lowmem runs them). It prints the medians, the glimpse
networks' share of the fast+lowmem step, and reference step / glimpse networks: the speed-up a path
would reach if everything else cost nothing. It also prints a 3 x 3 convolution's rate in GFLOP/s,
which tells machines apart: the glimpse networks are almost all convolutions.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_speed import _setup, _step  # noqa: E402

from space.fastpath import GLIMPSE_CHUNK  # noqa: E402


def conv_gflops(repeats: int = 5) -> float:
    """Forward rate of a 3 x 3, 64 -> 64 convolution on a (32, 64, 64, 64) batch."""
    x, conv = torch.randn(32, 64, 64, 64), torch.nn.Conv2d(64, 64, 3, padding=1)
    with torch.no_grad():
        conv(x)
        start = time.perf_counter()
        for _ in range(repeats):
            conv(x)
    return 2 * 32 * 64 * 64 * 64 * 64 * 9 * repeats / (time.perf_counter() - start) / 1e9


def glimpse_step(model, x: torch.Tensor) -> float:
    """Forward and backward of z_what_net and glimpse_dec on B*N random glimpses; seconds."""
    fg = model.fg_module
    cfg = model.cfg
    n, h = x.size(0) * cfg.num_cells, cfg.glimpse_size
    glimpses = torch.rand(n, 3, h, h, generator=torch.Generator().manual_seed(2))
    z_what = torch.randn(n, cfg.z_what_dim, generator=torch.Generator().manual_seed(3))
    start = time.perf_counter()
    for i in range(0, n, GLIMPSE_CHUNK):
        g = glimpses[i:i + GLIMPSE_CHUNK].requires_grad_()
        mean, std = fg.z_what_net(g)
        o, alpha = fg.glimpse_dec(z_what[i:i + GLIMPSE_CHUNK].requires_grad_())
        (mean.sum() + std.sum() + o.sum() + alpha.sum()).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["3d_room_small", "atari_spaceinvaders"])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, 128 x 128 (params.yaml experiments: their own), torch threads {args.threads}, median of {args.steps} after 1 warm-up; "
          f"3x3 conv {conv_gflops():.0f} GFLOP/s")
    print(f"{'config':20s} {'reference s':>11s} {'fast+lowmem s':>13s} {'glimpse nets s':>14s} "
          f"{'share':>6s} {'ref/glimpse':>11s}")
    for config in args.configs:
        runs = {path: _setup(config, path, args.batch, 0.0) for path in ("reference", "fast+lowmem")}
        times = {"reference": [], "fast+lowmem": [], "glimpse": []}
        for step in range(args.steps + 1):
            for path, (model, optimizers, x, priors) in runs.items():
                start = time.perf_counter()
                _step("train", model, optimizers, x, priors, step)
                if step:
                    times[path].append(time.perf_counter() - start)
            seconds = glimpse_step(runs["fast+lowmem"][0], runs["fast+lowmem"][2])
            if step:
                times["glimpse"].append(seconds)
        ref, fast, glimpse = (statistics.median(times[k]) for k in ("reference", "fast+lowmem", "glimpse"))
        print(f"{config:20s} {ref:11.2f} {fast:13.2f} {glimpse:14.2f} {glimpse / fast:6.2f} {ref / glimpse:10.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
