"""The classifier's mask summary (lungcad.models.classifier)."""

from __future__ import annotations

import pytest
import torch

from lungcad.models.classifier import mask_summary


def test_mask_summary_values() -> None:
    # probabilities 0.5, 0.88, 0.12, 0.5 (logits 0, 2, -2, 0) -> area 1/4, max, mean
    logits = torch.tensor([[[[0.0, 2.0], [-2.0, 0.0]]]])
    s = mask_summary(logits)
    p_hi = 1 / (1 + torch.exp(torch.tensor(-2.0)))
    expected = torch.tensor([[0.25, p_hi, (0.5 + p_hi + (1 - p_hi) + 0.5) / 4]])
    torch.testing.assert_close(s, expected)


def test_direct_mask_term_starts_silent_or_from_the_largest_tumour_probability() -> None:
    """Without the term, or with prior 0, the head is its MLP alone; with prior w the term
    adds w * logit(max p)."""
    from lungcad.models.classifier import ClassificationHead, mask_evidence_features

    torch.manual_seed(0)
    head = ClassificationHead(8, hidden=(4,), dropout=0.0, mask_term=True).eval()
    bottleneck = torch.rand(3, 8, 2, 2)
    summary = torch.tensor([[0.0, 0.01, 0.001], [0.01, 0.5, 0.05], [0.05, 0.99, 0.2]])
    mlp_only = head.mlp(torch.cat([head.pool(bottleneck).flatten(1), summary], 1)).squeeze(1)
    torch.testing.assert_close(head(bottleneck, summary), mlp_only)
    head.reset_mask_evidence(1.0)
    max_logit = torch.logit(summary[:, 1])
    torch.testing.assert_close(head(bottleneck, summary), mlp_only + max_logit)
    head.mask_term = False  # off: the weights are ignored
    torch.testing.assert_close(head(bottleneck, summary), mlp_only)
    features = mask_evidence_features(torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.isfinite(features).all() and features.abs().max() <= 8.0


def test_checkpoint_without_the_direct_mask_term_loads_unchanged() -> None:
    """Weights written before the direct mask term existed load, with the term silent."""
    from lungcad.models.registry import create_model
    from lungcad.training.checkpoint import load_weights

    torch.manual_seed(0)
    old = create_model("resnet18").eval()
    old.classifier.reset_mask_evidence(1.0)
    state = {k: v for k, v in old.state_dict().items() if "mask_evidence" not in k}
    new = create_model("resnet18").eval()
    load_weights(new, state)
    assert float(new.classifier.mask_evidence.weight.abs().sum()) == 0.0
    state["classifier.surplus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected"):
        load_weights(new, state)
