"""The few distributions SPACE needs, written out so that the formulas are visible.

They follow torch.distributions' formulas exactly, without argument validation (PyTorch 1.3.0,
which the original ran on, did not validate; SPEC 13.3).
"""
from __future__ import annotations

import math

import torch

EPS_PROB = torch.finfo(torch.float32).eps  # clamp of u and p in the relaxed Bernoulli (SPEC 4.3)
EPS_BERNOULLI_KL = 1e-15  # inside the logs of the Bernoulli KL (SPEC 4.8)
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, std^2).

    A float std becomes a float32 tensor first, as torch.distributions.Normal does, so that the
    log and the square are taken in float32 like the original's."""
    if not torch.is_tensor(std):
        std = torch.tensor(std, dtype=x.dtype, device=x.device)
    var = std ** 2
    log_std = std.log()
    return -((x - mean) ** 2) / (2 * var) - log_std - _LOG_SQRT_2PI


def normal_kl(mean_q: torch.Tensor, std_q: torch.Tensor,
              mean_p: torch.Tensor | float, std_p: torch.Tensor | float) -> torch.Tensor:
    """Elementwise KL(N(mean_q, std_q) || N(mean_p, std_p))."""
    var_ratio = (std_q / std_p) ** 2
    t1 = ((mean_q - mean_p) / std_p) ** 2
    return 0.5 * (var_ratio + t1 - 1 - var_ratio.log())


def normal_sample(mean: torch.Tensor, std: torch.Tensor, deterministic: bool) -> torch.Tensor:
    """Reparameterised sample, or the mean in deterministic mode."""
    if deterministic:
        return mean
    # randn, not randn_like: a sliced (non-contiguous) mean would get its noise in a permuted
    # layout, and the original draws contiguous noise (same draws, same order as its rsample).
    return mean + std * torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)


def relaxed_bernoulli_logit_sample(logits: torch.Tensor, tau: float, deterministic: bool) -> torch.Tensor:
    """Sample of a logit-relaxed Bernoulli (SPEC 4.3); z_pres = sigmoid(result).

    In deterministic mode the noise-free value logits / tau, the distribution's median.
    """
    if deterministic:
        return logits / tau
    # In float32 whatever the logits' type: under bf16 autocast 1 - EPS_PROB rounds to 1, the clamp
    # left p at 1 for confident cells, and log1p(-p) made the gradients NaN (every step skipped).
    logits = logits.float()
    p = torch.sigmoid(logits).clamp(EPS_PROB, 1 - EPS_PROB)
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device).clamp(EPS_PROB, 1 - EPS_PROB)
    return (u.log() - (-u).log1p() + p.log() - (-p).log1p()) / tau


def bernoulli_kl(q: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Analytic KL(Bernoulli(q) || Bernoulli(p)), elementwise, with the original's 1e-15 (SPEC 4.8)."""
    eps = EPS_BERNOULLI_KL
    p = torch.as_tensor(p, dtype=q.dtype, device=q.device)  # float32, as the original's buffer
    return (q * ((q + eps).log() - (p + eps).log())
            + (1 - q) * ((1 - q + eps).log() - (1 - p + eps).log()))
