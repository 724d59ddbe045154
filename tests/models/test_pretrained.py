"""Tests for lungcad.models.pretrained: torchvision-layout ImageNet weights into the encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lungcad.errors import InputError, MissingInputError
from lungcad.models.pretrained import load_pretrained_encoder
from lungcad.models.registry import create_model
from lungcad.models.unet import LungCADNet

# torchvision's resnet definitions (block type, blocks per stage), written out independently of
# lungcad so the test checks our key names against torchvision's, not against themselves.
_TV = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


def torchvision_resnet_state_dict(
    depth: str, seed: int = 0, with_counters: bool = True
) -> dict[str, torch.Tensor]:
    """A random state dict with the keys and shapes of ``torchvision.models.<depth>()``."""
    gen = torch.Generator().manual_seed(seed)
    block, layers = _TV[depth]
    expansion = 4 if block == "bottleneck" else 1
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, *shape: int) -> None:
        sd[f"{name}.weight"] = torch.randn(*shape, generator=gen)

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = torch.rand(c, generator=gen) + 0.5
        sd[f"{name}.bias"] = torch.randn(c, generator=gen)
        sd[f"{name}.running_mean"] = torch.randn(c, generator=gen)
        sd[f"{name}.running_var"] = torch.rand(c, generator=gen) + 0.5
        if with_counters:
            sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    conv("conv1", 64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    stages = zip((64, 128, 256, 512), layers, strict=True)
    for stage, (planes, n_blocks) in enumerate(stages, start=1):
        for b in range(n_blocks):
            p = f"layer{stage}.{b}"
            if block == "basic":
                conv(f"{p}.conv1", planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
            else:
                conv(f"{p}.conv1", planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1, 1)
                bn(f"{p}.bn3", planes * 4)
            stride = 2 if (b == 0 and stage > 1) else 1
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = torch.randn(1000, 512 * expansion, generator=gen)
    sd["fc.bias"] = torch.randn(1000, generator=gen)
    return sd


@pytest.fixture(scope="module")
def tv18() -> dict[str, torch.Tensor]:
    sd = torchvision_resnet_state_dict("resnet18")
    # Known values: one RGB filter tap set to 1, 2, 3 -> the grey filter tap must be 6.
    sd["conv1.weight"][5, :, 3, 4] = torch.tensor([1.0, 2.0, 3.0])
    return sd


@pytest.fixture
def net18() -> LungCADNet:
    torch.manual_seed(0)
    return create_model("resnet18")


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_weights_land_on_the_right_parameters(
    tv18: dict[str, torch.Tensor], net18: LungCADNet, tmp_path: Path
) -> None:
    decoder_before = {k: v.clone() for k, v in net18.decoder.state_dict().items()}
    report = load_pretrained_encoder(net18, _save(tv18, tmp_path / "r18.pth"))

    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len([k for k in tv18 if not k.startswith("fc.")])
    enc = net18.encoder
    # Checked through module attributes, not state-dict keys.
    torch.testing.assert_close(enc.bn1.bias, tv18["bn1.bias"])
    torch.testing.assert_close(enc.layer1[0].conv1.weight, tv18["layer1.0.conv1.weight"])
    torch.testing.assert_close(
        enc.layer2[0].downsample[0].weight, tv18["layer2.0.downsample.0.weight"]
    )
    torch.testing.assert_close(
        enc.layer3[0].downsample[1].running_var, tv18["layer3.0.downsample.1.running_var"]
    )
    torch.testing.assert_close(enc.layer4[1].bn2.running_mean, tv18["layer4.1.bn2.running_mean"])
    torch.testing.assert_close(enc.layer4[1].conv2.weight, tv18["layer4.1.conv2.weight"])
    # First conv: one input channel, the sum of the RGB filters.
    assert enc.conv1.weight.shape == (64, 1, 7, 7)
    assert enc.conv1.weight[5, 0, 3, 4].item() == pytest.approx(6.0)
    torch.testing.assert_close(enc.conv1.weight, tv18["conv1.weight"].sum(1, keepdim=True))
    # ... which is exactly the RGB conv applied to the grey image repeated in R, G and B.
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    rgb = F.conv2d(x.repeat(1, 3, 1, 1), tv18["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(enc.conv1(x), rgb, atol=1e-4, rtol=1e-4)
    # Nothing outside the encoder changes.
    for k, v in net18.decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k])


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_and_prefixed_state_dicts(
    tv18: dict[str, torch.Tensor], net18: LungCADNet, tmp_path: Path, wrapper: str
) -> None:
    wrapped = {wrapper: {f"module.{k}": v for k, v in tv18.items()}, "epoch": 90}
    report = load_pretrained_encoder(net18, _save(wrapped, tmp_path / "w.pth"))
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(net18.encoder.layer3[1].bn1.weight, tv18["layer3.1.bn1.weight"])


def test_released_files_without_bn_counters_load_strictly(
    net18: LungCADNet, tmp_path: Path
) -> None:
    sd = torchvision_resnet_state_dict("resnet18", seed=1, with_counters=False)
    report = load_pretrained_encoder(net18, _save(sd, tmp_path / "old.pth"), strict=True)
    assert report.missing == []


def test_depth_mismatch_names_key_shapes_and_cause(
    tv18: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    net50 = create_model("resnet50")
    with pytest.raises(InputError) as info:
        load_pretrained_encoder(net50, _save(tv18, tmp_path / "r18.pth"))
    msg = str(info.value)
    assert "r18.pth" in msg
    assert "'layer1.0.conv1.weight'" in msg
    assert "(64, 64, 3, 3)" in msg and "(64, 64, 1, 1)" in msg
    assert "resnet18" in msg and "resnet50" in msg


def test_missing_and_unexpected_keys_are_reported(
    tv18: dict[str, torch.Tensor], net18: LungCADNet, tmp_path: Path
) -> None:
    partial = {k: v for k, v in tv18.items() if not k.startswith("layer4.1.")}
    partial["extra.weight"] = torch.zeros(3)
    path = _save(partial, tmp_path / "partial.pth")
    before = net18.encoder.layer4[1].conv1.weight.clone()

    with pytest.raises(InputError, match="strict=False"):
        load_pretrained_encoder(net18, path, strict=True)

    report = load_pretrained_encoder(net18, path, strict=False)
    bn_params = ("weight", "bias", "running_mean", "running_var")
    expected_missing = ["layer4.1.conv1.weight", "layer4.1.conv2.weight"] + [
        f"layer4.1.bn{i}.{p}" for i in (1, 2) for p in bn_params
    ]
    assert sorted(report.missing) == sorted(expected_missing)
    assert report.unexpected == ["extra.weight"]
    assert torch.equal(net18.encoder.layer4[1].conv1.weight, before)  # kept its own init
    torch.testing.assert_close(net18.encoder.layer4[0].conv1.weight, tv18["layer4.0.conv1.weight"])


def test_bad_files(net18: LungCADNet, tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="nothing is downloaded|Nothing is downloaded"):
        load_pretrained_encoder(net18, tmp_path / "absent.pth")
    with pytest.raises(InputError, match="no weight matches"):
        load_pretrained_encoder(net18, _save({"foo.weight": torch.zeros(2)}, tmp_path / "f.pth"))
    with pytest.raises(InputError, match="expected a state dict"):
        load_pretrained_encoder(net18, _save([1, 2, 3], tmp_path / "list.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputError, match="torch.load"):
        load_pretrained_encoder(net18, junk)
