"""SPACE: foreground and background combined by a per-channel mixture likelihood (SPEC 6).

Letters: B batch, N = G*G cells, K components, H = W image side, h = w glimpse side.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .bg import SpaceBg
from .config import ModelConfig, original_config
from .fg import SpaceFg
from .schedules import Priors

ALPHA_LOG_EPS = 1e-5  # log(alpha + 1e-5) and log(1 - alpha + 1e-5) (SPEC 6 step 3)
MODES = ("sample", "deterministic")


@dataclass
class SpaceOutput:
    """Everything a forward pass computes; names are the original's log keys (SPEC 4.9, 5.7, 6)."""

    loss: torch.Tensor  # () mean over the batch of -elbo + boundary_loss
    elbo: torch.Tensor  # (B,)
    log_like: torch.Tensor  # (B,)
    mse: torch.Tensor  # (B,) per-image sum of squared errors
    imgs: torch.Tensor  # (B, 3, H, W) input
    y: torch.Tensor  # (B, 3, H, W) reconstruction
    fg: torch.Tensor  # (B, 3, H, W) premultiplied foreground
    alpha_map: torch.Tensor  # (B, 1, H, W) real foreground alpha
    bg: torch.Tensor  # (B, 3, H, W)
    comps: torch.Tensor  # (B, K, 3, H, W)
    masks: torch.Tensor  # (B, K, 1, H, W)
    z_what: torch.Tensor  # (B, N, D)
    z_where: torch.Tensor  # (B, N, 4): sx, sy, tx, ty
    z_pres: torch.Tensor  # (B, N, 1)
    z_pres_prob: torch.Tensor  # (B, N, 1)
    z_pres_logits: torch.Tensor  # (B, N, 1)
    z_scale: torch.Tensor  # (B, N, 2)
    z_shift: torch.Tensor  # (B, N, 2)
    z_depth: torch.Tensor  # (B, N, 1)
    z_mask: torch.Tensor  # (B, K, D)
    z_comp: torch.Tensor  # (B, K, D)
    prior_z_pres_prob: torch.Tensor  # (1,)
    o_att: torch.Tensor  # (B*N, 3, h, w)
    alpha_att: torch.Tensor  # (B*N, 1, h, w)
    alpha_att_hat: torch.Tensor  # (B*N, 1, h, w)
    importance_map_full_res_norm: torch.Tensor | None  # (B, N, 1, H, W)
    boundary_loss: torch.Tensor  # (B,)
    boundary_map: torch.Tensor | None  # (B, 1, H, W)
    kl_z_what: torch.Tensor  # (B,) each
    kl_z_pres: torch.Tensor
    kl_z_scale: torch.Tensor
    kl_z_shift: torch.Tensor
    kl_z_depth: torch.Tensor
    kl_z_where: torch.Tensor
    kl_fg: torch.Tensor
    kl_bg: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor | None]:
        """The fields as a dict, keyed like the original's ``log``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Space(nn.Module):
    """The SPACE model. Children ``fg_module`` then ``bg_module``, as the original (SPEC 3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.fg_module = SpaceFg(cfg)
        self.bg_module = SpaceBg(cfg)

    def forward(self, x: torch.Tensor, priors: Priors, mode: str = "sample") -> SpaceOutput:
        """One forward pass.

        Args:
            x: (B, 3, H, W) images in [0, 1].
            priors: the step-dependent values, from ``schedules.priors_at(cfg, step)`` in training
                or ``schedules.final_priors(cfg)`` for evaluation.
            mode: 'sample' draws every latent, as the original; 'deterministic' takes each
                Normal latent at its mean and z_pres at sigmoid(logits / tau).
        Returns:
            a :class:`SpaceOutput`.
        """
        if mode not in MODES:
            raise ValueError(f"invalid mode {mode!r}; allowed: {MODES}")
        size = self.cfg.image_size
        if x.dim() != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(x.shape)}")
        if not x.is_floating_point():  # (the range is not checked here: it would cost a GPU sync each step)
            raise ValueError(f"expected float images in [0, 1], got {x.dtype}: divide by 255 (or 65535), or pass "
                             f"them to model.detect, which takes uint8 and uint16 images of any size")
        deterministic = mode == "deterministic"
        # 1. Background first, then foreground: the original's RNG order (SPEC 13.3).
        bg = self.bg_module(x, deterministic)
        fg = self.fg_module(x, priors, deterministic)

        # 2. Fix-alpha trick: a constant alpha in the likelihood and reconstruction only.
        alpha = fg.alpha_map if priors.fix_alpha is None else torch.full_like(fg.alpha_map, priors.fix_alpha)

        # 3. Per-channel mixture of foreground and background (SPEC 6 step 3).
        fg_ll = fg.fg_likelihood + (alpha + ALPHA_LOG_EPS).log()
        bg_ll = bg.bg_likelihood + (1 - alpha + ALPHA_LOG_EPS).log()
        log_like = torch.logsumexp(torch.stack((fg_ll, bg_ll), 1), 1).flatten(1).sum(1)  # (B,)

        # 4. Reconstruction: fg is premultiplied, so alpha enters twice (SPEC 13.1).
        y = alpha * fg.fg + (1 - alpha) * bg.bg
        elbo = log_like - bg.kl_bg - fg.kl_fg
        objective = -elbo
        if priors.kl_what_weight != 1.0:  # z_what's KL warm-up (model.z_what_kl_warmup_steps)
            objective = objective - (1.0 - priors.kl_what_weight) * fg.kl_z_what
        loss = (objective + fg.boundary_loss).mean()
        mse = ((y - x) ** 2).flatten(1).sum(1)
        return SpaceOutput(
            loss=loss, elbo=elbo, log_like=log_like, mse=mse, imgs=x, y=y, fg=fg.fg, alpha_map=fg.alpha_map,
            bg=bg.bg, comps=bg.comps, masks=bg.masks, z_what=fg.z_what, z_where=fg.z_where, z_pres=fg.z_pres,
            z_pres_prob=fg.z_pres_prob, z_pres_logits=fg.z_pres_logits, z_scale=fg.z_scale, z_shift=fg.z_shift,
            z_depth=fg.z_depth, z_mask=bg.z_mask, z_comp=bg.z_comp,
            prior_z_pres_prob=self.fg_module.prior_z_pres_prob.detach().reshape(1),
            o_att=fg.o_att, alpha_att=fg.alpha_att, alpha_att_hat=fg.alpha_att_hat,
            importance_map_full_res_norm=fg.importance_map_full_res_norm, boundary_loss=fg.boundary_loss,
            boundary_map=fg.boundary_map, kl_z_what=fg.kl_z_what, kl_z_pres=fg.kl_z_pres,
            kl_z_scale=fg.kl_z_scale, kl_z_shift=fg.kl_z_shift, kl_z_depth=fg.kl_z_depth,
            kl_z_where=fg.kl_z_where, kl_fg=fg.kl_fg, kl_bg=bg.kl_bg)

    def detect(self, images, threshold: float = 0.5, mode: str = "deterministic"):
        """Objects per image with pixel boxes, presence, depth and z_what (see ``space.objects``)."""
        from .objects import detect
        return detect(self, images, threshold, mode)


def build_model(config: str | ModelConfig) -> Space:
    """Build SPACE from a ModelConfig or the name of one of the original's five configurations."""
    cfg = original_config(config)[0] if isinstance(config, str) else config
    return Space(cfg)


def build_optimizers(model: Space, fg_optim: str = "RMSprop", fg_lr: float = 1e-5,
                     bg_optim: str = "Adam", bg_lr: float = 1e-3) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The original's two optimisers, split purely by submodule (SPEC 8.1).

    The frozen legacy ``boundary_filter.weight`` stays in the fg optimiser's list, so that the
    parameter indices, and therefore old optimiser state_dicts, match.
    """
    fg = getattr(torch.optim, fg_optim)(model.fg_module.parameters(), lr=fg_lr)
    bg = getattr(torch.optim, bg_optim)(model.bg_module.parameters(), lr=bg_lr)
    return fg, bg
