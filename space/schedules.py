"""Annealing schedules: pure functions of the training step (SPEC section 7).

The training loop computes :class:`Priors` for the current step and passes them to the model;
evaluation passes :func:`final_priors` (the original passed a fake step of 1e8 instead).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig, TrainConfig

# The original evaluates with this fake step so that every schedule is at its end value (SPEC 9.2).
EVAL_STEP = 100_000_000


def linear_anneal(step: int, start_step: int, end_step: int, start_value: float, end_value: float) -> float:
    """Linear annealing as the original's ``linear_annealing`` (SPEC 7).

    ``start_value`` up to and including ``start_step``, ``end_value`` from ``end_step`` on, and a
    straight line in between (slope computed in float64).
    """
    if step <= start_step:
        return float(start_value)
    if step < end_step:
        slope = (end_value - start_value) / (end_step - start_step)
        return float(start_value + slope * (step - start_step))
    return float(end_value)


def lr_decay_at(cfg: TrainConfig, step: int) -> float:
    """The factor on both learning rates at a step: 1 until ``lr_decay_start``, then a line down
    to ``lr_decay_factor`` at ``max_steps`` (1 throughout when ``lr_decay_start`` is 0)."""
    if cfg.lr_decay_start <= 0 or cfg.lr_decay_start >= cfg.max_steps:
        return 1.0
    return linear_anneal(step, cfg.lr_decay_start, cfg.max_steps, 1.0, cfg.lr_decay_factor)


def fg_lr_at(cfg: TrainConfig, step: int) -> float:
    """The foreground optimiser's learning rate at a step: ``fg_lr``, times the final decay."""
    return cfg.fg_lr * lr_decay_at(cfg, step)


def bg_lr_at(cfg: TrainConfig, step: int) -> float:
    """The background optimiser's learning rate at a step: the warm-up line, then ``bg_lr``;
    times the final decay."""
    base = cfg.bg_lr if cfg.bg_lr_warmup_steps <= 0 else \
        linear_anneal(step, 0, cfg.bg_lr_warmup_steps, cfg.bg_lr * cfg.bg_lr_warmup_factor, cfg.bg_lr)
    return base * lr_decay_at(cfg, step)


@dataclass(frozen=True)
class Priors:
    """Everything in a forward pass that depends on the training step."""

    step: int
    tau: float  # relaxed-Bernoulli temperature of z_pres
    z_pres_prob: float  # prior presence probability
    z_scale_mean: float  # prior mean of the pre-sigmoid z_scale
    fix_alpha: float | None  # constant alpha for the likelihood, or None (SPEC 6 step 2)
    boundary_loss: bool  # whether the boundary loss counts (SPEC 4.6)
    kl_what_weight: float = 1.0  # weight of z_what's KL in the loss (1: the original's)


def priors_at(cfg: ModelConfig, step: int) -> Priors:
    """Priors at a training step."""
    return Priors(
        step=step,
        tau=linear_anneal(step, cfg.tau_start_step, cfg.tau_end_step, cfg.tau_start_value, cfg.tau_end_value),
        z_pres_prob=linear_anneal(step, cfg.z_pres_start_step, cfg.z_pres_end_step,
                                  cfg.z_pres_start_value, cfg.z_pres_end_value),
        z_scale_mean=linear_anneal(step, cfg.z_scale_mean_start_step, cfg.z_scale_mean_end_step,
                                   cfg.z_scale_mean_start_value, cfg.z_scale_mean_end_value),
        # Step 0 is never fixed: the original tests the step for truthiness first.
        fix_alpha=cfg.fix_alpha_value if (step and step < cfg.fix_alpha_steps) else None,
        # Switched off strictly after bl_off_step.
        boundary_loss=cfg.boundary_loss and not step > cfg.bl_off_step,
        kl_what_weight=linear_anneal(step, 0, cfg.z_what_kl_warmup_steps, cfg.z_what_kl_warmup_start, 1.0)
        if cfg.z_what_kl_warmup_steps else 1.0,
    )


def final_priors(cfg: ModelConfig) -> Priors:
    """Priors used for evaluation: the original's fake step 1e8 (all schedules at their end)."""
    return priors_at(cfg, EVAL_STEP)
