"""The model registry: names -> LungCADNet constructors, and parameter summaries.

Models are pure ``nn.Module``s returning logits; losses live in :mod:`lungcad.training.losses`.

Example::

    net = create_model("resnet18", decoder_dropout=0.1)
    out = net(torch.zeros(2, 1, 64, 64))  # {"seg_logits": (2, 1, 64, 64), "cls_logits": (2,)}
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from lungcad.errors import InputError
from lungcad.models.unet import LungCADNet

#: name -> constructor taking LungCADNet's keyword arguments (all but ``backbone``).
MODELS: dict[str, Callable[..., LungCADNet]] = {
    "resnet18": partial(LungCADNet, backbone="resnet18"),
    "resnet34": partial(LungCADNet, backbone="resnet34"),
    "resnet50": partial(LungCADNet, backbone="resnet50"),
}


def check_model_name(name: str, path: str | None = None) -> str:
    """``name`` if it is a key of :data:`MODELS`, else an :class:`InputError` listing them.

    Args:
        name: the model name to check.
        path: what the error names as the offending key (e.g. ``"model.name"``).
    """
    if name not in MODELS:
        raise InputError(
            f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}", path=path
        )
    return name


def create_model(name: str = "resnet50", **kwargs: Any) -> LungCADNet:
    """Build a registered model with random weights.

    Args:
        name: a key of :data:`MODELS` (``"resnet18"``, ``"resnet34"``, ``"resnet50"``).
        **kwargs: passed to :class:`LungCADNet` (``decoder_dropout``, ``head_hidden``,
            ``head_dropout``, ``detach_mask_summary``, ...).

    Raises:
        InputError: for an unknown name; the message lists the valid names.
    """
    return MODELS[check_model_name(name)](**kwargs)


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def model_summary(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a model.

    Returns:
        ``{"total", "trainable"}`` for any module, plus ``"encoder"``, ``"decoder"`` (decoder +
        segmentation head) and ``"head"`` (classifier) for a :class:`LungCADNet`.
    """
    summary = {
        "total": _count(model.parameters()),
        "trainable": _count(p for p in model.parameters() if p.requires_grad),
    }
    if isinstance(model, LungCADNet):
        summary["encoder"] = _count(model.encoder_parameters())
        summary["decoder"] = _count(model.decoder_parameters())
        summary["head"] = _count(model.head_parameters())
    return summary
