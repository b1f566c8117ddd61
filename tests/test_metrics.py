"""Tests for space.metrics (SPEC 9.4). Expected values are worked out by hand.

Notation in the comments: the pool is listed in ranked order as T (hit) or
F (false positive) with its confidence; prec_k = cum_hits_k / k and
rec_k = cum_hits_k / total_gt; the 11 recall levels are
np.linspace(0, 1, 11) = 0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5,
0.6000000000000001, 0.7000000000000001, 0.8, 0.9, 1.0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from space.metrics import (
    IOU_THRESHOLDS,
    RECALL_LEVELS,
    DetectionAccumulator,
    average_precision,
    average_precisions,
    count_metrics,
    iou_matrix,
)

# Unit square and some boxes, [y_min, y_max, x_min, x_max].
UNIT = [0.0, 1.0, 0.0, 1.0]
FAR = [2.0, 2.5, 2.0, 2.5]  # disjoint from everything near [0, 1]^2
BOX_A = [0.1, 0.3, 0.2, 0.4]
BOX_B = [0.5, 0.9, 0.5, 0.9]


def _b(*rows: list[float]) -> np.ndarray:
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def _c(*vals: float) -> np.ndarray:
    return np.array(vals, dtype=np.float64)


def _mean11(values: list[float]) -> float:
    assert len(values) == 11
    return float(np.mean(values))


# --------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------


def test_iou_thresholds_keep_float_rounding() -> None:
    assert len(IOU_THRESHOLDS) == 10
    assert IOU_THRESHOLDS[0] == 0.5
    assert IOU_THRESHOLDS[-1] == 0.95
    # linspace(0.5, 0.95, 10)[8] = 0.5 + 8 * 0.05 rounds below 0.9.
    assert IOU_THRESHOLDS[8] == 0.8999999999999999
    assert IOU_THRESHOLDS[8] < 0.9


def test_recall_levels() -> None:
    np.testing.assert_array_equal(RECALL_LEVELS, np.linspace(0.0, 1.0, 11))
    assert RECALL_LEVELS[3] == 0.30000000000000004  # > 3/10 in float


# --------------------------------------------------------------------------
# iou_matrix
# --------------------------------------------------------------------------


def test_iou_matrix_values_and_floor() -> None:
    # pred0 = unit square vs gt0 = unit square: IoU 1.
    # pred0 vs gt1 = left half [0,1,0,0.5]: inter 0.5, union 1 + 0.5 - 0.5 = 1 -> 0.5.
    # pred1 = FAR vs both: the raw intersection extents are negative
    # (e.g. bottom - top = 1 - 2 = -1 and right - left = -1); unfloored they
    # would multiply to +1. Floored at 0 -> IoU 0.
    iou = iou_matrix(_b(UNIT, FAR), _b(UNIT, [0.0, 1.0, 0.0, 0.5]))
    assert iou.shape == (2, 2)
    np.testing.assert_array_equal(iou, [[1.0, 0.5], [0.0, 0.0]])


def test_iou_matrix_empty_shapes() -> None:
    assert iou_matrix(np.zeros((0, 4)), _b(UNIT)).shape == (0, 1)
    assert iou_matrix(_b(UNIT), np.zeros((0,))).shape == (1, 0)


def test_iou_matrix_rejects_bad_shape() -> None:
    with pytest.raises(ValueError):
        iou_matrix(np.zeros((2, 5)), _b(UNIT))


# --------------------------------------------------------------------------
# AP
# --------------------------------------------------------------------------


def test_perfect_single_image() -> None:
    # One GT, one identical prediction: IoU 1 > every threshold (max 0.95).
    # Pool: T(0.9); prec = [1], rec = [1]; every level <= 1 -> 1. AP = 1.
    res = average_precisions([_b(BOX_A)], [_c(0.9)], [_b(BOX_A)])
    assert res["ap_50"] == 1.0
    assert res["ap_avg"] == 1.0
    assert list(res["ap_by_iou"].values()) == [1.0] * 10
    assert list(res["ap_by_iou"].keys()) == [float(t) for t in IOU_THRESHOLDS]


def test_single_fp_above_tp() -> None:
    # One GT. Pool: F(0.9, far box), T(0.8, exact).
    # prec = [0/1, 1/2] = [0, 0.5]; rec = [0, 1].
    # Level 0: max(0, 0.5) = 0.5; levels 0.1..1.0: only rank 2 -> 0.5.
    # AP = 11 * 0.5 / 11 = 0.5.
    ap = average_precision([_b(FAR, BOX_A)], [_c(0.9, 0.8)], [_b(BOX_A)], 0.5)
    assert ap == 0.5


def test_fp_ranked_above_tp_across_images() -> None:
    # Image 1: GT A, pred A (0.9). Image 2: GT B, preds FAR (0.8), B (0.7).
    # total_gt = 2. Pooled and sorted: T(0.9), F(0.8), T(0.7).
    # cum_hits = [1, 1, 2]; prec = [1, 1/2, 2/3]; rec = [0.5, 0.5, 1.0].
    # Levels 0, 0.1, 0.2, 0.3.., 0.4, 0.5 (6 levels): all ranks qualify
    #   -> max(1, 0.5, 0.667) = 1.
    # Levels 0.6.., 0.7.., 0.8, 0.9, 1.0 (5 levels): only rank 3 -> 2/3.
    # AP = (6 * 1 + 5 * 2/3) / 11 = (28/3) / 11 = 28/33 = 0.848484...
    ap = average_precision(
        [_b(BOX_A), _b(FAR, BOX_B)], [_c(0.9), _c(0.8, 0.7)], [_b(BOX_A), _b(BOX_B)], 0.5
    )
    assert ap == _mean11([1.0] * 6 + [2.0 / 3.0] * 5)
    assert ap == pytest.approx(28.0 / 33.0, abs=1e-15)


def test_tied_confidences_keep_input_order_within_image() -> None:
    # One GT A; two predictions with the same confidence 0.5.
    # Order FAR, A: stable sort keeps F first -> pool F, T;
    #   prec = [0, 0.5], rec = [0, 1] -> every level 0.5 -> AP 0.5.
    # Order A, FAR: pool T, F; prec = [1, 0.5], rec = [1, 1]
    #   -> every level max(1, 0.5) = 1 -> AP 1.0.
    gt = [_b(BOX_A)]
    assert average_precision([_b(FAR, BOX_A)], [_c(0.5, 0.5)], gt, 0.5) == 0.5
    assert average_precision([_b(BOX_A, FAR)], [_c(0.5, 0.5)], gt, 0.5) == 1.0


def test_tied_confidences_keep_image_order_when_pooling() -> None:
    # Image X: no GT, one pred with conf 0.5 -> F(0.5).
    # Image Y: GT A, exact pred with conf 0.5 -> T(0.5). total_gt = 1.
    # X before Y: pool F, T -> same as above -> AP 0.5.
    # Y before X: pool T, F -> AP 1.0.
    x = (_b(BOX_A), _c(0.5), _b())
    y = (_b(BOX_A), _c(0.5), _b(BOX_A))
    xy = average_precision([x[0], y[0]], [x[1], y[1]], [x[2], y[2]], 0.5)
    yx = average_precision([y[0], x[0]], [y[1], x[1]], [y[2], x[2]], 0.5)
    assert (xy, yx) == (0.5, 1.0)


def test_iou_exactly_at_threshold_is_a_miss() -> None:
    # GT = unit square (area 1), pred = its lower half [0, 0.5, 0, 1] (area 0.5).
    # inter = 0.5 * 1 = 0.5; union = (1 + 0.5) - 0.5 = 1.0; IoU = 0.5 exactly.
    # Threshold 0.5: 0.5 > 0.5 is False -> F(0.9) only; prec = [0] -> AP 0.
    # Threshold 0.49: hit -> AP 1.
    pred, gt = [_b([0.0, 0.5, 0.0, 1.0])], [_b(UNIT)]
    assert iou_matrix(pred[0], gt[0])[0, 0] == 0.5
    assert average_precision(pred, [_c(0.9)], gt, 0.5) == 0.0
    assert average_precision(pred, [_c(0.9)], gt, 0.49) == 1.0


def test_threshold_0_8999999999999999_accepts_iou_0_9() -> None:
    # GT [0, 0.625, 0, 1] (area 0.625), pred [0, 0.5625, 0, 1] (area 0.5625);
    # all dyadic, so exact: inter = 0.5625, union = 0.625 + 0.5625 - 0.5625
    # = 0.625, IoU = 0.5625 / 0.625 = 0.9 (the float nearest 9/10).
    # 0.9 > 0.8999999999999999 -> hit at the 9th threshold (would miss at 0.9).
    # Thresholds 0.5 .. 0.8999999999999999 (9 of them): AP 1; 0.95: AP 0.
    # ap_avg = 9 / 10 = 0.9.
    pred, gt = [_b([0.0, 0.5625, 0.0, 1.0])], [_b([0.0, 0.625, 0.0, 1.0])]
    assert iou_matrix(pred[0], gt[0])[0, 0] == 0.9
    assert average_precision(pred, [_c(0.7)], gt, 0.9) == 0.0
    res = average_precisions(pred, [_c(0.7)], gt)
    assert res["ap_by_iou"][0.8999999999999999] == 1.0
    assert res["ap_by_iou"][0.95] == 0.0
    assert 0.9 not in res["ap_by_iou"]
    assert res["ap_avg"] == pytest.approx(0.9, abs=1e-15)
    assert res["ap_50"] == 1.0


def test_duplicate_on_claimed_gt_has_no_fallback() -> None:
    # GT g1 = unit square (area 1), g2 = [0, 1, 0, 0.8] (area 0.8).
    # p1 = unit square (conf 0.9): IoU(g1) = 1, IoU(g2) = 0.8 -> picks g1, hit.
    # p2 = [0, 1, 0, 0.9] (conf 0.8, area 0.9):
    #   IoU(g1) = 0.9 / (1 + 0.9 - 0.9) ~ 0.9; IoU(g2) = 0.8 / (0.9 + 0.8 - 0.8) ~ 0.889.
    #   Argmax g1, already claimed -> F, although IoU(g2) = 0.889 > 0.5.
    # Pool T(0.9), F(0.8); total_gt 2; prec = [1, 0.5]; rec = [0.5, 0.5].
    # Levels 0 .. 0.5 (6 levels): max(1, 0.5) = 1; levels 0.6.. .. 1.0: none -> 0.
    # AP = 6 / 11. (A fallback to g2 would give rec [0.5, 1], prec [1, 1], AP 1.)
    pred = [_b(UNIT, [0.0, 1.0, 0.0, 0.9])]
    gt = [_b(UNIT, [0.0, 1.0, 0.0, 0.8])]
    ap = average_precision(pred, [_c(0.9, 0.8)], gt, 0.5)
    assert ap == _mean11([1.0] * 6 + [0.0] * 5)
    assert ap == pytest.approx(6.0 / 11.0, abs=1e-15)


def test_images_without_gt_make_false_positives() -> None:
    # Image 1: no GT, preds conf 0.9 and 0.8 -> F(0.9), F(0.8).
    # Image 2: GT A, exact pred conf 0.7 -> T(0.7). total_gt = 1.
    # Pool F, F, T: prec = [0, 0, 1/3], rec = [0, 0, 1].
    # Every level reaches rank 3 -> 1/3 each -> AP = 1/3.
    ap = average_precision(
        [_b(BOX_A, BOX_B), _b(BOX_A)], [_c(0.9, 0.8), _c(0.7)], [_b(), _b(BOX_A)], 0.5
    )
    assert ap == _mean11([1.0 / 3.0] * 11)
    # Even a prediction identical to some box is an FP when its image has no
    # GT: with only image 1 there is no GT at all -> documented AP 0.0 (the
    # original's 0/0 recalls are NaN, fail every level, and give 0.0 too).
    assert average_precision([_b(BOX_A, BOX_B)], [_c(0.9, 0.8)], [_b()], 0.5) == 0.0


def test_images_without_predictions_still_count_gt() -> None:
    # Image 1: GT A, exact pred 0.9. Image 2: GT B, no predictions.
    # total_gt = 2; pool T(0.9); prec = [1]; rec = [0.5].
    # Levels 0 .. 0.5 (6 levels) -> 1; 0.6.. .. 1.0 -> 0. AP = 6/11.
    ap = average_precision(
        [_b(BOX_A), np.zeros((0, 4))], [_c(0.9), _c()], [_b(BOX_A), _b(BOX_B)], 0.5
    )
    assert ap == _mean11([1.0] * 6 + [0.0] * 5)
    # Without image 2: rec = [1] -> AP 1.
    assert average_precision([_b(BOX_A)], [_c(0.9)], [_b(BOX_A)], 0.5) == 1.0


def test_nothing_pooled_gives_zero() -> None:
    # GT but no predictions anywhere -> nothing pooled -> 0.0.
    assert average_precision([_b()], [_c()], [_b(BOX_A)], 0.5) == 0.0
    # No images at all.
    assert average_precision([], [], [], 0.5) == 0.0
    res = average_precisions([], [], [])
    assert res["ap_50"] == 0.0 and res["ap_avg"] == 0.0


def test_recall_of_exactly_three_tenths_misses_level_0_3() -> None:
    # 10 GT boxes (disjoint), 3 exact predictions (conf 0.9, 0.8, 0.7).
    # prec = [1, 1, 1]; rec = [0.1, 0.2, 0.3].
    # Levels 0, 0.1, 0.2 -> 1 (3/10 >= 0.2 etc.). Level 0.30000000000000004:
    # max rec = 0.3 < 0.30000000000000004 -> none -> 0. Higher levels -> 0.
    # AP = 3/11 (a decimal level 0.3 would give 4/11).
    gts = _b(*[[0.1 * k, 0.1 * k + 0.05, 0.0, 0.05] for k in range(10)])
    preds = gts[:3].copy()
    ap = average_precision([preds], [_c(0.9, 0.8, 0.7)], [gts], 0.5)
    assert ap == _mean11([1.0] * 3 + [0.0] * 8)
    assert ap == pytest.approx(3.0 / 11.0, abs=1e-15)


def test_per_image_sort_by_confidence() -> None:
    # Image: GT A. Preds given as [FAR (0.2), A (0.9)] -> sorted A first:
    # pool T(0.9), F(0.2); prec = [1, 0.5], rec = [1, 1] -> AP 1.
    ap = average_precision([_b(FAR, BOX_A)], [_c(0.2, 0.9)], [_b(BOX_A)], 0.5)
    assert ap == 1.0


def test_float32_predictions_accepted() -> None:
    pred = np.array([BOX_A], dtype=np.float32)
    conf = np.array([0.9], dtype=np.float32)
    assert average_precision([pred], [conf], [_b(BOX_A)], 0.5) == 1.0


def test_mismatched_inputs_raise() -> None:
    with pytest.raises(ValueError):
        average_precision([_b(BOX_A)], [_c(0.9)], [], 0.5)
    with pytest.raises(ValueError):
        average_precision([_b(BOX_A)], [_c(0.9, 0.8)], [_b(BOX_A)], 0.5)
    with pytest.raises(ValueError):
        average_precision([_b(BOX_A)], [_c(np.nan)], [_b(BOX_A)], 0.5)


# --------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------


def test_count_metrics_with_empty_images() -> None:
    # (M, N): (2, 2) perfect, err 0
    #         (3, 2) over,    err 1/2
    #         (1, 2) under,   err 1/2
    #         (0, 0) perfect, excluded from error_rate
    #         (1, 0) over,    excluded from error_rate
    # error_rate = (0 + 0.5 + 0.5) / 3 = 1/3; perfect 2, over 2, under 1;
    # accuracy = 2 / 5 = 0.4.
    res = count_metrics([2, 3, 1, 0, 1], [2, 2, 2, 0, 0])
    assert res["error_rate"] == pytest.approx(1.0 / 3.0, abs=1e-15)
    assert (res["perfect"], res["overcount"], res["undercount"]) == (2, 2, 1)
    assert all(type(res[k]) is int for k in ("perfect", "overcount", "undercount"))
    assert res["accuracy"] == 0.4
    assert res["num_images"] == 5
    assert res["num_images_without_objects"] == 2


def test_count_metrics_degenerate() -> None:
    # Every image has N = 0: error_rate undefined -> None; (0,0) perfect,
    # (2,0) over -> accuracy 1/2.
    res = count_metrics([0, 2], [0, 0])
    assert res["error_rate"] is None
    assert res["accuracy"] == 0.5
    # No images at all.
    res = count_metrics([], [])
    assert res["error_rate"] is None and res["accuracy"] is None
    json.dumps(res)
    with pytest.raises(ValueError):
        count_metrics([1], [1, 2])


# --------------------------------------------------------------------------
# streaming accumulator
# --------------------------------------------------------------------------


def test_accumulator_compute() -> None:
    # Same images as test_fp_ranked_above_tp_across_images plus one image with
    # no GT and no predictions. Boxes are exact, so every threshold gives
    # AP 28/33 and ap_avg = 28/33. Counts (M, N): (1, 1) perfect,
    # (2, 1) over (err 1), (0, 0) perfect (excluded) -> error_rate = 1/2,
    # accuracy 2/3.
    acc = DetectionAccumulator()
    acc.add(_b(BOX_A), _c(0.9), _b(BOX_A))
    acc.add(_b(FAR, BOX_B), _c(0.8, 0.7), _b(BOX_B))
    acc.add(np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,)))
    assert len(acc) == 3
    res = acc.compute()
    expected_ap = _mean11([1.0] * 6 + [2.0 / 3.0] * 5)
    assert res["ap_50"] == expected_ap
    assert res["aps"] == [expected_ap] * 10
    assert res["ap_avg"] == pytest.approx(28.0 / 33.0, abs=1e-15)
    assert res["ap_by_iou"][0.8999999999999999] == expected_ap
    assert res["iou_thresholds"] == [float(t) for t in IOU_THRESHOLDS]
    assert res["count_error_rate"] == 0.5
    assert res["count_accuracy"] == pytest.approx(2.0 / 3.0, abs=1e-15)
    assert (res["perfect"], res["overcount"], res["undercount"]) == (2, 1, 0)
    assert res["num_images"] == 3
    assert res["num_images_without_objects"] == 1
    json.dumps(res)


def test_accumulator_empty() -> None:
    res = DetectionAccumulator().compute()
    assert res["ap_50"] == 0.0 and res["ap_avg"] == 0.0
    assert res["num_images"] == 0 and res["count_accuracy"] is None


def _reference_ap(preds, confs, gts, threshold):
    """Literal, loop-based reading of SPEC 9.4, for cross-checking."""
    total_gt, pool = 0, []
    for p, c, g in zip(preds, confs, gts):
        total_gt += len(g)
        order = sorted(range(len(c)), key=lambda i: -c[i])
        if len(g) == 0:
            pool.extend((False, c[i]) for i in order)
            continue
        if len(order) == 0:
            continue
        used = [False] * len(g)
        for i in order:
            ious = iou_matrix(p[i : i + 1], g)[0]
            j = int(np.argmax(ious))
            if ious[j] > threshold and not used[j]:
                used[j] = True
                pool.append((True, c[i]))
            else:
                pool.append((False, c[i]))
    if not pool:
        return 0.0
    pool = sorted(pool, key=lambda x: -x[1])
    cum = np.cumsum([h for h, _ in pool])
    prec = cum / (np.arange(len(pool)) + 1.0)
    rec = cum / total_gt
    vals = []
    for r in np.linspace(0.0, 1.0, 11):
        sel = prec[rec >= r]
        vals.append(0.0 if sel.size == 0 else sel.max())
    return float(np.mean(vals))


def test_accumulator_matches_loop_reference_on_random_data() -> None:
    rng = np.random.default_rng(0)
    preds, confs, gts = [], [], []
    for _ in range(60):
        n_gt = int(rng.integers(1, 6))
        g = rng.uniform(0.0, 0.7, size=(n_gt, 2))
        gt = np.stack([g[:, 0], g[:, 0] + 0.2, g[:, 1], g[:, 1] + 0.2], axis=1)
        n_pred = int(rng.integers(0, 8))
        idx = rng.integers(0, n_gt, size=n_pred)
        p = (gt[idx] + rng.normal(0.0, 0.04, size=(n_pred, 4))).astype(np.float32)
        # Coarse confidences so ties occur within and across images.
        c = (rng.integers(5, 10, size=n_pred) / 10.0).astype(np.float32)
        preds.append(p)
        confs.append(c)
        gts.append(gt)
    res = average_precisions(preds, confs, gts)
    acc = DetectionAccumulator()
    for p, c, g in zip(preds, confs, gts):
        acc.add(p, c, g)
    assert acc.compute()["aps"] == list(res["ap_by_iou"].values())
    for t in IOU_THRESHOLDS:
        expected = _reference_ap(preds, confs, gts, t)
        assert res["ap_by_iou"][float(t)] == expected
        assert average_precision(preds, confs, gts, t) == expected
    assert 0.0 < res["ap_avg"] < 1.0


def test_cuda_devices_get_the_original_numerics_and_the_cpu_is_left_alone(monkeypatch):
    """resolve_device: on CUDA, cuDNN deterministic, no autotuning, no TF32 (PyTorch 1.3 had
    none); the CPU leaves the global flags as they are. No GPU needed: two CUDA devices are
    pretended (torch.device('cuda', 1) does not touch a device)."""
    import torch

    from space.evaluation import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    flags = [(torch.backends.cudnn, "deterministic"), (torch.backends.cudnn, "benchmark"),
             (torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
    saved = [getattr(obj, name) for obj, name in flags]
    try:
        for obj, name in flags:  # the opposite of what the original wants
            setattr(obj, name, name != "deterministic")
        assert resolve_device("cpu") == torch.device("cpu")
        assert [getattr(obj, name) for obj, name in flags] == [False, True, True, True]
        assert resolve_device("cuda:1") == torch.device("cuda", 1)
        assert [getattr(obj, name) for obj, name in flags] == [True, False, False, False]
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


def test_non_finite_metrics_become_null_and_are_named():
    from space.io import nulls_for_non_finite
    data = {"mse": float("nan"), "ap_50": 0.5, "ap_by_iou": {"0.50": float("inf"), "0.55": 0.25},
            "aps": [0.1, float("-inf")], "bg_failure": False, "experiment": "x"}
    clean, keys = nulls_for_non_finite(data)
    assert keys == ["mse", "ap_by_iou.0.50", "aps[1]"]
    assert clean == {"mse": None, "ap_50": 0.5, "ap_by_iou": {"0.50": None, "0.55": 0.25}, "aps": [0.1, None],
                     "bg_failure": False, "experiment": "x"}
    assert json.loads(json.dumps(clean, allow_nan=False)) == clean


def test_a_device_that_is_not_there_is_refused_by_name(monkeypatch):
    import torch

    from space.evaluation import resolve_device

    for device in ("tpu", "meta", "garbage"):  # meta is a torch device, holding no values
        with pytest.raises(ValueError, match=rf"device '{device}' is not one to train or evaluate on: use 'auto', "
                                             r"'cpu', 'cuda' or 'cuda:N' \(train.device, evaluate.device\)"):
            resolve_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but CUDA is not available here .*use 'auto' or 'cpu'"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device 'cuda:1' asked for, but this machine has 1 CUDA device\(s\): cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'mps' asked for, but MPS \(Apple's GPUs\) is not available here"):
        resolve_device("mps")

