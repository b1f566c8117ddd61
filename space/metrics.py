"""Detection and counting metrics of the SPACE evaluation protocol (SPEC 9.4).

Pure numpy. Every box is a normalised ``[y_min, y_max, x_min, x_max]`` row
(the SPEC 9.2 order) and a set of boxes is an array of shape ``(M, 4)``.
Converting ``z_where`` to boxes is not done here (see ``space.geometry``).

The functions reproduce the original ``src/eval/ap.py`` down to the float
details that can change a result:

* IoU thresholds are ``np.linspace(0.5, 0.95, 10)``; the 9th is
  ``0.8999999999999999``, so an IoU of exactly ``0.9`` is a hit there.
* The 11 recall levels are ``np.linspace(0.0, 1.0, 11)``, compared with
  ``recall >= r`` in float64. Three levels are slightly above their decimal
  value (``0.30000000000000004``, ``0.6000000000000001``,
  ``0.7000000000000001``), so a recall of exactly ``3/10`` does **not**
  reach the level "0.3".
* A prediction is a hit only if its IoU is strictly greater than the
  threshold, with greedy matching against the argmax GT and no fallback.
* IoU is evaluated with the same operation order as the original, in the
  dtype of the inputs (the original's predicted boxes are float32, GT boxes
  float64), so passing the same dtypes gives bit-identical IoUs.

Decisions where the original crashes or is undefined (SPEC 13.2 item 3):

* Counting, image with ``N = 0`` GT boxes: the original raises
  ``ZeroDivisionError``. Here such an image is left out of the mean of
  ``error_rate`` (how many were left out is reported as
  ``num_images_without_objects``) but still counts towards perfect,
  overcount and undercount (``M = 0`` is perfect, ``M > 0`` an overcount).
* If no image has a GT box, ``error_rate`` is ``None`` (JSON-safe, and not
  a NaN that ``save_best`` would treat as always-better, SPEC 13.2 item 4).
  If there are no images at all, ``accuracy`` is ``None`` too.
* AP with no GT box in the whole set: the original divides by zero inside
  numpy, which gives NaN recalls that fail every ``recall >= r`` test, so its
  AP is 0.0 (plus a RuntimeWarning). Here the result is the same 0.0,
  returned without the division.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = [
    "IOU_THRESHOLDS",
    "RECALL_LEVELS",
    "iou_matrix",
    "average_precision",
    "average_precisions",
    "count_metrics",
    "DetectionAccumulator",
]

#: The 10 IoU thresholds of the protocol. The 9th is 0.8999999999999999.
IOU_THRESHOLDS: np.ndarray = np.linspace(0.5, 0.95, 10)

#: The 11 recall levels of the 11-point interpolated AP.
RECALL_LEVELS: np.ndarray = np.linspace(0.0, 1.0, 11)


def _as_boxes(boxes: Any, name: str) -> np.ndarray:
    """Returns ``boxes`` as an ``(M, 4)`` array, keeping a floating dtype.

    Args:
        boxes: Array-like of shape ``(M, 4)``; any empty array-like (for
            example ``[]`` or an array of shape ``(0,)``) means no boxes.
        name: Argument name used in error messages.

    Returns:
        An ``(M, 4)`` array. Floating inputs keep their dtype (float32 stays
        float32, as in the original); other inputs become float64.

    Raises:
        ValueError: If a non-empty input is not of shape ``(M, 4)``.
    """
    arr = np.asarray(boxes)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (M, 4), got {arr.shape}")
    return arr


def _as_conf(conf: Any, num_boxes: int) -> np.ndarray:
    """Returns confidences as a 1-D array matching ``num_boxes``.

    Args:
        conf: Array-like of ``num_boxes`` confidences (shape ``(M,)`` or
            ``(M, 1)``).
        num_boxes: Number of predicted boxes they belong to.

    Returns:
        A 1-D floating array of length ``num_boxes``.

    Raises:
        ValueError: If the length differs from ``num_boxes`` or a value is NaN.
    """
    arr = np.asarray(conf)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    arr = arr.reshape(-1)
    if arr.shape[0] != num_boxes:
        raise ValueError(
            f"got {arr.shape[0]} confidences for {num_boxes} predicted boxes"
        )
    if np.isnan(arr).any():
        raise ValueError("confidences must not be NaN")
    return arr


def iou_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Intersection over union between two sets of boxes.

    Intersection heights and widths are floored at 0. The operation order is
    the original's: ``inter / ((area_pred + area_gt) - inter)``, with each
    area computed in its input's dtype. Two zero-area boxes give NaN (0/0),
    as in the original; no warning is emitted.

    Args:
        pred: Boxes ``[y_min, y_max, x_min, x_max]`` of shape ``(M, 4)``.
        gt: Boxes of shape ``(G, 4)``.

    Returns:
        IoU matrix of shape ``(M, G)``.
    """
    pred = _as_boxes(pred, "pred")
    gt = _as_boxes(gt, "gt")
    area_pred = ((pred[:, 1] - pred[:, 0]) * (pred[:, 3] - pred[:, 2]))[:, None]
    area_gt = ((gt[:, 1] - gt[:, 0]) * (gt[:, 3] - gt[:, 2]))[None, :]
    p = pred[:, None, :]
    g = gt[None, :, :]
    top = np.maximum(p[..., 0], g[..., 0])
    bottom = np.minimum(p[..., 1], g[..., 1])
    left = np.maximum(p[..., 2], g[..., 2])
    right = np.minimum(p[..., 3], g[..., 3])
    h_inter = np.maximum(0.0, bottom - top)
    w_inter = np.maximum(0.0, right - left)
    inter = h_inter * w_inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_pred + area_gt - inter)


def _match_image(
    pred_boxes: Any,
    pred_conf: Any,
    gt_boxes: Any,
    iou_thresholds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy per-image matching at several IoU thresholds (SPEC 9.4 steps 1-6).

    Args:
        pred_boxes: Predicted boxes, shape ``(M, 4)``.
        pred_conf: Their confidences, shape ``(M,)``.
        gt_boxes: GT boxes, shape ``(G, 4)``.
        iou_thresholds: 1-D array of ``T`` thresholds.

    Returns:
        ``(hits, conf, num_gt)``: ``hits`` is a ``(T, M)`` bool array and
        ``conf`` the ``(M,)`` confidences, both in the image's order of
        decreasing confidence (stable); ``num_gt`` is ``G``.
    """
    pred = _as_boxes(pred_boxes, "pred_boxes")
    conf = _as_conf(pred_conf, pred.shape[0])
    gt = _as_boxes(gt_boxes, "gt_boxes")
    num_pred, num_gt = pred.shape[0], gt.shape[0]
    num_thr = iou_thresholds.shape[0]

    order = np.argsort(-conf, kind="stable")
    pred, conf = pred[order], conf[order]
    hits = np.zeros((num_thr, num_pred), dtype=bool)
    if num_gt == 0 or num_pred == 0:
        # No GT: every prediction is a false positive. No predictions: nothing
        # to pool, but the GT still count towards the total.
        return hits, conf, num_gt

    iou = iou_matrix(pred, gt)
    best = np.argmax(iou, axis=1)  # ties (and a first NaN) go to the first GT
    best_iou = iou[np.arange(num_pred), best]
    for t, threshold in enumerate(iou_thresholds):
        valid = np.flatnonzero(best_iou > threshold)
        # Claims are made only by valid predictions, in rank order, so a valid
        # prediction is a hit iff it is the first valid one to pick its GT.
        _, first = np.unique(best[valid], return_index=True)
        hits[t, valid[first]] = True
    return hits, conf, num_gt


def _ap_from_pooled(hits: np.ndarray, conf_order: np.ndarray, total_gt: int) -> float:
    """11-point interpolated AP from pooled hits (SPEC 9.4, pooling steps).

    Args:
        hits: 1-D bool array of the pooled hits, in pooling order.
        conf_order: Permutation sorting the pool by decreasing confidence
            (stable).
        total_gt: Number of GT boxes over all images.

    Returns:
        The AP as a Python float; 0.0 if nothing was pooled or ``total_gt``
        is 0.
    """
    if hits.shape[0] == 0 or total_gt == 0:
        return 0.0
    hit_cum = np.cumsum(hits[conf_order])
    precision = hit_cum / (np.arange(hits.shape[0]) + 1.0)
    recall = hit_cum / total_gt
    precs = []
    for level in RECALL_LEVELS:
        prec = precision[recall >= level]
        precs.append(0.0 if prec.size == 0 else prec.max())
    return float(np.mean(precs))


def count_metrics(pred_counts: Sequence[int], gt_counts: Sequence[int]) -> dict[str, Any]:
    """Counting metrics (SPEC 9.4, "Counting").

    Images with no GT box (``N = 0``) are left out of the ``error_rate`` mean
    (the original raises ``ZeroDivisionError``) but still count as perfect
    (``M = 0``) or overcount (``M > 0``).

    Args:
        pred_counts: Number of predicted boxes ``M`` per image.
        gt_counts: Number of GT boxes ``N`` per image, same length.

    Returns:
        Dict with ``error_rate`` (mean of ``|M - N| / N`` over images with
        ``N > 0``; ``None`` if there is none), ``accuracy`` (``perfect /
        num_images``; ``None`` if there are no images), ``perfect``,
        ``overcount``, ``undercount``, ``num_images`` and
        ``num_images_without_objects`` (all ints).

    Raises:
        ValueError: If the two sequences differ in length.
    """
    pred_counts = [int(m) for m in pred_counts]
    gt_counts = [int(n) for n in gt_counts]
    if len(pred_counts) != len(gt_counts):
        raise ValueError(
            f"{len(pred_counts)} prediction counts but {len(gt_counts)} GT counts"
        )
    error_rates = []
    perfect = overcount = undercount = without = 0
    for m, n in zip(pred_counts, gt_counts):
        if n == 0:
            without += 1
        else:
            error_rates.append(abs(m - n) / n)
        perfect += m == n
        overcount += m > n
        undercount += m < n
    total = perfect + overcount + undercount
    return {
        "error_rate": float(np.mean(error_rates)) if error_rates else None,
        "accuracy": perfect / total if total else None,
        "perfect": perfect,
        "overcount": overcount,
        "undercount": undercount,
        "num_images": len(pred_counts),
        "num_images_without_objects": without,
    }


class DetectionAccumulator:
    """Streams per-image predictions and GT, then computes all SPEC 9.4 metrics.

    Each :meth:`add` matches one image at once, for all 10 IoU thresholds, and
    keeps only a ``(10, M)`` bool array of hits, the ``M`` confidences and two
    counts, so memory grows with the number of predicted boxes, never with
    the boxes or images themselves.

    Example:
        >>> acc = DetectionAccumulator()
        >>> for boxes, conf, gt in per_image_results:  # doctest: +SKIP
        ...     acc.add(boxes, conf, gt)
        >>> metrics = acc.compute()  # doctest: +SKIP
    """

    def __init__(self) -> None:
        """Creates an empty accumulator over :data:`IOU_THRESHOLDS`."""
        self.iou_thresholds: np.ndarray = IOU_THRESHOLDS.copy()
        self._hits: list[np.ndarray] = []
        self._conf: list[np.ndarray] = []
        self._pred_counts: list[int] = []
        self._gt_counts: list[int] = []

    def __len__(self) -> int:
        """Returns the number of images added so far."""
        return len(self._gt_counts)

    def add(self, pred_boxes: Any, pred_conf: Any, gt_boxes: Any) -> None:
        """Adds one image.

        Args:
            pred_boxes: Predicted boxes ``[y_min, y_max, x_min, x_max]``,
                shape ``(M, 4)`` (``M`` may be 0).
            pred_conf: Their confidences, shape ``(M,)``.
            gt_boxes: GT boxes, shape ``(G, 4)`` (``G`` may be 0).

        Raises:
            ValueError: On malformed shapes or NaN confidences.
        """
        hits, conf, num_gt = _match_image(pred_boxes, pred_conf, gt_boxes, self.iou_thresholds)
        self._hits.append(hits)
        self._conf.append(conf)
        self._pred_counts.append(int(conf.shape[0]))
        self._gt_counts.append(num_gt)

    def average_precisions(self) -> list[float]:
        """Returns the AP at each threshold of :attr:`iou_thresholds`, in order."""
        if not self._conf:
            return [0.0] * len(self.iou_thresholds)
        conf = np.concatenate(self._conf)
        hits = np.concatenate(self._hits, axis=1)
        # The pool is in image order, then each image's confidence order, for
        # every threshold, so one stable sort serves all thresholds.
        order = np.argsort(-conf, kind="stable")
        total_gt = int(sum(self._gt_counts))
        return [_ap_from_pooled(hits[t], order, total_gt) for t in range(hits.shape[0])]

    def compute(self) -> dict[str, Any]:
        """Computes all metrics over the images added so far.

        Returns:
            JSON-safe dict with keys ``ap_50`` (AP at IoU 0.5), ``ap_avg``
            (mean of the 10 APs), ``ap_by_iou`` (threshold -> AP),
            ``aps`` and ``iou_thresholds`` (the 10 APs and thresholds as
            lists, in order), ``count_error_rate``, ``count_accuracy``,
            ``perfect``, ``overcount``, ``undercount``, ``num_images`` and
            ``num_images_without_objects``. See :func:`count_metrics` for
            the ``None`` cases.
        """
        aps = self.average_precisions()
        counts = count_metrics(self._pred_counts, self._gt_counts)
        thresholds = [float(t) for t in self.iou_thresholds]
        return {
            "ap_50": aps[0],
            "ap_avg": float(np.mean(aps)),
            "ap_by_iou": dict(zip(thresholds, aps)),
            "aps": aps,
            "iou_thresholds": thresholds,
            "count_error_rate": counts["error_rate"],
            "count_accuracy": counts["accuracy"],
            "perfect": counts["perfect"],
            "overcount": counts["overcount"],
            "undercount": counts["undercount"],
            "num_images": counts["num_images"],
            "num_images_without_objects": counts["num_images_without_objects"],
        }


def _check_lengths(pred_boxes: Sequence, pred_conf: Sequence, gt_boxes: Sequence) -> None:
    """Raises ValueError unless the three per-image lists have equal length.

    The original pairs lists with ``zip`` (truncating); here the caller must
    pair images with GT files itself (SPEC 9.3).
    """
    if not len(pred_boxes) == len(pred_conf) == len(gt_boxes):
        raise ValueError(
            "per-image lists differ in length: "
            f"{len(pred_boxes)} pred_boxes, {len(pred_conf)} pred_conf, {len(gt_boxes)} gt_boxes"
        )


def average_precision(
    pred_boxes: Sequence[np.ndarray],
    pred_conf: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    iou_threshold: float,
) -> float:
    """11-point interpolated AP at one IoU threshold (SPEC 9.4, "AP").

    Args:
        pred_boxes: Per image, predicted boxes of shape ``(M_i, 4)``.
        pred_conf: Per image, confidences of shape ``(M_i,)``.
        gt_boxes: Per image, GT boxes of shape ``(G_i, 4)``.
        iou_threshold: A prediction is a hit only if its best IoU is strictly
            greater than this.

    Returns:
        The AP; 0.0 if nothing was pooled or there is no GT box at all.

    Raises:
        ValueError: If the three lists differ in length or shapes are malformed.
    """
    _check_lengths(pred_boxes, pred_conf, gt_boxes)
    thresholds = np.asarray([iou_threshold], dtype=np.float64)
    hits, conf, total_gt = [], [], 0
    for boxes, c, gt in zip(pred_boxes, pred_conf, gt_boxes):
        h, c_sorted, n = _match_image(boxes, c, gt, thresholds)
        hits.append(h[0])
        conf.append(c_sorted)
        total_gt += n
    if not conf:
        return 0.0
    all_conf = np.concatenate(conf)
    order = np.argsort(-all_conf, kind="stable")
    return _ap_from_pooled(np.concatenate(hits), order, total_gt)


def average_precisions(
    pred_boxes: Sequence[np.ndarray],
    pred_conf: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
) -> dict[str, Any]:
    """AP at each of the 10 :data:`IOU_THRESHOLDS`.

    Args:
        pred_boxes: Per image, predicted boxes of shape ``(M_i, 4)``.
        pred_conf: Per image, confidences of shape ``(M_i,)``.
        gt_boxes: Per image, GT boxes of shape ``(G_i, 4)``.

    Returns:
        Dict with ``ap_by_iou`` (threshold as a Python float -> AP),
        ``ap_50`` (the AP at 0.5, the original's ``ap_dot5``) and ``ap_avg``
        (mean of the 10 APs).

    Raises:
        ValueError: If the three lists differ in length or shapes are malformed.
    """
    _check_lengths(pred_boxes, pred_conf, gt_boxes)
    acc = DetectionAccumulator()
    for boxes, c, gt in zip(pred_boxes, pred_conf, gt_boxes):
        acc.add(boxes, c, gt)
    aps = acc.average_precisions()
    return {
        "ap_by_iou": {float(t): ap for t, ap in zip(acc.iou_thresholds, aps)},
        "ap_50": aps[0],
        "ap_avg": float(np.mean(aps)),
    }
