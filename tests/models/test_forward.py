"""The shared forward pass (lungcad.models.forward): autocast, float32 logits, probabilities."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from lungcad.models.forward import Logits, autocast, forward_logits, probabilities, sigmoid
from lungcad.models.registry import create_model

torch.set_num_threads(1)


class _Fixed(nn.Module):
    """Returns the given logits whatever the input (and records the input it saw)."""

    def __init__(self, seg: torch.Tensor, cls: torch.Tensor) -> None:
        super().__init__()
        self.seg, self.cls = seg, cls
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen = x
        return {"seg_logits": self.seg.to(torch.float16), "cls_logits": self.cls.double()}


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # building it needs no GPU
def test_autocast_only_on_cuda_when_enabled() -> None:
    assert isinstance(autocast("cpu", True), contextlib.nullcontext)  # CPU runs stay float32
    assert isinstance(autocast(torch.device("cuda"), False), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cuda", 0), True), torch.autocast)


def test_forward_logits_matches_the_model_in_float32_without_autograd() -> None:
    torch.manual_seed(0)
    net = create_model("resnet18").eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
    logits = forward_logits(net, x, "cpu")
    assert isinstance(logits, Logits)
    assert logits.seg.shape == (2, 1, 64, 64) and logits.cls.shape == (2,)
    assert logits.seg.dtype == logits.cls.dtype == torch.float32
    assert not logits.seg.requires_grad and not logits.cls.requires_grad
    assert torch.equal(logits.seg, ref["seg_logits"]) and torch.equal(logits.cls, ref["cls_logits"])
    assert torch.is_grad_enabled()  # the caller's autograd mode is left alone


def test_forward_logits_widens_outputs_and_applies_the_memory_format() -> None:
    fixed = _Fixed(torch.full((1, 1, 4, 4), 0.5), torch.tensor([2.0]))
    out = forward_logits(fixed, torch.zeros(1, 3, 4, 4), "cpu", memory_format=torch.channels_last)
    assert out.seg.dtype == out.cls.dtype == torch.float32
    assert fixed.seen is not None and fixed.seen.is_contiguous(memory_format=torch.channels_last)
    forward_logits(fixed, torch.zeros(1, 3, 4, 4), "cpu")
    assert fixed.seen.is_contiguous()  # None keeps the layout


def test_probabilities_are_the_same_for_tensors_and_arrays() -> None:
    logits = torch.linspace(-90, 90, 1001)
    from_tensor = probabilities(logits)
    from_array = probabilities(logits.numpy().astype(np.float64))  # e.g. ONNX outputs
    assert from_tensor.dtype == from_array.dtype == np.float32
    assert np.array_equal(from_tensor, from_array)  # bit for bit
    assert np.array_equal(from_tensor, torch.sigmoid(logits).numpy())
    assert np.isfinite(from_tensor).all() and from_tensor[0] == 0.0 and from_tensor[-1] == 1.0
    assert torch.equal(sigmoid(logits.half()), torch.sigmoid(logits.half().float()))


def test_probabilities_use_the_calibration_when_given() -> None:
    seen: list[np.ndarray] = []

    def halve(x: np.ndarray) -> np.ndarray:
        seen.append(x)
        return np.asarray(x, dtype=np.float64) / 2

    assert probabilities(torch.tensor([1.0, 3.0]), halve).tolist() == [0.5, 1.5]
    assert seen[-1].dtype == np.float32  # the logits' own dtype reaches the calibration
    assert probabilities(np.array([4.0]), halve).tolist() == [2.0]
    assert seen[-1].dtype == np.float64


def test_read_only_arrays_are_accepted() -> None:
    array = np.zeros(3, dtype=np.float32)
    array.setflags(write=False)
    with np.testing.assert_no_warnings():
        assert probabilities(array).tolist() == [0.5, 0.5, 0.5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_amp_on_cuda_gives_float32_logits() -> None:
    net = create_model("resnet18").cuda().eval()
    out = forward_logits(net, torch.rand(1, 1, 64, 64), torch.device("cuda"), amp=True)
    assert out.seg.dtype == torch.float32 and out.seg.device.type == "cuda"
