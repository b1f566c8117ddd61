"""Does SPACE compute the same on a GPU? Fast path against reference path there, and the GPU against the CPU.

Usage: python benchmarks/check_device.py [--device cuda] [--configs 3d_room_small atari_spaceinvaders]
           [--batch 4]

For each original configuration (128 x 128, G = 8 and G = 16), one model (seed 0) is built on
the CPU and copied; a training forward in sample mode (same seed, hence the same draws on one
device) and its backward are run:

* on ``--device``, reference path (``model.fast_path: false``) against fast path, in float64:
  the loss and every parameter gradient to 1e-9 relative (the same function), and in float32:
  the loss and the reconstruction to 1e-5 (the tests' tolerance on the CPU);
* deterministic mode, float64, fast path: ``--device`` against the CPU, loss and every parameter
  gradient to 1e-9 (the draws differ between devices, so sample mode is not compared there);
* one bf16-autocast training forward (``train.amp: bf16``) on ``--device``: its loss against the
  float32 loss, printed (bf16 changes the numbers by design).

The GPU runs with the original's numerics (space.evaluation.use_original_cuda_numerics: no TF32).
Runs every comparison, then names each that failed and exits non-zero if any did. The CPU tests (tests/test_fastpath.py)
check the same on the CPU; CI has no GPU, hence this script.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import space  # noqa: E402
from space.evaluation import resolve_device  # noqa: E402
from space.layers import biases_before_batchnorm  # noqa: E402
from space.schedules import priors_at  # noqa: E402
from space.training import autocast  # noqa: E402

FAILURES: list[str] = []


def compare(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    """The largest |got - want| / (|want| + max(1, max |want|)): at most ``tol`` is the tests'
    allclose(rtol=tol, atol=tol * max(1, max |want|)); a failure is recorded above it."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = max(1.0, want.abs().max().item())
    worst = ((got - want).abs() / (want.abs() + scale)).max().item() if want.numel() else 0.0
    if not (got.shape == want.shape and torch.isfinite(got).all() and worst <= tol):
        FAILURES.append(f"{what}: relative difference {worst:.3g} > {tol:g}")
    return worst


def forward_backward(model, x, priors, mode: str, seed: int, amp: str = "none"):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with autocast(x.device, amp):
        out = model(x, priors, mode)
    out.loss.backward()
    return out


def grads(model) -> dict[str, torch.Tensor]:
    noise = biases_before_batchnorm(model)  # exact gradient zero: rounding noise on either path
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and n not in noise}


def check_config(name: str, device: torch.device, batch: int) -> None:
    cfg = space.original_config(name)[0]
    torch.manual_seed(0)
    ref_cpu = space.build_model(dataclasses.replace(cfg, fast_path=False))
    priors = priors_at(cfg, 5000)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))

    def on(model_cfg_fast: bool, dtype: torch.dtype, where: torch.device):
        model = space.build_model(dataclasses.replace(cfg, fast_path=model_cfg_fast))
        model.load_state_dict(ref_cpu.state_dict())
        return model.to(where, dtype)

    start = time.perf_counter()
    worst = {}
    # Reference against fast on the device: float64 (every gradient) and float32 (loss and image).
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        ref, fast = on(False, dtype, device), on(True, dtype, device)
        a = forward_backward(ref, x.to(device, dtype), priors, "sample", seed=3)
        b = forward_backward(fast, x.to(device, dtype), priors, "sample", seed=3)
        tag = f"{name} {device.type} fast vs reference {str(dtype)[6:]}"
        worst[f"{str(dtype)[6:]} loss"] = compare(f"{tag} loss", b.loss, a.loss, tol)
        worst[f"{str(dtype)[6:]} y"] = compare(f"{tag} y", b.y, a.y, tol)
        if dtype == torch.float64:
            ga, gb = grads(ref), grads(fast)
            if ga.keys() != gb.keys():
                FAILURES.append(f"{tag}: gradients of {sorted(ga.keys() ^ gb.keys())} on one path only")
            worst["float64 grads"] = max(compare(f"{tag} d/d{n}", gb[n], ga[n], tol) for n in ga.keys() & gb.keys())
        float32_loss = b.loss.item()
    # The device against the CPU: deterministic mode (no draws), float64, fast path.
    cpu, dev = on(True, torch.float64, torch.device("cpu")), on(True, torch.float64, device)
    a = forward_backward(cpu, x.double(), priors, "deterministic", seed=3)
    b = forward_backward(dev, x.to(device, torch.float64), priors, "deterministic", seed=3)
    tag = f"{name} {device.type} vs cpu float64 deterministic"
    worst["device vs cpu loss"] = compare(f"{tag} loss", b.loss, a.loss, 1e-9)
    ga, gb = grads(cpu), grads(dev)
    worst["device vs cpu grads"] = max(compare(f"{tag} d/d{n}", gb[n], ga[n], 1e-9) for n in ga.keys() & gb.keys())
    # bf16 autocast on the device: printed, not compared (it rounds by design).
    bf16 = forward_backward(on(True, torch.float32, device), x.to(device), priors, "sample", seed=3, amp="bf16")
    print(f"{name} (G = {cfg.G}, batch {batch}) on {device}: largest relative differences "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
          + f"; bf16-autocast loss {bf16.loss.item():.6g} against float32 {float32_loss:.6g} "
          f"({abs(bf16.loss.item() - float32_loss) / abs(float32_loss):.2e} relative); "
          f"{time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", nargs="+", default=["3d_room_small", "atari_spaceinvaders"])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as error:  # e.g. no CUDA here: one line, not a traceback
        raise SystemExit(f"error: {error}") from None
    if device.type == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, "
              f"cudnn {torch.backends.cudnn.version()}, TF32 for convolutions {torch.backends.cudnn.allow_tf32}")
    torch.distributions.Distribution.set_default_validate_args(False)
    for name in args.configs:
        check_config(name, device, args.batch)
    if FAILURES:
        print("FAILED:\n  " + "\n  ".join(FAILURES))
        raise SystemExit(1)
    print("all comparisons within tolerance")


if __name__ == "__main__":
    main()
