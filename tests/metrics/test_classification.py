"""Tests of lungcad.metrics.classification: hand-counted values, scikit-learn agreement, NaN
conventions for undefined values, ECE by hand and the choice of the decision threshold."""

from __future__ import annotations

import math
import warnings

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
    THRESHOLD_METHODS,
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
)
from lungcad.training import choices as training_choices

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
    # The training config offers the same rules (it cannot import this module's sklearn).
    assert THRESHOLD_METHODS == training_choices.THRESHOLD_METHODS == ("mcc", "youden")
    with pytest.raises(InputError, match="single class"):
        choose_threshold(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(InputError, match="method"):
        choose_threshold(y, p, "f1")
