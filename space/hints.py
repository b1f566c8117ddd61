"""Prior hints: propose G, the object-size prior and the z_pres prior for a dataset.

SPACE needs three things set to the data: the grid size G (a cell should be about one object
wide, and two object centres should rarely share a cell), the prior mean of the pre-sigmoid
z_scale (sigmoid of it is the object size over the image size), and the prior presence
probability. With boxes (a dataset's ``bb`` files, or a few boxes a user measured) these follow
from the object sizes and counts; without boxes they cannot be known and we say so.

Command line::

    python -m space.hints --experiment rooms                  # the boxes of its splits
    python -m space.hints --boxes 12,20,14,16 40,8,10,12 --image-size 128   # two objects in one image
    python -m space.hints --boxes 12,20,14,16 40,8,10,12 --boxes 90,60,12,12 --image-size 128  # two images
    python -m space.hints --boxes 400,300,90,120 --image-size 1000 --model-size 128
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .config import ALLOWED_G

START_SCALE_FACTOR = 2.0  # start the size prior at about twice the object size, as the originals do
CROWDING_LIMIT = 0.05  # at most 5 % of objects may share their cell with another object's centre


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@dataclass
class Hints:
    """Suggested params and the reasons behind them."""

    values: dict[str, float | int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = ["Suggested model params:"]
        lines += [f"  {key}: {value}" for key, value in self.values.items()]
        lines += ["Why:"] + [f"  - {reason}" for reason in self.reasons]
        if self.unknown:
            lines += ["Cannot be known from this data:"] + [f"  - {item}" for item in self.unknown]
        return "\n".join(lines)


def suggest(boxes_per_image: Sequence[np.ndarray] | None, image_size: int) -> Hints:
    """Hints from boxes in the normalised [y_min, y_max, x_min, x_max] convention (or None).

    Args:
        boxes_per_image: per image, an (M, 4) array; None when the data has no boxes.
        image_size: the model's image side in pixels (for G and the messages).
    """
    hints = Hints()
    valid_g = [g for g in ALLOWED_G if image_size % g == 0 and image_size // g in (8, 16, 32)]
    if not valid_g:
        sizes = sorted({g * cell for g in ALLOWED_G for cell in (8, 16, 32)})
        raise ValueError(f"no grid fits an image size of {image_size}: the model's cells are 8, 16 or 32 pixels "
                         f"wide and G is one of {ALLOWED_G}, so its image_size is one of {sizes}")
    if not boxes_per_image or sum(len(b) for b in boxes_per_image) == 0:
        hints.values = {"G": 8 if 8 in valid_g else valid_g[0], "z_scale_mean_start_value": -1.0,
                        "z_scale_mean_end_value": -2.0, "z_pres_start_value": 0.1, "z_pres_end_value": 0.01}
        hints.reasons.append("no boxes: these are the original 3D-room values, a neutral start")
        hints.unknown += [
            "object size: give a few boxes (--boxes cx,cy,w,h in pixels) or add bb/ files; the size prior "
            "z_scale_mean_end_value should be logit(object side / image side)",
            "objects per image: it sets G (about one object per cell) and the z_pres prior",
        ]
        return hints
    all_boxes = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in boxes_per_image])
    heights = all_boxes[:, 1] - all_boxes[:, 0]
    widths = all_boxes[:, 3] - all_boxes[:, 2]
    side = np.sqrt(np.clip(widths * heights, 1e-6, None))  # geometric mean of width and height
    size = float(np.median(side))
    counts = np.array([len(b) for b in boxes_per_image])

    # G: the largest grid (smallest cells, so that near objects get their own cells) whose cells
    # are still at least about half an object wide, with little crowding.
    centres = np.stack([(all_boxes[:, 0] + all_boxes[:, 1]) / 2, (all_boxes[:, 2] + all_boxes[:, 3]) / 2], 1)
    owners = np.repeat(np.arange(len(boxes_per_image)), counts)
    crowding = {}
    for g in valid_g:
        cells = np.clip((centres * g).astype(int), 0, g - 1)
        keys = owners * g * g + cells[:, 0] * g + cells[:, 1]
        _, inverse, shared = np.unique(keys, return_inverse=True, return_counts=True)
        crowding[g] = float((shared[inverse] > 1).mean())
    candidates = [g for g in valid_g if 1 / g >= 0.5 * size and crowding[g] <= CROWDING_LIMIT] or \
        [min(valid_g, key=lambda g: crowding[g])]
    G = max(candidates)
    density = float(counts.mean()) / (G * G)
    hints.values = {
        "G": G,
        "z_scale_mean_start_value": round(logit(min(0.45, START_SCALE_FACTOR * size)), 2),
        "z_scale_mean_end_value": round(logit(size), 2),
        "z_pres_start_value": round(min(0.5, max(0.1, 2 * density)), 3),
        "z_pres_end_value": 0.01,
    }
    images = f"{len(boxes_per_image)} image" + ("s" if len(boxes_per_image) != 1 else "")
    hints.reasons += [
        f"{len(all_boxes)} boxes in {images}; median object side {size:.3f} of the image "
        f"({size * image_size:.1f} px at {image_size} px); sigmoid(z_scale_mean_end_value) = {size:.3f}",
        f"the size prior starts at about {START_SCALE_FACTOR:g}x the object size and anneals down, as the originals do",
        "treat the end value as an upper end: while the boundary loss is on, boxes come out larger than their "
        "objects, and a prior below the object size holds them tighter. On the default rooms (median side 10 px of "
        "64) this rule gives -1.69, and -1.7 scored test AP50 0.65 with its boxes past IoU 0.5, against 0.80-0.89 "
        "for the default's -2.0 (7.6 px; benchmarks/README.md): try about 0.3 lower too",
        f"G = {G}: cells of {image_size // G} px; share of objects sharing a cell with another: "
        + ", ".join(f"G={g}: {crowding[g]:.1%}" for g in valid_g),
        f"{counts.mean():.2f} objects per image ({counts.min()}-{counts.max()}): {density:.3f} of the {G * G} cells; "
        f"the presence prior starts at about twice that (at least 0.1, the originals' start) and ends at 0.01",
    ]
    return hints


def _boxes_from_pixels(groups: Sequence[Sequence[str]], image_size: int) -> list[np.ndarray]:
    """Per image (one ``--boxes`` group each), its boxes as normalised [y_min, y_max, x_min, x_max]."""
    images = []
    for specs in groups:
        boxes = []
        for spec in specs:
            try:
                cx, cy, w, h = (float(v) / image_size for v in spec.split(","))
            except ValueError as error:
                raise ValueError(f"bad box {spec!r}: expected cx,cy,w,h in pixels") from error
            if not np.isfinite([cx, cy, w, h]).all() or w <= 0 or h <= 0:
                raise ValueError(f"bad box {spec!r}: expected cx,cy,w,h in pixels, finite, with width and height > 0")
            boxes.append([cy - h / 2, cy + h / 2, cx - w / 2, cx + w / 2])
        images.append(np.array(boxes))
    return images


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Propose G and the priors of SPACE for a dataset.")
    parser.add_argument("--experiment", help="an experiment of params.yaml: use its data's boxes")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                        help="whose boxes to read with --experiment (default: every split that has them)")
    parser.add_argument("--boxes", nargs="+", action="append", metavar="CX,CY,W,H",
                        help="the boxes you measured on one image, each cx,cy,w,h in pixels; give --boxes "
                        "again for each further image (which objects share an image enters G and the presence prior)")
    parser.add_argument("--image-size", type=int, default=128, help="image side the --boxes are in")
    parser.add_argument("--model-size", type=int, help="the model's image_size, if not --image-size "
                        "(boxes measured on a 1000-pixel photo: --image-size 1000 --model-size 128)")
    args = parser.parse_args(argv)
    try:
        if args.boxes:
            boxes = _boxes_from_pixels(args.boxes, args.image_size)
            try:
                print(suggest(boxes, args.model_size or args.image_size).text())
            except ValueError as error:
                if args.model_size:
                    raise
                raise ValueError(f"{error}; for boxes measured on an image of another size, give the model's "
                                 f"as --model-size") from None
            return
        if not args.experiment:
            parser.error("give --experiment NAME or --boxes")
        from .experiment import build_dataset, load_experiment
        exp = load_experiment(args.params, args.experiment)
        datasets = [build_dataset(exp, split) for split in (("train", "val", "test") if args.split == "all"
                                                            else (args.split,))]
        boxes = [dataset.boxes(i) for dataset in datasets if getattr(dataset, "has_boxes", False)
                 for i in range(len(dataset))]
        print(suggest(boxes or None, exp.model.image_size).text())
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
