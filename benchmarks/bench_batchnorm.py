"""BatchNorm's backward on channels_last CPU maps: torch's kernel against NCHW copies, and what
that does to whole training steps.

Usage: .venv/bin/python benchmarks/bench_batchnorm.py [--configs rooms 3d_room_small] [--steps 16]
           [--threads 2] [--channels 4 8 16 24 32]

First, for a (48, C, 66, 66) map (the default experiment's component decoder: B * K = 48 maps of
the 64-pixel image plus its padding) and each C: the median time of torch's BatchNorm backward on
the channels_last map, and of the same backward on NCHW copies of the map and its gradient, the
input's gradient copied back to channels_last (what ``space.fastpath.batch_norm_cl`` does).

Then, per config: training steps of the fast path (``bench_speed.py``'s set-up: seed 0, one
random batch) with ``space.fastpath`` choosing as it does ('new') and with every BatchNorm left to
torch ('old'), alternating step by step in one process (order reversed every other step) after
three warm-up steps; printed are both medians and the median of the step-by-step ratios old / new.
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

import space.fastpath as fastpath  # noqa: E402
from space.allocator import retain_freed_memory  # noqa: E402


def _median_ms(fn, repeats: int = 7) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernels(channels: list[int]) -> None:
    print(f"BatchNorm backward, (48, C, 66, 66), torch threads {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'C':>4} {'channels_last ms':>17} {'via NCHW ms':>12} {'ratio':>6}")
    for c in channels:
        x = torch.randn(48, c, 66, 66).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(48, c, 66, 66).contiguous(memory_format=torch.channels_last)
        weight = torch.rand(c) + 0.5
        _, mean, invstd = torch.native_batch_norm(x, weight, None, None, None, True, 0.1, 1e-5)
        mask = [True, True, True]
        native = _median_ms(lambda: torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, 1e-5, mask))
        nchw = _median_ms(lambda: torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x.contiguous(), weight, None, None, mean, invstd, True, 1e-5, mask)[0]
            .contiguous(memory_format=torch.channels_last))
        print(f"{c:>4} {native:>17.2f} {nchw:>12.2f} {native / nchw:>5.2f}x")


def steps(config: str, n: int) -> None:
    model, optimizers, x, priors = _setup(config, "fast", 12, 0.0)
    choose = fastpath._nchw_backward_pays
    never = lambda *args: False  # noqa: E731
    for i in range(3):
        _step("train", model, optimizers, x, priors, i)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(n):
        for name in ("new", "old") if i % 2 else ("old", "new"):
            fastpath._nchw_backward_pays = choose if name == "new" else never
            start = time.perf_counter()
            _step("train", model, optimizers, x, priors, i)
            times[name].append(time.perf_counter() - start)
    fastpath._nchw_backward_pays = choose
    ratio = statistics.median(o / w for o, w in zip(times["old"], times["new"]))
    print(f"{config:<20} old {statistics.median(times['old']):.3f} s  new {statistics.median(times['new']):.3f} s  "
          f"old / new {ratio:.3f} (median of {n} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["rooms"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="*", default=[4, 8, 16, 24, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the train stage does on CPU
    kernels(args.channels)
    print("\ntraining steps, fast path, batch 12 (rooms: its own batch and size)")
    for config in args.configs:
        steps(config, args.steps)


if __name__ == "__main__":
    main()
