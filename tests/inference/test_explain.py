"""Grad-CAM: MONAI's GradCAM on the cancer logit, normalised the right way round."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lungcad.inference.explain import CamExplainer, cam_overlay, grad_cam
from lungcad.models.registry import create_model

torch.set_num_threads(1)


def _manual_grad_cam(model, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM written out (Selvaraju et al. 2017) with a plain hook on encoder.layer4."""
    saved = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        saved["act"] = output

    handle = model.encoder.layer4.register_forward_hook(keep)
    try:
        model.eval()
        logits = model(x.clone().requires_grad_(True))["cls_logits"]
        logits.sum().backward()
    finally:
        handle.remove()
    act, grad = saved["act"], saved["act"].grad
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)
    cam = cam[:, 0].detach().numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)
    return cam / np.where(peak > 0, peak, 1.0)[:, None, None]


def test_grad_cam_matches_the_definition_and_is_not_inverted() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    maps = CamExplainer(model)(x)
    expected = _manual_grad_cam(model, x)
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert np.allclose(maps, expected, atol=1e-4)
    assert all(e.max() > 0 for e in expected)  # something to compare, not all-zero maps
    for m, e in zip(maps, expected, strict=True):
        if e.max() > 0:  # the hottest pixel is where the definition puts it (not inverted)
            assert m.flat[np.argmax(e)] == 1.0


def test_explainer_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_cam(model, np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32))
    assert not model.encoder.layer4._forward_hooks and not model.encoder.layer4._backward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_cam_overlay_colours_only_where_hot() -> None:
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    heat = np.zeros((64, 64), np.float32)
    heat[10:20, 30:40] = 1.0
    rgb = cam_overlay(image, heat)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    cold = heat == 0
    grey = np.round(255 * image[cold]).astype(np.uint8)
    assert np.array_equal(rgb[cold][:, 0], grey) and np.array_equal(rgb[cold][:, 2], grey)
    hot = rgb[10:20, 30:40].reshape(-1, 3).astype(int)
    assert np.any(hot[:, 0] != hot[:, 1])  # coloured
