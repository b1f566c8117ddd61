"""Pictures of what SPACE does: the original's panel grid and boxes, plus figures for people.

Two families live here.

* **The original's pictures (SPEC 12).** :func:`separations_grid` is the 'show' task's panel grid
  (SPEC 12.1) and :func:`tensorboard_images` the images written to TensorBoard during training
  (SPEC 12.2). Their "fg with boxes" panel comes from :func:`original_boxes_on_fg` (alias
  :func:`box_overlay`), which reproduces the original faithfully: a 21 x 21 green-border template
  is scaled by each cell's *relaxed z_pres sample*, pasted with the inverse spatial transform
  (bilinear, so the border is blurred and its thickness scales with the box), summed over cells
  and added to the *foreground reconstruction*. Boxes therefore fade in and out with the soft
  z_pres (a cell at z_pres 0.3 draws a dim box), may be thicker or thinner than 2 px and sit on
  the foreground, not the input.
* **Clearer pictures for our demo.** :func:`draw_boxes` draws crisp rectangles (1 pixel; thicker past 128) at the
  pixel boxes of the cells with ``z_pres_prob > 0.5`` (the same boxes and threshold as the
  evaluation, SPEC 9.2) on the *input image*; :func:`demo_figure` lays the decomposition out as a
  labelled matplotlib figure and :func:`training_curves` plots the training log.

torchvision is not a dependency, so :func:`make_grid` re-implements the part of
``torchvision.utils.make_grid`` the original used. Every file is written atomically: to a
temporary file in the target folder, then ``os.replace``.

Letters: B batch, N = G*G cells, K background components, H = W image side, P panels per row.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from .geometry import boxes_to_pixels, paste_glimpses, z_where_to_boxes
from .io import atomic_path

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

    from .model import SpaceOutput

BOX_TEMPLATE_SIZE = 21  # the original's bbox template is 3 x 21 x 21 (SPEC 12.1)
BOX_THICKNESS = 2  # border rows/columns 0-1 and 19-20
GRID_PADDING = 2
GRID_PAD_VALUE = 1.0
TENSORBOARD_MAX_IMAGES = 10  # SPEC 12.2: at most the first 10 images of the batch
TENSORBOARD_NROW = 5
PRES_THRESHOLD = 0.5  # a cell is an object when z_pres_prob > 0.5 (SPEC 9.2)
GREEN = (0.0, 1.0, 0.0)

__all__ = ["BOX_TEMPLATE_SIZE", "box_overlay", "box_template", "demo_figure", "draw_boxes", "make_grid",
           "original_boxes_on_fg", "panel_count", "predicted_boxes_px", "save_png", "separations_grid",
           "separations_tensor", "tensorboard_images", "to_uint8", "training_curves"]


# --------------------------------------------------------------------------------------------
# Grids and files
# --------------------------------------------------------------------------------------------

def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = GRID_PADDING,
              pad_value: float = GRID_PAD_VALUE) -> torch.Tensor:
    """Tile images into one picture, like ``torchvision.utils.make_grid`` (no normalisation).

    Images are laid out row by row, ``nrow`` per row, with ``padding`` pixels of ``pad_value``
    around and between them. One-channel images are repeated to three channels. Unlike
    torchvision, a single image is padded too (torchvision returns a lone image unpadded).

    Args:
        images: (M, C, H, W) with C in {1, 3}, or one (C, H, W) image.
        nrow: images per row.
        padding: pixels between and around images.
        pad_value: value of the padding.
    Returns:
        (3, rows * (H + padding) + padding, min(nrow, M) * (W + padding) + padding) float tensor.
    """
    images = images.detach()
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.size(1) not in (1, 3):
        raise ValueError(f"expected (M, 1|3, H, W) images, got {tuple(images.shape)}")
    if images.size(1) == 1:
        images = images.expand(-1, 3, -1, -1)
    m, c, h, w = images.shape
    if m == 0:
        raise ValueError("make_grid needs at least one image")
    xmaps = min(nrow, m)
    ymaps = math.ceil(m / xmaps)
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, ymaps * cell_h + padding, xmaps * cell_w + padding), float(pad_value))
    for k in range(m):
        y, x = divmod(k, xmaps)
        grid[:, y * cell_h + padding:y * cell_h + padding + h, x * cell_w + padding:x * cell_w + padding + w] = images[k]
    return grid


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] to an (H, W, 3) uint8 array: clamp, * 255, truncate (SPEC 12.1)."""
    array = image.detach().float().cpu().clamp(0.0, 1.0).mul(255).to(torch.uint8)  # (3, H, W)
    return array.permute(1, 2, 0).contiguous().numpy()


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        write(file)
    return Path(path)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG, atomically.

    Args:
        array: (H, W, 3) uint8, e.g. from :func:`separations_grid`.
        path: target file.
    Returns:
        the path written.
    """
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {array.shape} {array.dtype}")
    image = Image.fromarray(array)
    return _atomic_write(path, lambda f: image.save(f, format="PNG"))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu()


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------

def box_template(size: int = BOX_TEMPLATE_SIZE, thickness: int = BOX_THICKNESS,
                 colour: Sequence[float] = GREEN) -> torch.Tensor:
    """The original's box template: (3, size, size), zero inside, ``colour`` on a border.

    With the defaults this is SPEC 12.1's template: rows and columns 0-1 and 19-20 of the green
    channel are 1, everything else 0.
    """
    template = torch.zeros(3, size, size)  # (3, h, w)
    border = torch.zeros(size, size, dtype=torch.bool)
    border[:thickness, :] = border[-thickness:, :] = True
    border[:, :thickness] = border[:, -thickness:] = True
    for c, value in enumerate(colour):
        template[c][border] = float(value)
    return template


def original_boxes_on_fg(fg: torch.Tensor, z_where: torch.Tensor, z_pres: torch.Tensor,
                         thickness: int = BOX_THICKNESS, template_size: int = BOX_TEMPLATE_SIZE) -> torch.Tensor:
    """The original's "fg with boxes" panel (SPEC 12.1), faithfully.

    Each cell's green-border template is multiplied by the cell's relaxed z_pres sample, pasted to
    full resolution with the inverse spatial transform at ``z_where`` (= cat(z_scale, z_shift),
    bilinear), the pasted maps are summed over cells and clamped to [0, 1], added to the
    foreground and clamped again. Box brightness tracks the *soft* z_pres, not a threshold.

    Args:
        fg: (B, 3, H, W) premultiplied foreground.
        z_where: (B, N, 4) [sx, sy, tx, ty].
        z_pres: (B, N, 1) relaxed z_pres sample.
        thickness: border thickness of the template, in template pixels.
        template_size: side of the template.
    Returns:
        (B, 3, H, W) in [0, 1].
    """
    fg, z_where, z_pres = _cpu(fg), _cpu(z_where), _cpu(z_pres)
    b, n = z_where.shape[:2]
    size = fg.size(-1)
    template = box_template(template_size, thickness)  # (3, h, w)
    glimpses = z_pres.reshape(b * n, 1, 1, 1) * template  # (B*N, 3, h, w)
    boxes = paste_glimpses(glimpses, z_where.reshape(b * n, 4), size)  # (B*N, 3, H, W)
    boxes = boxes.view(b, n, 3, size, size).sum(1).clamp(0.0, 1.0)  # (B, 3, H, W)
    return (boxes + fg).clamp(0.0, 1.0)


def box_overlay(out: SpaceOutput, thickness: int = BOX_THICKNESS) -> torch.Tensor:
    """SPEC 12.1's boxes on the foreground of a forward pass: :func:`original_boxes_on_fg`.

    Args:
        out: a forward pass.
        thickness: template border thickness (2 in the original).
    Returns:
        (B, 3, H, W) in [0, 1]: green, soft-z_pres-weighted boxes on ``out.fg``.
    """
    return original_boxes_on_fg(out.fg, out.z_where, out.z_pres, thickness)


def predicted_boxes_px(out: SpaceOutput, threshold: float = PRES_THRESHOLD) -> list[torch.Tensor]:
    """Pixel boxes of the cells with ``z_pres_prob > threshold`` (SPEC 9.2's boxes, in pixels).

    Returns:
        one (M_b, 4) tensor per image: continuous pixel coordinates (x_min, y_min, x_max, y_max).
    """
    h, w = out.imgs.shape[-2:]
    boxes = boxes_to_pixels(z_where_to_boxes(_cpu(out.z_where)), h, w)  # (B, N, 4)
    keep = _cpu(out.z_pres_prob).squeeze(-1) > threshold  # (B, N)
    return [boxes[i][keep[i]] for i in range(boxes.size(0))]


def draw_boxes(images: torch.Tensor, boxes_px: Sequence[torch.Tensor],
               colour: Sequence[float] = GREEN, width: int = 1) -> torch.Tensor:
    """Crisp rectangles, ``width`` pixels thick, on images (our demo's boxes; see the module docstring).

    A box with continuous pixel edges [x_min, x_max) x [y_min, y_max) covers the pixels
    round(x_min) .. round(x_max) - 1 (and likewise in y); its outline is drawn on the first and
    last of those rows and columns, clipped to the image. Unlike :func:`original_boxes_on_fg`
    there is no blurring, no soft weighting and no dependence on the box size.

    Args:
        images: (B, 3, H, W) in [0, 1]; not modified.
        boxes_px: one (M_b, 4) tensor (x_min, y_min, x_max, y_max) per image, e.g. from
            :func:`predicted_boxes_px`.
        colour: RGB in [0, 1].
        width: outline thickness in pixels, drawn inwards from the box's first and last rows and
            columns.
    Returns:
        (B, 3, H, W) copy of ``images`` with the outlines drawn.
    """
    out = _cpu(images).clone()
    b, _, h, w = out.shape
    if len(boxes_px) != b:
        raise ValueError(f"need one box tensor per image: {len(boxes_px)} for {b} images")
    value = torch.tensor([float(c) for c in colour]).view(3, 1)
    for i, boxes in enumerate(boxes_px):
        for x0f, y0f, x1f, y1f in torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).tolist():
            x0, y0 = int(round(x0f)), int(round(y0f))
            x1, y1 = int(round(x1f)) - 1, int(round(y1f)) - 1  # last covered pixel
            if x1 < x0 or y1 < y0 or x1 < 0 or y1 < 0 or x0 >= w or y0 >= h:
                continue  # empty or fully outside
            cx0, cx1, cy0, cy1 = max(x0, 0), min(x1, w - 1), max(y0, 0), min(y1, h - 1)
            for y in {*range(y0, min(y0 + width, y1 + 1)), *range(max(y1 - width + 1, y0), y1 + 1)}:
                if 0 <= y < h:  # horizontal edges, when inside the image
                    out[i, :, y, cx0:cx1 + 1] = value
            for x in {*range(x0, min(x0 + width, x1 + 1)), *range(max(x1 - width + 1, x0), x1 + 1)}:
                if 0 <= x < w:  # vertical edges
                    out[i, :, cy0:cy1 + 1, x] = value
    return out


# --------------------------------------------------------------------------------------------
# The original's panel grid (SPEC 12.1, 12.2)
# --------------------------------------------------------------------------------------------

def panel_count(k: int) -> int:
    """Panels per row of the separations grid: 5 + 3K + 1 (15 for K = 3, 21 for K = 5)."""
    return 5 + 3 * k + 1


def separations_tensor(out: SpaceOutput, max_images: int = TENSORBOARD_MAX_IMAGES) -> torch.Tensor:
    """The SPEC 12.1 panel grid as an unclamped (3, H', W') float tensor.

    Row per image, 5 + 3K + 1 panels: x, y, fg, fg with boxes (original style), bg, the K masked
    components comp_k * m_k, the K masks (grey), the K raw components, the alpha map (grey).
    Padding 2 with value 1.

    Args:
        out: a forward pass.
        max_images: at most this many images (rows), from the start of the batch.
    Returns:
        (3, rows * (H + 2) + 2, P * (W + 2) + 2) float tensor, values as computed (not clamped).
    """
    n = max(1, min(max_images, out.imgs.size(0)))
    imgs, y, fg, bg = (_cpu(t[:n]) for t in (out.imgs, out.y, out.fg, out.bg))  # (n, 3, H, W) each
    comps, masks = _cpu(out.comps[:n]), _cpu(out.masks[:n])  # (n, K, 3, H, W), (n, K, 1, H, W)
    alpha = _cpu(out.alpha_map[:n])  # (n, 1, H, W)
    fg_box = original_boxes_on_fg(fg, out.z_where[:n], out.z_pres[:n])  # (n, 3, H, W)
    panels = torch.cat([imgs[:, None], y[:, None], fg[:, None], fg_box[:, None], bg[:, None],
                        comps * masks, masks.expand(-1, -1, 3, -1, -1), comps,
                        alpha[:, None].expand(-1, -1, 3, -1, -1)], dim=1)  # (n, P, 3, H, W)
    p = panels.size(1)
    return make_grid(panels.reshape(n * p, *panels.shape[2:]), nrow=p)


def separations_grid(out: SpaceOutput, max_images: int = 10) -> np.ndarray:
    """The 'show' task's picture (SPEC 12.1) as an (H', W', 3) uint8 array.

    The grid of :func:`separations_tensor`, clamped to [0, 1], scaled by 255 and cast to uint8.
    Write it with :func:`save_png`.
    """
    return to_uint8(separations_tensor(out, max_images))


def tensorboard_images(writer: Any, out: SpaceOutput, step: int,
                       max_images: int = TENSORBOARD_MAX_IMAGES) -> None:
    """Write SPEC 12.2's training images to TensorBoard.

    Tags 'train/#0-separations' (the panel grid of §12.1), 'train/1-image',
    'train/2-reconstruction_overall' and 'train/3-background' (5 images per row, padding 2,
    pad value 1), from at most the first ``max_images`` images.

    The original passed the separations grid unclamped. TensorBoard's ``add_image`` scales float
    images by 255 and clips to [0, 255] anyway, so we clamp to [0, 1] before writing: the stored
    image is the same, and the clamp only makes that explicit.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_image``).
        out: a forward pass.
        step: global step.
        max_images: at most this many images.
    """
    n = max(1, min(max_images, out.imgs.size(0)))
    writer.add_image("train/#0-separations", separations_tensor(out, n).clamp(0.0, 1.0), step)
    for tag, images in (("train/1-image", out.imgs), ("train/2-reconstruction_overall", out.y),
                        ("train/3-background", out.bg)):
        grid = make_grid(_cpu(images[:n]), nrow=TENSORBOARD_NROW)  # (3, H', W')
        writer.add_image(tag, grid.clamp(0.0, 1.0), step)


# --------------------------------------------------------------------------------------------
# Figures for people
# --------------------------------------------------------------------------------------------

def _new_figure(width: float, height: float, compact: bool = False) -> Any:
    """A matplotlib Figure drawn by the Agg backend, with constrained (tight) layout.

    Constrained layout, unlike ``tight_layout``, also makes room for a suptitle and for labels
    under image axes, so nothing overlaps.

    The figure gets its own Agg canvas instead of going through pyplot, so it renders headless
    without calling ``matplotlib.use('Agg')``, which would switch the backend for the whole process
    (e.g. a notebook importing this module).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    if compact:  # image panels: little space between them
        fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    return _atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _hwc(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) to an (H, W, C) or (H, W) float array in [0, 1] for imshow."""
    array = _cpu(image).clamp(0.0, 1.0)
    return array[0].numpy() if array.size(0) == 1 else array.permute(1, 2, 0).numpy()


DEMO_MAX_ROWS = 8  # images in a demo figure


def demo_figure(out: SpaceOutput, path: str | os.PathLike, title: str | None = None,
                max_images: int = DEMO_MAX_ROWS, threshold: float = PRES_THRESHOLD,
                labels: Sequence[str] | None = None
                ) -> Path:
    """A labelled PNG of the decomposition, one row per image.

    Columns: Image, Reconstruction, Foreground, Background, Boxes on image (crisp boxes of the
    cells with z_pres_prob > threshold drawn on the *input* by :func:`draw_boxes`, the object count
    written under each panel), Alpha, then the K masks and the K components.

    Args:
        out: a forward pass.
        path: PNG file to write (atomically).
        title: optional figure title.
        max_images: at most this many rows.
        threshold: z_pres_prob above which a cell counts as an object.
        labels: each row's label (e.g. its image's index in the dataset); default ``#0``, ``#1``, ...
    Returns:
        the path written.
    """
    n = max(1, min(max_images, out.imgs.size(0)))
    k = out.comps.size(1)
    boxes = predicted_boxes_px(out, threshold)[:n]
    # A panel is 1.5 inches, 150 pixels: past 128 pixels the image is shrunk, and 1-pixel outlines
    # fell between the pixels shown.
    boxed = draw_boxes(out.imgs[:n], boxes, width=max(1, math.ceil(out.imgs.size(-1) / 128)))  # (n, 3, H, W)
    columns: list[tuple[str, Callable[[int], torch.Tensor]]] = [
        ("Image", lambda i: out.imgs[i]),
        ("Reconstruction", lambda i: out.y[i]),
        ("Foreground", lambda i: out.fg[i]),
        ("Background", lambda i: out.bg[i]),
        ("Boxes on image", lambda i: boxed[i]),
        ("Alpha", lambda i: out.alpha_map[i]),
    ]
    columns += [(f"Mask {j}", lambda i, j=j: out.masks[i, j]) for j in range(k)]
    columns += [(f"Component {j}", lambda i, j=j: out.comps[i, j]) for j in range(k)]

    fig = _new_figure(1.5 * len(columns), 1.75 * n + (0.3 if title else 0.0), compact=True)
    axes = fig.subplots(n, len(columns), squeeze=False)
    for i in range(n):
        for c, (label, get) in enumerate(columns):
            ax = axes[i, c]
            image = _hwc(get(i))
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=7)
            if label == "Boxes on image":
                count = len(boxes[i])
                ax.set_xlabel(f"{count} object{'s' if count != 1 else ''}", fontsize=7, labelpad=1)
        axes[i, 0].set_ylabel(labels[i] if labels is not None else f"#{i}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save_figure(fig, path)


CURVE_PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda c: c == "loss"),
    ("elbo", lambda c: c == "elbo"),
    ("log_like", lambda c: c == "log_like"),
    ("KL terms", lambda c: c.startswith("kl_")),
    ("mse", lambda c: c in ("mse", "val_mse")),
    ("validation AP", lambda c: c.startswith("val_ap")),
)


def _read_log(source: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        return source
    path = Path(source)
    try:
        return pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; the train stage writes it (run it again)") from None


def training_curves(source: str | os.PathLike | pd.DataFrame, path: str | os.PathLike,
                    title: str | None = None) -> Path:
    """Plot the training log: loss, elbo, log_like, KL terms, mse and validation AP.

    Panels whose columns are missing or entirely NaN are skipped; within a series NaN rows (e.g.
    steps without evaluation) are dropped. The x axis is the ``step`` column when present, else
    the row number. With nothing to plot, the figure says so.

    Args:
        source: a TSV (``.tsv`` or anything not ``.csv``) or CSV file, or a DataFrame.
        path: PNG file to write (atomically).
        title: optional figure title.
    Returns:
        the path written.
    """
    import pandas as pd

    frame = _read_log(source)
    x_all = frame["step"] if "step" in frame.columns else pd.Series(np.arange(len(frame)), index=frame.index)
    panels: list[tuple[str, list[str]]] = []
    for name, wanted in CURVE_PANELS:
        cols = [c for c in frame.columns if wanted(str(c))
                and pd.to_numeric(frame[c], errors="coerce").notna().any()]
        if cols:
            panels.append((name, cols))

    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = _new_figure(4.0 * ncols, 2.8 * nrows + (0.3 if title else 0.0))
    if not panels:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no metrics to plot yet", ha="center", va="center")
    else:
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (name, cols) in zip(axes, panels):
            for col in cols:
                y = pd.to_numeric(frame[col], errors="coerce")
                ok = y.notna() & pd.to_numeric(x_all, errors="coerce").notna()
                sparse = ok.sum() < 0.5 * len(frame)  # evaluation-only series: show the points
                ax.plot(x_all[ok].to_numpy(dtype=float), y[ok].to_numpy(dtype=float), label=str(col),
                        marker="o" if sparse else None, markersize=3, linewidth=1)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step" if "step" in frame.columns else "row", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if len(cols) > 1 or name in ("mse", "validation AP"):
                ax.legend(fontsize=6)
        for ax in axes[len(panels):]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)
