"""Training: the original's loop (SPEC 8) with exact resume, atomic checkpoints and fault checks.

Beyond the original:
* everything is seeded (torch, numpy, Python) and the data order is a pure function of
  (seed, epoch), so a run killed at any point and re-run resumes exactly: model, optimisers,
  step, RNG states and position in the epoch all come from the last checkpoint;
* checkpoints are written atomically and pruned only after the new one is in place (the
  original updated its list before writing the file, SPEC 13.2 item 5);
* a non-finite loss or gradient skips the step; ``max_bad_steps`` in a row stop training;
* a non-finite validation metric never replaces the best checkpoint (SPEC 13.2 item 4).

Scale-out (README "Multi-GPU and multi-node"): run under ``torchrun --nproc_per_node N [--nnodes
...]`` and the same loop trains with DistributedDataParallel (WORLD_SIZE, RANK and LOCAL_RANK from
the environment; NCCL on CUDA with one GPU per process, cuda:LOCAL_RANK; gloo on the CPU):

* the global batch is ``batch_size x world_size``: each global batch is taken from the seeded
  epoch order exactly as one process with that batch would take it, and rank r trains on its
  slice [r*b, (r+1)*b) (:func:`rank_batches`). An epoch's last, smaller global batch is split as
  evenly as possible and each rank's loss weighted by its share, so that the gradient is still
  the mean over the global batch; if it has fewer images than processes, it is left out;
* DDP averages the gradients; the non-finite check, the joint clip and both optimisers (built
  from the unwrapped model's fg_module and bg_module, in the original's parameter order) then
  run identically on every rank. The logged loss and the plot rows are global-batch means;
* BatchNorm (background module) is synchronised over the global batch when
  ``train.sync_batchnorm`` (default true): ``nn.SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm`
  on the CPU, where PyTorch's has no kernel. State-dict keys are unchanged;
* only rank 0 writes checkpoints, TensorBoard logs, plot CSVs and best checkpoints, and runs the
  validation while the others wait at a barrier;
* RNG: the model is initialised from ``seed`` on every rank (and DDP broadcasts rank 0's weights),
  then each rank reseeds torch, numpy and Python with :func:`rank_seed` (seed, rank), so sampling
  noise differs across ranks. Each checkpoint holds every rank's RNG state (gathered to rank 0);
  all ranks resume from the same checkpoint, read by rank 0 and broadcast, and each restores its
  own RNG state, so a resume with the same world size is exact. With another world size the RNG
  cannot be restored: each rank reseeds from (seed, rank, step) and a warning says so.

For GPUs, off by default: ``train.amp: bf16`` runs the forward (only) under bf16 autocast (no
loss scaling is needed with bf16; the backward, the clip and the optimisers stay in float32), and
``train.compile: true`` wraps the (DDP) model in ``torch.compile``. Both change the numerics
slightly (rounding, fused kernels), so neither run is bit for bit the float32 eager one; checkpoints
are the unwrapped model's either way. ``train.latent_mode: deterministic`` trains without
sampling noise (latents at their means), which makes runs comparable across process counts.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import CheckpointError, load_weights, read_checkpoint, save_checkpoint
from .config import BEST_METRICS, GLOBAL_MODEL_KEYS, ModelConfig, TrainConfig, to_dict
from .evaluation import RESEED_REMEDY, evaluate, resolve_device
from .io import lock_exclusive, unlock, write_json, write_text
from .model import Space, SpaceOutput, build_optimizers
from .schedules import Priors, bg_lr_at, fg_lr_at, priors_at

log = logging.getLogger("space.training")

CHECKPOINT_GLOB = "model_*.pth"
PLOTTED_VAL_COLUMNS = ("val_ap_50", "val_count_accuracy")  # the validation columns dvc.yaml's plots name
TRAIN_METRICS = ("loss", "elbo", "log_like", "mse", "kl_z_what", "kl_z_where", "kl_z_pres", "kl_z_depth",
                 "kl_bg", "boundary_loss", "count")


class TrainingError(RuntimeError):
    """Training cannot go on (for example, too many non-finite steps in a row)."""


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold ``run_dir/.lock`` while resuming and while training: a second training of the same run (a
    train stage left running by a killed ``dvc``, and a new ``dvc repro``) would write the same
    checkpoints. Held only inside those calls, so that a Trainer built and never fitted (or whose
    construction failed) holds nothing."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as lock:
        try:
            why_not = lock_exclusive(lock, blocking=False)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process"
            raise TrainingError(f"another training of this run is in progress ({holder}), writing to {run_dir}: "
                                f"let it end or stop it, then run again") from None
        if why_not is not None:
            log.warning("%s cannot be locked (%s): nothing stops two trainings of this run at once", run_dir, why_not)
            yield
            return
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            unlock(lock)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's random (the original seeded only the first two)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled data order of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """A 32-bit seed for one rank's sampling noise under DDP: a pure function of (seed, rank, ...)."""
    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1)[0])


def rank_batches(order: np.ndarray, global_batch: int, world_size: int = 1,
                 rank: int = 0) -> list[tuple[list[int], int]]:
    """This rank's part of every global batch of one epoch, with the global batch's size.

    Global batches are consecutive slices of ``order`` of ``global_batch`` images, as one process
    with that batch takes them (drop_last = False); rank r gets [r*b, (r+1)*b) of each, with b =
    global_batch / world_size. The last, smaller global batch of m images is split into
    world_size contiguous parts as even as possible (sizes differ by at most one); if m <
    world_size it is left out, since every rank must train on at least one image. With one
    process this is simply the original's batches.
    """
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not a multiple of the world size {world_size}")
    b = global_batch // world_size
    out = []
    for start in range(0, len(order), global_batch):
        chunk = order[start:start + global_batch]
        m = len(chunk)
        if m == global_batch:
            part = chunk[rank * b:(rank + 1) * b]
        elif m >= world_size:
            q, extra = divmod(m, world_size)
            first = rank * q + min(rank, extra)
            part = chunk[first:first + q + (rank < extra)]
        else:
            continue
        out.append((part.tolist(), m))
    return out


# -- processes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: world size, global rank and rank on its node (torchrun's names)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """The process group if one is initialised, else torchrun's WORLD_SIZE, RANK and LOCAL_RANK
    variables; one process without either."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistEnv(dist.get_world_size(), rank, int(os.environ.get("LOCAL_RANK", rank)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return DistEnv(world_size, rank, int(os.environ.get("LOCAL_RANK", rank)))


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (torch.distributed.run)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed(device: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the process group when there are several processes, and pick this process's device.

    One process: ``device`` as given ('auto': CUDA when present). Several: the default process
    group is initialised from the environment if not yet (NCCL on CUDA, gloo on the CPU), and a
    CUDA device becomes cuda:LOCAL_RANK, one GPU per process.
    """
    env = dist_env()
    base = resolve_device(device)
    if not env.distributed:
        return env, base
    if base.type == "cuda":
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise RuntimeError(f"process with LOCAL_RANK {env.local_rank} has no GPU: this node has {count}; "
                               f"start at most {count} processes per node (--nproc_per_node / "
                               f"train.nproc_per_node)")
        if base.index is not None and base.index != env.local_rank:
            log.warning("train.device %s ignored under DDP: rank %d uses cuda:%d (LOCAL_RANK)", base, env.rank,
                        env.local_rank)
        base = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(base)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if base.type == "cuda" else "gloo")
        env = dist_env()
    return env, base


def shutdown_distributed() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _barrier(env: DistEnv, device: torch.device) -> None:
    if env.distributed:
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


# -- synchronised BatchNorm -------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Sum over all processes, differentiable: the gradient of each input is the sum of the
    output's gradients over all processes (as torch.distributed.nn's, now deprecated)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over every process's batch, for the CPU (gloo).

    PyTorch's ``nn.SyncBatchNorm`` has CUDA kernels only. This one computes the same thing with
    differentiable all-reductions : the global mean, then the global
    biased variance for normalising and the unbiased one for the running statistics, exactly as
    BatchNorm over the concatenated batch. Outside a process group of two or more, or in eval
    mode, it is plain BatchNorm. Parameters and buffers are BatchNorm's (same state-dict keys).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        C = input.shape[1]
        dims = (0, *range(2, input.dim()))
        shape = (1, C) + (1,) * (input.dim() - 2)
        x = input.float()
        local = torch.cat((x.sum(dims), x.new_tensor([x.numel() // C])))
        total = _AllReduceSum.apply(local)
        count = total[C].detach()
        mean = total[:C] / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised across processes, in place where it can be:
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` on CUDA, :class:`CpuSyncBatchNorm` on the CPU.
    The parameters are the same objects and the state-dict keys are unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (CpuSyncBatchNorm,
                                                                                       nn.SyncBatchNorm)):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


# -- one step ---------------------------------------------------------------------------------

def autocast(device: torch.device, amp: str = "none"):
    """bf16 autocast for ``amp='bf16'``, else nothing."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: Space, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], x: torch.Tensor,
               priors: Priors, clip_norm: float, mode: str = "sample", amp: str = "none",
               global_count: int | None = None) -> tuple[SpaceOutput, bool]:
    """One step in the original's order (SPEC 8.2): forward, zero fg then bg, backward, one joint
    clip, step fg then bg. Returns the output and whether the step was applied: a non-finite loss
    or gradient norm skips both optimiser steps.

    Args:
        model: the model, or its DDP (or compiled) wrapper; ``model(x, priors, mode)``.
        mode: the latents' mode in the forward ('sample', the original's, or 'deterministic').
        amp: 'bf16' runs the forward (only) under bf16 autocast.
        global_count: under DDP, the number of images in the global batch of which ``x`` is this
            rank's part. The loss is then all-reduced, so the finiteness check agrees on every
            rank and ``out.loss`` becomes the global batch's mean loss (detached); a rank whose
            part is not exactly global_count / world_size weights its loss by its share.
    """
    model.train()
    # A skipped step must leave the model as it was: BatchNorm running statistics are updated by
    # the forward itself, so keep a copy of the (small) buffers to put back.
    buffers = [b.detach().clone() for b in model.buffers()]
    with autocast(x.device, amp):
        out = model(x, priors, mode)
    fg_opt, bg_opt = optimizers
    fg_opt.zero_grad()
    bg_opt.zero_grad()
    loss = out.loss
    if global_count is None:
        finite = bool(torch.isfinite(loss))
    else:
        n, world_size = x.shape[0], dist.get_world_size()
        total = (loss.detach().float() * n).reshape(1)
        dist.all_reduce(total)
        out.loss = total[0] / global_count
        finite = bool(torch.isfinite(out.loss))
        if n * world_size != global_count:
            loss = loss * (n * world_size / global_count)
    if finite:
        loss.backward()
        total_norm = nn.utils.clip_grad_norm_(model.parameters(), clip_norm if clip_norm else math.inf)
        finite = bool(torch.isfinite(total_norm))
    if not finite:
        fg_opt.zero_grad()
        bg_opt.zero_grad()
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        return out, False
    fg_opt.step()
    bg_opt.step()
    return out, True


#: Model keys added after run ids were first written: they enter the id only at other values.
_MODEL_KEYS_BEYOND_ORIGINAL = {"z_what_kl_warmup_steps": 0, "z_what_kl_warmup_start": 0.0, "boundary_width": None,
                              "shift_range": 1.0}


_DEFAULT_TRAIN = TrainConfig()


def file_digest(path: str | Path, key: str) -> str:
    """SHA-1 of a file's bytes (hex, 16 digits); ``key`` names the setting that gave the path."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise TrainingError(f"{key}: cannot read {path}: {error.strerror or error}") from None
    return digest.hexdigest()[:16]


def run_id(model_cfg: ModelConfig, train_cfg: TrainConfig, data: Mapping[str, Any] | None = None,
           world_size: int = 1) -> str:
    """A short hash of what defines a run's trajectory (not its length or logging intervals), so
    that a re-run with more steps resumes, and a change of seed or model starts afresh. The one
    exception: with ``train.lr_decay_start`` set the decay ends at ``max_steps``, so the length
    shapes the trajectory and enters the id. Validation's settings enter too (it draws from the
    random generator that training goes on from).

    The batch is the global one (batch_size x world_size): 2 processes of 8 continue a run of 1
    process of 16. Keys beyond the original enter only at non-default values, so that the ids of
    existing runs stay the same.
    """
    keys = ("seed", "batch_size", "clip_norm", "fg_optim", "fg_lr", "bg_optim", "bg_lr")
    model = {k: v for k, v in to_dict(model_cfg).items()
             if k not in GLOBAL_MODEL_KEYS  # same maths either way
             and not (k in _MODEL_KEYS_BEYOND_ORIGINAL and v == _MODEL_KEYS_BEYOND_ORIGINAL[k])}
    train = {k: getattr(train_cfg, k) for k in keys}
    train["batch_size"] = train_cfg.batch_size * world_size
    if train_cfg.latent_mode != "sample":
        train["latent_mode"] = train_cfg.latent_mode
    if train_cfg.bg_lr_warmup_steps:
        train["bg_lr_warmup"] = [train_cfg.bg_lr_warmup_steps, train_cfg.bg_lr_warmup_factor]
    if train_cfg.lr_decay_start:
        train["lr_decay"] = [train_cfg.lr_decay_start, train_cfg.lr_decay_factor, train_cfg.max_steps]
    if train_cfg.amp != "none":
        train["amp"] = train_cfg.amp
    if train_cfg.init_from:  # by content: another file at the same path is another run
        train["init_from"] = file_digest(train_cfg.init_from, "train.init_from")
    # Validation draws from torch's generator (its data loader's seed, and its samples in 'sample'
    # mode), which training then goes on from: how often and how it runs shapes the trajectory.
    validation = {"eval_on": train_cfg.eval_on}
    if train_cfg.eval_on:
        validation.update(eval_every=train_cfg.eval_every, val_mode=train_cfg.val_mode)
        if train_cfg.val_mode == "sample":
            validation["val_num_images"] = train_cfg.val_num_images
        if train_cfg.val_mse_num_images is not None:  # a pass of its own: one more draw (more in 'sample' mode)
            validation["val_mse_num_images"] = train_cfg.val_mse_num_images if train_cfg.val_mode == "sample" else True
    if validation != {key: getattr(_DEFAULT_TRAIN, key) for key in validation}:
        train["validation"] = validation
    if world_size > 1 and not train_cfg.sync_batchnorm:
        train["sync_batchnorm"] = False
    identity = {"model": model, "train": train, "data": data or {}}
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def _rng_state(current_cuda_only: bool = False) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
             "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        if current_cuda_only:  # under DDP a rank draws on its own GPU only
            state["cuda_current"] = torch.cuda.get_rng_state()
        else:
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_current" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_current"])


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The original's naming: model_{step + 1:09}.pth holds global_step = step (SPEC 11.2)."""
    return run_dir / f"model_{step + 1:09d}.pth"


def _checkpoint_step(path: Path) -> int:
    """The global_step a periodic checkpoint holds, from its name (:func:`checkpoint_path`)."""
    return int(path.stem.split("_")[-1]) - 1


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Periodic checkpoints of a run, oldest first (``model_<digits>.pth``: not a ``model_final.pth``
    put there by hand, which would sort last and outlive the pruning)."""
    return sorted(path for path in run_dir.glob(CHECKPOINT_GLOB) if re.fullmatch(r"model_\d+\.pth", path.name))


@dataclass
class _Position:
    step: int = 0  # next step to train
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch

    @property
    def last_epoch(self) -> int:
        """The epoch of the step just trained, which a checkpoint's 'epoch' records (SPEC 11.1)."""
        return self.epoch - 1 if self.batch == 0 and self.epoch > 0 else self.epoch


#: Param-group keys newer than the original's torch 1.3, which torch fills in when a file lacks them.
_NEWER_GROUP_KEYS = frozenset({"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay",
                               "param_names"})


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], source: str, configured: str,
                           name: str) -> None:
    """Refuse an optimiser state of another kind than ``optimizer`` (torch would load it, and fail
    or misbehave at the first step), or of other parameters. The kind shows in each parameter's
    state and in the param groups' settings; Adam and AdamW differ only in decoupled_weight_decay."""
    probe = torch.zeros(1, requires_grad=True)
    probe.grad = torch.zeros(1)
    # AdamW's defaults hold a key its constructor does not take
    accepted = inspect.signature(type(optimizer)).parameters
    fresh = type(optimizer)([probe], **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    fresh.step()
    expected = set(fresh.state[probe])
    remedy = f"set train.{name}_optim (and its learning rate) to what the file was trained with"
    for index, held in state.get("state", {}).items():
        if set(held) != expected:
            raise CheckpointError(f"{source} holds {sorted(held)} for parameter {index}, where train.{name}_optim = "
                                  f"{configured} keeps {sorted(expected)}: {remedy}")
    settings = set(fresh.param_groups[0]) - {"params"}
    for group in state.get("param_groups", []):
        held = set(group) - {"params"}
        decoupled = group.get("decoupled_weight_decay", fresh.param_groups[0].get("decoupled_weight_decay"))
        if held - _NEWER_GROUP_KEYS != settings - _NEWER_GROUP_KEYS or \
                decoupled != fresh.param_groups[0].get("decoupled_weight_decay"):
            shown = sorted(held - _NEWER_GROUP_KEYS) + (["decoupled_weight_decay"] if decoupled else [])
            raise CheckpointError(f"{source} holds the settings {shown}, where train.{name}_optim = {configured} has "
                                  f"{sorted(settings - _NEWER_GROUP_KEYS)}: {remedy}")
    groups = state.get("param_groups", [])
    sizes, ours = [len(group.get("params", ())) for group in groups], [len(g["params"]) for g in optimizer.param_groups]
    if sizes != ours:
        raise CheckpointError(f"{source} holds parameter groups of {sizes} parameters, this model's {ours}")


class Trainer:
    """Trains one experiment; re-running it resumes from the last checkpoint in ``run_dir``.

    In one process, or in every process of a torchrun launch (DDP; see the module docstring):
    each process builds its own Trainer with the same arguments and calls :meth:`fit`.

    Args:
        model_cfg, train_cfg: the configuration.
        train_set: yields image tensors.
        val_set: optional validation dataset; with ground truth (``has_boxes``), AP and counts
            are computed every ``eval_every`` steps and the best checkpoint is kept (on rank 0).
        run_dir: where checkpoints live (outside DVC outputs, so a reproduction keeps them).
        log_dir: TensorBoard folder, or None.
        plots_path: CSV of training curves for DVC, or None.
        progress: show a progress bar (rank 0 only).
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, train_set: Dataset, run_dir: Path,
                 val_set: Dataset | None = None, log_dir: Path | None = None, plots_path: Path | None = None,
                 progress: bool = True):
        if len(train_set) == 0:
            raise ValueError("the training split is empty: nothing to train on")
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.train_set, self.val_set = train_set, val_set
        self.run_dir, self.log_dir, self.plots_path = Path(run_dir), log_dir, plots_path
        self.env, self.device = setup_distributed(train_cfg.device)
        env = self.env
        if len(train_set) < env.world_size:
            raise ValueError(f"the training split has {len(train_set)} images, fewer than the {env.world_size} "
                             f"processes: every process needs at least one")
        left = len(train_set) % (train_cfg.batch_size * env.world_size)
        if 0 < left < env.world_size and env.is_main:
            log.warning("the last global batch of each epoch has %d image(s), fewer than the %d processes: it is "
                        "left out (%d of %d training images an epoch), so this run differs from one process's at "
                        "that global batch", left, env.world_size, left, len(train_set))
        self.progress = progress and env.is_main
        seed_everything(train_cfg.seed)  # the same initial weights on every rank
        model = Space(model_cfg)
        if env.distributed and train_cfg.sync_batchnorm:
            model = convert_sync_batchnorm(model, self.device)
        self.model = model.to(self.device)
        if env.distributed:  # each rank its own sampling noise
            seed_everything(rank_seed(train_cfg.seed, env.rank))
        # From the unwrapped model's submodules: the original's parameter order, whatever wraps it.
        self.optimizers = build_optimizers(self.model, train_cfg.fg_optim, train_cfg.fg_lr,
                                           train_cfg.bg_optim, train_cfg.bg_lr)
        self.position = _Position()
        self.rows: list[dict[str, Any]] = []  # plot data
        self.losses: deque[float] = deque(maxlen=20)  # the original logs the median of the last 20
        self.best: dict[str, Any] | None = None
        self.resumed_from: Path | None = None
        self.initialised_from: Path | None = None  # train.init_from, when this run started from it
        self.last_saved: int | None = None  # step of the newest checkpoint of this run
        with run_lock(self.run_dir) if env.is_main else contextlib.nullcontext():
            self._resume()  # may set a best checkpoint aside: not while another training of this run goes on
        self._val_on = self._has_val()
        if env.distributed:  # rank 0 decides, so that every rank takes part in the same collectives
            flag = [self._val_on]
            dist.broadcast_object_list(flag, src=0)
            self._val_on = flag[0]
        self.forward_model: nn.Module = self.model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if train_cfg.compile:
            self.forward_model = torch.compile(self.forward_model)

    # -- checkpoints -------------------------------------------------------------------------
    def _find_resumable(self) -> tuple[str, dict[str, Any]] | None:
        paths = find_checkpoints(self.run_dir)
        # The run id leaves max_steps out, so that raising it resumes a run; lowered, it asks for
        # a step that this run may have passed, and checkpoints past it must not be resumed.
        within = [path for path in paths if _checkpoint_step(path) <= self.cfg.max_steps]
        if len(within) < len(paths):
            reached = _checkpoint_step(paths[-1])
            if not within:
                raise TrainingError(
                    f"{self.run_dir} holds this run's checkpoints of steps {_checkpoint_step(paths[0])}-{reached}, "
                    f"all past train.max_steps = {self.cfg.max_steps}, and none before it (train.max_ckpt = "
                    f"{self.cfg.max_ckpt} are kept): to train this run to step {self.cfg.max_steps}, move that "
                    f"folder aside, and training starts afresh")
            log.warning("this run reached step %d, past train.max_steps = %d: resuming from the last checkpoint "
                        "within it, %s", reached, self.cfg.max_steps, within[-1].name)
        for path in reversed(within):
            try:
                ckpt = read_checkpoint(path)
                lacking = [key for key in ("resume", "optimizer_fg", "optimizer_bg", "global_step")
                           if not isinstance(ckpt.get(key), (dict, int))]
                if lacking:  # e.g. one of the original's files, or a stage's final model, put here by hand
                    raise CheckpointError(f"it holds no {', '.join(lacking)} to resume training from; only the "
                                          f"checkpoints a training run of this code writes here can resume it")
                load_weights(self.model, ckpt, str(path))
            except (CheckpointError, FileNotFoundError) as error:
                log.warning("skipping unusable checkpoint %s: %s", path, error)
                continue
            return str(path), ckpt
        return None

    def _resume(self) -> None:
        """Rank 0 finds the last usable checkpoint and, under DDP, sends it to every rank (their
        file system may not be rank 0's); all ranks then load the same state."""
        env = self.env
        found = self._find_resumable() if env.is_main else None
        if env.distributed:
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
            if found is not None and not env.is_main:
                load_weights(self.model, found[1], found[0])
        if found is None:
            if self.cfg.init_from:
                self._start_from(self.cfg.init_from)
            return
        path, ckpt = Path(found[0]), found[1]
        self.optimizers[0].load_state_dict(ckpt["optimizer_fg"])
        self.optimizers[1].load_state_dict(ckpt["optimizer_bg"])
        resume = ckpt["resume"]
        self.position = _Position(ckpt["global_step"] + 1, resume["epoch"], resume["batch"])
        self.rows = [row for row in json.loads(resume["rows"]) if row["step"] <= ckpt["global_step"]]
        self.losses.extend(resume["losses"])
        best_json = self.best_path.with_suffix(".json")  # the file on disk is authoritative
        self.best = json.loads(best_json.read_text()) if env.is_main and best_json.is_file() else None
        if self.best is not None and self.best["global_step"] > self.cfg.max_steps:
            # Past max_steps (lowered): this run's best up to it is not kept. (A best past the step
            # resumed from but within max_steps is of this very trajectory, and stays.)
            log.warning("the best checkpoint by validation %s is of step %d, past train.max_steps = %d; it is set "
                        "aside as %s", self.cfg.best_metric, self.best["global_step"], self.cfg.max_steps,
                        self._set_best_aside().name)
        self._restore_rng(resume, ckpt["global_step"])
        self.resumed_from = path
        self.last_saved = ckpt["global_step"]
        if env.is_main:
            log.info("resumed from %s at step %d", path, self.position.step)

    def _start_from(self, path: str) -> None:
        """``train.init_from``, as the original's resume_ckpt (SPEC 8.4): the file's weights, and where
        it holds both optimisers' states and its global_step, those too, going on at that step + 1
        from the start of its epoch ('epoch', as the original) in this run's data order. A file with
        weights alone (the published pretrained ones may be such) starts fresh optimisers at step 0,
        where the schedules start too. Rank 0 reads the file; under DDP every rank loads its copy."""
        env = self.env
        ckpt = read_checkpoint(path) if env.is_main else None
        if env.distributed:
            box = [ckpt]
            dist.broadcast_object_list(box, src=0)
            ckpt = box[0]
        try:
            load_weights(self.model, ckpt, path)
        except CheckpointError as err:
            raise CheckpointError(f"{err}\n  train.init_from: the model settings of this experiment must be those "
                                  f"the file was trained with") from None
        states = ckpt.get("optimizer_fg"), ckpt.get("optimizer_bg")
        step = ckpt.get("global_step")
        self.initialised_from = Path(path)
        if not (all(isinstance(state, dict) for state in states) and isinstance(step, int)):
            if env.is_main:
                log.info("train.init_from: the weights of %s, with fresh optimisers from step 0 (it holds no "
                         "optimiser states, or no global_step, to go on from)", path)
            return
        if step + 1 > self.cfg.max_steps:
            raise TrainingError(f"train.init_from: {path} was saved at step {step}, and train.max_steps is "
                                f"{self.cfg.max_steps}: raise max_steps to train on from it")
        epoch = ckpt.get("epoch")
        epoch = epoch if isinstance(epoch, int) and epoch >= 0 else 0
        if epoch >= self.cfg.max_epochs:
            raise TrainingError(f"train.init_from: {path} was saved in epoch {epoch} (counted from 0), and "
                                f"train.max_epochs is {self.cfg.max_epochs}: raise max_epochs to train on from it")
        for optimizer, state, name in zip(self.optimizers, states, ("fg", "bg")):
            _check_optimizer_state(optimizer, state, f"{path}: optimizer_{name}",
                                   getattr(self.cfg, f"{name}_optim"), name)
            optimizer.load_state_dict(state)
        self.position = _Position(step + 1, epoch, 0)
        if env.is_main:
            log.info("train.init_from: the weights and optimiser states of %s, going on at step %d (epoch %d)",
                     path, self.position.step, self.position.epoch)

    def _restore_rng(self, resume: Mapping[str, Any], step: int) -> None:
        env = self.env
        saved_world = resume.get("world_size", 1)
        if saved_world == env.world_size:
            _set_rng_state(resume["rng_ranks"][env.rank] if env.distributed else resume["rng"])
            return
        # Another number of processes: there is no state for this rank to restore.
        seed_everything(rank_seed(self.cfg.seed, env.rank, step))
        if env.is_main:
            log.warning("checkpoint written by %d process(es), resumed by %d: RNG states reseeded from (seed, rank, "
                        "step), so sampling noise differs from an uninterrupted run", saved_world, env.world_size)

    def _save(self, step: int, position: _Position) -> Path:
        """A checkpoint at ``step`` (all ranks call this: their RNG states are gathered; rank 0 writes)."""
        env = self.env
        path = checkpoint_path(self.run_dir, step)
        state = _rng_state(current_cuda_only=env.distributed)
        states: list[Any] | None = [state]
        if env.distributed:
            states = [None] * env.world_size if env.is_main else None
            dist.gather_object(state, states, dst=0)
        if env.is_main:
            resume = {"epoch": position.epoch, "batch": position.batch, "rng": states[0],
                      "rows": json.dumps(self.rows), "losses": list(self.losses)}
            if env.distributed:
                resume.update(world_size=env.world_size, rng_ranks=states)
            save_checkpoint(path, self.model, self.optimizers, step, position.last_epoch, self.cfg, {"resume": resume})
            # Prune after the new one exists; checkpoints past this step (left by a run with a higher
            # max_steps) are not this run's newest and are left alone.
            ours = [old for old in find_checkpoints(self.run_dir) if _checkpoint_step(old) <= step]
            for old in ours[:-self.cfg.max_ckpt]:
                old.unlink(missing_ok=True)
        self.last_saved = step
        return path

    def _set_best_aside(self) -> Path:
        """Rename the best checkpoint and its .json with the step they hold; forget it."""
        aside = self.best_path.with_name(f"{self.best_path.stem}_step{self.best['global_step']}.pth")
        for source, target in ((self.best_path, aside), (self.best_path.with_suffix(".json"), aside.with_suffix(".json"))):
            if source.exists():
                os.replace(source, target)
        self.best = None
        return aside

    @property
    def validates(self) -> bool:
        """Whether this run validates (``eval_on`` and a validation split)."""
        return self._val_on

    @property
    def best_path(self) -> Path:
        """The best validation checkpoint (by ``train.best_metric``); its ``.json`` sits beside it."""
        return self.run_dir / f"best_{self.cfg.best_metric}.pth"

    def _maybe_save_best(self, metrics: Mapping[str, Any], step: int, position: _Position) -> None:
        name = self.cfg.best_metric
        value = metrics.get(name)
        if step == 0 and self.initialised_from is None:
            return  # seeded initial weights are no trained model: a run whose foreground collapsed must
            # not hand them on as its best (its later checkpoints then carry the bg_failure verdict);
            # weights from train.init_from may be the best this run sees
        if value is None or not math.isfinite(value):
            return  # never let a NaN or missing value replace the best (the original did)
        higher = BEST_METRICS[name]
        if self.best is not None and not (value > self.best["value"] if higher else value < self.best["value"]):
            return
        self.best = {"name": name, "value": float(value), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "global_step": step}
        best_path = self.best_path
        save_checkpoint(best_path, self.model, self.optimizers, step, position.last_epoch, self.cfg)
        write_json(best_path.with_suffix(".json"), self.best)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> Space:
        """Train to ``max_steps`` (steps 0..max_steps, as the original) and return the (unwrapped) model."""
        with run_lock(self.run_dir) if self.env.is_main else contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> Space:
        cfg, env = self.cfg, self.env
        n = len(self.train_set)
        global_batch = cfg.batch_size * env.world_size
        batches_per_epoch = len(rank_batches(np.arange(n), global_batch, env.world_size, env.rank))
        writer = self._writer()
        losses = self.losses
        bad_steps = 0
        pos = self.position
        bar = tqdm(total=cfg.max_steps + 1, initial=min(pos.step, cfg.max_steps + 1), desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while pos.step <= cfg.max_steps and pos.epoch < cfg.max_epochs:
                order = epoch_order(cfg.seed, pos.epoch, n)
                batches = rank_batches(order, global_batch, env.world_size, env.rank)[pos.batch:]
                loader = DataLoader(self.train_set, batch_sampler=[part for part, _ in batches],
                                    num_workers=cfg.num_workers,
                                    generator=torch.Generator().manual_seed(cfg.seed + pos.epoch),
                                    pin_memory=self.device.type == "cuda")
                for x, (_, count) in zip(loader, batches):
                    step = pos.step
                    for group in self.optimizers[0].param_groups:
                        group["lr"] = fg_lr_at(cfg, step)
                    for group in self.optimizers[1].param_groups:
                        group["lr"] = bg_lr_at(cfg, step)
                    out, ok = train_step(self.forward_model, self.optimizers, x.to(self.device, non_blocking=True),
                                         priors_at(self.model_cfg, step), cfg.clip_norm, cfg.latent_mode, cfg.amp,
                                         count if env.distributed else None)
                    if ok:
                        bad_steps = 0
                        losses.append(out.loss.item())
                    else:
                        bad_steps += 1
                        message = (f"non-finite loss or gradient at step {step} (loss {out.loss.item()}); "
                                   f"step skipped ({bad_steps} in a row)")
                        log.warning(message)
                        if bad_steps >= cfg.max_bad_steps:
                            last = find_checkpoints(self.run_dir)
                            raise TrainingError(
                                f"training stopped at step {step}: {bad_steps} consecutive steps had a non-finite "
                                f"loss or gradient (train.max_bad_steps = {cfg.max_bad_steps}). The last good "
                                f"checkpoint is kept: {last[-1] if last else 'none yet'}. Lower the learning "
                                f"rates or reseed (train.seed).")
                    pos.batch += 1
                    pos.step += 1
                    after = _Position(pos.step, pos.epoch + 1, 0) if pos.batch >= batches_per_epoch \
                        else _Position(pos.step, pos.epoch, pos.batch)
                    self._periodic(step, out, ok, losses, after, writer, count)
                    bar.update(1)
                    if losses:
                        bar.set_postfix(loss=f"{statistics.median(losses):.1f}", epoch=pos.epoch + 1, refresh=False)
                    if pos.step > cfg.max_steps:
                        break
                if pos.batch >= batches_per_epoch:
                    pos.epoch, pos.batch = pos.epoch + 1, 0
        except KeyboardInterrupt:
            bar.close()
            last = find_checkpoints(self.run_dir)
            if env.is_main:
                log.warning(f"training interrupted at step {pos.step}; "
                            + (f"the last checkpoint, {last[-1]}, is where a new run resumes"
                               if last else "no checkpoint written yet: a new run starts from step 0"))
            raise
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        last_step = pos.step - 1
        if pos.step <= cfg.max_steps and env.is_main:  # the original, too, stops at max_epochs, without a word
            log.warning(f"training ended after {cfg.max_epochs} epochs (train.max_epochs) at step {last_step}, before "
                        f"train.max_steps = {cfg.max_steps}: an epoch here is {batches_per_epoch} steps; raise "
                        f"train.max_epochs to train on (a re-run resumes)")
        if last_step >= 0 and self.last_saved != last_step:
            self._save(last_step, pos)
        if env.is_main:
            self._write_plots()
        return self.model

    def _writer(self):
        if self.log_dir is None or not self.env.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.log_dir), flush_secs=30, purge_step=self.position.step)

    def _periodic(self, step: int, out: SpaceOutput, ok: bool, losses: deque, after: _Position, writer,
                  count: int | None = None) -> None:
        """Logging, plot rows, validation and checkpoints at step t: the original's order (SPEC 8.3)
        but for validation, which comes before the checkpoint here (see below).

        Under DDP every rank comes here with the same step: the plot row's batch metrics are
        all-reduced (global-batch means), the checkpoint gathers every rank's RNG state, and
        validation runs on rank 0 while the others wait at a barrier; TensorBoard (rank 0) shows
        rank 0's part of the batch, with the global median loss.
        """
        cfg, env = self.cfg, self.env
        if step % cfg.print_every == 0 and writer is not None and ok:
            self._tensorboard(writer, step, out, losses)
        val_step = cfg.eval_on and step % cfg.eval_every == 0
        val_due = val_step and self._val_on
        if step % cfg.plot_every == 0 or val_due:
            row = {"step": step, **_batch_metrics(out, count if env.distributed else None)}
            if losses:
                row["loss"] = statistics.median(losses)
            self.rows.append(row)
        # Validation before the checkpoint (the original saves first): its data loader draws from
        # torch's global RNG, so the checkpoint must record the RNG state after it, the one the
        # next step starts from, for a resumed run to equal an uninterrupted one; the checkpoint's
        # plot rows then carry the validation too. The weights are the same either way.
        if val_due:
            if env.is_main:
                self._validate(step, after, writer)
            _barrier(env, self.device)
        if step % cfg.save_every == 0:
            self._save(step, after)
            if env.is_main:
                self._write_plots()

    def _validate(self, step: int, after: _Position, writer) -> None:
        cfg = self.cfg
        # Evaluation sets the prior buffers (tau, z_pres prior) to their final values, which the best
        # checkpoint keeps, as the original's does; they are put back to the training step's below,
        # so that the periodic checkpoint written next holds what the original's would.
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        mse = None
        if cfg.val_mse_num_images is not None:  # the original's MSE pass, first, at the current step (SPEC 9.5)
            mse = evaluate(self.model, self.val_set, cfg.val_batch_size, cfg.val_mode, cfg.val_mse_num_images,
                           self.device, progress=False, priors=priors_at(self.model.cfg, step))["mse"]
        metrics = evaluate(self.model, self.val_set, cfg.val_batch_size, cfg.val_mode, cfg.val_num_images,
                           self.device, progress=False)
        if mse is not None:
            metrics["mse"] = mse
        self.rows[-1].update({f"val_{k}": metrics[k] for k in ("ap_50", "ap_avg", "count_accuracy", "mse",
                                                                "fg_explained", "alpha_coverage", "mean_objects")
                              if metrics.get(k) is not None})
        if writer is not None:
            _val_tensorboard(writer, step, metrics)
        if metrics["bg_failure"] and step >= cfg.eval_every:
            message = f"step {step}: {metrics['bg_failure_reason']}; if it persists, {RESEED_REMEDY}"
            log.warning(message)
        self._maybe_save_best(metrics, step, after)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)

    def _has_val(self) -> bool:
        return self.val_set is not None and bool(getattr(self.val_set, "has_boxes", False)) and len(self.val_set) > 0

    def _tensorboard(self, writer, step: int, out: SpaceOutput, losses: deque) -> None:
        """Scalars and images with the original's tags (SPEC 12.2)."""
        with torch.no_grad():
            first = slice(0, 10)
            writer.add_scalar("train/mse", out.mse[first].mean().item(), step)
            writer.add_scalar("train/loss", statistics.median(losses), step)
            writer.add_scalar("train/count", out.z_pres[first].flatten(1).sum(1).mean().item(), step)
            writer.add_scalar("train/log_like", out.log_like.mean().item(), step)
            writer.add_scalar("train/loss_boundary", out.boundary_loss.mean().item(), step)
            for tag, value in (("What_KL", out.kl_z_what), ("Where_KL", out.kl_z_where), ("Pres_KL", out.kl_z_pres),
                               ("Depth_KL", out.kl_z_depth), ("Bg_KL", out.kl_bg)):
                writer.add_scalar(f"train/{tag}", value.mean().item(), step)
            try:
                from .visualisation import tensorboard_images
            except ImportError:  # pragma: no cover - visualisation is part of the package
                return
            tensorboard_images(writer, out, step)

    def _write_plots(self) -> None:
        if self.plots_path is None or not self.rows:
            return
        import pandas as pd
        frame = pd.DataFrame(self.rows).sort_values("step")
        for column in PLOTTED_VAL_COLUMNS:  # dvc.yaml plots them: a run without validation leaves them empty,
            if column not in frame:          # where a missing field made `dvc plots show` drop the whole plot
                frame[column] = float("nan")
        write_text(self.plots_path, frame.to_csv(index=False, float_format="%.6g"))


def _batch_metrics(out: SpaceOutput, global_count: int | None = None) -> dict[str, float]:
    """Batch means of the logged terms; under DDP (``global_count`` given) over the global batch."""
    keys = [key for key in TRAIN_METRICS if key not in ("count", "loss")]
    with torch.no_grad():
        values = torch.stack([getattr(out, key).detach().float().mean() for key in keys]
                             + [out.z_pres.detach().float().flatten(1).sum(1).mean()])
        if global_count is not None:
            values = values * out.imgs.shape[0]
            dist.all_reduce(values)
            values = values / global_count
    return dict(zip(keys + ["count"], values.tolist()))


def _val_tensorboard(writer, step: int, metrics: Mapping[str, Any]) -> None:
    writer.add_scalar("val/mse", metrics["mse"], step)
    for threshold, ap in zip(metrics["iou_thresholds"], metrics["aps"]):
        writer.add_scalar(f"val/ap_{threshold}", ap, step)
    for key, tag in (("ap_avg", "ap_avg"), ("count_accuracy", "accuracy"), ("perfect", "perfect"),
                     ("overcount", "overcount"), ("undercount", "undercount"), ("count_error_rate", "error_rate")):
        if metrics.get(key) is not None:
            writer.add_scalar(f"val/{tag}", metrics[key], step)
