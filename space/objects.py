"""Objects as data: detections with pixel boxes and latents, exported for a whole split.

Convention: a box is (x_min, y_min, x_max, y_max) in pixels of the image as given, x to the
right and y down, with pixel j spanning [j, j + 1) (so a box covering pixels 3..5 has x_min 3 and
x_max 6). Boxes are not clipped to the image (SPACE's boxes may overhang its border).
"""
from __future__ import annotations

import logging
import operator
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .data.datasets import to_rgb, turned_as_shown
from .evaluation import PRESENCE_THRESHOLD
from .geometry import boxes_to_pixels, z_where_to_boxes
from .io import atomic_write, write_json
from .model import Space
from .schedules import final_priors

log = logging.getLogger(__name__)


@dataclass
class Detection:
    """One object found by SPACE."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    presence: float  # z_pres probability sigmoid(logit)
    depth: float  # z_depth (smaller is nearer)
    cell: int  # grid cell n = row * G + column
    z_what: list[float]

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x_min, self.y_min, self.x_max, self.y_max)


def _as_batch(images: Any, size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Images resized to the model's square size, as a (B, 3, size, size) float tensor in [0, 1];
    also returns each input's (height, width).

    ``images``: a (B, 3, H, W) or (3, H, W) tensor (float in [0, 1], uint8 in 0..255 or uint16 in
    0..65535), or one image or a list of them, each a (3, H, W) tensor likewise (as
    ``torchvision.io.read_image`` gives; another shape is read as an array), a PIL image (any mode, 16-bit and float ones
    included: converted to RGB as the datasets do, by :func:`space.data.datasets.to_rgb`) or an
    (H, W, 3) array (uint8, uint16, or float in [0, 1]; (H, W) grey and (H, W, 4) with alpha are
    taken as PIL takes them: grey repeated, alpha dropped). A PIL image with an EXIF orientation
    (a phone photo) is turned as viewers show it, as the datasets turn their files; its boxes are
    in that turned image.
    """
    if torch.is_tensor(images):
        if images.dim() not in (3, 4) or images.shape[-3] != 3:
            raise ValueError(f"expected a (B, 3, H, W) or (3, H, W) image tensor, got shape {tuple(images.shape)}")
        if images.numel() == 0:
            raise ValueError(f"no images given (a tensor of shape {tuple(images.shape)})")
        x = _unit_range(images, "the image tensor")
        if x.dim() == 3:
            x = x[None]
        shapes = [tuple(x.shape[-2:])] * x.size(0)
        if x.shape[-2:] != (size, size):
            x = _resize(x, size)
        return x, shapes
    if hasattr(images, "convert") or isinstance(images, (str, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        images = [images]  # one image (or a path, refused below)
    tensors, shapes = [], []
    for k, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            raise ValueError(f"image {k}: got the path {str(image)!r}: pass the image itself, e.g. PIL.Image.open(path)")
        if torch.is_tensor(image) and image.dim() == 3 and image.shape[0] == 3 and image.shape[2] != 3:
            # channels first, as a batch tensor's images are (other tensors are read as arrays are)
            if 0 in image.shape:
                raise ValueError(f"image {k}: expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
            tensors.append(_unit_range(image.cpu(), f"image {k}"))
            shapes.append(tuple(image.shape[1:]))
            continue
        if torch.is_tensor(image):  # another shape: read as an array is
            image = image.detach().cpu()
            image = image.float() if image.dtype == torch.bfloat16 else image
        # a PIL image is turned as viewers show it, as the datasets turn their files
        array = np.asarray(to_rgb(turned_as_shown(image), f"image {k}") if hasattr(image, "convert") else image)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        elif array.ndim == 3 and array.shape[2] in (1, 4):
            array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]
        if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
            hint = "; a channels-first (3, H, W) image goes in as a torch tensor" if array.ndim == 3 and array.shape[0] == 3 else ""
            raise ValueError(f"image {k}: expected an RGB image (H, W, 3), got an array of shape {array.shape}{hint}")
        t = _unit_range(torch.from_numpy(np.array(array)), f"image {k}")  # a copy: PIL's arrays are read-only
        tensors.append(t.permute(2, 0, 1))
        shapes.append(array.shape[:2])
    if not tensors:
        raise ValueError("no images given")
    x = torch.stack([_resize(t[None], size)[0] if t.shape[-2:] != (size, size) else t for t in tensors])
    return x, shapes


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) to (B, 3, size, size), bilinear and, when shrinking, antialiased as PIL's resize
    (which made the training images) is: without it a large photo reached the model as a sparse
    sample of its pixels (fine texture at full contrast instead of averaged out)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _unit_range(t: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 values 0..255 divided by 255, uint16 ones 0..65535 by 65535; float ones checked to lie in [0, 1]."""
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype == torch.uint16:
        return t.float() / 65535.0
    if not t.is_floating_point():
        raise ValueError(f"{what}: expected uint8 values (0..255), uint16 ones (0..65535) or float ones in [0, 1], "
                         f"got {t.dtype}")
    t = t.float()
    if not torch.isfinite(t).all():  # NaN passes both comparisons below
        raise ValueError(f"{what}: float values must be finite and lie in [0, 1], got "
                         f"{int((~torch.isfinite(t)).sum())} NaN or infinite value(s)")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"{what}: float values must lie in [0, 1], got {t.min().item():g}..{t.max().item():g} "
                         f"(for 0..255, pass uint8 or divide by 255)")
    return t


@torch.no_grad()
def detect(model: Space, images: Any, threshold: float = PRESENCE_THRESHOLD, mode: str = "deterministic"
           ) -> list[list[Detection]]:
    """Objects in each image: cells whose presence probability exceeds ``threshold``.

    Args:
        model: a SPACE model (put in eval mode for this call).
        images: a (B, 3, H, W) tensor (float in [0, 1], uint8 or uint16), or one or a list of PIL
            images (any mode), (H, W, 3) arrays (uint8, uint16, or float in [0, 1]) or (3, H, W)
            tensors, of any size;
            they are resized to the model's size and boxes are mapped back.
    Returns:
        per image, a list of :class:`Detection`, most confident first.
    """
    try:  # numbers of any kind (numpy's, a 0-d tensor), but not True/False
        value = None if isinstance(threshold, bool) else float(threshold)
    except (TypeError, ValueError, RuntimeError):
        value = None
    if value is None or not 0 <= value < 1:
        raise ValueError(f"threshold: a presence probability in [0, 1) above which a cell is an object, got "
                         f"{threshold!r}")
    threshold = value
    device = next(model.parameters()).device
    x, shapes = _as_batch(images, model.cfg.image_size)
    was_training = model.training
    model.eval()
    try:
        out = model(x.to(device), final_priors(model.cfg), mode)
    finally:
        model.train(was_training)
    boxes = z_where_to_boxes(out.z_where).cpu()  # (B, N, 4) normalised
    prob, depth = out.z_pres_prob[..., 0].cpu(), out.z_depth[..., 0].cpu()
    z_what = out.z_what.cpu()
    finite = torch.stack([t.flatten(1).isfinite().all(1) for t in (boxes, prob, depth, z_what)]).all(0)
    if not finite.all():  # NaN presence compares false: a diverged model would find "no objects"
        raise ValueError(f"the model computes NaN or infinite latents for image(s) "
                         f"{torch.nonzero(~finite).flatten().tolist()[:10]} (a diverged run or a corrupt checkpoint)")
    results = []
    for b, (height, width) in enumerate(shapes):
        pixels = boxes_to_pixels(boxes[b], height, width)
        cells = torch.nonzero(prob[b] > threshold).flatten().tolist()
        cells.sort(key=lambda n: -prob[b, n].item())
        results.append([Detection(*pixels[n].tolist(), presence=prob[b, n].item(), depth=depth[b, n].item(),
                                  cell=n, z_what=z_what[b, n].tolist()) for n in cells])
    return results


#: The table's columns for a box in pixels of the image file (the model sees it resized and cropped).
FILE_BOX_COLUMNS = ("file_x_min", "file_y_min", "file_x_max", "file_y_max")


def export_detections(model: Space, dataset: Dataset, path: str | Path, batch_size: int = 32,
                      threshold: float = PRESENCE_THRESHOLD, mode: str = "deterministic",
                      num_images: int | None = None, progress: bool = True, split: str | None = None
                      ) -> dict[str, Any]:
    """Detect objects in a dataset split and write them as a table and a JSON file.

    Writes ``<path>.parquet`` (or ``.csv`` where pyarrow is missing): one row per object with
    image, file, object, x_min, y_min, x_max, y_max (pixels of the model-size image), presence,
    depth, cell, file_x_min, file_y_min, file_x_max, file_y_max (the box in pixels of the image
    file as viewers show it, undoing the resize and crop) and z_what_0..z_what_{D-1}; and ``<path>.json``: per image,
    its file and objects. Both atomically. The file columns need a dataset of ``space.data``
    (one with ``source(index)``); for other datasets they are left out.
    ``split`` (its name) and the number of images go into the JSON too. Returns a summary.
    """
    import pandas as pd

    if num_images is not None:
        try:  # integers of any kind (numpy's included), but not True/False
            count = None if isinstance(num_images, bool) else operator.index(num_images)
        except TypeError:
            count = None
        if count is None or count < 1:
            raise ValueError(f"num_images: a number of images >= 1 or None (all), got {num_images!r}")
        num_images = count
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    if num_images is not None and num_images > n:
        log.warning("num_images = %d, but the %s has %d images: exporting those", num_images,
                    f"{split} split" if split else "dataset", n)
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    sources = hasattr(dataset, "source")  # our datasets: each item's file and its geometry
    rows, per_image, index = [], [], 0
    for x in tqdm(loader, desc="export", unit="batch", disable=not progress, dynamic_ncols=True):
        for detections in detect(model, x, threshold, mode):
            source = dataset.source(index) if sources else None
            objects = []
            for k, d in enumerate(detections):
                row = {"image": index, **({"file": source.path} if source else {}), "object": k,
                       **{f: getattr(d, f) for f in ("x_min", "y_min", "x_max", "y_max", "presence", "depth", "cell")}}
                obj = asdict(d)
                if source:
                    file_box = source.box(*d.box)
                    row.update(zip(FILE_BOX_COLUMNS, file_box))
                    obj["file_box"] = list(file_box)
                row.update({f"z_what_{i}": v for i, v in enumerate(d.z_what)})
                rows.append(row)
                objects.append(obj)
            per_image.append({"image": index, **({"file": source.path} if source else {}), "objects": objects})
            index += 1
    columns = ["image", *(["file"] if sources else []), "object", "x_min", "y_min", "x_max", "y_max", "presence",
               "depth", "cell", *(FILE_BOX_COLUMNS if sources else ()), *(f"z_what_{i}" for i in range(model.cfg.z_what_dim))]
    # Types set, not inferred: an export without objects (an early model, a high threshold) wrote
    # columns of no type, which then spoilt the types of a table it was concatenated with.
    frame = pd.DataFrame(rows, columns=columns).astype(
        {c: ("int64" if c in ("image", "object", "cell") else "str" if c == "file" else "float64") for c in columns})
    path = Path(path)
    try:
        import pyarrow  # noqa: F401
        table = path.with_suffix(".parquet")
        atomic_write(table, lambda tmp: frame.to_parquet(tmp, index=False))
    except ImportError:
        table = path.with_suffix(".csv")
        atomic_write(table, lambda tmp: frame.to_csv(tmp, index=False))
    convention = ("boxes are x_min, y_min, x_max, y_max in pixels of the model-size image "
                  f"({model.cfg.image_size} x {model.cfg.image_size}); pixel j spans [j, j+1)"
                  + ("; file_box is the same box in pixels of the image file as viewers show it "
                     "(EXIF orientation applied)" if sources else ""))
    write_json(path.with_suffix(".json"), {"convention": convention, **({"split": split} if split else {}),
                                           "num_images": n, "threshold": threshold, "mode": mode,
                                           "images": per_image})
    return {"table": str(table), "json": str(path.with_suffix(".json")), "num_images": n, "num_objects": len(rows)}
