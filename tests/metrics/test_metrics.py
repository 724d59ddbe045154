"""Tests of lungcad.metrics.classification: hand-counted values, scikit-learn agreement, NaN
conventions,
HD95 and lesion detection on shapes with known answers, and patient-level bootstrap."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    cohen_kappa_score,
    f1_score,
    matthews_corrcoef,
    roc_auc_score,
)

from lungcad.errors import InputError
from lungcad.metrics.classification import (
    CI_KEYS,
    bootstrap_ci,
    choose_threshold,
    classification_metrics,
    classification_metrics_with_ci,
    dice,
    expected_calibration_error,
    hd95,
    iou,
    lesion_detection,
    lesion_sensitivity,
    segmentation_counts,
    segmentation_metrics,
)

# 10 samples counted by hand at threshold 0.5: tp=3 fn=1 (positives 0-3), fp=2 tn=4.
Y_HAND = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P_HAND = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.55, 0.4, 0.3, 0.1, 0.05])


def test_confusion_metrics_match_hand_counts():
    m = classification_metrics(Y_HAND, P_HAND)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (3, 1, 2, 4, 10)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 10 / sqrt(600)
    assert m["mcc"] == pytest.approx(10 / math.sqrt(600))
    # kappa: p_o = 0.7, p_e = 0.5*0.4 + 0.5*0.6 = 0.5 -> 0.4
    assert m["kappa"] == pytest.approx(0.4)
    assert m["prevalence"] == pytest.approx(0.4)
    assert m["threshold"] == 0.5


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1)
    m = classification_metrics(y, p, threshold=0.4)
    pred = (p >= 0.4).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert set(m) >= {
        "accuracy",
        "precision",
        "sensitivity",
        "specificity",
        "f1",
        "mcc",
        "kappa",
        "auc",
        "pr_auc",
        "brier",
        "ece",
        "tp",
        "fp",
        "tn",
        "fn",
        "n",
        "prevalence",
    }


def test_single_class_gives_nan_without_exception_or_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(np.zeros(5, int), np.array([0.1, 0.2, 0.7, 0.4, 0.3]))
    for key in ("auc", "pr_auc", "mcc", "kappa", "sensitivity"):
        assert math.isnan(m[key]), key
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(4 / 5)


def test_no_positive_prediction_gives_nan_precision():
    m = classification_metrics(Y_HAND, P_HAND, threshold=0.95)
    assert math.isnan(m["precision"])
    assert m["sensitivity"] == 0.0
    assert m["mcc"] == 0.0  # scikit-learn's convention for a constant prediction


def test_expected_calibration_error_by_hand():
    # bin [0, .1): mean prob .05, positive rate .5 -> gap .45; bin [.9, 1]: .95 vs 1 -> .05
    y = np.array([0, 1, 1, 1])
    p = np.array([0.05, 0.05, 0.95, 1.0])
    expected = 0.5 * 0.45 + 0.5 * abs(1 - 0.975)
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    assert classification_metrics(y, p)["ece"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("y", "p"),
    [([0, 1, -1], [0.1, 0.2, 0.3]), ([0, 1], [0.1, 1.2]), ([0, 1], [0.1]), ([], [])],
)
def test_bad_classification_input_raises(y, p):
    with pytest.raises(InputError):
        classification_metrics(np.array(y), np.array(p))


def _square(shape, y0, x0, size=10):
    mask = np.zeros(shape, dtype=bool)
    mask[y0 : y0 + size, x0 : x0 + size] = True
    return mask


def test_dice_iou_from_counts():
    ref = _square((40, 40), 10, 10)
    pred = _square((40, 40), 10, 14)  # 60 px overlap of 100 each
    assert tuple(segmentation_counts(pred, ref)) == (60, 40, 40, 1600 - 140)
    assert dice(pred, ref) == pytest.approx(120 / 200)
    assert iou(pred, ref) == pytest.approx(60 / 140)


def test_empty_reference_gives_nan():
    empty = np.zeros((20, 20), dtype=np.uint8)
    some = _square((20, 20), 2, 2, 5)
    assert math.isnan(dice(empty, empty)) and math.isnan(iou(empty, empty))
    assert math.isnan(dice(some, empty)) and math.isnan(iou(some, empty))
    assert dice(empty, some) == 0.0
    assert math.isnan(hd95(empty, some, (1.0, 1.0)))
    m = segmentation_metrics(some, empty, (1.0, 1.0))
    assert math.isnan(m["dice"]) and math.isnan(m["lesion_sensitivity"])
    assert m["fp"] == 25 and m["n_fp_lesions"] == 1


def test_non_binary_mask_raises():
    with pytest.raises(InputError, match="binary"):
        dice(np.full((4, 4), 0.7), np.ones((4, 4)))
    with pytest.raises(InputError, match="shape"):
        dice(np.ones((4, 4)), np.ones((4, 5)))


def test_hd95_of_offset_squares_in_mm():
    ref = _square((40, 40), 10, 10)
    # Shifted 4 columns: every point of the far edge is 4 px from the reference -> 4 * 1.5 mm.
    assert hd95(_square((40, 40), 10, 14), ref, (0.7, 1.5)) == pytest.approx(6.0, abs=1e-4)
    # Shifted 6 rows at 0.7 mm per row.
    assert hd95(_square((40, 40), 16, 10), ref, (0.7, 1.5)) == pytest.approx(4.2, abs=1e-4)
    assert hd95(ref, ref, (0.7, 1.5)) == 0.0


def test_hd95_3d_anisotropic():
    ref = np.zeros((12, 20, 20), dtype=bool)
    ref[2:8, 5:15, 5:15] = True
    pred = np.roll(ref, 2, axis=0)  # two slices further at 2.5 mm
    assert hd95(pred, ref, (2.5, 0.8, 0.8)) == pytest.approx(5.0, abs=1e-4)
    with pytest.raises(InputError, match="spacing"):
        hd95(pred, ref, (0.8, 0.8))


def test_lesion_sensitivity_two_lesions_one_missed():
    ref = _square((60, 60), 5, 5) | _square((60, 60), 40, 40)
    pred = _square((60, 60), 8, 8, 4) | _square((60, 60), 40, 5, 5)  # hits 1st, plus a FP
    found = lesion_detection(pred, ref, (1.0, 1.0))
    assert found == (2, 1, 2, 1)
    assert lesion_sensitivity(pred, ref, (1.0, 1.0)) == 0.5
    # The hit covers 16% of the lesion: not enough when 50% is required.
    assert lesion_sensitivity(pred, ref, (1.0, 1.0), min_overlap=0.5) == 0.0
    # Lesions smaller than 50 mm^2 (at 0.5 mm pixels each lesion is 25 mm^2) are ignored.
    assert math.isnan(lesion_sensitivity(pred, ref, (0.5, 0.5), min_lesion_size=50.0))
    m = segmentation_metrics(pred, ref, (1.0, 1.0))
    assert m["lesion_sensitivity"] == 0.5 and m["n_ref_lesions"] == 2


def test_bootstrap_resamples_whole_groups():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, size=15)
    groups = np.repeat(np.arange(15), sizes)
    n = groups.size
    y = (groups % 2).astype(int)
    prob = (np.arange(n) + 0.5) / n  # unique value per sample identifies it
    seen: list[Counter] = []

    def record(yt, yp):
        seen.append(Counter(np.round(yp * n - 0.5).astype(int).tolist()))
        return {"x": float(yt.mean())}

    bootstrap_ci(y, prob, groups, metric_fn=record, n_boot=50, seed=1)
    assert len(seen) == 50
    drawn_fewer = 0
    for counts in seen:
        draws = []
        for g in range(15):
            members = np.flatnonzero(groups == g)
            # every member of a group appears equally often: whole groups, duplicates kept
            per_member = {counts.get(int(i), 0) for i in members}
            assert len(per_member) == 1
            draws.append(per_member.pop())
        assert sum(draws) == 15  # G groups drawn with replacement
        drawn_fewer += min(draws) == 0
    assert drawn_fewer > 40  # sampling with replacement usually misses some patients


def _cheap_metrics(y, p):
    # A fast metric_fn: these tests are about the resampling, not the metric.
    return {"accuracy": accuracy_score(y, p >= 0.5), "brier": brier_score_loss(y, p)}


def test_group_bootstrap_is_wider_than_image_bootstrap():
    # 20 patients with 10 identical slices each: the information is 20 samples, not 200.
    rng = np.random.default_rng(0)
    y_p = rng.integers(0, 2, 20)
    p_p = np.clip(0.3 * y_p + 0.7 * rng.random(20), 0, 1)
    y, p = np.repeat(y_p, 10), np.repeat(p_p, 10)
    by_patient = bootstrap_ci(y, p, np.repeat(np.arange(20), 10), _cheap_metrics, 200, seed=0)
    by_image = bootstrap_ci(y, p, np.arange(200), _cheap_metrics, 200, seed=0)
    for key in ("accuracy", "brier"):
        width_patient = by_patient[key][1] - by_patient[key][0]
        width_image = by_image[key][1] - by_image[key][0]
        assert width_patient > 1.8 * width_image, key


def test_metrics_with_ci_flat_keys_and_reproducible():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(30), 3)
    y = np.repeat(rng.integers(0, 2, 30), 3)
    p = np.clip(0.5 * y + 0.5 * rng.random(90), 0, 1)
    a = classification_metrics_with_ci(y, p, groups, threshold=0.5, n_boot=200, seed=2)
    assert bootstrap_ci(y, p, groups, _cheap_metrics, 200, seed=2) == bootstrap_ci(
        y, p, groups, _cheap_metrics, 200, seed=2
    )
    assert bootstrap_ci(y, p, groups, _cheap_metrics, 200, seed=2) != bootstrap_ci(
        y, p, groups, _cheap_metrics, 200, seed=3
    )
    assert a["n_groups"] == 30 and a["ci_level"] == pytest.approx(0.95)
    for key in CI_KEYS:
        assert a[f"{key}_ci_low"] <= a[key] + 1e-9 <= a[f"{key}_ci_high"] + 2e-9, key


def test_choose_threshold_maximises_mcc_on_given_data():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])
    t = choose_threshold(y, p, "mcc")
    assert 0.6 < t < 0.7  # predicts .7, .8, .9 positive: MCC 12/sqrt(240)
    brute = max(matthews_corrcoef(y, p >= v) for v in np.unique(p))
    assert matthews_corrcoef(y, p >= t) == pytest.approx(brute)


def test_choose_threshold_youden_separable():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7])
    assert choose_threshold(y, p, "youden") == pytest.approx(0.45)
    assert choose_threshold(y, p, "mcc") == pytest.approx(0.45)
    with pytest.raises(InputError, match="single class"):
        choose_threshold(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(InputError, match="method"):
        choose_threshold(y, p, "f1")
