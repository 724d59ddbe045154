"""Tests for lungcad.data.augmentation: shapes, ranges, determinism, mask alignment, speed."""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import pytest

import lungcad.data.augmentation as augmentation
from lungcad.data.augmentation import AugmentationConfig, build_augmentation
from lungcad.errors import InputError

SPATIAL = ("flip_lr_prob", "flip_ud_prob", "rotate_prob", "scale_prob", "elastic_prob")
INTENSITY = ("brightness_prob", "contrast_prob", "gamma_prob", "noise_prob", "blur_prob")
ALL_ON = AugmentationConfig(elastic_magnitude=0.03, **{name: 1.0 for name in SPATIAL + INTENSITY})
SPATIAL_ONLY = dataclasses.replace(ALL_ON, **{name: 0.0 for name in INTENSITY})
INTENSITY_ONLY = dataclasses.replace(ALL_ON, **{name: 0.0 for name in SPATIAL})
NOTHING = dataclasses.replace(ALL_ON, **{name: 0.0 for name in SPATIAL + INTENSITY})


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    """A 64x64 slice-like image in [0, 1] and a mask of an off-centre disc and a square."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 22) ** 2 + (xx - 40) ** 2 <= 10**2
    mask = disc | ((yy > 40) & (yy < 54) & (xx > 8) & (xx < 24))
    image = np.clip(0.2 + 0.6 * mask + rng.normal(0, 0.05, mask.shape), 0, 1)
    return image[None].astype(np.float32), mask[None].astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_disabled_is_identity(pair: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = pair
    augment = build_augmentation(dataclasses.replace(ALL_ON, enabled=False), seed=0)
    out_image, out_mask = augment(image, mask)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_outputs_keep_shape_dtype_and_ranges(pair: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = pair
    augment = build_augmentation(ALL_ON, seed=1)
    for mask_dtype in (np.float32, np.uint8):
        for _ in range(10):
            out_image, out_mask = augment(image, mask.astype(mask_dtype))
            assert out_image.shape == image.shape and out_image.dtype == np.float32
            assert out_mask.shape == mask.shape and out_mask.dtype == mask_dtype
            assert out_image.min() >= 0.0 and out_image.max() <= 1.0
            assert set(np.unique(out_mask)) <= {0, 1}
            assert out_mask.sum() > 0.5 * mask.sum()  # the objects stay in view
    # the inputs are not modified in place
    np.testing.assert_array_equal(pair[1], mask)


def test_same_seed_same_sequence(pair: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = pair
    first, second = build_augmentation(ALL_ON, seed=7), build_augmentation(ALL_ON, seed=7)
    outputs = [first(image, mask) for _ in range(3)]
    for out_image, out_mask in outputs:
        again_image, again_mask = second(image, mask)
        np.testing.assert_array_equal(out_image, again_image)
        np.testing.assert_array_equal(out_mask, again_mask)
    assert not np.array_equal(outputs[0][0], outputs[1][0])  # the sequence moves on
    other = build_augmentation(ALL_ON, seed=8)(image, mask)
    assert not np.array_equal(other[0], outputs[0][0])


def test_global_rng_when_no_seed(pair: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = pair
    augment = build_augmentation(ALL_ON)
    np.random.seed(123)
    first = augment(image, mask)
    np.random.seed(123)
    again = augment(image, mask)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_forked_worker_gets_its_own_stream(
    pair: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    image, mask = pair
    parent = build_augmentation(ALL_ON, seed=3)
    child = copy.deepcopy(parent)  # what a forked DataLoader worker inherits
    parent_next = parent(image, mask)
    monkeypatch.setattr(augmentation.os, "getpid", lambda: 999_999)
    child_next = child(image, mask)
    assert not np.array_equal(parent_next[0], child_next[0])


def test_mask_stays_aligned_with_image(pair: tuple[np.ndarray, np.ndarray]) -> None:
    _, mask = pair
    augment = build_augmentation(SPATIAL_ONLY, seed=2)
    for _ in range(10):
        # The image is the mask itself: bilinear image and nearest mask must agree.
        out_image, out_mask = augment(mask.copy(), mask)
        assert dice(out_image, out_mask) > 0.95
        assert dice(out_mask, mask) < 0.95  # and the transform really moved things


def test_flips_are_exact(pair: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = pair
    cfg = dataclasses.replace(NOTHING, flip_lr_prob=1.0)
    out_image, out_mask = build_augmentation(cfg, seed=0)(image, mask)
    np.testing.assert_array_equal(out_image, image[:, :, ::-1])
    up_down = build_augmentation(dataclasses.replace(NOTHING, flip_ud_prob=1.0), seed=0)
    np.testing.assert_array_equal(up_down(image, mask)[1], mask[:, ::-1, :])
    unchanged = build_augmentation(NOTHING, seed=0)(image, mask)
    np.testing.assert_array_equal(unchanged[0], image)
    np.testing.assert_array_equal(out_mask, mask[:, :, ::-1])


def test_intensity_transforms_leave_mask_alone(pair: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = pair
    out_image, out_mask = build_augmentation(INTENSITY_ONLY, seed=0)(image, mask)
    np.testing.assert_array_equal(out_mask, mask)
    assert np.abs(out_image - image).mean() > 0.01


def test_bad_config_and_inputs_raise(pair: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(InputError, match="augmentation.rotate_prob"):
        build_augmentation(AugmentationConfig(rotate_prob=1.5))
    with pytest.raises(InputError, match="augmentation.scale_range"):
        build_augmentation(AugmentationConfig(scale_range=(1.2, 0.8)))
    with pytest.raises(InputError, match="augmentation.gamma_range"):
        build_augmentation(AugmentationConfig(gamma_range=(0.0, 1.0)))
    image, mask = pair
    augment = build_augmentation(AugmentationConfig(), seed=0)
    with pytest.raises(InputError, match="same H, W"):
        augment(image, mask[:, :32])
    with pytest.raises(InputError):
        augment(image[0], mask[0])


def test_fast_enough_on_64x64(pair: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = pair
    augment = build_augmentation(ALL_ON, seed=0)
    augment(image, mask)
    start = time.process_time()
    for _ in range(50):
        augment(image, mask)
    per_call = (time.process_time() - start) / 50
    assert per_call < 0.005, f"{per_call * 1000:.2f} ms per 64x64 call"
