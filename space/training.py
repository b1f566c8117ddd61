"""Training: one optimisation step in the original's order (SPEC 8.2)."""
from __future__ import annotations

import torch
from torch import nn

from .model import Space, SpaceOutput
from .schedules import Priors


def train_step(model: Space, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], x: torch.Tensor,
               priors: Priors, clip_norm: float) -> SpaceOutput:
    """Forward, zero both optimisers (fg then bg), backward, one joint clip, step fg then bg."""
    model.train()
    out = model(x, priors)
    fg_opt, bg_opt = optimizers
    fg_opt.zero_grad()
    bg_opt.zero_grad()
    out.loss.backward()
    if clip_norm:
        nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    fg_opt.step()
    bg_opt.step()
    return out
