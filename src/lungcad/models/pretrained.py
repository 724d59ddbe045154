"""Transfer learning: load ImageNet ResNet weights (torchvision layout) into the encoder.

The weights come from a local file, never from the network. Its layout is torchvision's
``resnet18/34/50`` state dict (``conv1.weight`` ``(64, 3, 7, 7)``, ``bn1.*``,
``layer1.0.conv1.weight``, ..., ``fc.weight``/``fc.bias``), as saved by
``torch.save(torchvision.models.resnet50(weights=...).state_dict(), path)``. The encoder of
:class:`~lungcad.models.unet.LungCADNet` uses the same key names, so the mapping is: strip a
``module.`` prefix (DataParallel/DDP files), drop the ImageNet classifier ``fc.*``, and turn the
RGB first convolution into a one-channel one by summing over its input channels. The sum is
exact for a grey image fed as R = G = B (timm's ``adapt_input_conv`` does the same). ImageNet's
per-channel mean/std normalisation is not reproduced: inputs stay lung-windowed [0, 1] and the
BatchNorm layers adapt during fine-tuning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lungcad.errors import InputError, MissingInputError
from lungcad.models.unet import LungCADNet, ResNetEncoder2d

log = logging.getLogger(__name__)

#: Wrapper keys under which checkpoints commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model")
#: torchvision depth by (block type, blocks in layer3): used to explain shape mismatches.
_TORCHVISION_DEPTHS = {
    ("basic", 2): "resnet18",
    ("basic", 6): "resnet34",
    ("bottleneck", 6): "resnet50",
    ("bottleneck", 23): "resnet101",
    ("bottleneck", 36): "resnet152",
}


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained_encoder` did.

    Attributes:
        missing: encoder keys the file did not provide (they keep their random init).
        unexpected: file keys (other than the dropped ``fc.*``) the encoder has no use for.
        loaded: encoder keys that were set from the file.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise MissingInputError(
            "pretrained encoder weights not found; expected a local torchvision-layout ResNet "
            "state dict (.pth/.pt). Nothing is downloaded: save one with "
            "torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V2').state_dict(), path) "
            "on a machine that has torchvision, and copy it here.",
            path,
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, ...)
        raise InputError(
            f"cannot read as PyTorch weights with torch.load(weights_only=True): {exc}. Expected a "
            "state dict saved with torch.save(model.state_dict(), path).",
            path,
        ) from exc
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise InputError(
            f"holds a {type(obj).__name__}, expected a state dict (a mapping of parameter names "
            "to tensors), optionally nested under 'state_dict' or 'model'.",
            path,
        )
    tensors = {
        str(k).removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)
    }
    if not tensors:
        raise InputError("holds no tensors; expected a ResNet state dict.", path)
    return tensors


def _guess_depth(keys: set[str]) -> str:
    """Name the torchvision ResNet a set of keys looks like (for error messages)."""
    block = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
    n_layer3 = len({m.group(1) for k in keys if (m := re.match(r"layer3\.(\d+)\.", k))})
    fallback = f"{block}-block ResNet ({n_layer3} blocks in layer3)"
    return _TORCHVISION_DEPTHS.get((block, n_layer3), fallback)


def _adapt(key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """The file tensor reshaped for the encoder, or None if the shapes are incompatible."""
    if key == "conv1.weight" and value.ndim == 4 and target.ndim == 4:
        if value.shape[1] != target.shape[1] and target.shape[1] == 1:
            # RGB filters applied to a grey image repeated in R, G, B == the summed filter.
            value = value.sum(dim=1, keepdim=True)
    if value.shape != target.shape:
        return None
    return value.to(dtype=target.dtype)


def load_pretrained_encoder(
    model: LungCADNet | ResNetEncoder2d, path: str | Path, strict: bool = True
) -> LoadReport:
    """Load a local torchvision-layout ResNet state dict into the model's encoder.

    Args:
        model: a :class:`LungCADNet` (its ``encoder`` is loaded) or a bare encoder.
        path: ``.pth``/``.pt`` file read with ``torch.load(weights_only=True)``; a dict nested
            under ``"state_dict"`` or ``"model"`` is accepted, as is a ``module.`` key prefix.
        strict: if True, any missing or unexpected key (besides the dropped ``fc.*`` and absent
            ``num_batches_tracked`` counters) raises; if False they are only reported.

    Returns:
        A :class:`LoadReport` of missing, unexpected and loaded keys.

    Raises:
        MissingInputError: the file does not exist.
        InputError: the file is not a state dict; a tensor's shape does not fit (e.g. resnet18
            weights for a resnet50 model: the message names the key, both shapes and the depth
            the file looks like); nothing matches; or, with ``strict``, keys are missing or
            unexpected.
    """
    path = Path(path)
    encoder = model.encoder if isinstance(model, LungCADNet) else model
    file_sd = _read_state_dict(path)
    target_sd = encoder.state_dict()
    model_depth = getattr(encoder, "depth", type(encoder).__name__)

    new_sd: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in file_sd.items():
        if key.startswith("fc."):
            continue  # ImageNet classifier: no counterpart in a segmentation encoder
        if key not in target_sd:
            unexpected.append(key)
            continue
        adapted = _adapt(key, value, target_sd[key])
        if adapted is None:
            file_depth = _guess_depth(set(file_sd))
            raise InputError(
                f"weight {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(target_sd[key].shape)} in the model's {model_depth} encoder. The file "
                f"looks like {file_depth} weights; build the model with that backbone "
                f"(e.g. create_model({file_depth!r})) or use {model_depth} weights.",
                path,
            )
        new_sd[key] = adapted
    # torchvision's released ImageNet files predate BatchNorm's num_batches_tracked counter.
    missing = [k for k in target_sd if k not in new_sd and not k.endswith("num_batches_tracked")]

    if not new_sd:
        sample = ", ".join(list(file_sd)[:5])
        raise InputError(
            f"no weight matches the {model_depth} encoder; expected torchvision ResNet keys such "
            f"as 'conv1.weight', 'layer1.0.conv1.weight', found e.g. {sample}.",
            path,
        )
    if strict and (missing or unexpected):
        raise InputError(
            f"does not match the {model_depth} encoder exactly: {len(missing)} missing key(s) "
            f"{missing[:8]}, {len(unexpected)} unexpected key(s) {unexpected[:8]}. Use weights "
            "of the same ResNet depth, or pass strict=False to load the matching part.",
            path,
        )

    # Every key of new_sd was checked against the encoder's own keys and shapes above.
    encoder.load_state_dict(new_sd, strict=False)
    log.info(
        "loaded %d encoder tensors from %s (%d missing, %d unexpected)",
        len(new_sd),
        path,
        len(missing),
        len(unexpected),
    )
    return LoadReport(missing=missing, unexpected=unexpected, loaded=list(new_sd))
