"""Evaluation: average precision, object counting and reconstruction over a dataset (SPEC 9).

Differences from the original, on purpose:
* Deterministic inference by default (every Normal latent at its mean, z_pres at its median),
  so that metrics do not depend on noise; ``mode='sample'`` gives the original's behaviour.
* Images without ground-truth objects are left out of the counting error rate instead of
  crashing it (see ``space.metrics.count_metrics``).
* A last batch of size 1 works (the original's ``squeeze()`` dropped the batch dimension).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .geometry import z_where_to_boxes
from .metrics import DetectionAccumulator
from .model import Space, SpaceOutput
from .schedules import Priors, final_priors

PRESENCE_THRESHOLD = 0.5  # a cell is an object when z_pres_prob > 0.5 (strict, SPEC 9.2)

# Background-failure rule (see bg_failure_verdict).
MIN_FG_EXPLAINED = 0.05  # the foreground must remove at least 5 % of the background-only error
MIN_MEAN_OBJECTS = 0.25  # and find objects in a fair share of the images
MAX_ALPHA_COVERAGE = 0.5  # the foreground must not cover most of the image
RESEED_REMEDY = ("reseed and retrain: dvc exp run -S train.seed=2 (or queue several: "
                 "for s in 2 3 4; do dvc exp run --queue -S train.seed=$s; done; dvc queue start)")


def bg_failure_verdict(fg_explained: float, mean_objects: float, alpha_coverage: float) -> tuple[bool, str]:
    """Whether the background absorbed the objects, or the foreground the background.

    Rule, in this order:

    1. the foreground took over the background when its mean alpha exceeds MAX_ALPHA_COVERAGE,
       or when it finds objects (at least MIN_MEAN_OBJECTS per image) yet makes the
       reconstruction worse than the background alone (fg_explained < 0: spurious objects
       pasted over a background that was right);
    2. the background absorbed the objects when the foreground removes less than
       MIN_FG_EXPLAINED of the error the background alone leaves
       (fg_explained = 1 - SSE(reconstruction) / SSE(background alone)), or finds fewer than
       MIN_MEAN_OBJECTS objects per image.

    Returns (failure, reason).
    """
    summary = (f"foreground explains {fg_explained:.1%} of the background-only error, "
               f"{mean_objects:.2f} objects per image, alpha covers {alpha_coverage:.1%}")
    if alpha_coverage > MAX_ALPHA_COVERAGE or (mean_objects >= MIN_MEAN_OBJECTS and fg_explained < 0):
        return True, f"the foreground took over the background ({summary})"
    if fg_explained < MIN_FG_EXPLAINED or mean_objects < MIN_MEAN_OBJECTS:
        return True, f"the background absorbed the objects ({summary})"
    return False, summary


def predicted_boxes(out: SpaceOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, the boxes [y_min, y_max, x_min, x_max] (normalised) and confidences of present cells."""
    boxes = z_where_to_boxes(out.z_where)  # (B, N, 4)
    prob = out.z_pres_prob[..., 0]  # (B, N)
    present = prob > PRESENCE_THRESHOLD
    return [(boxes[b][present[b]], prob[b][present[b]]) for b in range(prob.size(0))]


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU. On CUDA, also :func:`use_original_cuda_numerics`.

    Raises ValueError, naming the device, for a string torch does not read as a device and for a
    CUDA or MPS device this machine does not have (instead of torch's failure at the first tensor moved)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):  # not 'meta', which holds no values
        raise ValueError(f"device {device!r} is not one to train or evaluate on: use 'auto', 'cpu', 'cuda' or "
                         f"'cuda:N' (train.device, evaluate.device)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here (torch "
                             f"{torch.__version__}); use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} asked for, but this machine has {count} CUDA device(s): "
                             f"cuda:0 to cuda:{count - 1}")
        use_original_cuda_numerics()
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS (Apple's GPUs) is not available here; "
                         f"use 'auto' or 'cpu'")
    return resolved


def use_original_cuda_numerics() -> None:
    """The original's GPU settings: cuDNN deterministic, without autotuning (SPEC 0, set with the
    seed), and full float32: PyTorch 1.3 had no TF32, which modern PyTorch enables by default for
    cuDNN convolutions on Ampere and later GPUs (10 mantissa bits instead of 23). For speed at
    slightly different numbers, ``train.amp: bf16`` is the switch."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@torch.no_grad()
def evaluate(model: Space, dataset: Dataset, batch_size: int = 12, mode: str = "deterministic",
             num_images: int | None = None, device: str | torch.device = "cpu", num_workers: int = 0,
             progress: bool = True, desc: str = "evaluate", priors: Priors | None = None) -> dict[str, Any]:
    """Evaluate a model on the first ``num_images`` images of a dataset, in order.

    Args:
        model: a SPACE model; it is put in eval mode (BatchNorm running statistics) and restored.
        dataset: yields image tensors; if it has ``has_boxes`` true, ``dataset.boxes(i)`` gives
            the ground truth in the normalised [y_min, y_max, x_min, x_max] convention.
        priors: the step-dependent values the forward takes (default: their final values, t = 1e8,
            as the original's AP evaluation; its validation MSE takes the current step's).
    Returns:
        a JSON-safe dict: 'mse' (mean per-image sum of squared errors, as the original), 'elbo',
        'num_images', and with ground truth the AP and counting metrics of ``space.metrics``.
    """
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    subset = Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    has_boxes = bool(getattr(dataset, "has_boxes", False))
    accumulator = DetectionAccumulator() if has_boxes else None
    priors = final_priors(model.cfg) if priors is None else priors
    was_training = model.training
    model.eval()
    sums = {"mse": 0.0, "elbo": 0.0, "log_like": 0.0, "kl_fg": 0.0, "kl_bg": 0.0, "count": 0.0, "bg_sse": 0.0,
            "alpha": 0.0}
    index = 0
    try:
        for x in tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            out = model(x.to(device, non_blocking=True), priors, mode)
            sums["mse"] += out.mse.sum().item()
            sums["elbo"] += out.elbo.sum().item()
            sums["log_like"] += out.log_like.sum().item()
            sums["kl_fg"] += out.kl_fg.sum().item()
            sums["kl_bg"] += out.kl_bg.sum().item()
            sums["count"] += (out.z_pres_prob > PRESENCE_THRESHOLD).sum().item()
            sums["bg_sse"] += ((out.bg - out.imgs) ** 2).sum().item()
            sums["alpha"] += out.alpha_map.mean((1, 2, 3)).sum().item()
            if accumulator is not None:
                for boxes, conf in predicted_boxes(out):
                    accumulator.add(boxes.cpu().numpy(), conf.cpu().numpy(), dataset.boxes(index))
                    index += 1
    finally:
        model.train(was_training)
    results: dict[str, Any] = {key: value / max(n, 1) for key, value in sums.items()}
    results["mean_objects"] = results.pop("count")
    results["alpha_coverage"] = results.pop("alpha")
    bg_sse = results.pop("bg_sse")
    results["fg_explained"] = 1 - results["mse"] / bg_sse if bg_sse > 0 else 0.0
    failure, reason = bg_failure_verdict(results["fg_explained"], results["mean_objects"], results["alpha_coverage"])
    results["bg_failure"] = failure
    results["bg_failure_reason"] = reason
    results["num_images"] = n
    results["mode"] = mode
    if accumulator is not None:
        results.update(accumulator.compute())
        results["has_ground_truth"] = True
    else:
        results["has_ground_truth"] = False
        results["note"] = "no ground-truth boxes for this dataset: reconstruction metrics only (mse, elbo)"
    return results
