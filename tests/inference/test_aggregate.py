"""Tests for lungcad.inference.aggregate: the study probability from slice probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.inference.aggregate import aggregate_study


def test_aggregate_study_top_k() -> None:
    probs = np.array([np.nan, 0.1, 0.9, 0.7, 0.2, np.nan])
    assert aggregate_study(probs, spacing_z_mm=2.5, extent_mm=5.0) == (pytest.approx(0.8), 2)
    assert aggregate_study(probs, spacing_z_mm=5.0) == (pytest.approx(0.9), 1)
    assert aggregate_study(probs, spacing_z_mm=0.5)[1] == 4  # k capped at the evaluated slices
    assert aggregate_study(np.array([np.nan]), 1.0) == (0.0, 0)
