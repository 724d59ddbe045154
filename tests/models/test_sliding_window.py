"""Segmentation at the model's physical scale (lungcad.models.sliding_window)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungcad.models.sliding_window import resampled_shape, segment_at_scale


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius_px: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius_px**2).astype(np.float32)


def _bright_is_tumour(windows: torch.Tensor) -> torch.Tensor:
    """A stand-in network: bright pixels are tumour (exactly translation-equivariant)."""
    return (windows > 0.5).float()


def test_resampled_shape_follows_the_physical_size() -> None:
    assert resampled_shape((512, 512), (0.7, 0.7), 1.5) == (239, 239)
    assert resampled_shape((100, 50), (1.5, 3.0), 1.5) == (100, 100)
    assert resampled_shape((2, 2), (0.1, 0.1), 5.0) == (1, 1)


def test_sliding_windows_cover_a_slice_larger_than_one_window() -> None:
    # A 300x300 slice at 0.5 mm resampled to 1.5 mm is 100x100: several 32-px windows.
    image = _disc((300, 300), (220, 70), 30) * 0.9
    out = segment_at_scale(image[None], (0.5, 0.5), 1.5, 32, _bright_is_tumour)
    assert out.shape == (1, 300, 300) and out.dtype == np.float32
    mask = out[0] >= 0.5
    ref = image > 0.5
    dice = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
    assert dice > 0.95  # window borders and the two resamplings cost almost nothing


def test_the_model_sees_the_tumour_at_its_training_scale() -> None:
    """A network that only fires on blobs of ~10 model pixels finds a 15 mm tumour on a
    0.7 mm slice at 1.5 mm per model pixel, and does not when the slice is fed unscaled."""
    seen: list[float] = []

    def measures_blob(windows: torch.Tensor) -> torch.Tensor:
        area = float((windows > 0.5).sum(dim=(-1, -2)).max())
        seen.append(area)
        return (windows > 0.5).float()

    image = _disc((256, 256), (128, 128), 7.5 / 0.7) * 0.9  # 15 mm diameter
    segment_at_scale(image[None], (0.7, 0.7), 1.5, 64, measures_blob)
    # At 1.5 mm the disc has radius 5 model pixels: area ~ 79 px (not ~360 px at 0.7 mm).
    assert 60 <= max(seen) <= 100


def test_batches_of_slices_keep_their_own_masks() -> None:
    a = _disc((80, 80), (20, 20), 8) * 0.9
    b = _disc((80, 80), (60, 60), 8) * 0.9
    out = segment_at_scale(np.stack([a, b]), (1.0, 1.0), 1.0, 32, _bright_is_tumour)
    assert out[0, 20, 20] > 0.5 and out[0, 60, 60] < 0.5
    assert out[1, 60, 60] > 0.5 and out[1, 20, 20] < 0.5


# --------------------------------------------------------------------------- in the predictor


def _predictor(tmp_path, seg_pixel_mm: float | None):
    import dataclasses

    from lungcad.data.preprocessing import LUNG_WINDOW
    from lungcad.inference.predictor import Predictor
    from lungcad.training.checkpoint import load_checkpoint
    from lungcad.training.domain import HU, InputDomain
    from tests.inference_helpers import make_run_folder

    model, config, info = load_checkpoint(make_run_folder(tmp_path / "run"))
    # As if trained from a segmentation run: its decoder counts as trained.
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, init_from=str(tmp_path / "seg"))
    )
    # The decoder learnt 32-px inputs at seg_pixel_mm; the classifier whole 64-px slices.
    info["seg_input_domain"] = InputDomain(HU, LUNG_WINDOW, seg_pixel_mm, 32).to_dict()
    info["input_domain"] = InputDomain(HU, LUNG_WINDOW, None, 64).to_dict()
    return Predictor(model, config, info, study_threshold=None)


@pytest.fixture(scope="module")
def ct():
    from lungcad.data.synthetic.phantom import make_phantom

    # 4 slices of 64x64 (5.6 mm pixels) with one 20 mm tumour.
    return make_phantom(3, shape_zyx=(4, 64, 64), matrix=64, n_nodules=1, size_mm=20.0).volume


def test_predictor_segments_at_the_decoders_pixel_size(tmp_path, ct) -> None:
    predictor = _predictor(tmp_path, seg_pixel_mm=2.0)
    shapes: list[tuple[int, ...]] = []
    run_model = predictor.run_model

    def recording(inputs: np.ndarray):
        shapes.append(inputs.shape)
        return run_model(inputs)

    predictor.run_model = recording  # type: ignore[method-assign]
    result = predictor.predict_volume(ct, cam=False)
    assert result.probability.shape == ct.shape
    # Whole 64-px slices for the classifier; 32-px windows over the lung box resampled from
    # 5.6 mm to 2 mm (several windows per slice) for the decoder.
    assert any(s[1:] == (1, 64, 64) for s in shapes)
    windows = sum(s[0] for s in shapes if s[1:] == (1, 32, 32))
    assert windows >= 2 * len(result.lung_slices)
    assert not any("segmented whole" in w for w in result.warnings)


def test_predictor_says_when_the_decoders_scale_is_unknown(tmp_path, ct) -> None:
    predictor = _predictor(tmp_path, seg_pixel_mm=None)
    result = predictor.predict_volume(ct, cam=False)
    assert any("pixel size was not recorded" in w for w in result.warnings)


def test_predictor_says_how_hu_meet_a_model_of_display_images(tmp_path, ct) -> None:
    from lungcad.training.domain import DISPLAY, InputDomain

    predictor = _predictor(tmp_path, seg_pixel_mm=2.0)
    predictor.cls_domain = InputDomain(DISPLAY, None, None, 64)
    result = predictor.predict_volume(ct, cam=False)
    assert any("display-windowed" in w and "lung window" in w for w in result.warnings)


@pytest.mark.parametrize(("pixel_mm", "one_pass"), [(6.0, True), (2.0, False)])
def test_a_classifier_at_the_decoders_scale_segments_in_its_own_pass(
    tmp_path, ct, pixel_mm, one_pass
) -> None:
    """A classifier trained on whole slices at the decoder's pixel size (data.slice_pixel_mm)
    is fed the slice at that size; where the slice fits its input (64 px at 5.6 mm -> 60 px at
    6 mm) its own decoder output is the mask (no sliding windows); where it does not (179 px
    at 2 mm) the decoder segments the lung box in windows as before."""
    from lungcad.data.preprocessing import LUNG_WINDOW
    from lungcad.training.domain import HU, InputDomain

    predictor = _predictor(tmp_path, seg_pixel_mm=pixel_mm)
    predictor.cls_domain = InputDomain(HU, LUNG_WINDOW, pixel_mm, 64, resampled=True)
    predictor.seg_domain = InputDomain(HU, LUNG_WINDOW, pixel_mm, 32, resampled=True)
    shapes: list[tuple[int, ...]] = []
    inputs_seen: list[np.ndarray] = []
    run_model = predictor.run_model

    def recording(inputs: np.ndarray):
        shapes.append(inputs.shape)
        if inputs.shape[-1] == 64:
            inputs_seen.append(inputs)
        return run_model(inputs)

    predictor.run_model = recording  # type: ignore[method-assign]
    result = predictor.predict_volume(ct, cam=False)
    assert result.probability.shape == ct.shape
    windows = [s for s in shapes if s[1:] == (1, 32, 32)]
    assert (not windows) == one_pass
    if one_pass:
        # 60 of the 64 columns hold the slice; 2 columns of padding on each side.
        assert np.all(inputs_seen[0][..., :, :2] == 0) and np.all(inputs_seen[0][..., :, -2:] == 0)
        assert inputs_seen[0][..., :, 2:-2].max() > 0
        assert float(result.probability.array.max()) > 0
