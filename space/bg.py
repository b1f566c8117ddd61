"""SPACE background: a K-component mixture with a recurrent mask posterior (SPEC 3.2 and 5).

Letters: B batch, K components, D latent size, H = W image side.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fastpath import run_checkpointed, spatial_broadcast_decode
from .distributions import normal_kl, normal_log_prob, normal_sample
from .layers import conv_bn_elu, pixel_shuffle_decoder, scaled

LATENT_STD_EPS = 1e-4  # added to mask and component stds (SPEC 3.2)
MASK_LOG_EPS = 1e-5  # log(mask + 1e-5) (SPEC 5.4, 5.5)
SPATIAL_BROADCAST_PAD = 8  # the broadcast decoder starts 8 pixels larger; 4 unpadded 3x3 convs


def loc_scale(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (.., 2D) output into loc and softplus(.) + 1e-4 scale."""
    loc, scale = t.chunk(2, -1)
    return loc, F.softplus(scale) + LATENT_STD_EPS


class ImageEncoderBg(nn.Module):
    """(B, 3, H, W) -> (B, img_enc_dim_bg)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = scaled(64, cfg.bg_width)
        side = cfg.image_size // 16
        self.enc = nn.Sequential(*conv_bn_elu(3, c, 3, 2, 1), *conv_bn_elu(c, c, 3, 2, 1),
                                 *conv_bn_elu(c, c, 3, 2, 1), *conv_bn_elu(c, c, 3, 2, 1),
                                 nn.Flatten(), nn.Linear(c * side * side, cfg.img_enc_dim_bg), nn.ELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)


class PredictMask(nn.Module):
    """LSTM state -> loc and scale of z_mask."""

    def __init__(self, hidden_dim: int, z_dim: int):
        super().__init__()
        self.fc = nn.Linear(hidden_dim, 2 * z_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loc_scale(self.fc(h))


class PredictComp(nn.Module):
    """z_mask -> loc and scale of the prior of z_comp."""

    def __init__(self, z_mask_dim: int, hidden_dim: int, z_comp_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(z_mask_dim, hidden_dim), nn.ELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.ELU(), nn.Linear(hidden_dim, 2 * z_comp_dim))

    def forward(self, z_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loc_scale(self.mlp(z_mask))


class MaskDecoder(nn.Module):
    """z_mask (M, D) -> mask logits' sigmoid (M, 1, H, W); PixelShuffle 4, 2, 4, 4 at 128 px."""

    STAGES = [(256, 4, 16), (128, 2, 16), (64, 4, 8), (16, 4, 4)]  # (channels, factor, groups)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dec = pixel_shuffle_decoder(cfg.z_mask_dim, 1, self.STAGES, cfg.image_size, cfg.bg_width)

    def forward(self, z_mask: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(z_mask[:, :, None, None]))


class CompEncoder(nn.Module):
    """[log(mask + 1e-5), R, G, B] (M, 4, H, W) -> loc and scale of z_comp."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c32, c64 = scaled(32, cfg.bg_width), scaled(64, cfg.bg_width)
        side = cfg.image_size // 16
        self.enc = nn.Sequential(*conv_bn_elu(4, c32, 3, 2, 1), *conv_bn_elu(c32, c32, 3, 2, 1),
                                 *conv_bn_elu(c32, c64, 3, 2, 1), *conv_bn_elu(c64, c64, 3, 2, 1),
                                 nn.Flatten(), nn.Linear(c64 * side * side, 2 * cfg.z_comp_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loc_scale(self.enc(x))


class SpatialBroadcast(nn.Module):
    """Tile z to (M, D, S, S) and append x then y coordinates in [-1, 1]."""

    def forward(self, z: torch.Tensor, size: int) -> torch.Tensor:
        M, D = z.shape
        z = z[:, :, None, None].expand(M, D, size, size)
        line = torch.linspace(-1, 1, size, device=z.device, dtype=z.dtype)
        yy, xx = torch.meshgrid(line, line, indexing="ij")
        coords = torch.stack((xx, yy))[None].expand(M, 2, size, size)
        return torch.cat((z, coords), 1)  # (M, D + 2, S, S)


class CompDecoder(nn.Module):
    """Spatial-broadcast component decoder, used for K > 1: z_comp (M, D) -> RGB (M, 3, H, W)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.size = cfg.image_size + SPATIAL_BROADCAST_PAD
        self.fast_path = cfg.fast_path
        self.low_memory = cfg.fast_path and cfg.low_memory
        c = scaled(32, cfg.bg_width)
        self.spatial_broadcast = SpatialBroadcast()
        self.decoder = nn.Sequential(*conv_bn_elu(cfg.z_comp_dim + 2, c, 3, 1, 0), *conv_bn_elu(c, c, 3, 1, 0),
                                     *conv_bn_elu(c, c, 3, 1, 0), *conv_bn_elu(c, c, 3, 1, 0), nn.Conv2d(c, 3, 1, 1, 0))

    def forward(self, z_comp: torch.Tensor) -> torch.Tensor:
        if self.fast_path:  # the first conv split into a per-sample and a shared term (fastpath.py)
            return spatial_broadcast_decode(self.decoder, z_comp, self.size, recompute=self.low_memory)
        return torch.sigmoid(self.decoder(self.spatial_broadcast(z_comp, self.size)))


class CompDecoderStrong(nn.Module):
    """PixelShuffle component decoder, used for K = 1: z_comp (M, D) -> RGB (M, 3, H, W)."""

    STAGES = [(256, 4, 16), (128, 4, 16), (64, 2, 8), (16, 4, 4)]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dec = pixel_shuffle_decoder(cfg.z_comp_dim, 3, self.STAGES, cfg.image_size, cfg.bg_width)

    def forward(self, z_comp: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(z_comp[:, :, None, None]))


def stick_breaking(pis: list[torch.Tensor]) -> list[torch.Tensor]:
    """Masks from K decoded maps; the last takes the remainder, its own map unused (SPEC 5.3)."""
    rest = torch.ones_like(pis[0])
    masks = []
    for pi in pis[:-1]:
        mask = pi * rest
        rest = rest - mask
        masks.append(mask)
    masks.append(rest)
    return masks


@dataclass
class BgOutput:
    """Background results; field names are the original's log keys (SPEC 5.7)."""

    bg: torch.Tensor  # (B, 3, H, W)
    comps: torch.Tensor  # (B, K, 3, H, W)
    masks: torch.Tensor  # (B, K, 1, H, W)
    bg_likelihood: torch.Tensor  # (B, 3, H, W) per-channel mixture log-likelihood
    kl_bg: torch.Tensor  # (B,)
    z_mask: torch.Tensor  # (B, K, D)
    z_comp: torch.Tensor  # (B, K, D)


class SpaceBg(nn.Module):
    """Background module; state_dict keys as the original's ``bg_module`` (SPEC 3.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_enc = ImageEncoderBg(cfg)
        self.rnn_mask = nn.LSTMCell(cfg.z_mask_dim + cfg.img_enc_dim_bg, cfg.rnn_mask_hidden_dim)
        self.rnn_mask_h = nn.Parameter(torch.zeros(cfg.rnn_mask_hidden_dim))
        self.rnn_mask_c = nn.Parameter(torch.zeros(cfg.rnn_mask_hidden_dim))
        self.z_mask_0 = nn.Parameter(torch.zeros(cfg.z_mask_dim))
        self.predict_mask = PredictMask(cfg.rnn_mask_hidden_dim, cfg.z_mask_dim)
        self.mask_decoder = MaskDecoder(cfg)
        self.comp_encoder = CompEncoder(cfg)
        self.comp_decoder = CompDecoder(cfg) if cfg.K > 1 else CompDecoderStrong(cfg)
        self.rnn_mask_prior = nn.LSTMCell(cfg.z_mask_dim, cfg.rnn_mask_prior_hidden_dim)
        self.rnn_mask_h_prior = nn.Parameter(torch.zeros(cfg.rnn_mask_prior_hidden_dim))
        self.rnn_mask_c_prior = nn.Parameter(torch.zeros(cfg.rnn_mask_prior_hidden_dim))
        self.predict_mask_prior = PredictMask(cfg.rnn_mask_prior_hidden_dim, cfg.z_mask_dim)
        self.predict_comp_prior = PredictComp(cfg.z_mask_dim, cfg.predict_comp_hidden_dim, cfg.z_comp_dim)

    def forward(self, x: torch.Tensor, deterministic: bool = False) -> BgOutput:
        cfg = self.cfg
        B, K, H = x.size(0), cfg.K, cfg.image_size

        # 1. Mask posterior: an LSTM over components (SPEC 5.2).
        low_memory = cfg.fast_path and cfg.low_memory  # recompute in the backward (fastpath.run_checkpointed)
        x_enc = run_checkpointed(self.image_enc, x, low_memory)  # (B, E)
        h, c = self.rnn_mask_h.expand(B, -1), self.rnn_mask_c.expand(B, -1)
        z_mask = self.z_mask_0.expand(B, -1)
        z_masks, mask_posts, pis = [], [], []
        for _ in range(K):
            h, c = self.rnn_mask(torch.cat((z_mask, x_enc), 1), (h, c))
            loc, scale = self.predict_mask(h)
            z_mask = normal_sample(loc, scale, deterministic)  # (B, D)
            z_masks.append(z_mask)
            mask_posts.append((loc, scale))
            pis.append(run_checkpointed(self.mask_decoder, z_mask, low_memory))  # (B, 1, H, W)
        masks = torch.stack(stick_breaking(pis), 1)  # (B, K, 1, H, W)

        # 2. Components: encode [log mask, image] per (b, k), flattened as b*K + k (SPEC 5.4).
        log_masks = (masks + MASK_LOG_EPS).log()
        comp_input = torch.cat((log_masks.view(B * K, 1, H, H),
                                x[:, None].expand(B, K, 3, H, H).reshape(B * K, 3, H, H)), 1)
        comp_loc, comp_scale = run_checkpointed(self.comp_encoder, comp_input, low_memory)  # (B*K, D) each
        z_comp = normal_sample(comp_loc, comp_scale, deterministic)
        comps = self.comp_decoder(z_comp).view(B, K, 3, H, H)

        # 3. Per-channel mixture likelihood and the reconstruction (SPEC 5.5).
        log_like = normal_log_prob(x[:, None], comps, cfg.bg_sigma) + log_masks  # (B, K, 3, H, W)
        bg_likelihood = torch.logsumexp(log_like, 1)  # (B, 3, H, W)
        bg = (comps * masks).sum(1)

        # 4. Prior LSTM, fed the posterior samples, and the KL terms (SPEC 5.6).
        h, c = self.rnn_mask_h_prior.expand(B, -1), self.rnn_mask_c_prior.expand(B, -1)
        comp_prior = []
        kl_bg = x.new_zeros(B)
        for k in range(K):
            prior_loc, prior_scale = self.predict_mask_prior(h)
            kl_bg = kl_bg + normal_kl(*mask_posts[k], prior_loc, prior_scale).sum(-1)
            comp_prior.append(self.predict_comp_prior(z_masks[k]))
            h, c = self.rnn_mask_prior(z_masks[k], (h, c))
        comp_prior_loc = torch.stack([loc for loc, _ in comp_prior], 1)  # (B, K, D)
        comp_prior_scale = torch.stack([scale for _, scale in comp_prior], 1)
        kl_comp = normal_kl(comp_loc.view(B, K, -1), comp_scale.view(B, K, -1), comp_prior_loc, comp_prior_scale)
        kl_bg = kl_bg + kl_comp.flatten(1).sum(1)
        return BgOutput(bg=bg, comps=comps, masks=masks, bg_likelihood=bg_likelihood, kl_bg=kl_bg,
                        z_mask=torch.stack(z_masks, 1), z_comp=z_comp.view(B, K, -1))
