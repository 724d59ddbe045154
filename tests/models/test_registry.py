"""The model registry (lungcad.models.registry): names, unknown names, parameter counts."""

from __future__ import annotations

import pytest
import torch

from lungcad.errors import InputError
from lungcad.models.registry import MODELS, check_model_name, create_model, model_summary


def test_registry_and_unknown_name() -> None:
    assert set(MODELS) == {"resnet18", "resnet34", "resnet50"}
    net = create_model("resnet34", head_hidden=(32,), decoder_dropout=0.0)
    assert net.backbone == "resnet34"
    assert [m.out_features for m in net.classifier.mlp if isinstance(m, torch.nn.Linear)] == [32, 1]
    with pytest.raises(InputError) as info:  # a ValueError, one line, not a KeyError
        create_model("resnet101")
    msg = str(info.value)
    assert "\n" not in msg
    assert "resnet101" in msg
    assert all(name in msg for name in ("resnet18", "resnet34", "resnet50"))


def test_check_model_name_names_the_key() -> None:
    assert check_model_name("resnet18") == "resnet18"
    with pytest.raises(InputError, match=r"^model\.name: unknown model 'resnet19'; valid names"):
        check_model_name("resnet19", path="model.name")


def test_model_summary_of_any_module() -> None:
    layer = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    layer.bias.requires_grad_(False)
    assert model_summary(layer) == {"total": 8, "trainable": 6}  # no LungCADNet parts
