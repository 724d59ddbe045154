"""Tests for lungcad.models.tta: flip test-time augmentation and probability averaging."""

from __future__ import annotations

import torch

from lungcad.models.registry import create_model
from lungcad.models.tta import FlipTTA, mean_probability_logits


def test_mean_probability_logits_averages_probabilities() -> None:
    a = {"seg_logits": torch.zeros(1, 1, 2, 2), "cls_logits": torch.tensor([0.0])}
    b = {"seg_logits": torch.full((1, 1, 2, 2), 100.0), "cls_logits": torch.tensor([-100.0])}
    out = mean_probability_logits([a, b])
    torch.testing.assert_close(torch.sigmoid(out["seg_logits"]), torch.full((1, 1, 2, 2), 0.75))
    torch.testing.assert_close(torch.sigmoid(out["cls_logits"]), torch.tensor([0.25]))


def test_flip_tta_is_mirror_symmetric() -> None:
    torch.manual_seed(0)
    net = FlipTTA(create_model("resnet18").eval())
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        out, mirrored = net(x), net(torch.flip(x, dims=[-1]))
        plain = net.model(x)
    # Averaging a view with its mirror makes the result independent of the view.
    torch.testing.assert_close(out["cls_logits"], mirrored["cls_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        out["seg_logits"], torch.flip(mirrored["seg_logits"], dims=[-1]), atol=1e-4, rtol=1e-4
    )
    assert out["seg_logits"].shape == plain["seg_logits"].shape == (2, 1, 64, 64)
    assert not torch.allclose(out["cls_logits"], plain["cls_logits"])  # it did change something
