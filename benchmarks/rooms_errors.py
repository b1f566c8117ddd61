"""What a trained model gets wrong on a split with boxes: missed objects, false ones, box sizes.

Usage: .venv/bin/python benchmarks/rooms_errors.py MODEL.pth DATA_ROOT [--split val] [--figure F.png]

At IoU 0.5 against the ground truth (deterministic mode, presence > 0.5, as the evaluation):
counts right / over / under per image; true objects missed, split into those found with a poor
box (best IoU 0.1-0.5) and those not found at all (IoU <= 0.1); false boxes far from every true
object (IoU <= 0.1) near the image border or the top (walls) and elsewhere; the predicted/true box
side ratio (height, width) of matched pairs; for over-counted images, the boxes beyond the true
count (the least present ones): their presence, their IoU with the nearest other present box and
their mean glimpse alpha, against those of the other present boxes. ``--figure`` draws the first 24 images with true
boxes (green), present cells (red) and cells with presence 0.1-0.5 (yellow).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import space  # noqa: E402
from space.data.datasets import Obj3dDataset  # noqa: E402
from space.geometry import z_where_to_boxes  # noqa: E402
from space.metrics import iou_matrix  # noqa: E402
from space.schedules import final_priors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data_root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--figure", default=None)
    args = parser.parse_args()
    model = space.load(args.model)
    size = model.cfg.image_size
    data = Obj3dDataset(args.data_root, args.split, image_size=size, with_boxes=True)
    counts = {"right": 0, "over": 0, "under": 0}
    poor = absent = far_edge = far_inside = total = 0
    ratios, shown = [], []
    extra = {"prob": [], "iou": [], "alpha": []}
    kept_alpha = []
    by_side = []  # (largest true object's side in pixels, count difference) per image
    dup_sides, all_sides = [], []  # side (pixels) of the true object an extra box overlaps most; of all
    with torch.no_grad():
        for start in range(0, len(data), 50):
            index = range(start, min(start + 50, len(data)))
            x = torch.stack([data[i] for i in index])
            out = model(x, final_priors(model.cfg), mode="deterministic")
            boxes, prob = z_where_to_boxes(out.z_where).numpy(), out.z_pres_prob[..., 0].numpy()
            alpha = out.alpha_att.flatten(2).mean(2).view(len(index), -1).numpy()  # (B, N) mean glimpse alpha
            for k, i in enumerate(index):
                gt, pred = np.asarray(data.boxes(i)), boxes[k][prob[k] > 0.5]
                total += len(gt)
                diff = len(pred) - len(gt)
                sides = np.sqrt((gt[:, 1] - gt[:, 0]) * (gt[:, 3] - gt[:, 2])) * size if len(gt) else np.zeros(0)
                all_sides += list(sides)
                if len(gt):
                    by_side.append((sides.max(), diff))
                counts["right" if diff == 0 else "over" if diff > 0 else "under"] += 1
                iou = iou_matrix(pred, gt) if len(pred) and len(gt) else np.zeros((len(pred), len(gt)))
                best_gt = iou.max(0) if len(pred) else np.zeros(len(gt))
                poor += int(((best_gt > 0.1) & (best_gt <= 0.5)).sum())
                absent += int((best_gt <= 0.1).sum())
                for j in np.flatnonzero(iou.max(1) <= 0.1) if len(gt) else range(len(pred)):
                    cy, cx = pred[j, :2].mean(), pred[j, 2:].mean()
                    if cx < 0.12 or cx > 0.88 or cy < 0.3:
                        far_edge += 1
                    else:
                        far_inside += 1
                for j, g in enumerate(iou.argmax(1) if len(gt) else []):
                    if iou[j, g] > 0.3:
                        ratios.append(((pred[j, 1] - pred[j, 0]) / (gt[g, 1] - gt[g, 0]),
                                       (pred[j, 3] - pred[j, 2]) / (gt[g, 3] - gt[g, 2])))
                present = np.flatnonzero(prob[k] > 0.5)
                present = present[np.argsort(-prob[k][present], kind="stable")]
                extras = present[len(gt):]
                kept_alpha += list(alpha[k][present[:len(gt)]])
                if len(extras):
                    between = iou_matrix(boxes[k][present], boxes[k][present])
                    np.fill_diagonal(between, 0)
                    extra["prob"] += list(prob[k][extras])
                    extra["iou"] += list(between[len(gt):].max(1))
                    extra["alpha"] += list(alpha[k][extras])
                    if len(gt):
                        dup_sides += list(sides[iou_matrix(boxes[k][extras], gt).argmax(1)])
                if len(shown) < 24:
                    shown.append((x[k], gt, boxes[k], prob[k]))
    ratios = np.array(ratios).reshape(-1, 2)
    print(f"{len(data)} images, {total} objects; counts {counts}")
    print(f"missed at IoU 0.5: {poor + absent} ({poor} with a poor box, IoU 0.1-0.5; {absent} not found)")
    print(f"false boxes away from every object (IoU <= 0.1): {far_edge} near the border or top, {far_inside} elsewhere")
    if len(ratios):
        print(f"predicted/true box side (height, width): median {np.median(ratios, 0).round(2)}, "
              f"10-90% {np.percentile(ratios, 10, 0).round(2)} - {np.percentile(ratios, 90, 0).round(2)}")
    if extra["prob"]:
        q = [10, 50, 90]
        print(f"boxes beyond the true count in over-counted images: {len(extra['prob'])}; presence 10/50/90% "
              f"{np.percentile(extra['prob'], q).round(3)}, IoU with the nearest other present box "
              f"{np.percentile(extra['iou'], q).round(2)}, mean glimpse alpha {np.percentile(extra['alpha'], q).round(2)} "
              f"(the other present boxes: {np.percentile(kept_alpha, q).round(2)})")
    if by_side:
        side, diff = np.array(by_side).T
        edges = np.percentile(side, [0, 25, 50, 75, 100])
        print("images by their largest true object's side (pixels): over / under / images")
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (side >= lo) & (side <= hi) if hi == edges[-1] else (side >= lo) & (side < hi)
            print(f"  {lo:5.1f}-{hi:5.1f}: {int((diff[sel] > 0).sum())} / {int((diff[sel] < 0).sum())} / {int(sel.sum())}")
    if dup_sides:
        print(f"side (pixels) of the true object each extra box overlaps most: median {np.median(dup_sides):.1f} "
              f"(all true objects: median {np.median(all_sides):.1f})")
    if args.figure:
        draw(shown, size, args.figure)


def draw(shown, size: int, path: str, scale: int = 4) -> None:
    from PIL import Image, ImageDraw

    tiles = []
    for x, gt, boxes, prob in shown:
        image = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        image = image.resize((size * scale, size * scale), Image.NEAREST)
        pen = ImageDraw.Draw(image)
        for y0, y1, x0, x1 in gt * size * scale:
            pen.rectangle([x0, y0, x1, y1], outline=(0, 255, 0))
        for (y0, y1, x0, x1), p in zip(boxes * size * scale, prob):
            if p > 0.1:
                pen.rectangle([x0, y0, x1, y1], outline=(255, 0, 0) if p > 0.5 else (255, 255, 0))
        tiles.append(np.asarray(image))
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 6)
    rows = [np.concatenate(tiles[r:r + 6], 1) for r in range(0, len(tiles), 6)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
