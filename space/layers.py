"""Small builders shared by the foreground and background networks.

They produce ``nn.Sequential`` lists whose indices equal the original's, so that state_dict keys
match (SPEC section 3 and Appendix A).
"""
from __future__ import annotations

import math

from torch import nn


def scaled(channels: int, width: float) -> int:
    """Channel count times a width multiplier (powers of two stay integers for allowed widths)."""
    return max(1, int(channels * width))


def gn(groups: int, channels: int) -> nn.GroupNorm:
    """GroupNorm; the group count shrinks with narrow widths so that it divides the channels."""
    return nn.GroupNorm(min(groups, channels), channels)


def conv_celu_gn(c_in: int, c_out: int, kernel: int, stride: int, padding: int, groups: int) -> list[nn.Module]:
    """conv -> CELU -> GroupNorm, the original's foreground block."""
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.CELU(), gn(groups, c_out)]


def conv_bn_elu(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    """conv -> BatchNorm -> ELU, the original's background encoder block."""
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.BatchNorm2d(c_out), nn.ELU()]


def upsample_block(c_in: int, c_out: int, factor: int, groups: int) -> list[nn.Module]:
    """1x1 conv -> PixelShuffle -> CELU -> GN -> 3x3 conv -> CELU -> GN (7 modules)."""
    return [nn.Conv2d(c_in, c_out * factor * factor, 1), nn.PixelShuffle(factor), nn.CELU(), gn(groups, c_out),
            nn.Conv2d(c_out, c_out, 3, 1, 1), nn.CELU(), gn(groups, c_out)]


def upsample_factors(base: list[int], size: int) -> list[int]:
    """Adapt the original's PixelShuffle factors (whose product is 128) to another output size.

    Halves the largest factor (the rightmost of equals) until the product fits, or doubles the
    smallest; at 128 the original's factors are returned unchanged.
    """
    factors = list(base)
    while math.prod(factors) > size:
        i = max(range(len(factors)), key=lambda j: (factors[j], j))
        factors[i] //= 2
    while math.prod(factors) < size:
        i = min(range(len(factors)), key=lambda j: (factors[j], -j))
        factors[i] *= 2
    return factors


def pixel_shuffle_decoder(z_dim: int, out_channels: int, stages: list[tuple[int, int, int]],
                          size: int, width: float) -> nn.Sequential:
    """The original's mask decoder / strong component decoder shape (SPEC 3.2).

    conv(z -> 256, 1), CELU, GN(16); one :func:`upsample_block` per (channels, factor, groups)
    stage; then conv(16 -> 16, 3), CELU, GN(4) and a final conv(16 -> out_channels, 3).
    """
    factors = upsample_factors([factor for _, factor, _ in stages], size)
    first = scaled(256, width)
    layers: list[nn.Module] = [nn.Conv2d(z_dim, first, 1), nn.CELU(), gn(16, first)]
    c_in = first
    for (channels, _, groups), factor in zip(stages, factors):
        c_out = scaled(channels, width)
        layers += upsample_block(c_in, c_out, factor, groups)
        c_in = c_out
    layers += conv_celu_gn(c_in, c_in, 3, 1, 1, 4)
    layers.append(nn.Conv2d(c_in, out_channels, 3, 1, 1))
    return nn.Sequential(*layers)


def biases_before_batchnorm(model: nn.Module) -> set[str]:
    """Names of the conv biases that feed a BatchNorm directly (next in the same nn.Sequential).

    In training mode the BatchNorm subtracts the batch mean, so such a bias has no effect on the
    output and its exact gradient is zero: what a backward computes for it is rounding noise,
    which comparisons of gradients between two computations must leave out.
    """
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (name, layer), (_, following) in zip(children, children[1:]):
                if (isinstance(layer, nn.Conv2d) and layer.bias is not None
                        and isinstance(following, nn.modules.batchnorm._BatchNorm)):
                    names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names
