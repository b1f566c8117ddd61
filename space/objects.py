"""Objects as data: detections with pixel boxes and latents, exported for a whole split.

Convention: a box is (x_min, y_min, x_max, y_max) in pixels of the image as given, x to the
right and y down, with pixel j spanning [j, j + 1) (so a box covering pixels 3..5 has x_min 3 and
x_max 6). Boxes are not clipped to the image (SPACE's boxes may overhang its border).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .evaluation import PRESENCE_THRESHOLD
from .geometry import boxes_to_pixels, z_where_to_boxes
from .io import atomic_write, write_json
from .model import Space
from .schedules import final_priors


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
    """Images (a (B,3,H,W) tensor in [0, 1], or a list of PIL images / HxWx3 uint8 arrays) resized
    to the model's square size; also returns each input's (height, width)."""
    if torch.is_tensor(images):
        x = images.float()
        if x.dim() == 3:
            x = x[None]
        shapes = [tuple(x.shape[-2:])] * x.size(0)
    else:
        tensors, shapes = [], []
        for image in images:
            array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
            if array.ndim != 3 or array.shape[2] != 3:
                raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {array.shape}")
            t = torch.from_numpy(np.array(array)).permute(2, 0, 1).float()  # a copy: PIL's arrays are read-only
            tensors.append(t / 255.0 if array.dtype == np.uint8 else t)
            shapes.append(array.shape[:2])
        x = torch.stack([F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False)[0]
                         if t.shape[-2:] != (size, size) else t for t in tensors])
        return x, shapes
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, shapes


@torch.no_grad()
def detect(model: Space, images: Any, threshold: float = PRESENCE_THRESHOLD, mode: str = "deterministic"
           ) -> list[list[Detection]]:
    """Objects in each image: cells whose presence probability exceeds ``threshold``.

    Args:
        model: a SPACE model (put in eval mode for this call).
        images: a (B, 3, H, W) float tensor in [0, 1] or a list of PIL images / uint8 arrays of
            any size; they are resized to the model's size and boxes are mapped back.
    Returns:
        per image, a list of :class:`Detection`, most confident first.
    """
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
                      num_images: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Detect objects in a dataset split and write them as a table and a JSON file.

    Writes ``<path>.parquet`` (or ``.csv`` where pyarrow is missing): one row per object with
    image, file, object, x_min, y_min, x_max, y_max (pixels of the model-size image), presence,
    depth, cell, file_x_min, file_y_min, file_x_max, file_y_max (the box in pixels of the image
    file, undoing the resize and crop) and z_what_0..z_what_{D-1}; and ``<path>.json``: per image,
    its file and objects. Both atomically. The file columns need a dataset of ``space.data``
    (one with ``source(index)``); for other datasets they are left out.
    Returns a summary.
    """
    import pandas as pd

    n = len(dataset) if num_images is None else min(num_images, len(dataset))
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
    frame = pd.DataFrame(rows, columns=columns)
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
                  + ("; file_box is the same box in pixels of the image file" if sources else ""))
    write_json(path.with_suffix(".json"), {"convention": convention, "threshold": threshold, "mode": mode,
                                           "images": per_image})
    return {"table": str(table), "json": str(path.with_suffix(".json")), "num_images": n, "num_objects": len(rows)}
