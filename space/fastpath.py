"""Fast path: the same mathematics as the SPEC-literal code, several times faster and lighter.

Letters: B batch, N = G*G cells, C channels, H = W image side, h = w glimpse side, M decoder batch,
P window side, T total number of window pixels.

The SPEC-literal foreground (``fg.SpaceFg.forward``) repeats the image N times to crop glimpses and
pastes every cell's glimpse maps to full resolution (B*N maps of H*W pixels, several times over),
then takes a softmax over all N cells per pixel. The SPEC-literal component decoder
(``bg.CompDecoder``) convolves a (M, D + 2, H + 8, W + 8) tensor in which D channels are constant.
This module computes the same functions without those redundancies:

* :func:`crop_glimpses_batched`: one grid_sample per image over the N glimpse grids, instead of
  sampling N copies of the image. Bit-identical outputs (same grid, same per-pixel arithmetic).
* :func:`compose`: each pasted map is zero outside a small window around its box, so each cell is
  sampled only on its window and the windows are scatter-added into full resolution; the softmax
  over all N cells is rebuilt exactly from those sums (see the docstring for the algebra).
* :func:`spatial_broadcast_decode`: the first convolution of the broadcast decoder splits into a
  matrix product with z and one convolution of the coordinate channels shared by all samples
  (the rest runs in channels_last format, with in-place ELUs; on CPU, its BatchNorms of a channel
  count torch's channels_last backward is slow for take the backward in NCHW: :func:`batch_norm_cl`).
* :func:`run_in_chunks`: the per-glimpse networks (z_what encoder, glimpse decoder) treat every
  glimpse independently, so they run on chunks of glimpses (faster on CPU: each chunk's memory
  comes from malloc's heap instead of fresh pages), checkpointed under ``model.low_memory``: at
  most one chunk's activations are kept. :func:`run_checkpointed` does the same for one call (meant for
  the background's mask decoder, image encoder and component encoder).

``model.low_memory`` (off by default) turns the recomputation on everywhere it is exact: glimpse
networks in chunks, each :func:`compose` piece (``recompute``), the background's mask decoder,
image encoder and component encoder (:func:`run_checkpointed`) and the BatchNorm blocks of
:func:`spatial_broadcast_decode`, two per segment, each block checkpointed again within it
(``recompute``); BatchNorm running statistics are updated once (see :func:`_recompute_safe`).
The glimpse decoder's two output heads run as one convolution on the fast path (``fg.GlimpseDec``).

Everything is pure autograd-friendly PyTorch; results equal the reference up to float rounding
(tests/test_fastpath.py: float32 to 1e-5, float64 to 1e-9, outputs and gradients).
``fg.SpaceFg`` and ``bg.CompDecoder`` call these pieces when ``model.fast_path`` is on (the
default); with it off they run the SPEC-literal code that the tests compare against.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .geometry import INVERSE_EPS, compose_reference

# --------------------------------------------------------------------------------------------
# 1. Glimpse cropping
# --------------------------------------------------------------------------------------------

def _crop_theta(z_where: torch.Tensor) -> torch.Tensor:
    """(M, 4) -> (M, 2, 3) crop matrices [[sx, 0, tx], [0, sy, ty]], as geometry.crop_glimpses."""
    sx, sy, tx, ty = z_where.unbind(-1)
    zero = torch.zeros_like(sx)
    return torch.stack((torch.stack((sx, zero, tx), -1), torch.stack((zero, sy, ty), -1)), -2)


def crop_glimpses_batched(x: torch.Tensor, z_where: torch.Tensor, size: int) -> torch.Tensor:
    """Crop N glimpses from each image without repeating the image N times.

    Equal to ``crop_glimpses(x.repeat_interleave(N, 0), z_where.reshape(B * N, 4), size)``:
    the (B*N, h, w, 2) sampling grid is built by the same ``F.affine_grid`` call, so its values
    are bit-identical; it is then viewed as one (N*h, w) grid per image, and grid_sample computes
    every output pixel from its own grid point only, so the glimpses are bit-identical too. Only
    the backward to ``x`` sums the N glimpses' contributions in another order (rounding).

    Args:
        x: (B, C, H, W) images.
        z_where: (B, N, 4) boxes [sx, sy, tx, ty].
        size: glimpse side h = w.
    Returns:
        (B*N, C, h, w) glimpses; row b*N + n is cell n of image b.
    """
    B, C = x.shape[:2]
    N = z_where.size(1)
    theta = _crop_theta(z_where.reshape(B * N, 4))  # (B*N, 2, 3)
    grid = F.affine_grid(theta, [B * N, C, size, size], align_corners=False)  # (B*N, h, w, 2)
    glimpses = F.grid_sample(x, grid.view(B, N * size, size, 2), mode="bilinear", padding_mode="zeros",
                             align_corners=False)  # (B, C, N*h, w)
    return glimpses.view(B, C, N, size, size).transpose(1, 2).reshape(B * N, C, size, size)


# --------------------------------------------------------------------------------------------
# 2. Compositing on windows
# --------------------------------------------------------------------------------------------

WINDOW_PIXELS = 2 ** 21  # window pixels sampled per grid_sample call in compose (bounds its memory)


def _bucket_sides(image_size: int) -> list[int]:
    """Window sides used for bucketing cells: 8, 16, 32, 48, 64, 96, ... and the image side.

    Each bucket costs a dozen operations whatever its size, so small windows share coarse
    buckets (factor 2), while large ones, where the area matters, get factor 1.5 steps.
    """
    sides, side = [], 8
    while side < image_size:
        sides += [side, side * 3 // 2] if side >= 32 else [side]
        side *= 2
    return [s for s in sides if s < image_size] + [image_size]


def _pixel_base(size: int, like: torch.Tensor) -> torch.Tensor:
    """(size,) pixel-centre coordinates u_j = (2j + 1)/size - 1, computed as F.affine_grid does."""
    return torch.linspace(-1, 1, size, dtype=like.dtype, device=like.device) * ((size - 1) / size)


def _windows(scale: torch.Tensor, shift: torch.Tensor, glimpse_side: int, image_size: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """First pixel and length of the window holding one axis of each pasted map's support.

    The pasted map samples the glimpse at g = a*u + c with a = 1/(s + 1e-9), c = -t/(s + 1e-9) (u the
    pixel's normalised coordinate). Bilinear sampling with zero padding and align_corners=False
    is non-zero, and has a non-zero gradient, only for g in [-1 - 1/w, 1 + 1/w]; that is pixels
    j in [j_lo, j_hi] with j = ((u + 1) * W - 1) / 2. We take one more pixel on each side for
    rounding. Computed in float64, without gradient (window positions are discrete).

    Returns:
        start (M,) int64 and length (M,) int64, length <= image_size.
    """
    a = 1 / (scale.double() + INVERSE_EPS)
    c = -shift.double() / (scale.double() + INVERSE_EPS)
    edge = 1 + 1 / glimpse_side
    u1, u2 = (-edge - c) / a, (edge - c) / a
    j1, j2 = ((u1 + 1) * image_size - 1) / 2, ((u2 + 1) * image_size - 1) / 2
    lo = torch.minimum(j1, j2).clamp(-2 * image_size, 2 * image_size)
    hi = torch.maximum(j1, j2).clamp(-2 * image_size, 2 * image_size)
    start = lo.floor().long() - 1
    length = (hi.ceil().long() + 1 - start + 1).clamp(1, image_size)
    return start, length


def _compose_piece(base_x: torch.Tensor, base_y: torch.Tensor, flat: torch.Tensor, maps_k: torch.Tensor,
                   affine_k: torch.Tensor, shift: torch.Tensor, count: torch.Tensor, denominator: torch.Tensor,
                   *sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One piece of :func:`compose`: sample its windows and add them to the running sums.

    base_x (nb, Px) and base_y (nb, Py) are the windows' pixel-centre coordinates, flat
    (nb*Py*Px,) their indices into the (B*H*W,) maps. Returns the updated shift, count,
    denominator and sums (Y (3), A and, where given, K).
    """
    nb, Px = base_x.shape
    Py = base_y.size(1)
    a_x, c_x, a_y, c_y = affine_k.unbind(1)  # (nb,) each
    gx = base_x * a_x[:, None] + c_x[:, None]  # (nb, Px), the same values as affine_grid's
    gy = base_y * a_y[:, None] + c_y[:, None]  # (nb, Py)
    grid = torch.stack((gx[:, None, :].expand(nb, Py, Px), gy[:, :, None].expand(nb, Py, Px)), -1)  # (nb, Py, Px, 2)
    sampled = F.grid_sample(maps_k, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    I, *rest = (channel.reshape(-1) for channel in sampled.unbind(1))  # (nb*Py*Px,) each: I, Y (3), A, [K]

    # Online softmax over pieces: raise the shift where this piece's importance exceeds it,
    # and rescale what was accumulated against the old shift by exp(m_old - m_new) <= 1.
    with torch.no_grad():
        new_shift = shift.scatter_reduce(0, flat, I, "amax", include_self=True)  # m(p) = max(0, max I)
        rescale = torch.exp(shift - new_shift)  # (B*H*W,)
        count = count.index_add(0, flat, torch.ones_like(I))  # c(p)
    e = torch.exp(I - new_shift[flat])  # (nb*Py*Px,) every exponent <= 0
    denominator = (denominator * rescale).index_add(0, flat, e)
    sums = [(total * rescale).index_add(0, flat, value * e) if c < 4 else total.index_add(0, flat, value)
            for c, (total, value) in enumerate(zip(sums, rest))]
    return (new_shift, count, denominator, *sums)


def compose(importance: torch.Tensor, y_att: torch.Tensor, alpha_att_hat: torch.Tensor, z_where: torch.Tensor,
            image_size: int, boundary: torch.Tensor | None = None, recompute: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Paste every cell's glimpse maps and take the softmax over cells, on windows only (SPEC 4.5, 4.6).

    Reference (``SpaceFg.forward`` steps 4-5): with I_n, Y_n, A_n, K_n the glimpse maps pasted to
    full resolution by the inverse transform (bilinear, zeros, align_corners=False),

        w_n(p) = exp(I_n(p)) / sum_{n'=1..N} exp(I_n'(p)),
        fg(p) = sum_n w_n(p) Y_n(p),   alpha(p) = sum_n w_n(p) A_n(p),   boundary(p) = sum_n K_n(p).

    Every pasted map is zero, with zero gradient, outside a window around its box
    (:func:`_windows`). Sample each cell only on its window W_n; let c(p) be the number of
    windows containing p and m(p) = max(0, max_{n: p in W_n} I_n(p)). Cells whose window misses p
    have I_n(p) = 0, so with the shift m (the softmax is shift invariant; m is detached, which
    leaves the gradients exact because the expression below does not depend on m)

        sum_{n'} exp(I_n'(p)) = exp(m(p)) * D(p),
        D(p) = (N - c(p)) exp(-m(p)) + sum_{n: p in W_n} exp(I_n(p) - m(p)),
        fg(p) = sum_{n: p in W_n} exp(I_n(p) - m(p)) Y_n(p) / D(p)   (alpha likewise),

    and every exponent is <= 0, so importance up to 100 does not overflow float32 (the reference
    softmax subtracts the max too). The sums are ``index_add`` scatters of the windows into
    (B*H*W,) maps, so nothing of size B*N*H*W is ever built.

    Windows are grouped into buckets of similar size (sides 8, 16, 32, 48, 64, 96, ...), each
    bucket using one P_y x P_x window side for all its cells; a window is moved inside the image
    when it sticks out (its pixels outside the window are zero anyway), and a box larger than the
    image simply gets the whole image as its window, which is the reference computation for that
    cell. Buckets are processed one after another with an online softmax: m(p) is the running
    maximum, and the sums accumulated so far are multiplied by exp(m_old(p) - m_new(p)) when it
    rises, which leaves exactly the sums above at the end. So without gradients only one
    bucket's windows (at most WINDOW_PIXELS of them: larger buckets are cut) are ever in memory.

    Args:
        importance: (B*N, 1, h, w) glimpse importance.
        y_att: (B*N, 3, h, w) premultiplied glimpse colour.
        alpha_att_hat: (B*N, 1, h, w) glimpse alpha times z_pres.
        z_where: (B, N, 4) boxes [sx, sy, tx, ty].
        image_size: H = W.
        boundary: optional (B*N, 1, h, w) glimpse maps that are only pasted and summed.
        recompute: with gradients enabled, checkpoint each piece (torch.utils.checkpoint): the
            backward keeps only the pieces' inputs and the (B*H*W,) running sums, and samples
            each piece's windows again, instead of keeping every window's intermediate values.
            The recomputation is exact (no randomness; the same operations on the same inputs).
    Returns:
        fg (B, 3, H, W), alpha_map (B, 1, H, W), boundary_sum (B, 1, H, W) or None.
    """
    B, N = z_where.shape[:2]
    H = W = image_size
    h, w = importance.shape[-2:]
    where = z_where.reshape(B * N, 4)

    # Inverse transform g = a*u + c per axis, computed exactly as geometry.paste_glimpses' theta
    # (the same float32 operations, so that the sampling grids are bit-identical; gradients flow).
    sx, sy, tx, ty = where.unbind(-1)
    ax, ay = 1 / (sx + INVERSE_EPS), 1 / (sy + INVERSE_EPS)
    cx, cy = -tx / (sx + INVERSE_EPS), -ty / (sy + INVERSE_EPS)
    affine = torch.stack((ax, cx, ay, cy), 1)  # (B*N, 4)
    if not torch.isfinite(affine).all():  # no windows for NaN/inf boxes: the reference gives its NaNs
        return compose_reference(importance, y_att, alpha_att_hat, z_where, image_size, boundary)[:3]
    maps = [importance, y_att, alpha_att_hat] + ([boundary] if boundary is not None else [])
    maps = torch.cat(maps, 1)  # (B*N, Cm, h, w): channels I, Y (3), A, [K]
    base_x, base_y = _pixel_base(W, ax), _pixel_base(H, ay)  # (W,), (H,)

    with torch.no_grad():
        x_start, x_len = _windows(sx, tx, w, W)  # (B*N,) each
        y_start, y_len = _windows(sy, ty, h, H)
        sides = torch.tensor(_bucket_sides(image_size), device=where.device)
        bucket = torch.bucketize(torch.maximum(x_len, y_len), sides)  # (B*N,) index into sides
        order = torch.argsort(bucket, stable=True)  # cells grouped by bucket
        sizes = [n for n in torch.bincount(bucket).tolist() if n > 0]  # cells per non-empty bucket

    # One gather into bucket order, then contiguous pieces (split has a single, cheap backward);
    # a bucket with more than WINDOW_PIXELS window pixels is cut into several pieces.
    pieces = []  # (cells (nb,), their maps (nb, Cm, h, w), their affine (nb, 4), Px, Py)
    for cells, maps_k, affine_k in zip(order.split(sizes), maps.index_select(0, order).split(sizes),
                                       affine.index_select(0, order).split(sizes)):
        Px, Py = int(x_len[cells].max()), int(y_len[cells].max())
        per_piece = max(1, WINDOW_PIXELS // (Px * Py))
        pieces += [(*piece, Px, Py) for piece in zip(cells.split(per_piece), maps_k.split(per_piece),
                                                     affine_k.split(per_piece))]
    zeros = maps.new_zeros(B * H * W)
    shift = count = denominator = zeros  # m(p) so far (detached), c(p), sum of exp(I - m) so far
    sums = [zeros] * (maps.size(1) - 1)  # Y (3), A: sums of exp(I - m) * value so far; [K]: plain sum
    for cells, maps_k, affine_k, Px, Py in pieces:  # one piece at a time: only its windows are alive
        with torch.no_grad():
            x0 = x_start[cells].clamp(0, W - Px)  # (nb,) windows moved inside the image
            y0 = y_start[cells].clamp(0, H - Py)
            cols = x0[:, None] + torch.arange(Px, device=cells.device)  # (nb, Px)
            rows = y0[:, None] + torch.arange(Py, device=cells.device)  # (nb, Py)
            image = torch.div(cells, N, rounding_mode="floor")  # (nb,) b of each cell
            flat = ((image[:, None] * H + rows)[:, :, None] * W + cols[:, None, :]).reshape(-1)  # (nb*Py*Px,)
        step = functools.partial(_compose_piece, base_x[cols], base_y[rows], flat)
        if recompute and torch.is_grad_enabled():
            # Keep only this piece's inputs; its windows are sampled again during the backward.
            shift, count, denominator, *sums = checkpoint(step, maps_k, affine_k, shift, count, denominator, *sums,
                                                          use_reentrant=False, preserve_rng_state=False)
        else:
            shift, count, denominator, *sums = step(maps_k, affine_k, shift, count, denominator, *sums)
    denominator = denominator + (N - count) * torch.exp(-shift)  # the N - c(p) cells with I = 0 there

    composite = (torch.stack(sums[:4]) / denominator).view(4, 1, B, H, W)
    fg = composite[:3, 0].transpose(0, 1).contiguous()  # (B, 3, H, W)
    alpha_map = composite[3].transpose(0, 1)  # (B, 1, H, W), contiguous
    boundary_sum = sums[4].view(B, 1, H, W) if boundary is not None else None
    return fg, alpha_map, boundary_sum


# --------------------------------------------------------------------------------------------
# 3. Spatial-broadcast decoding
# --------------------------------------------------------------------------------------------

DECODER_BLOCKS_PER_SEGMENT = 2  # SPACE's decoder has 4 blocks: 2 segments; 1 (per block) peaked
# 76 / 115 MiB higher at G=8 / G=16 in benchmarks/bench_speed.py's memory worker, 4 (one segment) higher still.
# Within a segment each block is checkpointed again (nested): the segment's recomputation then keeps
# only the blocks' inputs, not their BatchNorm-ELU outputs, and each block is recomputed once more
# in its own backward (its conv runs three times a step instead of two). At G = 8 that cut the
# memory worker's peak from 1533 / 1609 MiB to 1400 / 1411 MiB (two runs each) for ~4% more time.


def spatial_broadcast_decode(decoder: nn.Sequential, z: torch.Tensor, size: int,
                             channels_last: bool = True, recompute: bool = False) -> torch.Tensor:
    """``sigmoid(decoder(SpatialBroadcast()(z, size)))`` without the broadcast tensor.

    decoder[0] is an unpadded 3x3 convolution over [z tiled (D channels), x, y]. At every output
    position it computes sum_{d,k} W[:, d, k] z_d + sum_{c in (x, y), k} W[:, c, k] coord_c(p + k)
    + bias: the first term is (W[:, :D] summed over the kernel) @ z, the same at every position;
    the second is one convolution of the (1, 2, S, S) coordinate image, the same for every sample.
    Their broadcast sum is decoder[0]'s output. Gradients are those of the same function: the
    kernel-sum's backward spreads dL/dW[:, :D] to all kernel taps, as the tiled input does.

    decoder[1:] then runs layer by layer as in nn.Sequential (in train mode its BatchNorms take
    batch statistics and update their running statistics as usual), with two changes that keep
    the values: the activations are in channels_last memory format (oneDNN's convolutions are
    about twice as fast in NHWC on CPU), and each ELU runs in place on its BatchNorm's output,
    which nothing else keeps (BatchNorm's backward uses its input; ELU's backward can use its
    output), saving one activation per block. (Were some BatchNorm variant to keep its output
    for its backward, autograd's version check would raise, not compute wrong gradients.)

    Args:
        decoder: bg.CompDecoder.decoder (decoder[0]: Conv2d(D + 2, c, 3, 1, 0)).
        z: (M, D) latents.
        size: S, the broadcast side (H + 8 in SPACE).
        channels_last: run decoder[1:] in channels_last format.
        recompute: with gradients enabled, checkpoint decoder[1:] in segments of
            DECODER_BLOCKS_PER_SEGMENT blocks (each block a BatchNorm, its ELU and the next conv;
            see :func:`_recompute_safe`): the forward keeps one activation per segment instead of
            two per block, and the backward recomputes one segment at a time, each of its blocks
            checkpointed in turn (:func:`_run_blocks_checkpointed`).
    Returns:
        (M, out, S - 8, S - 8) for SPACE's decoder, contiguous: sigmoid of the decoder output.
    """
    conv = decoder[0]
    M, D = z.shape
    line = torch.linspace(-1, 1, size, device=z.device, dtype=z.dtype)  # as bg.SpatialBroadcast
    yy, xx = torch.meshgrid(line, line, indexing="ij")
    coords = torch.stack((xx, yy))[None]  # (1, 2, S, S): x then y
    weight = conv.weight  # (c, D + 2, kh, kw)
    z_part = z @ weight[:, :D].sum((2, 3)).t()  # (M, c)
    coord_part = F.conv2d(coords, weight[:, D:], conv.bias, conv.stride, conv.padding, conv.dilation)  # (1, c, S', S')
    if channels_last:
        coord_part = coord_part.contiguous(memory_format=torch.channels_last)
    h = _BroadcastAdd.apply(z_part, coord_part)  # (M, c, S', S'), in coord_part's memory format
    # Blocks that each start at a BatchNorm (the conv before it ends the previous block).
    blocks: list[list[nn.Module]] = [[]]
    for layer in decoder[1:]:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and blocks[-1]:
            blocks.append([])
        blocks[-1].append(layer)
    if recompute and torch.is_grad_enabled():
        for i in range(0, len(blocks), DECODER_BLOCKS_PER_SEGMENT):
            segment = blocks[i:i + DECODER_BLOCKS_PER_SEGMENT]
            layers = [layer for block in segment for layer in block]
            h = checkpoint(_recompute_safe(_run_blocks_checkpointed, layers), segment, h,
                           use_reentrant=False, preserve_rng_state=False)
    else:
        for block in blocks:
            h = _run_block(block, h)
    return torch.sigmoid(h).contiguous()


class _BroadcastAdd(torch.autograd.Function):
    """``z_part[:, :, None, None] + coord_part``: (M, c) + (1, c, S, S) -> (M, c, S, S).

    Autograd's own backward reduces the (M, c, S, S) gradient twice, over (2, 3) and over 0,
    which in channels_last strides the reductions across memory (about 10x slower on CPU). Here
    both reduce the (M, S, S, c) view, whose last dimension is contiguous in that format.
    """

    @staticmethod
    def forward(ctx, z_part: torch.Tensor, coord_part: torch.Tensor) -> torch.Tensor:
        return z_part[:, :, None, None] + coord_part

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g = grad.permute(0, 2, 3, 1)  # (M, S, S, c)
        grad_z = g.sum((1, 2)) if ctx.needs_input_grad[0] else None
        grad_coord = g.sum(0).permute(2, 0, 1)[None] if ctx.needs_input_grad[1] else None
        return grad_z, grad_coord


def _run_blocks_checkpointed(blocks: list[list[nn.Module]], h: torch.Tensor) -> torch.Tensor:
    """Blocks in order, each under its own checkpoint (nested in a segment's checkpoint).

    ``_recompute_safe`` makes every call after a block's first keep the BatchNorm running
    statistics; when the segment is recomputed the outer wrapper has already set momentum 0, and
    the fresh inner wrappers keep it, so one step still updates the statistics once.
    """
    for block in blocks:
        h = checkpoint(_recompute_safe(_run_block, block), block, h, use_reentrant=False, preserve_rng_state=False)
    return h


def _run_block(layers: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    """Layers in order; an ELU right after a BatchNorm runs in place on its fresh output; a
    BatchNorm training on a channels_last CPU tensor takes its backward in NCHW (:func:`batch_norm_cl`)."""
    previous: nn.Module | None = None
    for layer in layers:
        if isinstance(layer, nn.ELU) and isinstance(previous, nn.modules.batchnorm._BatchNorm):
            h = F.elu(h, layer.alpha, inplace=True)  # h is BatchNorm's fresh output, unused elsewhere
        elif type(layer) is nn.BatchNorm2d and _nchw_backward_pays(layer, h):
            h = batch_norm_cl(layer, h)
        else:
            h = layer(h)
        previous = layer
    return h


def _nchw_backward_pays(layer: nn.BatchNorm2d, h: torch.Tensor) -> bool:
    """Whether :func:`batch_norm_cl` is faster than ``layer(h)``: torch's CPU BatchNorm backward in
    channels_last is fast where the channel count is a multiple of 16, and 2-10 times slower than
    through NCHW copies otherwise (torch 2.13, its AVX2 and AVX-512 kernels alike; for a
    (48, C, 66, 66) map on two threads, C = 8: 17.5 ms, 16: 1.7 ms, 24: 20-30 ms, 32: 6.2 ms, against
    3-6, 7, 10-11 and 19-22 ms through NCHW copies). The original experiments' 32-channel decoders
    keep torch's; the default's 8-channel one does not."""
    return (layer.training and torch.is_grad_enabled() and h.device.type == "cpu"
            and h.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
            and h.dim() == 4 and h.shape[1] % 16 != 0 and not h.is_contiguous()
            and h.is_contiguous(memory_format=torch.channels_last))


def batch_norm_cl(layer: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a BatchNorm2d in train mode and a channels_last CPU tensor ``x``: the same
    forward (torch's own kernel, the same running-statistics update), with the backward computed
    in NCHW copies, where that is faster (:func:`_nchw_backward_pays`): for the default experiment's
    8-channel component decoder torch's channels_last backward was 16 % of the training step, and
    the step is 11-15 % shorter this way. The gradients are the same up to float rounding (the
    kernels sum in another order)."""
    factor = 0.0 if layer.momentum is None else layer.momentum  # as nn.BatchNorm2d.forward
    if layer.track_running_stats and layer.num_batches_tracked is not None:
        layer.num_batches_tracked.add_(1)
        if layer.momentum is None:
            factor = 1.0 / float(layer.num_batches_tracked)
    return _BatchNormNCHWBackward.apply(x, layer.weight, layer.bias, layer.running_mean, layer.running_var,
                                        factor, layer.eps)


class _BatchNormNCHWBackward(torch.autograd.Function):
    """Train-mode BatchNorm: forward by ``torch.native_batch_norm`` on the input as it is, backward
    by ``native_batch_norm_backward`` on NCHW copies; the input's gradient in the input's format."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                weight is not None and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x.contiguous(), weight, None, None, mean, invstd, True, ctx.eps, need)
        if dx is not None:
            dx = dx.contiguous(memory_format=torch.channels_last)
        return dx, dw, db, None, None, None, None


def _recompute_safe(fn, layers: list[nn.Module]):
    """``fn`` for torch.utils.checkpoint over layers that may hold BatchNorms.

    The checkpoint calls ``fn`` again during the backward. A BatchNorm in train mode normalises
    by its batch statistics, so the recomputed values are the same; but it would also update its
    running statistics a second time. From the second call on, every BatchNorm runs with
    momentum 0 (running statistics kept exactly: r <- 1 * r + 0 * batch) and its
    ``num_batches_tracked`` is put back, so one step updates them once, as without checkpointing.
    """
    norms = [m for layer in layers for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    calls = 0

    def run(*args):
        nonlocal calls
        calls += 1
        if calls == 1 or not norms:
            return fn(*args)
        saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                 for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            return fn(*args)
        finally:
            for m, momentum, tracked in saved:
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
    return run


# --------------------------------------------------------------------------------------------
# 4. Per-glimpse networks in chunks
# --------------------------------------------------------------------------------------------

GLIMPSE_CHUNK = 256  # glimpses per checkpointed chunk of z_what_net and glimpse_dec under model.low_memory
# Largest activation of one chunk on the fast path without low_memory: glibc's malloc serves
# blocks below its mmap threshold (which rises to at most 32 MiB) from its heap and maps larger
# ones afresh, page by page, at every allocation (see run_in_chunks).
CHUNK_BYTES = 16 * 2**20


def glimpse_chunk_size(glimpse_size: int, channels: int) -> int:
    """Glimpses per chunk such that a float32 activation of ``channels`` at the glimpse's full
    resolution (the widest activations of both glimpse networks) takes at most CHUNK_BYTES:
    256 for the original's 32-pixel glimpses and 16 channels, 1024 for 16-pixel glimpses."""
    return max(1, CHUNK_BYTES // (4 * channels * glimpse_size * glimpse_size))


def _couples_samples(module: nn.Module) -> bool:
    """Whether a network mixes samples of its batch (BatchNorm batch statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def run_in_chunks(module: nn.Module, inputs: torch.Tensor, chunk_size: int | None,
                  recompute: bool = True) -> tuple[torch.Tensor, ...]:
    """``module(inputs)`` for a network that treats every sample independently, chunk by chunk.

    SPACE's per-glimpse networks (ZWhatEnc, GlimpseDec) are convolutions, CELU, GroupNorm (with
    per-sample statistics), Linear and PixelShuffle: sample i of the output depends on sample i
    of the input only, so running the batch in chunks and concatenating gives the same values
    (the convolutions may block their sums differently for another batch size: rounding).

    Chunks are faster on CPU even with every activation kept: at G = 16 (3072 glimpses of
    32 x 32) one layer's activations are 192 MiB or more, which glibc's malloc maps afresh from the
    kernel at every allocation and gives back when freed, so each step faults them in again, page
    by page; a chunk's are below malloc's mmap threshold and come from (and return to) its heap.
    On one 2-core machine the two networks' forward and backward over 3072 glimpses took 12.7 s
    whole, 3.9 s in chunks of 256 (16 MiB per activation), 6.1 s in chunks of 512 (32 MiB, over
    the threshold) and 3.8 s whole with ``space.allocator.retain_freed_memory``.
    :func:`glimpse_chunk_size` picks the chunk for the fast path. Without ``recompute``, inputs
    on other devices run whole: CUDA's caching allocator reuses its blocks, and larger kernels
    use a GPU better.

    With ``recompute`` (``model.low_memory``) and gradients enabled each chunk is also
    checkpointed (torch.utils.checkpoint, non-reentrant): only its input is kept, and its forward
    is recomputed during the backward, so at most one chunk's activations are alive instead of
    all B*N glimpses'. The recomputation is exact: the networks draw no random numbers and have no
    running statistics. Networks with BatchNorm, and batches no larger than one chunk, run whole.

    Args:
        module: a network returning a tensor or a tuple of tensors, each with the batch first.
        inputs: (M, ...) batch.
        chunk_size: samples per chunk; None or 0 runs the whole batch at once.
        recompute: checkpoint each chunk when gradients are enabled (any device); without it,
            chunks on CPU only.
    Returns:
        the module's outputs as a tuple, concatenated over chunks.
    """
    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    # Chunks kept whole (no recompute) pay off only against malloc, so on CPU only.
    if (not chunk_size or inputs.size(0) <= chunk_size or _couples_samples(module)
            or (not recompute and inputs.device.type != "cpu")):
        return as_tuple(module(inputs))
    if recompute and torch.is_grad_enabled():
        outs = [as_tuple(checkpoint(module, chunk, use_reentrant=False, preserve_rng_state=False))
                for chunk in inputs.split(chunk_size)]
    else:
        outs = [as_tuple(module(chunk)) for chunk in inputs.split(chunk_size)]
    return tuple(torch.cat(parts) for parts in zip(*outs))


def run_checkpointed(module: nn.Module, inputs: torch.Tensor, enabled: bool = True):
    """``module(inputs)``, keeping only ``inputs`` for the backward, which recomputes the forward.

    For the background's networks at full resolution (mask decoder, called once per component k;
    component and image encoders): the mask decoder's K decodes keep ~150 MiB of activations each
    at batch 12, the component encoder ~140 MiB at G=8, K=5; checkpointed, the values and
    gradients are the same (no randomness) for one more forward per step. BatchNorms update their
    running statistics once (see :func:`_recompute_safe`). Calls without gradients, or with
    ``enabled`` false (``model.low_memory`` off), run plainly.
    """
    if not enabled or not torch.is_grad_enabled():
        return module(inputs)
    return checkpoint(_recompute_safe(module, [module]), inputs, use_reentrant=False, preserve_rng_state=False)
