"""The classifier's mask summary (lungcad.models.classifier)."""

from __future__ import annotations

import torch

from lungcad.models.classifier import mask_summary


def test_mask_summary_values() -> None:
    # probabilities 0.5, 0.88, 0.12, 0.5 (logits 0, 2, -2, 0) -> area 1/4, max, mean
    logits = torch.tensor([[[[0.0, 2.0], [-2.0, 0.0]]]])
    s = mask_summary(logits)
    p_hi = 1 / (1 + torch.exp(torch.tensor(-2.0)))
    expected = torch.tensor([[0.25, p_hi, (0.5 + p_hi + (1 - p_hi) + 0.5) / 4]])
    torch.testing.assert_close(s, expected)
