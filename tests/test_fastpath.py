"""The fast path (space/fastpath.py) against the SPEC-literal reference: values and gradients.

Tolerance: torch.allclose with rtol 1e-5 and atol 1e-5 times the reference tensor's largest
magnitude (at least 1), so that values around 1 are compared to 1e-5 and large gradients
relative to their scale. float32 cases show the fast path is as accurate as the reference
(which is itself only that accurate: its convolution weight gradients sum ~10^5 terms); float64
cases, compared to 1e-9, show the two are the same function, including every gradient.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from space.bg import CompDecoder, MaskDecoder
from space.config import ModelConfig, original_config
from space.experiment import load_experiment
from space.fastpath import (GLIMPSE_CHUNK, compose, crop_glimpses_batched, glimpse_chunk_size, run_checkpointed,
                            run_in_chunks, spatial_broadcast_decode)
from space.fg import SpaceFg
from space.geometry import compose_reference, crop_glimpses
from space.layers import biases_before_batchnorm
from space.model import Space
from space.schedules import priors_at

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
# The float32 z_where gradient of compose only. It sums the sampling-grid gradient over up to H*W
# pixels per box, in another order than affine_grid's backward, and for tiny boxes (s ~ 1e-3,
# a = 1/s ~ 1e3) it is dominated by float32 rounding on both paths: for one such box float64
# gives -36.7 where both float32 computations give 542 +- 0.1. Hence an absolute tolerance of
# 1e-4 of its largest entry; the float64 cases check the same gradients to 1e-9.
ZWHERE_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these many small operations gain nothing from two, and on a shared
    machine two spinning OpenMP threads can make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_config(**kwargs) -> ModelConfig:
    """A config whose modules run the SPEC-literal code (fast_path off where that switch exists)."""
    if "fast_path" in {f.name for f in dataclasses.fields(ModelConfig)}:
        kwargs["fast_path"] = False
    return ModelConfig(**kwargs)


def assert_close(fast: torch.Tensor, ref: torch.Tensor, what: str = "", rtol: float = RTOL,
                 atol_scale: float = RTOL) -> None:
    """allclose with rtol and an atol of atol_scale times max(1, the reference's largest entry)."""
    scale = max(1.0, ref.abs().max().item())
    assert fast.shape == ref.shape, what
    assert torch.allclose(fast, ref, rtol=rtol, atol=atol_scale * scale), \
        f"{what}: max abs diff {(fast - ref).abs().max().item():.3g} at scale {scale:.3g}"


def random_where(B: int, G: int, gen: torch.Generator) -> torch.Tensor:
    """(B, N, 4) boxes as the model makes them (centre within one cell of its own cell's centre),
    mixed with tiny boxes, boxes larger than the image and boxes mostly outside it."""
    N = G * G
    scale = torch.sigmoid(torch.randn(B, N, 2, generator=gen) * 2 - 1)
    kind = torch.randint(0, 5, (B, N, 1), generator=gen)
    scale = torch.where(kind == 1, torch.rand(B, N, 2, generator=gen) * 1e-3, scale)  # tiny, down to ~0
    scale = torch.where(kind == 2, 1 + torch.rand(B, N, 2, generator=gen), scale)  # larger than the image
    offset = torch.stack(torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")[::-1], -1).reshape(N, 2)
    shift = (2.0 / G) * (offset + 0.5 + torch.tanh(torch.randn(B, N, 2, generator=gen) * 2)) - 1
    shift = torch.where(kind == 3, shift.sign() * (1 + torch.rand(B, N, 2, generator=gen) * 0.3), shift)  # outside
    return torch.cat((scale, shift), -1)


def glimpse_maps(B: int, N: int, h: int, gen: torch.Generator):
    """importance, y_att, alpha_att_hat, boundary as the model forms them, with z_pres near 0 and 1
    and depths making the importance reach 100 (exp would overflow float32 without the shift)."""
    M = B * N

    def smooth(channels: int) -> torch.Tensor:  # decoded glimpses are smooth: upsampled 8 x 8 noise
        coarse = torch.randn(M, channels, 8, 8, generator=gen)
        return F.interpolate(coarse, size=(h, h), mode="bilinear", align_corners=False)

    alpha = torch.sigmoid(smooth(1) * 3)
    o = torch.sigmoid(smooth(3) * 2)
    z_pres = torch.sigmoid(torch.randn(M, 1, 1, 1, generator=gen) * 12)  # many within 1e-4 of 0 or 1
    z_depth = torch.randn(M, 1, 1, 1, generator=gen) * 8
    alpha_hat = alpha * z_pres
    importance = alpha_hat * 100 * torch.sigmoid(-z_depth)
    kernel = torch.full((h, h), 1 / 1024)
    kernel[6:h - 6, 6:h - 6] = 0
    return importance, alpha_hat * o, alpha_hat, kernel.expand(M, 1, h, h) * z_pres


@pytest.mark.parametrize("G,H", [(4, 64), (8, 128), (16, 128)])
def test_crop_glimpses_batched_is_bit_identical(G, H):
    gen = torch.Generator().manual_seed(G)
    B, N = 2, G * G
    x = torch.rand(B, 3, H, H, generator=gen, requires_grad=True)
    z_where = random_where(B, G, gen).requires_grad_()
    ref = crop_glimpses(x.repeat_interleave(N, 0), z_where.reshape(B * N, 4), 32)
    fast = crop_glimpses_batched(x, z_where, 32)
    assert torch.equal(fast, ref)
    cotangent = torch.randn(ref.shape, generator=gen)
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), (x, z_where))
    fast_grads = torch.autograd.grad((fast * cotangent).sum(), (x, z_where))
    for name, f, r in zip(("x", "z_where"), fast_grads, ref_grads):
        assert_close(f, r, name)


@pytest.mark.parametrize("G,H,B,seed,dtype", [(4, 64, 2, 0, torch.float32), (4, 128, 2, 1, torch.float32),
                                              (8, 64, 2, 2, torch.float32), (8, 128, 2, 3, torch.float32),
                                              (16, 64, 2, 4, torch.float32), (16, 128, 1, 5, torch.float32),
                                              (8, 64, 2, 6, torch.float64), (16, 128, 1, 7, torch.float64)])
def test_compose_matches_reference_values_and_gradients(G, H, B, seed, dtype):
    """float32: values and gradients to 1e-5 (z_where's gradient: see ZWHERE_ATOL). float64 shows
    that the two computations are the same function: everything agrees to 1e-9."""
    gen = torch.Generator().manual_seed(seed)
    N, h = G * G, 32
    z_where = random_where(B, G, gen)
    inputs = [t.to(dtype).requires_grad_() for t in (*glimpse_maps(B, N, h, gen), z_where)]
    importance, y_att, alpha_hat, boundary, z_where = inputs
    assert importance.max() > 99  # the overflow case is exercised
    ref = compose_reference(importance, y_att, alpha_hat, z_where, H, boundary)[:3]
    fast = compose(importance, y_att, alpha_hat, z_where, H, boundary)
    tol = RTOL if dtype == torch.float32 else 1e-9
    for name, f, r in zip(("fg", "alpha_map", "boundary_sum"), fast, ref):
        assert f.dtype == dtype
        assert_close(f, r, name, rtol=tol, atol_scale=tol)
    cotangents = [torch.randn(r.shape, generator=gen, dtype=dtype) for r in ref]
    ref_grads = torch.autograd.grad(sum((r * c).sum() for r, c in zip(ref, cotangents)), inputs)
    fast_grads = torch.autograd.grad(sum((f * c).sum() for f, c in zip(fast, cotangents)), inputs)
    for name, f, r in zip(("importance", "y_att", "alpha_att_hat", "boundary", "z_where"), fast_grads, ref_grads):
        atol = ZWHERE_ATOL if name == "z_where" and dtype == torch.float32 else tol
        assert_close(f, r, f"d/d{name}", rtol=tol, atol_scale=atol)


def test_compose_at_importance_100_everywhere_and_without_boundary():
    gen = torch.Generator().manual_seed(0)
    B, G, H, h = 2, 8, 64, 32
    N = G * G
    z_where = random_where(B, G, gen)
    importance = torch.full((B * N, 1, h, h), 100.0, requires_grad=True)
    _, y_att, alpha_hat, _ = glimpse_maps(B, N, h, gen)
    fg, alpha_map, boundary_sum = compose(importance, y_att, alpha_hat, z_where, H)
    ref_fg, ref_alpha, _, _ = compose_reference(importance, y_att, alpha_hat, z_where, H)
    assert boundary_sum is None
    assert torch.isfinite(fg).all() and torch.isfinite(alpha_map).all()
    assert_close(fg, ref_fg, "fg")
    assert_close(alpha_map, ref_alpha, "alpha_map")
    (grad,) = torch.autograd.grad(fg.sum() + alpha_map.sum(), importance)
    (ref_grad,) = torch.autograd.grad(ref_fg.sum() + ref_alpha.sum(), importance)
    assert torch.isfinite(grad).all()
    assert_close(grad, ref_grad, "d/dimportance")


def test_compose_single_box_by_hand():
    # One cell covering columns/rows 16-47 of a 64 image (scale 0.5, centred) among N = 4 cells:
    # inside the box its weight is e^v / (e^v + 3); elsewhere fg is 0.
    H, h, v = 64, 32, 2.0
    z_where = torch.tensor([[[0.5, 0.5, 0.0, 0.0]] + [[1e-3, 1e-3, 5.0, 5.0]] * 3])  # others far outside
    importance = torch.full((4, 1, h, h), v)
    y_att = torch.ones(4, 3, h, h)
    fg, alpha_map, _ = compose(importance, y_att, torch.ones(4, 1, h, h), z_where, H)
    weight = torch.exp(torch.tensor(v)) / (torch.exp(torch.tensor(v)) + 3)
    assert torch.allclose(fg[0, :, 20:44, 20:44], weight.expand(3, 24, 24))
    assert fg[0, :, :, :15].abs().max() == 0 and fg[0, :, :15].abs().max() == 0
    assert torch.allclose(alpha_map[0, 0, 30, 30], weight)


def test_compose_non_finite_boxes_give_what_the_reference_gives():
    gen = torch.Generator().manual_seed(1)
    B, G, H, h = 1, 4, 64, 32
    z_where = random_where(B, G, gen)
    z_where[0, 3, 0] = float("nan")
    maps = glimpse_maps(B, G * G, h, gen)
    fast = compose(*maps[:3], z_where, H, maps[3])
    ref = compose_reference(*maps[:3], z_where, H, maps[3])[:3]
    for f, r in zip(fast, ref):
        assert torch.equal(torch.isnan(f), torch.isnan(r))


@pytest.mark.parametrize("train,dtype,bg_width", [(True, torch.float32, 1.0), (False, torch.float32, 1.0),
                                                  (True, torch.float64, 1.0), (True, torch.float32, 0.25),
                                                  (True, torch.float64, 0.25)])
def test_spatial_broadcast_decode_matches_comp_decoder(train, dtype, bg_width):
    """float32 to 1e-5, float64 to 1e-9 (the same function), outputs, gradients, running stats;
    32 channels (torch's channels_last BatchNorm) and 8 (its backward through NCHW copies)."""
    torch.manual_seed(0)
    tol = RTOL if dtype == torch.float32 else 1e-9
    cfg = dataclasses.replace(reference_config(image_size=32, G=4), bg_width=bg_width)
    ref_module = CompDecoder(cfg).train(train).to(dtype)
    for m in ref_module.modules():  # non-trivial running statistics for eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fast_module = CompDecoder(dataclasses.replace(cfg, fast_path=True)).train(train).to(dtype)
    fast_module.load_state_dict(ref_module.state_dict())
    z = torch.randn(10, cfg.z_comp_dim, dtype=dtype, requires_grad=True)
    ref = ref_module(z)
    fast = fast_module(z)
    assert fast.shape == ref.shape == (10, 3, 32, 32) and fast.is_contiguous() and fast.dtype == dtype
    assert_close(fast, ref, "output", rtol=tol, atol_scale=tol)
    cotangent = torch.randn(ref.shape, dtype=dtype)
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), [z, *ref_module.parameters()])
    fast_grads = torch.autograd.grad((fast * cotangent).sum(), [z, *fast_module.parameters()])
    names = ["z"] + [name for name, _ in ref_module.named_parameters()]
    for name, f, r in zip(names, fast_grads, ref_grads):
        if train and name.endswith(".bias") and name.split(".")[1] in ("0", "3", "6", "9"):
            # A conv bias followed by train-mode BatchNorm has an exactly zero gradient; both
            # paths return float32 cancellation noise, compared at the scale of its weight's gradient.
            weight_scale = dict(zip(names, ref_grads))[name.replace("bias", "weight")].abs().max().item()
            assert f.abs().max() < tol * weight_scale and r.abs().max() < tol * weight_scale, name
            continue
        assert_close(f, r, f"d/d{name}", rtol=tol, atol_scale=tol)
    for (name, a), b in zip(ref_module.named_buffers(), fast_module.buffers()):  # running stats updated alike
        assert_close(b.double(), a.double(), name, rtol=tol, atol_scale=tol)


@pytest.mark.parametrize("channels,momentum", [(8, 0.1), (4, None), (24, 0.0)])
def test_batch_norm_with_an_nchw_backward_is_batch_norm(channels, momentum):
    # The same forward kernel: outputs and running statistics bit for bit; gradients to rounding.
    from space.fastpath import _nchw_backward_pays, batch_norm_cl
    torch.manual_seed(channels)
    ref = nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0), ref.bias.uniform_(-1, 1)
        ref.running_mean.uniform_(-0.5, 0.5), ref.running_var.uniform_(0.5, 2.0)
    ref.num_batches_tracked.fill_(3)
    layer = copy.deepcopy(ref)
    x = (torch.randn(6, channels, 12, 10) * 3 + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    wide = torch.zeros(6, 16, 12, 10).contiguous(memory_format=torch.channels_last)
    assert _nchw_backward_pays(layer, x) and not _nchw_backward_pays(nn.BatchNorm2d(16), wide)  # torch's is fast
    out, expected = batch_norm_cl(layer, x), ref(x)
    assert torch.equal(out, expected)
    for a, b in zip(layer.buffers(), ref.buffers()):
        assert torch.equal(a, b)
    assert layer.num_batches_tracked.item() == 4
    cotangent = torch.randn(out.shape)
    grads = torch.autograd.grad((out * cotangent).sum(), [x, layer.weight, layer.bias])
    ref_grads = torch.autograd.grad((expected * cotangent).sum(), [x, ref.weight, ref.bias])
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    for name, f, r in zip(("x", "weight", "bias"), grads, ref_grads):
        assert_close(f, r, f"d/d{name}")
    with torch.no_grad():
        assert not _nchw_backward_pays(layer, x)  # no backward to speed up
    assert not _nchw_backward_pays(layer.eval(), x) and not _nchw_backward_pays(layer.train(), x.contiguous())


def test_spatial_broadcast_decode_without_channels_last_and_without_grad():
    torch.manual_seed(1)
    decoder = CompDecoder(reference_config(image_size=32, G=4)).eval()
    z = torch.randn(3, 32)
    with torch.no_grad():
        ref = decoder(z)
        assert_close(spatial_broadcast_decode(decoder.decoder, z, decoder.size, channels_last=False), ref)
        assert_close(spatial_broadcast_decode(decoder.decoder, z, decoder.size), ref)


def test_run_in_chunks_equals_whole_batch_with_gradients():
    torch.manual_seed(0)
    fg = SpaceFg(reference_config(image_size=64, G=8, fg_width=0.25))
    z = torch.randn(37, 32, requires_grad=True)
    ref = fg.glimpse_dec(z)
    params = [z, *fg.glimpse_dec.parameters()]
    ref_grads = torch.autograd.grad(sum(t.square().sum() for t in ref), params, retain_graph=True)
    for recompute in (True, False):
        fast = run_in_chunks(fg.glimpse_dec, z, 10, recompute)
        for f, r in zip(fast, ref):
            assert_close(f, r)
        fast_grads = torch.autograd.grad(sum(t.square().sum() for t in fast), params)
        for f, r in zip(fast_grads, ref_grads):
            assert_close(f, r)
    calls = []
    meta = nn.Linear(4, 4, device="meta")  # another device than the CPU: kept chunks run whole
    meta.register_forward_hook(lambda module, args, out: calls.append(args[0].size(0)))
    run_in_chunks(meta, torch.empty(9, 4, device="meta"), 2, recompute=False)
    assert calls == [9]
    with torch.no_grad():
        run_in_chunks(meta, torch.empty(9, 4, device="meta"), 2, recompute=True)
    assert calls == [9, 2, 2, 2, 2, 1]
    bn = nn.BatchNorm1d(4)  # couples samples: must run whole
    x = torch.randn(9, 4)
    assert torch.equal(run_in_chunks(bn, x, 2)[0], nn.BatchNorm1d(4)(x))


def test_glimpse_chunks_stay_below_the_malloc_threshold_and_the_default_runs_whole():
    assert glimpse_chunk_size(32, 16) == 256  # the original's glimpses: 16 MiB per activation
    assert glimpse_chunk_size(16, 8) == 2048  # the default experiment (fg_width 0.5)
    assert glimpse_chunk_size(256, 64) == 1
    for name, cells in (("atari_spaceinvaders", 256), ("3d_room_small", 64)):
        model_cfg, train_cfg = original_config(name)
        fg = SpaceFg(dataclasses.replace(model_cfg, fast_path=True))
        assert fg.glimpse_chunk == 256 and not fg.recompute_glimpses
        assert train_cfg.batch_size * cells > fg.glimpse_chunk  # chunked
        low = SpaceFg(dataclasses.replace(model_cfg, fast_path=True, low_memory=True))
        assert low.glimpse_chunk == GLIMPSE_CHUNK and low.recompute_glimpses
        assert SpaceFg(dataclasses.replace(model_cfg, fast_path=False)).glimpse_chunk is None
    # The default experiment (batch 16, G = 8, 16-pixel glimpses) runs whole, as before chunking.
    rooms = load_experiment(ROOT / "params.yaml", "rooms")
    assert rooms.model.fast_path and not rooms.model.low_memory
    assert rooms.train.batch_size * rooms.model.G ** 2 <= SpaceFg(rooms.model).glimpse_chunk


def test_run_checkpointed_mask_decoder_gives_the_same_values_and_gradients():
    torch.manual_seed(0)
    decoder = MaskDecoder(reference_config(image_size=32, G=4, bg_width=0.25))
    z = torch.randn(3, 32, requires_grad=True)
    ref, fast = decoder(z), run_checkpointed(decoder, z)
    assert torch.equal(fast, ref)
    params = [z, *decoder.parameters()]
    for f, r in zip(torch.autograd.grad(fast.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        assert torch.equal(f, r)  # the same operations on the same values: bit-identical
    with torch.no_grad():
        assert torch.equal(run_checkpointed(decoder, z), ref)


FG_FIELDS = ("fg", "alpha_map", "fg_likelihood", "z_what", "z_where", "z_pres", "z_pres_prob", "z_depth",
             "o_att", "alpha_att", "alpha_att_hat", "boundary_loss", "boundary_map", "kl_fg")


def fg_loss(out) -> torch.Tensor:
    return out.fg_likelihood.sum() + out.boundary_loss.sum() + out.kl_fg.sum() + out.alpha_map.square().sum()


@pytest.mark.parametrize("G,chunk,low_memory,deterministic,step,shift_range",
                         [(8, 48, True, False, 5000, 1.0), (8, 40, False, False, 5000, 1.0),
                          (4, None, False, True, 200_000_000, 1.0), (8, None, False, False, 5000, 0.5)])
def test_fast_spacefg_matches_the_reference(G, chunk, low_memory, deterministic, step, shift_range):
    """SpaceFg with model.fast_path on (glimpses in chunks of ``chunk``, or whole where None;
    recomputed in the backward with ``low_memory``) against the SPEC-literal SpaceFg. Same seed, same draws. float32: every output to 1e-5. float64: outputs and the gradients
    of every parameter to 1e-9, i.e. the same function. (float32 parameter gradients are not
    compared elementwise: some, e.g. a conv bias feeding CELU then a one-channel-per-group
    GroupNorm, are sums of 10^5 terms that cancel to ~1e-3 of their size, so float32 rounding of
    the cotangents moves them by percents on either path.)"""
    torch.manual_seed(0)
    cfg = reference_config(image_size=64, G=G, fg_width=0.25, shift_range=shift_range)  # narrow: faster
    ref32 = SpaceFg(cfg)
    fast32 = SpaceFg(dataclasses.replace(cfg, fast_path=True, low_memory=low_memory))
    assert fast32.recompute_glimpses == low_memory
    fast32.load_state_dict(ref32.state_dict())
    fast32.glimpse_chunk = chunk
    priors = priors_at(cfg, step)
    x = torch.rand(2, 3, 64, 64)
    for dtype in (torch.float32, torch.float64):
        fg, fast_fg = copy.deepcopy(ref32).to(dtype), copy.deepcopy(fast32).to(dtype)
        tol = RTOL if dtype == torch.float32 else 1e-9
        torch.manual_seed(5)
        ref = fg(x.to(dtype), priors, deterministic)
        torch.manual_seed(5)
        fast = fast_fg(x.to(dtype), priors, deterministic)
        assert fast.importance_map_full_res_norm is None
        for name in FG_FIELDS:
            r, f = getattr(ref, name), getattr(fast, name)
            if r is None:
                assert f is None, name
            else:
                assert_close(f, r, name, rtol=tol, atol_scale=tol)
        if dtype == torch.float64:
            named = [(n, p) for n, p in fg.named_parameters() if p.requires_grad]
            ref_grads = torch.autograd.grad(fg_loss(ref), [p for _, p in named])
            fast_grads = torch.autograd.grad(fg_loss(fast), [p for p in fast_fg.parameters() if p.requires_grad])
            for (name, _), f, r in zip(named, fast_grads, ref_grads):
                assert_close(f, r, f"d/d{name}", rtol=tol, atol_scale=tol)


def test_fast_low_memory_model_gives_the_reference_loss_and_gradients():
    """The whole model with model.fast_path and model.low_memory, glimpses in ragged chunks of 10
    (48 cells), one training forward and backward: float32 loss and reconstruction to 1e-5;
    float64 loss and every parameter gradient to 1e-9."""
    torch.manual_seed(0)
    cfg = reference_config(image_size=32, G=4, K=3, fg_width=0.25, bg_width=0.25)
    model32 = Space(cfg)
    x = torch.rand(3, 3, 32, 32)
    priors = priors_at(cfg, 100)
    for dtype in (torch.float32, torch.float64):
        tol = RTOL if dtype == torch.float32 else 1e-9
        ref_model = copy.deepcopy(model32).to(dtype)
        fast_model = Space(dataclasses.replace(cfg, fast_path=True, low_memory=True)).to(dtype)
        fast_model.load_state_dict(ref_model.state_dict())
        fast_model.fg_module.glimpse_chunk = 10
        assert fast_model.state_dict().keys() == ref_model.state_dict().keys()
        outs = []
        for model in (ref_model, fast_model):
            torch.manual_seed(3)
            out = model(x.to(dtype), priors)
            out.loss.backward()
            outs.append(out)
        assert outs[1].importance_map_full_res_norm is None
        assert_close(outs[1].loss, outs[0].loss, "loss", rtol=tol, atol_scale=tol)
        assert_close(outs[1].y, outs[0].y, "y", rtol=tol, atol_scale=tol)
        if dtype == torch.float32:
            continue
        zero_grad_biases = biases_before_batchnorm(ref_model)
        for (name, a), b in zip(ref_model.named_parameters(), fast_model.parameters()):
            if a.grad is None:
                assert b.grad is None, name
                continue
            if name in zero_grad_biases:  # exactly zero (conv bias before train-mode BatchNorm): noise
                assert b.grad.abs().max() < 1e-9 * max(1.0, a.grad.abs().max().item()) + 1e-6, name
                continue
            assert_close(b.grad, a.grad, f"d/d{name}", rtol=tol, atol_scale=tol)


def test_biases_before_batchnorm_are_the_background_conv_biases():
    """The conv biases whose gradient the comparisons leave out: those at 0, 3, 6, 9 of the three
    conv -> BatchNorm -> ELU stacks of the background, and no other (the foreground's convolutions
    feed a CELU, not a normalisation)."""
    expected = {f"bg_module.{net}.{i}.bias" for net in ("image_enc.enc", "comp_encoder.enc", "comp_decoder.decoder")
                for i in (0, 3, 6, 9)}
    assert biases_before_batchnorm(Space(reference_config(image_size=32, G=4, K=3))) == expected
