"""Tumour-aware training patches at one physical scale (lungcad.data.patches)."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.data.dataset import SliceDataset
from lungcad.data.manifest import read_manifest
from lungcad.data.patches import PatchSampling, resample_to_pixel
from lungcad.errors import InputError
from tests.inference_helpers import make_manifest


def test_resampling_follows_the_spacing() -> None:
    image = np.zeros((100, 60), np.float32)
    assert resample_to_pixel(image, (0.75, 1.0), 1.5).shape == (50, 40)
    mask = np.zeros((100, 100), np.float32)
    mask[40:60, 40:60] = 1
    small = resample_to_pixel(mask, (1.0, 1.0), 2.0, mask=True)
    assert set(np.unique(small)) <= {0.0, 1.0} and small.sum() == pytest.approx(100, abs=12)


def test_tumour_patches_hold_the_tumour_at_the_model_scale() -> None:
    image = np.zeros((300, 300), np.float32)
    mask = np.zeros((300, 300), np.float32)
    mask[250:270, 20:40] = 1  # 20 px at 0.5 mm = 10 mm, near a corner
    image[mask > 0] = 0.9
    sampler = PatchSampling(pixel_mm=1.0, size=32, tumour_prob=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        patch, patch_mask = sampler.sample(image, mask, (0.5, 0.5), rng)
        assert patch.shape == patch_mask.shape == (32, 32)
        # Always some tumour, at 1 mm per pixel: at most 10x10 pixels of it.
        assert 0 < patch_mask.sum() <= 100
        assert np.all(patch[patch_mask > 0] > 0.5)


def test_random_patches_without_tumour_preference() -> None:
    image = np.zeros((400, 400), np.float32)
    mask = np.zeros((400, 400), np.float32)
    mask[10:20, 10:20] = 1
    sampler = PatchSampling(pixel_mm=1.0, size=32, tumour_prob=0.0)
    rng = np.random.default_rng(1)
    hits = sum(sampler.sample(image, mask, (1.0, 1.0), rng)[1].any() for _ in range(50))
    assert hits < 10  # a 10 mm tumour in a 400 mm slice: rarely inside a random patch


@pytest.mark.parametrize("pixel, prob", [(0.0, 0.5), (1.0, 1.5)])
def test_bad_settings_are_refused(pixel: float, prob: float) -> None:
    with pytest.raises(InputError):
        PatchSampling(pixel_mm=pixel, size=32, tumour_prob=prob)


def test_dataset_cuts_patches_and_fixed_patches_repeat(tmp_path) -> None:
    folder = make_manifest(tmp_path / "m", {"train": 2}, spacing=0.5)
    records = read_manifest(folder / "manifest.csv")
    sampler = PatchSampling(pixel_mm=1.0, size=32, tumour_prob=1.0)
    fixed = SliceDataset(records, folder, patches=sampler, fixed_patches=True)
    item = fixed[1]
    assert tuple(item["image"].shape) == (1, 32, 32)
    assert np.array_equal(fixed[1]["image"], item["image"])  # the same patch every epoch


def test_dataset_needs_the_spacing(tmp_path) -> None:
    folder = make_manifest(tmp_path / "m", {"train": 1}, spacing=float("nan"))
    records = read_manifest(folder / "manifest.csv")
    with pytest.raises(InputError, match="pixel spacing"):
        SliceDataset(records, folder, patches=PatchSampling(1.0, 32))


def test_several_patches_per_slice(tmp_path) -> None:
    folder = make_manifest(tmp_path / "m", {"train": 2}, spacing=0.5)
    records = read_manifest(folder / "manifest.csv")
    sampler = PatchSampling(pixel_mm=1.0, size=32, tumour_prob=1.0)
    data = SliceDataset(records, folder, patches=sampler, fixed_patches=True, patches_per_slice=3)
    assert len(data) == 3 * len(records)
    ids = [data[i]["sample_id"] for i in range(len(data))]
    assert ids == [r.sample_id for r in records for _ in range(3)]
    # The three patches of a tumour slice are drawn independently.
    first, second = data[3]["image"], data[4]["image"]
    assert not np.array_equal(first, second)
    with pytest.raises(InputError, match="patches per slice"):
        SliceDataset(records, folder, patches=sampler, patches_per_slice=0)
