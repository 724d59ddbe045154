"""Tests of lungcad.metrics.bootstrap: whole patients are resampled, patient intervals are wider
than image intervals, flat keys and reproducibility of the CIs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss

from lungcad.metrics.bootstrap import CI_KEYS, bootstrap_ci, classification_metrics_with_ci


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
