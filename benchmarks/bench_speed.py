"""Training-step and inference speed, and peak memory, of the reference path vs the fast path.

Usage: .venv/bin/python benchmarks/bench_speed.py [--configs 3d_room_small atari_spaceinvaders rooms]
           [--batch 12] [--steps 5] [--warmup 1] [--threads 2] [--tasks train infer]
           [--paths reference fast fast+lowmem] [--scale-bias 0] [--no-memory] [--thp] [--malloc default]
           [--device cpu] [--json FILE]

Variants, all built with the same seed and fed the same random 128 x 128 batch (priors of step 5000);
``rooms``, the default experiment of params.yaml, runs at its own size, batch and optimisers.
At initialisation the boxes are about half the image wide (z_scale ~ sigmoid(0)), the worst case
for windowed compositing; ``--scale-bias -2`` shifts the z_scale means (for all variants alike)
to boxes of ~12% of the image, the size the annealed prior (mean -1 -> -2) drives a model to.

* reference: the SPEC-literal modules (``model.fast_path: false``);
* fast: the default (``model.fast_path: true``): batched glimpse crop, windowed compositing and
  boundary map, split spatial-broadcast decoder in channels_last, the per-glimpse networks in
  chunks of at most 16 MiB per activation (``space.fastpath.glimpse_chunk_size``; 256 glimpses
  of 32 pixels), all activations kept;
* fast+lowmem: the same with ``model.low_memory: true``: z_what_net and glimpse_dec in
  checkpointed chunks of ``space.fastpath.GLIMPSE_CHUNK`` glimpses, and the composition pieces,
  mask decoder and component-decoder blocks recomputed in the backward.

Tasks:

* train: space.training.train_step (forward, backward, joint gradient clip, both optimiser steps
  of space.build_optimizers);
* infer: one forward in deterministic mode under torch.no_grad, in eval mode.

Time: one subprocess per (config, task) holds all variants and alternates them step by step
(order reversed every other step), each step seeded identically for all, so that a shared, noisy
machine slows them alike; the table gives the medians of ``--steps`` steps after ``--warmup``
warm-up steps, the ratio of the first variant's median to each one's ('speed-up'), and the median
over steps of the step-by-step time ratios ('pairwise', robust to load that drifts during the
run). The loss column is a sanity check: the same seed gives the same samples, so the losses
agree to float rounding at the first step (the table's last column). Later training steps drift
apart, faster than one might expect: Adam divides each gradient by its running RMS, so
parameters whose gradient is pure rounding noise (e.g. the conv biases before train-mode
BatchNorm, whose exact gradient is zero) take full-size steps of noise-dependent sign on either
path.

Memory: one fresh subprocess per (config, task, variant) runs ``--warmup`` + 1 steps and reports
the growth of its peak resident set (getrusage ru_maxrss) over them: the high-water mark of one
step, optimiser state included. With ``--device cuda``: the peak of CUDA memory allocated by
tensors (torch.cuda.max_memory_allocated) over those steps, less what the model and batch held
before them; the step times then end with torch.cuda.synchronize, and the device runs with the
original's numerics (space.evaluation.resolve_device: full float32, no TF32), as the stages do.

The subprocesses get OMP_WAIT_POLICY=PASSIVE unless the variable is already set: on a machine
shared with other jobs, OpenMP threads that spin while waiting for a descheduled partner slow
every parallel operation by milliseconds (much more so for code with many small operations),
which measures the machine's load more than the code. ``--thp`` sets THP_MEM_ALLOC_ENABLE=1
(transparent huge pages in PyTorch's CPU allocator) in the subprocesses. ``--malloc heap`` makes
every subprocess call ``space.allocator.retain_freed_memory()`` first, as the train stage does
on CPU (``train.cpu_allocator``); the default, ``--malloc default``, leaves malloc as it is.
Either applies to all variants alike.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

# name -> (model.fast_path, model.low_memory)
VARIANTS = {"reference": (False, False), "fast": (True, False), "fast+lowmem": (True, True)}
PRIOR_STEP = 5000


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _config(config: str, batch: int):
    """(ModelConfig, batch, optimiser settings) of an original configuration, or of an experiment
    of params.yaml (e.g. the default ``rooms``: its own image size, batch and optimisers)."""
    import space
    from space.config import ORIGINAL_CONFIGS
    from space.experiment import load_experiment

    if config in ORIGINAL_CONFIGS:
        return space.original_config(config)[0], batch, {}
    exp = load_experiment(ROOT / "params.yaml", config)
    t = exp.train
    return exp.model, t.batch_size, dict(fg_optim=t.fg_optim, fg_lr=t.fg_lr, bg_optim=t.bg_optim, bg_lr=t.bg_lr)


def _setup(config: str, path: str, batch: int, scale_bias: float, device: str = "cpu"):
    """A model (seed 0) with its optimisers, the batch and the priors, on ``device``."""
    import dataclasses

    import torch

    import space

    fast_path, low_memory = VARIANTS[path]
    cfg, batch, optim = _config(config, batch)
    cfg = dataclasses.replace(cfg, fast_path=fast_path, low_memory=low_memory)
    torch.manual_seed(0)
    model = space.build_model(cfg)
    with torch.no_grad():  # shift the pre-sigmoid z_scale means (x, y): smaller or larger boxes
        model.fg_module.img_encoder.z_scale_net.bias[:2] += scale_bias
    size = model.cfg.image_size
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    model.to(device)
    return model, space.build_optimizers(model, **optim), x, space.priors_at(model.cfg, PRIOR_STEP)


def _step(task: str, model, optimizers, x, priors, seed: int) -> float:
    """One seeded training step or inference forward; returns the loss."""
    import torch

    from space.training import train_step

    torch.manual_seed(seed)
    if task == "train":
        out, _ = train_step(model, optimizers, x, priors, 1.0)
    else:
        model.eval()
        with torch.no_grad():
            out = model(x, priors, mode="deterministic")
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return out.loss.item()


def time_worker(config: str, task: str, batch: int, steps: int, warmup: int, paths: list[str],
                scale_bias: float, device: str) -> dict:
    """All paths in one process, alternating; per-path step times and losses."""
    setups = {path: _setup(config, path, batch, scale_bias, device) for path in paths}
    times: dict = {path: [] for path in paths}
    losses: dict = {path: [] for path in paths}
    for i in range(warmup + steps):
        for path in (paths if i % 2 == 0 else paths[::-1]):
            start = time.perf_counter()
            losses[path].append(_step(task, *setups[path], seed=1000 + i))
            times[path].append(time.perf_counter() - start)
    return {"times_s": times, "losses": losses,
            "median_s": {path: statistics.median(times[path][warmup:]) for path in paths}}


def memory_worker(config: str, path: str, task: str, batch: int, warmup: int, scale_bias: float,
                  device: str) -> dict:
    """Peak RSS growth (CUDA: peak allocated growth) over warmup + 1 steps of one path, in a fresh process."""
    import torch

    setup = _setup(config, path, batch, scale_bias, device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = _maxrss_mib()
    for i in range(warmup + 1):
        _step(task, *setup, seed=1000 + i)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _maxrss_mib()
    return {"peak_mib": peak - base}


def run_child(args: argparse.Namespace, *worker_args: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", *worker_args, "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--scale-bias", str(args.scale_bias),
           "--malloc", args.malloc, "--device", args.device, "--paths", *args.paths]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["3d_room_small", "atari_spaceinvaders", "rooms"],
                        help="original configurations (at --batch, 128 x 128), or experiments of params.yaml "
                             "(their own image size, batch and optimisers; 'rooms' is the default)")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--paths", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="variants; the first is the baseline of the ratios")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--scale-bias", type=float, default=0.0,
                        help="added to the z_scale mean head's bias: boxes are about half the image at "
                             "initialisation (0); -2 gives boxes of ~12%% of it, as a trained model's")
    parser.add_argument("--thp", action="store_true", help="set THP_MEM_ALLOC_ENABLE=1 in the subprocesses")
    parser.add_argument("--malloc", choices=["default", "heap"], default="default",
                        help="heap: the subprocesses keep freed memory (space.allocator, as the train stage on CPU)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:N (the step times then synchronise) or auto (CUDA when present)")
    parser.add_argument("--json", type=Path, help="also write all measurements here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        from space.allocator import retain_freed_memory

        if args.malloc == "heap" and not retain_freed_memory():
            raise SystemExit("--malloc heap: mallopt is not available here")

        torch.set_num_threads(args.threads)
        from space.evaluation import resolve_device

        resolve_device(args.device)  # on CUDA: the original's numerics (no TF32), as the stages run
        kind, *rest = args.worker
        if kind == "time":
            result = time_worker(*rest, args.batch, args.steps, args.warmup, args.paths, args.scale_bias, args.device)
        else:
            result = memory_worker(*rest, args.batch, args.warmup, args.scale_bias, args.device)
        print(json.dumps(result))
        return

    from space.evaluation import resolve_device

    try:
        # here first: a device that is not there fails in one line, not in a worker; 'auto' becomes the one it picks
        args.device = str(resolve_device(args.device))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"batch {args.batch}, 128 x 128 (params.yaml experiments: their own), torch threads {args.threads}, median of {args.steps} steps after "
          f"{args.warmup} warm-up, z_scale bias {args.scale_bias:+g}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, "
          f"THP_MEM_ALLOC_ENABLE={'1' if args.thp else 'unset'}, malloc {args.malloc}, device {args.device}",
          flush=True)
    results: dict = {}
    for config in args.configs:
        for task in args.tasks:
            r = results[config, task] = run_child(args, "time", config, task)
            r["peak_mib"] = {}
            for path in args.paths:
                print(f"  {config} {task} {path:11s} times (s): {', '.join(f'{t:.2f}' for t in r['times_s'][path])}; "
                      f"losses: {', '.join(f'{v:.7g}' for v in r['losses'][path])}", flush=True)
            if not args.no_memory:
                for path in args.paths:
                    r["peak_mib"][path] = run_child(args, "memory", config, path, task)["peak_mib"]
                what = "peak RSS growth" if args.device == "cpu" else "peak allocated growth"
                print(f"  {config} {task} {what} (MiB): "
                      + ", ".join(f"{path} {mib:.0f}" for path, mib in r["peak_mib"].items()), flush=True)
    print()
    base = args.paths[0]
    header = (f"{'config':20s} {'task':5s} {'path':11s} {'median s':>9s} {'speed-up':>8s} {'pairwise':>8s} "
              f"{'peak MiB':>9s} {'mem/ref':>8s} {'step-1 loss rel. diff':>21s}")
    print(header)
    print("-" * len(header))
    for config in args.configs:
        for task in args.tasks:
            r = results[config, task]
            for path in args.paths:
                seconds = r["median_s"][path]
                first, first_base = r["losses"][path][0], r["losses"][base][0]
                loss_diff = abs(first - first_base) / max(abs(first_base), 1e-12)
                mib = r["peak_mib"].get(path)
                mem = f"{mib:9.0f} {mib / r['peak_mib'][base]:8.3f}" if mib is not None else f"{'-':>9s} {'-':>8s}"
                pairwise = statistics.median(b / p for b, p in zip(r["times_s"][base][args.warmup:],
                                                                   r["times_s"][path][args.warmup:]))
                print(f"{config:20s} {task:5s} {path:11s} {seconds:9.2f} {r['median_s'][base] / seconds:7.2f}x "
                      f"{pairwise:7.2f}x {mem} {loss_diff:21.2e}")
    if args.json:
        args.json.write_text(json.dumps({"|".join(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
