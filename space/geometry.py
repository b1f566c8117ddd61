"""Glimpse geometry: crop and paste with the spatial transformer, and z_where <-> boxes.

z_where = [sx, sy, tx, ty] (SPEC 4.3): sx, sy are the box width and height as fractions of the
image side, (tx, ty) its centre in normalised [-1, 1] coordinates (x along the width, y along
the height). :func:`crop_glimpses` and :func:`paste_glimpses` are inverses on the box region:
pasting a crop puts the glimpse back where it came from. Both use bilinear sampling, zero
padding and ``align_corners=False``, the PyTorch 1.3.0 behaviour the original relied on
(SPEC 13.3).

Letters: B batch, N cells, C channels, H, W image, h, w glimpse.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INVERSE_EPS = 1e-9  # 1 / (s + eps) in the inverse transform, as the original


def _theta(z_where: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Affine matrices (M, 2, 3) for grid sampling, as the original's spatial_transform."""
    sx, sy, tx, ty = z_where.unbind(-1)
    zero = torch.zeros_like(sx)
    if inverse:  # the shift by division, as the original (bit-identical pastes)
        sx, sy, tx, ty = (1 / (sx + INVERSE_EPS), 1 / (sy + INVERSE_EPS),
                          -tx / (sx + INVERSE_EPS), -ty / (sy + INVERSE_EPS))
    return torch.stack((torch.stack((sx, zero, tx), -1), torch.stack((zero, sy, ty), -1)), -2)


def crop_glimpses(images: torch.Tensor, z_where: torch.Tensor, size: int) -> torch.Tensor:
    """Crop one glimpse per row of ``z_where``.

    Args:
        images: (M, C, H, W), one image per glimpse.
        z_where: (M, 4).
        size: glimpse side h = w.
    Returns:
        (M, C, h, w) glimpses.
    """
    theta = _theta(z_where, inverse=False)
    grid = F.affine_grid(theta, [images.size(0), images.size(1), size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def paste_glimpses(glimpses: torch.Tensor, z_where: torch.Tensor, image_size: int) -> torch.Tensor:
    """Paste each glimpse back into an otherwise empty full-size map (the inverse of the crop).

    Args:
        glimpses: (M, C, h, w).
        z_where: (M, 4).
        image_size: H = W of the output.
    Returns:
        (M, C, H, W) maps, zero outside each glimpse's box.
    """
    theta = _theta(z_where, inverse=True)
    grid = F.affine_grid(theta, [glimpses.size(0), glimpses.size(1), image_size, image_size],
                         align_corners=False)
    return F.grid_sample(glimpses, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def compose_reference(importance: torch.Tensor, y_att: torch.Tensor, alpha_att_hat: torch.Tensor,
                      z_where: torch.Tensor, image_size: int, boundary: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """SPEC-literal composition (SPEC 4.5, 4.6): paste every cell's maps to full resolution and take
    the softmax of importance over all N cells per pixel (cells not covering a pixel still count,
    each with exp(0) = 1). ``fg.SpaceFg`` runs it when ``model.fast_path`` is off; it is the
    reference that ``fastpath.compose`` is tested against.

    Args:
        importance, alpha_att_hat, boundary: (B*N, 1, h, w); y_att: (B*N, 3, h, w); z_where: (B, N, 4).
    Returns:
        fg (B, 3, H, W), alpha_map (B, 1, H, W), the summed pasted boundary (B, 1, H, W) or None,
        and the weights (B, N, 1, H, W).
    """
    B, N, H = z_where.size(0), z_where.size(1), image_size
    where = z_where.reshape(B * N, 4)
    weights = torch.softmax(paste_glimpses(importance, where, H).view(B, N, 1, H, H), dim=1)
    fg = (paste_glimpses(y_att, where, H).view(B, N, 3, H, H) * weights).sum(1)
    alpha_map = (paste_glimpses(alpha_att_hat, where, H).view(B, N, 1, H, H) * weights).sum(1)
    boundary_sum = None if boundary is None else paste_glimpses(boundary, where, H).view(B, N, 1, H, H).sum(1)
    return fg, alpha_map, boundary_sum, weights


def z_where_to_boxes(z_where: torch.Tensor) -> torch.Tensor:
    """Boxes in the evaluation convention: normalised [y_min, y_max, x_min, x_max] (SPEC 9.2).

    Units are fractions of the image side, in [0, 1] for boxes inside the image (not clipped).
    """
    sx, sy, tx, ty = z_where.unbind(-1)
    cx, cy = (tx + 1) / 2, (ty + 1) / 2
    return torch.stack((cy - sy / 2, cy + sy / 2, cx - sx / 2, cx + sx / 2), -1)


def boxes_to_pixels(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised [y_min, y_max, x_min, x_max] to pixel (x_min, y_min, x_max, y_max)."""
    y_min, y_max, x_min, x_max = boxes.unbind(-1)
    return torch.stack((x_min * width, y_min * height, x_max * width, y_max * height), -1)
