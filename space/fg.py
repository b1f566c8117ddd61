"""SPACE foreground: a grid of cells proposing objects in parallel (SPEC sections 3.1 and 4).

Letters: B batch, N = G*G cells, D latent size, C channels, H = W image side, h = w glimpse side.
This is the SPEC-literal version: it pastes every cell's glimpse to a full-resolution map and
takes the softmax over all N cells per pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .distributions import bernoulli_kl, normal_kl, normal_log_prob, normal_sample, relaxed_bernoulli_logit_sample
from .fastpath import GLIMPSE_CHUNK, compose, crop_glimpses_batched, glimpse_chunk_size, run_in_chunks
from .geometry import compose_reference, crop_glimpses
from .layers import conv_celu_gn, scaled, upsample_block
from .schedules import Priors

Z_PRES_LOGIT_BOUND = 8.8  # logits = 8.8 * tanh(.), so presence is at most sigmoid(8.8) (SPEC 4.3)
SCALE_STD_EPS = 1e-15  # added to the z_scale std only (SPEC 4.3)
IMPORTANCE_SCALE = 100.0  # importance = alpha_hat * 100 * sigmoid(-z_depth) (SPEC 4.5)
BOUNDARY_SCALE = 1000.0  # boundary map multiplier (SPEC 4.6)
BOUNDARY_STD = 0.7  # std of the Normal penalising boundary overlap (SPEC 4.6)
BOUNDARY_VALUE = 1 / 1024  # value of the boundary kernel's ring
BOUNDARY_WIDTH_32 = 6  # ring width for a 32-pixel glimpse; scaled for other glimpse sizes
LEGACY_FILTER_BLOCK = (6, 26)  # +1/1024 block of the unused legacy boundary_filter weight


def boundary_kernel(size: int, width: int) -> torch.Tensor:
    """(size, size) kernel: BOUNDARY_VALUE on a ring ``width`` pixels wide, 0 inside (SPEC 4.6)."""
    kernel = torch.full((size, size), BOUNDARY_VALUE)
    kernel[width:size - width, width:size - width] = 0
    return kernel


class ImgEncoderFg(nn.Module):
    """Grid encoder and the four heads (z_scale, z_shift, z_pres, z_depth)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w, dim = cfg.fg_width, cfg.img_enc_dim_fg
        # Downsampling by image_size / G: three stride-2 convs always, then the last and the
        # second-to-last strided conv as needed (at 128 px: G=16 -> 1,1; G=8 -> 1,2; G=4 -> 2,2).
        extra = (cfg.image_size // cfg.G).bit_length() - 1 - 3  # stride-2 layers beyond the first three
        last_stride = 2 if extra >= 1 else 1
        second_to_last_stride = 2 if extra >= 2 else 1
        c = [scaled(n, w) for n in (16, 32, 64, 128, 256)]
        self.enc = nn.Sequential(
            *conv_celu_gn(3, c[0], 4, 2, 1, 4),
            *conv_celu_gn(c[0], c[1], 4, 2, 1, 8),
            *conv_celu_gn(c[1], c[2], 4, 2, 1, 8),
            *conv_celu_gn(c[2], c[3], 3, second_to_last_stride, 1, 16),
            *conv_celu_gn(c[3], c[4], 3, last_stride, 1, 32),
            *conv_celu_gn(c[4], dim, 1, 1, 0, 16),
        )
        self.enc_lat = nn.Sequential(*conv_celu_gn(dim, dim, 3, 1, 1, 16), *conv_celu_gn(dim, dim, 3, 1, 1, 16))
        self.enc_cat = nn.Sequential(*conv_celu_gn(2 * dim, dim, 3, 1, 1, 16))
        self.z_scale_net = nn.Conv2d(dim, 4, 1)  # means (x, y), pre-softplus stds (x, y)
        self.z_shift_net = nn.Conv2d(dim, 4, 1)
        self.z_pres_net = nn.Conv2d(dim, 1, 1)
        self.z_depth_net = nn.Conv2d(dim, 2, 1)  # mean, pre-softplus std
        offset_y, offset_x = torch.meshgrid(torch.arange(cfg.G), torch.arange(cfg.G), indexing="ij")
        self.register_buffer("offset", torch.stack((offset_x, offset_y)).float())  # (2, G, G): (column, row)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Grid features to per-cell heads, each (B, N, D): pres logits, depth, scale, shift."""
        B = x.size(0)
        enc = self.enc(x)
        features = self.enc_cat(torch.cat((enc, self.enc_lat(enc)), 1))  # (B, dim, G, G)

        def cells(t: torch.Tensor) -> torch.Tensor:  # (B, D, G, G) -> (B, N, D), row-major cells
            return t.permute(0, 2, 3, 1).reshape(B, -1, t.size(1))

        z_pres_logits = cells(Z_PRES_LOGIT_BOUND * torch.tanh(self.z_pres_net(features)))  # (B, N, 1)
        return (z_pres_logits, cells(self.z_depth_net(features)), cells(self.z_scale_net(features)),
                cells(self.z_shift_net(features)))


class ZWhatEnc(nn.Module):
    """Glimpse encoder: (B*N, 3, h, w) -> mean and std of z_what."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = [scaled(n, cfg.fg_width) for n in (16, 32, 32, 64, 128, 256)]
        last_kernel = cfg.glimpse_size // 8  # 4 for the original's 32-pixel glimpses: 4 -> 1
        self.enc_cnn = nn.Sequential(
            *conv_celu_gn(3, c[0], 3, 1, 1, 4),
            *conv_celu_gn(c[0], c[1], 4, 2, 1, 8),
            *conv_celu_gn(c[1], c[2], 3, 1, 1, 4),
            *conv_celu_gn(c[2], c[3], 4, 2, 1, 8),
            *conv_celu_gn(c[3], c[4], 4, 2, 1, 8),
            *conv_celu_gn(c[4], c[5], last_kernel, 1, 0, 16),
        )
        self.enc_what = nn.Linear(c[5], 2 * cfg.z_what_dim)

    def forward(self, glimpses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.enc_what(self.enc_cnn(glimpses).flatten(1)).chunk(2, -1)
        return mean, F.softplus(std)  # (B*N, D) each; no epsilon on the std (SPEC 4.4)


class GlimpseDec(nn.Module):
    """Glimpse decoder: z_what (B*N, D) -> RGB o (B*N, 3, h, w) and alpha (B*N, 1, h, w)."""

    # (channels, GroupNorm groups) of the original's five x2 upsampling stages, 1 -> 32 pixels.
    STAGES = [(128, 16), (128, 16), (64, 8), (32, 8), (16, 4)]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_stages = cfg.glimpse_size.bit_length() - 1
        stages = ([(128, 16)] * (n_stages - len(self.STAGES)) + self.STAGES)[-n_stages:]
        first = scaled(256, cfg.fg_width)
        layers: list[nn.Module] = conv_celu_gn(cfg.z_what_dim, first, 1, 1, 0, 16)
        c_in = first
        for channels, groups in stages:
            c_out = scaled(channels, cfg.fg_width)
            layers += upsample_block(c_in, c_out, 2, groups)
            c_in = c_out
        self.dec = nn.Sequential(*layers)
        self.dec_o = nn.Conv2d(c_in, 3, 3, 1, 1)
        self.dec_alpha = nn.Conv2d(c_in, 1, 3, 1, 1)
        self.fast_path = cfg.fast_path

    def forward(self, z_what: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dec(z_what[:, :, None, None])
        if self.fast_path:
            # Both heads as one 4-channel convolution, in channels_last: oneDNN is slow on convs
            # with 1 or 3 output channels (three times slower for the pair, fwd + bwd).
            weight = torch.cat((self.dec_o.weight, self.dec_alpha.weight))
            bias = torch.cat((self.dec_o.bias, self.dec_alpha.bias))
            out = torch.sigmoid(F.conv2d(h.contiguous(memory_format=torch.channels_last), weight, bias, 1, 1))
            return out[:, :3].contiguous(), out[:, 3:].contiguous()
        return torch.sigmoid(self.dec_o(h)), torch.sigmoid(self.dec_alpha(h))


@dataclass
class FgOutput:
    """Foreground results; field names are the original's log keys (SPEC 4.9)."""

    fg: torch.Tensor  # (B, 3, H, W) premultiplied foreground composite
    alpha_map: torch.Tensor  # (B, 1, H, W) real foreground alpha
    fg_likelihood: torch.Tensor  # (B, 3, H, W) log N(x; fg, fg_sigma^2)
    z_what: torch.Tensor  # (B, N, D)
    z_where: torch.Tensor  # (B, N, 4): sx, sy, tx, ty
    z_pres: torch.Tensor  # (B, N, 1) relaxed sample (or its median in deterministic mode)
    z_pres_prob: torch.Tensor  # (B, N, 1) sigmoid(logits)
    z_pres_logits: torch.Tensor  # (B, N, 1)
    z_scale: torch.Tensor  # (B, N, 2)
    z_shift: torch.Tensor  # (B, N, 2)
    z_depth: torch.Tensor  # (B, N, 1)
    o_att: torch.Tensor  # (B*N, 3, h, w)
    alpha_att: torch.Tensor  # (B*N, 1, h, w)
    alpha_att_hat: torch.Tensor  # (B*N, 1, h, w)
    importance_map_full_res_norm: torch.Tensor | None  # (B, N, 1, H, W); None on a fast path
    boundary_loss: torch.Tensor  # (B,)
    boundary_map: torch.Tensor | None  # (B, 1, H, W)
    kl_z_what: torch.Tensor  # (B,) each
    kl_z_pres: torch.Tensor
    kl_z_scale: torch.Tensor
    kl_z_shift: torch.Tensor
    kl_z_depth: torch.Tensor
    kl_z_where: torch.Tensor
    kl_fg: torch.Tensor


class SpaceFg(nn.Module):
    """Foreground module; state_dict keys as the original's ``fg_module`` (SPEC 3.1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Buffers in the original's order. Only tau and prior_z_pres_prob are read (as the last
        # forward's values, for checkpoints); the four prior_scale/shift ones are legacy placeholders.
        self.register_buffer("tau", torch.tensor(cfg.tau_start_value))
        self.register_buffer("prior_z_pres_prob", torch.tensor(cfg.z_pres_start_value))
        self.register_buffer("prior_what_mean", torch.zeros(1))
        self.register_buffer("prior_what_std", torch.ones(1))
        self.register_buffer("prior_depth_mean", torch.zeros(1))
        self.register_buffer("prior_depth_std", torch.ones(1))
        self.register_buffer("prior_scale_mean", torch.full((2, 1, 1), cfg.z_scale_mean_start_value))
        self.register_buffer("prior_scale_std", torch.full((2, 1, 1), cfg.z_scale_std_value))
        self.register_buffer("prior_shift_mean", torch.zeros(2, 1, 1))
        self.register_buffer("prior_shift_std", torch.ones(2, 1, 1))
        self.img_encoder = ImgEncoderFg(cfg)
        self.z_what_net = ZWhatEnc(cfg)
        self.glimpse_dec = GlimpseDec(cfg)
        # Legacy placeholder, never used in forward: kept for checkpoint keys and optimiser-state
        # indices. Built as a Conv2d so that it consumes RNG like the original (SPEC 13.3).
        self.boundary_filter = nn.Conv2d(1, 1, 32, bias=False)
        legacy = torch.full((1, 1, 32, 32), -1 / 1024)
        legacy[..., LEGACY_FILTER_BLOCK[0]:LEGACY_FILTER_BLOCK[1], LEGACY_FILTER_BLOCK[0]:LEGACY_FILTER_BLOCK[1]] = 1 / 1024
        self.boundary_filter.weight = nn.Parameter(legacy, requires_grad=False)
        width = round(BOUNDARY_WIDTH_32 * cfg.glimpse_size / 32) if cfg.boundary_width is None else cfg.boundary_width
        self.register_buffer("boundary_kernel", boundary_kernel(cfg.glimpse_size, width), persistent=False)
        # Glimpses per chunk of z_what_net and glimpse_dec (fastpath.run_in_chunks); None runs all
        # B*N at once (the reference). Chunks of at most 16 MiB per activation on the fast path on
        # CPU (256 glimpses of 32 pixels; the default experiment's 1024 of 16 pixels run whole), of
        # GLIMPSE_CHUNK recomputed in the backward under model.low_memory.
        if not cfg.fast_path:
            self.glimpse_chunk = None
        elif cfg.low_memory:
            self.glimpse_chunk = GLIMPSE_CHUNK
        else:
            self.glimpse_chunk = glimpse_chunk_size(cfg.glimpse_size, scaled(16, cfg.fg_width))
        self.recompute_glimpses = cfg.fast_path and cfg.low_memory

    def forward(self, x: torch.Tensor, priors: Priors, deterministic: bool = False) -> FgOutput:
        cfg = self.cfg
        B, N, H, h = x.size(0), cfg.num_cells, cfg.image_size, cfg.glimpse_size
        with torch.no_grad():  # keep the buffers as the original leaves them (SPEC 4.1)
            self.tau.fill_(priors.tau)
            self.prior_z_pres_prob.fill_(priors.z_pres_prob)

        # 1. Encode the grid and sample per-cell latents, in the original's RNG order (SPEC 13.3).
        z_pres_logits, depth, scale, shift = self.img_encoder(x)
        z_pres_y = relaxed_bernoulli_logit_sample(z_pres_logits, priors.tau, deterministic)
        z_pres = torch.sigmoid(z_pres_y)  # (B, N, 1)
        z_depth_mean, z_depth_std = depth[..., :1], F.softplus(depth[..., 1:])
        z_depth = normal_sample(z_depth_mean, z_depth_std, deterministic)  # (B, N, 1)
        z_scale_mean, z_scale_std = scale[..., :2], F.softplus(scale[..., 2:]) + SCALE_STD_EPS
        z_scale = torch.sigmoid(normal_sample(z_scale_mean, z_scale_std, deterministic))  # (B, N, 2)
        z_shift_mean, z_shift_std = shift[..., :2], F.softplus(shift[..., 2:])
        offset = self.img_encoder.offset.permute(1, 2, 0).reshape(N, 2)  # (N, 2): (column, row)
        shift_cells = torch.tanh(normal_sample(z_shift_mean, z_shift_std, deterministic))
        if cfg.shift_range != 1.0:  # model.shift_range, beyond the original
            shift_cells = cfg.shift_range * shift_cells
        z_shift = (2.0 / cfg.G) * (offset + 0.5 + shift_cells) - 1
        z_where = torch.cat((z_scale, z_shift), -1)  # (B, N, 4)

        # 2. Crop a glimpse per cell and encode it.
        if cfg.fast_path:
            glimpses = crop_glimpses_batched(x, z_where, h)  # (B*N, 3, h, w), without repeating x
        else:
            x_repeat = torch.repeat_interleave(x, N, dim=0)  # (B*N, 3, H, W): row b*N + n is cell n of image b
            glimpses = crop_glimpses(x_repeat, z_where.reshape(B * N, 4), h)  # (B*N, 3, h, w)
        z_what_mean, z_what_std = run_in_chunks(self.z_what_net, glimpses, self.glimpse_chunk,
                                                self.recompute_glimpses)
        z_what = normal_sample(z_what_mean, z_what_std, deterministic)  # (B*N, D)

        # 3. Decode glimpses.
        o_att, alpha_att = run_in_chunks(self.glimpse_dec, z_what, self.glimpse_chunk,
                                         self.recompute_glimpses)  # (B*N, 3, h, w), (B*N, 1, h, w)
        alpha_att_hat = alpha_att * z_pres.reshape(B * N, 1, 1, 1)
        y_att = alpha_att_hat * o_att
        importance = alpha_att_hat * IMPORTANCE_SCALE * torch.sigmoid(-z_depth.reshape(B * N, 1, 1, 1))

        # 4. Compose by importance, and 5. the boundary map (SPEC 4.5, 4.6).
        kernel = None
        if priors.boundary_loss:
            kernel = self.boundary_kernel.expand(B * N, 1, h, h) * z_pres.reshape(B * N, 1, 1, 1)
        if cfg.fast_path:
            fg, alpha_map, boundary_sum = compose(importance, y_att, alpha_att_hat, z_where, H, kernel, cfg.low_memory)
            weights = None
        else:
            fg, alpha_map, boundary_sum, weights = compose_reference(importance, y_att, alpha_att_hat, z_where, H, kernel)
        if priors.boundary_loss:
            boundary_map = boundary_sum * BOUNDARY_SCALE
            overlap = boundary_map * alpha_map
            boundary_loss = -normal_log_prob(overlap, torch.zeros_like(overlap), BOUNDARY_STD).flatten(1).sum(1)
        else:
            boundary_map, boundary_loss = None, x.new_zeros(B)

        # 6. Likelihood and KL terms, each summed to (B,); none weighted by z_pres (SPEC 4.8).
        fg_likelihood = normal_log_prob(x, fg, cfg.fg_sigma)
        z_pres_prob = torch.sigmoid(z_pres_logits)
        kl_z_pres = bernoulli_kl(z_pres_prob, priors.z_pres_prob).flatten(1).sum(1)
        kl_z_depth = normal_kl(z_depth_mean, z_depth_std, self.prior_depth_mean, self.prior_depth_std).flatten(1).sum(1)
        scale_prior_mean = torch.tensor(priors.z_scale_mean, device=x.device)
        kl_z_scale = normal_kl(z_scale_mean, z_scale_std, scale_prior_mean, cfg.z_scale_std_value).flatten(1).sum(1)
        kl_z_shift = normal_kl(z_shift_mean, z_shift_std, 0.0, 1.0).flatten(1).sum(1)
        kl_z_what = normal_kl(z_what_mean, z_what_std, self.prior_what_mean, self.prior_what_std).view(B, -1).sum(1)
        kl_z_where = kl_z_scale + kl_z_shift
        return FgOutput(
            fg=fg, alpha_map=alpha_map, fg_likelihood=fg_likelihood, z_what=z_what.view(B, N, -1),
            z_where=z_where, z_pres=z_pres, z_pres_prob=z_pres_prob, z_pres_logits=z_pres_logits,
            z_scale=z_scale, z_shift=z_shift, z_depth=z_depth, o_att=o_att, alpha_att=alpha_att,
            alpha_att_hat=alpha_att_hat, importance_map_full_res_norm=weights, boundary_loss=boundary_loss,
            boundary_map=boundary_map, kl_z_what=kl_z_what, kl_z_pres=kl_z_pres, kl_z_scale=kl_z_scale,
            kl_z_shift=kl_z_shift, kl_z_depth=kl_z_depth, kl_z_where=kl_z_where,
            kl_fg=kl_z_what + kl_z_where + kl_z_pres + kl_z_depth)
