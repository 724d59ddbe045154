"""Input checks before any model: geometry, values, body part and slice thickness."""

from __future__ import annotations

import numpy as np
import pytest

from lungcad.data.synthetic.phantom import make_phantom
from lungcad.errors import InputError
from lungcad.inference.input_checks import (
    MAX_SLICE_THICKNESS_MM,
    NO_LUNG,
    check_input,
)
from lungcad.volume import Volume


@pytest.fixture(scope="module")
def chest() -> Volume:
    # 8 slices of 64x64 (5.6 mm pixels, 2.5 mm slices): a chest with lungs.
    return make_phantom(3, shape_zyx=(8, 64, 64), matrix=64, n_nodules=1, size_mm=20.0).volume


def abdomen_slice(n: int = 256, pixel_mm: float = 1.4, seed: int = 0) -> Volume:
    """One axial HU slice of an abdomen: fat, organs, spine and a few bowel-gas pockets, no
    lung (the kind of slice that used to get a cancer decision)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] * pixel_mm
    cy = cx = n * pixel_mm / 2
    hu = np.full((n, n), -1000.0)
    hu[((yy - cy) / 120) ** 2 + ((xx - cx) / 160) ** 2 <= 1] = -100.0  # subcutaneous fat
    hu[((yy - cy) / 105) ** 2 + ((xx - cx) / 145) ** 2 <= 1] = 40.0  # organs
    hu[((yy - cy - 60) / 18) ** 2 + ((xx - cx) / 18) ** 2 <= 1] = 700.0  # vertebra
    for _ in range(6):  # bowel gas, 1-3 cm across
        gy, gx, r = cy + rng.uniform(-60, 40), cx + rng.uniform(-100, 100), rng.uniform(6, 15)
        hu[(yy - gy) ** 2 + (xx - gx) ** 2 <= r * r] = -950.0
    hu += rng.normal(0.0, 15.0, hu.shape)
    return Volume(
        hu[None].astype(np.float32), (5.0, pixel_mm, pixel_mm), meta={"source_path": "abdomen.nii"}
    )


def test_a_chest_ct_passes(chest: Volume) -> None:
    check = check_input(chest)
    assert check.assessable and check.status == "ok" and check.reason is None
    assert not check.single_slice and check.warnings == ()
    assert check.lung_slices == chest.shape[0] and check.lung_area_mm2 > 2500
    doc = check.to_dict()
    assert doc["status"] == "ok" and doc["shape_zyx"] == [8, 64, 64]
    assert "lungs" not in doc  # the mask stays out of findings.json


def test_an_abdominal_slice_cannot_be_assessed() -> None:
    check = check_input(abdomen_slice())
    assert not check.assessable and check.status == "cannot assess"
    assert check.reason == NO_LUNG
    assert check.to_dict()["reason"] == "no lung in the image"


def test_one_or_two_slices_are_flagged_single_slice(chest: Volume) -> None:
    for n in (1, 2):
        part = Volume(chest.array[3 : 3 + n], chest.spacing)
        check = check_input(part)
        assert check.assessable and check.single_slice and check.status == "single slice"
        assert any("not of a whole study" in w for w in check.warnings)


def test_thick_slices_are_warned(chest: Volume) -> None:
    thick = Volume(chest.array, (MAX_SLICE_THICKNESS_MM + 2.5, *chest.spacing[1:]))
    check = check_input(thick)
    assert check.assessable and any("7.5 mm thick" in w for w in check.warnings)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((1, 2, 2), "2x2 pixels"), ((1, 1, 64), "1x64 pixels"), ((1, 1, 1), "1x1 pixels")],
)
def test_too_small_images_are_refused(shape, message) -> None:
    volume = Volume(np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32))
    volume.meta["source_path"] = "tiny.png"
    with pytest.raises(InputError, match=rf"^tiny\.png: the image is {message} in plane") as info:
        check_input(volume)
    assert "\n" not in str(info.value)


def test_malformed_values_and_geometry_are_refused(chest: Volume) -> None:
    with pytest.raises(InputError, match="every voxel has the value -1000"):
        check_input(chest.with_array(np.full(chest.shape, -1000.0, np.float32)), "blank.nii")
    with pytest.raises(InputError, match="not CT Hounsfield units"):
        check_input(chest.with_array(chest.array * 1000.0), "scaled.nii")
    with pytest.raises(InputError, match="windowed image or a mask"):
        check_input(chest.with_array((chest.array > -400).astype(np.float32)), "mask.nii")
    bad = chest.with_array(chest.array)
    bad.spacing = (float("nan"), 1.0, 1.0)  # a Volume built past the readers' checks
    with pytest.raises(InputError, match=r"^nan\.nii: voxel spacing"):
        check_input(bad, "nan.nii")
    with pytest.raises(InputError, match="more than the 4096"):
        check_input(Volume(np.zeros((1, 32, 5000), np.float32) + np.arange(5000)), "wide.png")
