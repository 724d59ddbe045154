"""Grad-CAM heat maps: where in a slice the cancer classifier looked.

MONAI's ``GradCAM`` (Selvaraju et al. 2017) on :class:`lungcad.models.unet.ClassLogits`,
hooked at the last encoder stage ``encoder.layer4`` (stride 32): the feature maps weighted by the
spatially averaged gradient of the cancer logit, ReLU, upsampled bilinearly to the input.

Two details differ from MONAI's defaults, on purpose:

* MONAI's default post-processing rescales each map's (min, max) to (1, 0), i.e. it *inverts*
  the map; here each map is divided by its own maximum instead, so 1 marks the most
  important region and a map with no positive evidence stays 0 everywhere.
* The hooks are registered on a private copy of the network, so the predictor's own network
  keeps no hooks and ``torch.inference_mode`` passes stay hook-free.
* The copy's parameters are frozen and the target layer's input is cut from the graph (a
  detached leaf that requires grad), so the backward pass stops at the target layer instead
  of running through the whole encoder: Grad-CAM needs nothing below it.

Heat maps explain the classifier, not the segmentation; they are coarse (one value per 32x32
pixels before upsampling) and are a visual aid, not a measurement.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from monai.visualize import GradCAM

from lungcad.models.unet import ClassLogits, LungCADNet

__all__ = ["CamExplainer", "cam_overlay", "grad_cam"]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _cut_graph(_module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the layer's input becomes a leaf that requires grad."""
    return (args[0].detach().requires_grad_(True), *args[1:])


class CamExplainer:
    """Grad-CAM for a LungCADNet's cancer logit.

    Args:
        model: the trained network; it is copied, the original is not modified.
        target_layer: dotted module name inside the network (default its ``cam_target_layer``,
            ``"encoder.layer4"``).
    """

    def __init__(self, model: LungCADNet, target_layer: str | None = None) -> None:
        net = copy.deepcopy(model).cpu().eval()
        net.requires_grad_(False)
        name = target_layer or LungCADNet.cam_target_layer
        net.get_submodule(name).register_forward_pre_hook(_cut_graph)
        self.wrapped = ClassLogits(net)
        self.cam = GradCAM(
            nn_module=self.wrapped, target_layers="model." + name, postprocessing=_identity
        )

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Heat maps for a batch of model inputs.

        Args:
            images: ``(B, 1, S, S)`` float model inputs (lung-windowed [0, 1], S a multiple of 32).

        Returns:
            ``(B, S, S)`` float32 in [0, 1], each map divided by its maximum (all zeros where
            nothing raises the cancer logit).
        """
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        with torch.enable_grad():
            maps = self.cam(x=x, class_idx=0)
        maps = maps.detach().float().cpu().numpy()[:, 0]
        peak = maps.reshape(len(maps), -1).max(axis=1)
        scale = np.where(peak > 0, peak, 1.0)
        return np.clip(maps / scale[:, None, None], 0.0, 1.0).astype(np.float32)


def grad_cam(model: LungCADNet, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """One-off Grad-CAM (builds a :class:`CamExplainer`; reuse one for many batches)."""
    return CamExplainer(model)(images)


def cam_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map over a grey slice with the "jet" colour map.

    Args:
        image: ``(H, W)`` grey values in [0, 1] (lung-windowed slice).
        heat: ``(H, W)`` heat map in [0, 1].
        alpha: maximum opacity of the colours; scaled by the heat so cold regions stay grey.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    from matplotlib import colormaps

    grey = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=2)
    colours = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]
    weight = alpha * np.clip(heat, 0.0, 1.0)[..., None]
    return np.round(255.0 * ((1.0 - weight) * grey + weight * colours)).astype(np.uint8)
