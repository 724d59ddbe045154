"""LungCADNet (lungcad.models.unet): shapes, input checks, dropout, predict, parameter
groups, freezing, channels_last, the Grad-CAM hook."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import FlexibleUNet
from monai.visualize import GradCAM

from lungcad.errors import InputError
from lungcad.models.registry import create_model, model_summary
from lungcad.models.unet import ClassLogits, LungCADNet


@pytest.fixture(scope="module")
def net18() -> LungCADNet:
    torch.manual_seed(0)
    return create_model("resnet18", decoder_dropout=0.2, head_dropout=0.3)


@pytest.fixture
def x64() -> torch.Tensor:
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))


def test_resnet18_output_shapes(net18: LungCADNet, x64: torch.Tensor) -> None:
    net18.train()
    out = net18(x64)
    assert set(out) == {"seg_logits", "cls_logits"}
    assert out["seg_logits"].shape == (2, 1, 64, 64)
    assert out["cls_logits"].shape == (2,)
    assert torch.isfinite(out["seg_logits"]).all() and torch.isfinite(out["cls_logits"]).all()
    # Non-square inputs work too (both sides multiples of 32).
    out = net18(torch.rand(1, 1, 64, 96))
    assert out["seg_logits"].shape == (1, 1, 64, 96) and out["cls_logits"].shape == (1,)


def test_resnet50_shapes_and_layout_matches_flexible_unet(x64: torch.Tensor) -> None:
    net = create_model("resnet50")
    out = net(x64)
    assert out["seg_logits"].shape == (2, 1, 64, 64)
    assert out["cls_logits"].shape == (2,)
    assert net.classifier.mlp[0].in_features == 2048 + 3
    # Segmentation part is, layer for layer, MONAI's FlexibleUNet with a resnet50 backbone.
    ref = FlexibleUNet(in_channels=1, out_channels=1, backbone="resnet50", spatial_dims=2)
    ours = {k: v.shape for k, v in net.state_dict().items() if not k.startswith("classifier.")}
    assert ours == {k: v.shape for k, v in ref.state_dict().items()}


def test_input_shape_errors(net18: LungCADNet) -> None:
    with pytest.raises(ValueError, match="multiples of 32") as info:
        net18(torch.rand(1, 1, 60, 64))
    assert isinstance(info.value, InputError)
    assert "Pad to 64x64" in str(info.value)
    with pytest.raises(InputError, match=r"\(batch, 1, H, W\)"):
        net18(torch.rand(1, 3, 64, 64))
    with pytest.raises(InputError, match=r"image\[None, None\]"):
        net18(torch.rand(64, 64)[None])


def test_dropout_active_in_train_and_off_in_eval(x64: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = create_model("resnet18", decoder_dropout=0.3, head_dropout=0.5)
    net.train()
    a, b = net(x64), net(x64)
    assert not torch.allclose(a["seg_logits"], b["seg_logits"])
    assert not torch.allclose(a["cls_logits"], b["cls_logits"])
    net.eval()
    with torch.no_grad():
        a, b = net(x64), net(x64)
    assert torch.equal(a["seg_logits"], b["seg_logits"])
    assert torch.equal(a["cls_logits"], b["cls_logits"])
    # Control: without dropout, train-mode outputs are repeatable, so the difference above
    # came from dropout and not from something else.
    plain = create_model("resnet18", decoder_dropout=0.0, head_dropout=0.0).train()
    a, b = plain(x64), plain(x64)
    assert torch.equal(a["seg_logits"], b["seg_logits"])
    assert torch.equal(a["cls_logits"], b["cls_logits"])


def test_predict_returns_probabilities_in_eval(net18: LungCADNet, x64: torch.Tensor) -> None:
    net18.train()
    probs = net18.predict(x64)
    assert not net18.training
    assert probs["seg_probs"].shape == (2, 1, 64, 64) and probs["cls_probs"].shape == (2,)
    for p in probs.values():
        assert ((p >= 0) & (p <= 1)).all()
        assert not p.requires_grad
    with torch.no_grad():
        logits = net18(x64)
    torch.testing.assert_close(probs["cls_probs"], torch.sigmoid(logits["cls_logits"]))


def test_parameter_groups_partition_the_model(net18: LungCADNet) -> None:
    groups = [net18.encoder_parameters(), net18.decoder_parameters(), net18.head_parameters()]
    ids = [{id(p) for p in g} for g in groups]
    assert all(ids) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == {id(p) for p in net18.parameters()}
    s = model_summary(net18)
    assert s["encoder"] + s["decoder"] + s["head"] == s["total"] == s["trainable"]
    # torchvision resnet18 without fc has 11,176,512 parameters; conv1 here has 1 input
    # channel instead of 3 (64 * 2 * 7 * 7 fewer).
    assert s["encoder"] == 11_176_512 - 64 * 2 * 7 * 7


def test_freeze_encoder(x64: torch.Tensor) -> None:
    net = create_model("resnet18")
    net.freeze_encoder(True)
    assert net.encoder_frozen
    assert not any(p.requires_grad for p in net.encoder_parameters())
    assert all(p.requires_grad for p in net.decoder_parameters())
    assert all(p.requires_grad for p in net.head_parameters())
    assert model_summary(net)["trainable"] == model_summary(net)["total"] - sum(
        p.numel() for p in net.encoder_parameters()
    )
    net.train()
    assert not net.encoder.training and net.decoder.training
    mean_before = net.encoder.bn1.running_mean.clone()
    out = net(x64)
    (out["seg_logits"].mean() + out["cls_logits"].mean()).backward()
    assert torch.equal(net.encoder.bn1.running_mean, mean_before)  # BN statistics frozen too
    assert all(p.grad is None for p in net.encoder_parameters())
    assert net.segmentation_head[0].weight.grad is not None

    net.freeze_encoder(False)
    assert all(p.requires_grad for p in net.parameters())
    assert net.encoder.training
    net(x64)
    assert not torch.equal(net.encoder.bn1.running_mean, mean_before)


@pytest.mark.parametrize("detach", [True, False])
def test_mask_summary_detach_controls_decoder_gradient(detach: bool, x64: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = create_model("resnet18", detach_mask_summary=detach)
    net(x64)["cls_logits"].sum().backward()
    grad = net.segmentation_head[0].weight.grad
    if detach:
        assert grad is None  # the classification loss cannot move the segmentation decoder
    else:
        assert grad is not None and grad.abs().sum() > 0
    assert net.encoder.layer4[0].conv1.weight.grad is not None  # the encoder is shared


def test_channels_last_matches_contiguous(x64: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = create_model("resnet18").eval()
    with torch.no_grad():
        ref = net(x64)
        net = net.to(memory_format=torch.channels_last)
        out = net(x64.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out["seg_logits"], ref["seg_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["cls_logits"], ref["cls_logits"], atol=1e-4, rtol=1e-4)


def test_gradcam_hook_on_last_encoder_stage(net18: LungCADNet, x64: torch.Tensor) -> None:
    net18.eval()
    assert net18.get_submodule(net18.cam_target_layer) is net18.encoder.layer4
    features = net18.features(x64)
    assert features.shape == (2, 512, 2, 2)
    cam = GradCAM(nn_module=ClassLogits(net18), target_layers=ClassLogits.cam_target_layer)
    heat = cam(x64, class_idx=0)
    assert heat.shape == (2, 1, 64, 64)
    assert torch.isfinite(heat).all()
    # The CAM is built from the layer4 activations: not a constant map for a textured input.
    assert heat.std() > 0
