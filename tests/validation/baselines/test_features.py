"""Tests of lungcad.validation.baselines.features: determinism, finiteness, sensitivity to
texture, ROIs, cache."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from lungcad.data.manifest import SliceRecord
from lungcad.errors import InputError
from lungcad.validation.baselines import features
from lungcad.validation.baselines.features import extract_features, feature_table, slice_roi
from tests.system_tools import require_tool


def _textured(seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    stripes = 0.5 + 0.25 * np.sin(xx / 2.0) * np.cos(yy / 3.0)
    return np.clip(stripes + rng.normal(0, 0.08, (size, size)), 0, 1).astype(np.float32)


def _chest(seed: int = 0, size: int = 96) -> np.ndarray:
    """A chest-like windowed slice: air, a soft-tissue body and two dark lungs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    image = np.full((size, size), 0.02)
    image[((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1] = 0.62
    for cx in (0.3, 0.7):
        image[((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.25) ** 2 < 1] = 0.12
    return np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)


@pytest.fixture
def roi() -> np.ndarray:
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:56, 10:54] = True
    return mask


def needs_pyradiomics() -> None:
    """pyradiomics is a build-from-source extra: skip without it, but fail under CI=true."""
    require_tool(
        importlib.util.find_spec("radiomics") is not None,
        "pyradiomics is not installed: `make` installs it (pip install --no-build-isolation "
        "pyradiomics==3.0.1 after numpy and versioneer)",
    )


@pytest.mark.parametrize("kind", ["handcrafted", "radiomics"])
def test_features_deterministic_finite_and_texture_sensitive(kind, roi):
    if kind == "radiomics":
        needs_pyradiomics()
    textured = extract_features(_textured(), roi, kind)
    again = extract_features(_textured(), roi, kind)
    flat = extract_features(np.full((64, 64), 0.5, np.float32), roi, kind)
    assert textured == again
    assert list(textured) == list(flat)
    assert len(textured) > 30
    assert all(math.isfinite(v) for v in textured.values())
    prefix = "hc_" if kind == "handcrafted" else "rad_"
    assert all(name.startswith(prefix) for name in textured)
    if kind == "handcrafted":
        keys = ("hc_std", "hc_entropy", "hc_glcm_contrast_d1", "hc_glcm_homogeneity_d1")
    else:
        keys = (
            "rad_firstorder_Entropy",
            "rad_glcm_Contrast",
            "rad_glrlm_RunEntropy",
            "rad_glszm_ZoneEntropy",
            "rad_ngtdm_Coarseness",
        )
    for key in keys:
        assert textured[key] != pytest.approx(flat[key], rel=1e-3, abs=1e-6), key
    if kind == "handcrafted":
        assert flat["hc_std"] == 0 and textured["hc_glcm_contrast_d1"] > 0
        assert flat["hc_glcm_homogeneity_d1"] == pytest.approx(1.0)


def test_radiomics_covers_the_feature_classes(roi):
    needs_pyradiomics()
    names = extract_features(_textured(), roi, "radiomics", spacing=(0.7, 0.7))
    for family in ("firstorder", "shape2D", "glcm", "glrlm", "glszm", "gldm", "ngtdm"):
        assert any(n.startswith(f"rad_{family}_") for n in names), family
    # A ROI without background (the whole slice) works too (pyradiomics needs a border).
    whole = extract_features(_textured(), np.ones((64, 64), bool), "radiomics")
    assert list(whole) == list(names) and whole != names
    both = extract_features(_textured(), roi, "both")
    assert set(both) == set(extract_features(_textured(), roi, "handcrafted")) | set(names)


def test_radiomics_shape_uses_spacing(roi):
    needs_pyradiomics()
    one = extract_features(_textured(), roi, "radiomics", spacing=(1.0, 1.0))
    half = extract_features(_textured(), roi, "radiomics", spacing=(0.5, 0.5))
    assert half["rad_shape2D_PixelSurface"] == pytest.approx(one["rad_shape2D_PixelSurface"] / 4)


def test_high_density_fraction_and_roi_restriction(roi):
    image = np.full((64, 64), 0.1, np.float32)
    image[8:32, 10:54] = 0.9  # upper half of the ROI is dense (> -400 HU on the lung window)
    image[:8] = 1.0  # outside the ROI: must not count
    f = extract_features(image, roi, "handcrafted")
    assert f["hc_high_density_fraction"] == pytest.approx(0.5)
    assert f["hc_max"] == pytest.approx(0.9)
    assert f["hc_roi_fraction"] == pytest.approx(roi.mean())


def test_bad_inputs_raise(roi):
    with pytest.raises(InputError, match="at least"):
        extract_features(_textured(), np.zeros((64, 64), bool), "handcrafted")
    with pytest.raises(InputError, match="window"):
        extract_features(_textured() * 1000 - 600, roi, "handcrafted")
    with pytest.raises(InputError, match="kind"):
        extract_features(_textured(), roi, "deep")
    with pytest.raises(InputError, match="shape"):
        extract_features(_textured(), roi[:10], "handcrafted")


def test_slice_roi_lung_and_fallback():
    lungs, fell_back = slice_roi(_chest(), "lung", spacing=(1.0, 1.0))
    assert not fell_back
    assert 0.1 < lungs.mean() < 0.4  # two lungs, not the body or the air around it
    assert not lungs[0, 0] and lungs[48, 29]
    # A small patch inside a lung has no lung boundary: the whole patch is used instead.
    patch, fell_back = slice_roi(np.full((48, 48), 0.15, np.float32), "lung")
    assert fell_back and patch.all()
    with pytest.raises(InputError, match="mask"):
        slice_roi(_chest(), "mask", None)


def _write_records(tmp_path: Path, images: list[np.ndarray]) -> list[SliceRecord]:
    (tmp_path / "slices").mkdir(exist_ok=True)
    records = []
    for i, image in enumerate(images):
        np.save(tmp_path / "slices" / f"s{i}.npy", image)
        records.append(
            SliceRecord(
                sample_id=f"s{i}",
                group_id=f"p{i // 2}",
                slice_index=i,
                image_path=f"slices/s{i}.npy",
                mask_path="",
                label=i % 2,
                spacing_y=0.8,
                spacing_x=float("nan"),
                source="test",
                split="train",
            )
        )
    return records


def test_feature_table_logs_one_summary_for_slices_without_lung(tmp_path, caplog):
    # Slices with no lung (tissue only) fall back to the whole slice: one summary line, not
    # one lung_mask warning per slice.
    tissue = [np.clip(_textured(seed, 48) * 0.2 + 0.5, 0, 1) for seed in range(3)]
    records = _write_records(tmp_path, [_chest(0, 64), *tissue])
    with caplog.at_level(logging.DEBUG, logger="lungcad"):
        feature_table(records, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["3 of 4 slices had no usable lung mask; their features use the whole slice"]


def test_feature_table_order_and_cache(tmp_path, monkeypatch):
    images = [_chest(seed) for seed in range(3)] + [_textured(1, 96)]
    records = _write_records(tmp_path, images)
    cache = tmp_path / "cache"
    X, names = feature_table(records, tmp_path, kind="handcrafted", roi="lung", cache_dir=cache)
    assert X.shape == (4, len(names)) and np.isfinite(X).all()
    assert X[0].tolist() != X[3].tolist()
    single, _ = feature_table(records[3:], tmp_path, kind="handcrafted", roi="lung")
    np.testing.assert_array_equal(single[0], X[3])

    def fail(*args, **kwargs):
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr(features, "extract_features", fail)
    X_cached, names_cached = feature_table(
        records, tmp_path, kind="handcrafted", roi="lung", cache_dir=cache
    )
    np.testing.assert_array_equal(X_cached, X)
    assert names_cached == names
    # Changed image content changes the key: recomputed (and here, our stub fails).
    np.save(tmp_path / "slices" / "s0.npy", _chest(seed=9))
    with pytest.raises(AssertionError, match="recomputed"):
        feature_table(records, tmp_path, kind="handcrafted", roi="lung", cache_dir=cache)


def test_feature_table_mask_roi_and_errors(tmp_path):
    records = _write_records(tmp_path, [_textured(0), _textured(1)])
    with pytest.raises(InputError, match="no tumour mask"):
        feature_table(records, tmp_path, roi="mask")
    with pytest.raises(FileNotFoundError):
        feature_table(
            [records[0].__class__(**{**records[0].__dict__, "image_path": "slices/missing.npy"})],
            tmp_path,
            roi="whole",
        )
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 1
    np.save(tmp_path / "slices" / "m0.npy", mask)
    with_mask = [records[0].__class__(**{**records[0].__dict__, "mask_path": "slices/m0.npy"})]
    X, names = feature_table(with_mask, tmp_path, kind="handcrafted", roi="mask")
    assert X[0, names.index("hc_roi_fraction")] == pytest.approx(400 / 64**2)
