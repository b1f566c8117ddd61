"""Training: the original's loop (SPEC 8) with exact resume, atomic checkpoints and fault checks.

Beyond the original:
* everything is seeded (torch, numpy, Python) and the data order is a pure function of
  (seed, epoch), so a run killed at any point and re-run resumes exactly: model, optimisers,
  step, RNG states and position in the epoch all come from the last checkpoint;
* checkpoints are written atomically and pruned only after the new one is in place (the
  original updated its list before writing the file, SPEC 13.2 item 5);
* a non-finite loss or gradient skips the step; ``max_bad_steps`` in a row stop training;
* a non-finite validation metric never replaces the best checkpoint (SPEC 13.2 item 4).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import CheckpointError, load_weights, read_checkpoint, save_checkpoint
from .config import BEST_METRICS, ModelConfig, TrainConfig, to_dict
from .evaluation import RESEED_REMEDY, evaluate, resolve_device
from .io import write_json, write_text
from .model import Space, SpaceOutput, build_optimizers
from .schedules import Priors, priors_at

log = logging.getLogger("space.training")

CHECKPOINT_GLOB = "model_*.pth"
TRAIN_METRICS = ("loss", "elbo", "log_like", "mse", "kl_z_what", "kl_z_where", "kl_z_pres", "kl_z_depth",
                 "kl_bg", "boundary_loss", "count")


class TrainingError(RuntimeError):
    """Training cannot go on (for example, too many non-finite steps in a row)."""


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's random (the original seeded only the first two)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled data order of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_step(model: Space, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], x: torch.Tensor,
               priors: Priors, clip_norm: float) -> tuple[SpaceOutput, bool]:
    """One step in the original's order (SPEC 8.2): forward, zero fg then bg, backward, one joint
    clip, step fg then bg. Returns the output and whether the step was applied: a non-finite loss
    or gradient norm skips both optimiser steps."""
    model.train()
    # A skipped step must leave the model as it was: BatchNorm running statistics are updated by
    # the forward itself, so keep a copy of the (small) buffers to put back.
    buffers = [b.detach().clone() for b in model.buffers()]
    out = model(x, priors)
    fg_opt, bg_opt = optimizers
    fg_opt.zero_grad()
    bg_opt.zero_grad()
    finite = bool(torch.isfinite(out.loss))
    if finite:
        out.loss.backward()
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


def run_id(model_cfg: ModelConfig, train_cfg: TrainConfig, data: Mapping[str, Any] | None = None) -> str:
    """A short hash of what defines a run's trajectory (not its length or logging intervals), so
    that a re-run with more steps resumes, and a change of seed or model starts afresh."""
    keys = ("seed", "batch_size", "clip_norm", "fg_optim", "fg_lr", "bg_optim", "bg_lr")
    model = {k: v for k, v in to_dict(model_cfg).items() if k != "fast_path"}  # same maths either way
    identity = {"model": model, "train": {k: getattr(train_cfg, k) for k in keys}, "data": data or {}}
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
             "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The original's naming: model_{step + 1:09}.pth holds global_step = step (SPEC 11.2)."""
    return run_dir / f"model_{step + 1:09d}.pth"


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Periodic checkpoints of a run, oldest first."""
    return sorted(run_dir.glob(CHECKPOINT_GLOB))


@dataclass
class _Position:
    step: int = 0  # next step to train
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch


class Trainer:
    """Trains one experiment; re-running it resumes from the last checkpoint in ``run_dir``.

    Args:
        model_cfg, train_cfg: the configuration.
        train_set: yields image tensors.
        val_set: optional validation dataset; with ground truth (``has_boxes``), AP and counts
            are computed every ``eval_every`` steps and the best checkpoint is kept.
        run_dir: where checkpoints live (outside DVC outputs, so a reproduction keeps them).
        log_dir: TensorBoard folder, or None.
        plots_path: CSV of training curves for DVC, or None.
        data_identity: what identifies the data (goes into the run id).
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, train_set: Dataset, run_dir: Path,
                 val_set: Dataset | None = None, log_dir: Path | None = None, plots_path: Path | None = None,
                 progress: bool = True):
        if len(train_set) == 0:
            raise ValueError("the training split is empty: nothing to train on")
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.train_set, self.val_set = train_set, val_set
        self.run_dir, self.log_dir, self.plots_path = Path(run_dir), log_dir, plots_path
        self.progress = progress
        self.device = resolve_device(train_cfg.device)
        seed_everything(train_cfg.seed)
        self.model = Space(model_cfg).to(self.device)
        self.optimizers = build_optimizers(self.model, train_cfg.fg_optim, train_cfg.fg_lr,
                                           train_cfg.bg_optim, train_cfg.bg_lr)
        self.position = _Position()
        self.rows: list[dict[str, Any]] = []  # plot data
        self.losses: deque[float] = deque(maxlen=20)  # the original logs the median of the last 20
        self.best: dict[str, Any] | None = None
        self.resumed_from: Path | None = None
        self._resume()

    # -- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        for path in reversed(find_checkpoints(self.run_dir)):
            try:
                ckpt = read_checkpoint(path)
                load_weights(self.model, ckpt, str(path))
            except (CheckpointError, FileNotFoundError) as error:
                log.warning("skipping unusable checkpoint %s: %s", path, error)
                continue
            self.optimizers[0].load_state_dict(ckpt["optimizer_fg"])
            self.optimizers[1].load_state_dict(ckpt["optimizer_bg"])
            resume = ckpt["resume"]
            self.position = _Position(ckpt["global_step"] + 1, resume["epoch"], resume["batch"])
            self.rows = [row for row in json.loads(resume["rows"]) if row["step"] <= ckpt["global_step"]]
            self.losses.extend(resume["losses"])
            best_json = self.run_dir / f"best_{self.cfg.best_metric}.json"  # the file on disk is authoritative
            self.best = json.loads(best_json.read_text()) if best_json.is_file() else None
            _set_rng_state(resume["rng"])
            self.resumed_from = path
            log.info("resumed from %s at step %d", path, self.position.step)
            return

    def _save(self, step: int, position: _Position) -> Path:
        path = checkpoint_path(self.run_dir, step)
        extra = {"resume": {"epoch": position.epoch, "batch": position.batch, "rng": _rng_state(),
                            "rows": json.dumps(self.rows),
                            "losses": list(self.losses)}}
        save_checkpoint(path, self.model, self.optimizers, step, position.epoch, self.cfg, extra)
        for old in find_checkpoints(self.run_dir)[:-self.cfg.max_ckpt]:  # prune after the new one exists
            old.unlink(missing_ok=True)
        return path

    def _maybe_save_best(self, metrics: Mapping[str, Any], step: int, position: _Position) -> None:
        name = self.cfg.best_metric
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            return  # never let a NaN or missing value replace the best (the original did)
        higher = BEST_METRICS[name]
        if self.best is not None and not (value > self.best["value"] if higher else value < self.best["value"]):
            return
        self.best = {"name": name, "value": float(value), "global_step": step}
        best_path = self.run_dir / f"best_{name}.pth"
        save_checkpoint(best_path, self.model, self.optimizers, step, position.epoch, self.cfg)
        write_json(self.run_dir / f"best_{name}.json", self.best)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> Space:
        """Train to ``max_steps`` (steps 0..max_steps, as the original) and return the model."""
        cfg, model = self.cfg, self.model
        n = len(self.train_set)
        batches_per_epoch = math.ceil(n / cfg.batch_size)
        writer = self._writer()
        losses = self.losses
        bad_steps = 0
        pos = self.position
        bar = tqdm(total=cfg.max_steps + 1, initial=min(pos.step, cfg.max_steps + 1), desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while pos.step <= cfg.max_steps and pos.epoch < cfg.max_epochs:
                order = epoch_order(cfg.seed, pos.epoch, n)
                batches = [order[i:i + cfg.batch_size].tolist() for i in range(0, n, cfg.batch_size)]
                loader = DataLoader(self.train_set, batch_sampler=batches[pos.batch:], num_workers=cfg.num_workers,
                                    generator=torch.Generator().manual_seed(cfg.seed + pos.epoch),
                                    pin_memory=self.device.type == "cuda")
                for x in loader:
                    step = pos.step
                    out, ok = train_step(model, self.optimizers, x.to(self.device, non_blocking=True),
                                         priors_at(self.model_cfg, step), cfg.clip_norm)
                    if ok:
                        bad_steps = 0
                        losses.append(out.loss.item())
                    else:
                        bad_steps += 1
                        message = (f"non-finite loss or gradient at step {step} (loss {out.loss.item()}); "
                                   f"step skipped ({bad_steps} in a row)")
                        log.warning(message)
                        bar.write(f"warning: {message}")
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
                    self._periodic(step, out, ok, losses, after, writer)
                    bar.update(1)
                    if losses:
                        bar.set_postfix(loss=f"{statistics.median(losses):.1f}", epoch=pos.epoch + 1, refresh=False)
                    if pos.step > cfg.max_steps:
                        break
                if pos.batch >= batches_per_epoch:
                    pos.epoch, pos.batch = pos.epoch + 1, 0
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        last_step = pos.step - 1
        if not find_checkpoints(self.run_dir) or find_checkpoints(self.run_dir)[-1] != checkpoint_path(self.run_dir, last_step):
            if last_step >= 0:
                self._save(last_step, pos)
        self._write_plots()
        return model

    def _writer(self):
        if self.log_dir is None:
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.log_dir), flush_secs=30, purge_step=self.position.step)

    def _periodic(self, step: int, out: SpaceOutput, ok: bool, losses: deque, after: _Position, writer) -> None:
        """Logging, plot rows, checkpoints and validation at step t, in the original's order (SPEC 8.3)."""
        cfg = self.cfg
        if step % cfg.print_every == 0 and writer is not None and ok:
            self._tensorboard(writer, step, out, losses)
        val_due = cfg.eval_on and step % cfg.eval_every == 0 and self._has_val()
        if step % cfg.plot_every == 0 or val_due:
            row = {"step": step, **_batch_metrics(out)}
            if losses:
                row["loss"] = statistics.median(losses)
            self.rows.append(row)
        if step % cfg.save_every == 0:
            self._save(step, after)
            self._write_plots()
        if val_due:
            metrics = evaluate(self.model, self.val_set, cfg.val_batch_size, cfg.val_mode, cfg.val_num_images,
                               self.device, progress=False)
            self.rows[-1].update({f"val_{k}": metrics[k] for k in ("ap_50", "ap_avg", "count_accuracy", "mse",
                                                                    "fg_explained", "alpha_coverage", "mean_objects")
                                  if metrics.get(k) is not None})
            if writer is not None:
                _val_tensorboard(writer, step, metrics)
            if metrics["bg_failure"] and step >= cfg.eval_every:
                message = f"step {step}: {metrics['bg_failure_reason']}; if it persists, {RESEED_REMEDY}"
                log.warning(message)
                if self.progress:
                    tqdm.write(f"warning: {message}")
            self._maybe_save_best(metrics, step, after)

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
        write_text(self.plots_path, frame.to_csv(index=False, float_format="%.6g"))


def _batch_metrics(out: SpaceOutput) -> dict[str, float]:
    values = {key: getattr(out, key).mean().item() for key in TRAIN_METRICS if key not in ("count", "loss")}
    values["count"] = out.z_pres.flatten(1).sum(1).mean().item()
    return values


def _val_tensorboard(writer, step: int, metrics: Mapping[str, Any]) -> None:
    writer.add_scalar("val/mse", metrics["mse"], step)
    for threshold, ap in zip(metrics["iou_thresholds"], metrics["aps"]):
        writer.add_scalar(f"val/ap_{threshold}", ap, step)
    for key, tag in (("ap_avg", "ap_avg"), ("count_accuracy", "accuracy"), ("perfect", "perfect"),
                     ("overcount", "overcount"), ("undercount", "undercount"), ("count_error_rate", "error_rate")):
        if metrics.get(key) is not None:
            writer.add_scalar(f"val/{tag}", metrics[key], step)
