"""Tests for lungcad.inference.lesions: connected lesions measured in mL and mm on anisotropic
grids."""

from __future__ import annotations

import json
import logging
import math
import tracemalloc

import numpy as np
import pytest

from lungcad.errors import InputError
from lungcad.inference.lesions import MAX_LESIONS, find_lesions, lesion_labels, lesions_to_dicts
from lungcad.lesion import Lesion
from lungcad.volume import Volume

SPACING = (2.5, 0.6, 0.9)  # (z, y, x) mm: thick slices, non-square pixels
ORIGIN = (-120.0, -80.0, 40.0)  # (x, y, z) LPS mm


def _volume(array: np.ndarray, intensity: str = "hu") -> Volume:
    return Volume(
        array=array.astype(np.float32), spacing=SPACING, origin=ORIGIN, intensity=intensity
    )


def _box_mask(shape=(12, 60, 60)) -> np.ndarray:
    mask = np.zeros(shape, np.float32)
    mask[2:5, 10:20, 5:25] = 1  # 3 slices x 10 rows x 20 columns
    return mask


def test_box_volume_diameter_centroid_and_slices():
    (lesion,) = find_lesions(_volume(_box_mask()))
    assert lesion.id == 1
    assert lesion.voxel_count == 3 * 10 * 20
    assert lesion.volume_ml == pytest.approx(600 * 2.5 * 0.6 * 0.9 / 1000.0)
    # 10 rows of 0.6 mm by 20 columns of 0.9 mm: the caliper runs corner to corner.
    assert lesion.longest_axial_diameter_mm == pytest.approx(math.hypot(10 * 0.6, 20 * 0.9))
    assert lesion.slice_range == (2, 4)
    assert 2 <= lesion.diameter_slice <= 4
    assert lesion.centroid_zyx == pytest.approx((3.0, 14.5, 14.5))
    # LPS (x, y, z) = origin + index (x, y, z) * spacing (x, y, z) for an identity direction.
    assert lesion.centroid_lps_mm == pytest.approx(
        (-120.0 + 14.5 * 0.9, -80.0 + 14.5 * 0.6, 40.0 + 3.0 * 2.5)
    )
    assert lesion.mean_hu is None and lesion.max_probability is None


def test_centroid_follows_direction_cosines():
    # A volume stored feet-to-head and right-to-left: the LPS position must follow the direction.
    direction = np.diag([-1.0, 1.0, -1.0])
    mask = Volume(array=_box_mask(), spacing=SPACING, origin=ORIGIN, direction=direction)
    (lesion,) = find_lesions(mask)
    assert lesion.centroid_lps_mm == pytest.approx(
        (-120.0 - 14.5 * 0.9, -80.0 + 14.5 * 0.6, 40.0 - 3.0 * 2.5)
    )


def test_sphere_at_anisotropic_spacing():
    radius = 9.0
    z, y, x = np.mgrid[0:16, 0:50, 0:40].astype(np.float64)
    centre = (8, 25, 20)
    dist = np.sqrt(
        ((z - centre[0]) * SPACING[0]) ** 2
        + ((y - centre[1]) * SPACING[1]) ** 2
        + ((x - centre[2]) * SPACING[2]) ** 2
    )
    (lesion,) = find_lesions(_volume(dist <= radius))
    true_ml = 4.0 / 3.0 * math.pi * radius**3 / 1000.0
    assert lesion.volume_ml == pytest.approx(true_ml, rel=0.08)
    # The widest slice is the central one; pixel squares reach at most one pixel beyond 2R.
    pixel_diagonal = math.hypot(SPACING[1], SPACING[2])
    assert 2 * radius <= lesion.longest_axial_diameter_mm <= 2 * radius + pixel_diagonal
    assert lesion.diameter_slice == centre[0]
    assert lesion.slice_range == (centre[0] - 3, centre[0] + 3)  # |dz| <= 9 mm at 2.5 mm
    assert lesion.centroid_zyx == pytest.approx(centre, abs=1e-6)


def test_two_lesions_sorted_by_volume_with_hu_and_probability():
    mask = _box_mask()
    mask[8:10, 40:44, 40:44] = 1  # a small second lesion, 32 voxels
    hu = np.full(mask.shape, -800.0, np.float32)
    hu[mask > 0] = 40.0
    hu[8:10, 40:44, 40:44] = 100.0
    prob = np.where(mask > 0, 0.7, 0.05).astype(np.float32)
    prob[3, 12, 7] = 0.95
    lesions = find_lesions(_volume(mask), hu=_volume(hu), probability=_volume(prob))
    assert [les.id for les in lesions] == [1, 2]
    big, small = lesions
    assert (big.voxel_count, small.voxel_count) == (600, 32)
    assert big.mean_hu == pytest.approx(40.0) and small.mean_hu == pytest.approx(100.0)
    assert big.max_probability == pytest.approx(0.95)
    assert big.mean_probability == pytest.approx((599 * 0.7 + 0.95) / 600, rel=1e-6)
    assert small.max_probability == pytest.approx(0.7)
    assert small.slice_range == (8, 9)

    # A windowed image is not HU, so no mean HU is reported.
    windowed = _volume(np.clip(hu, 0, 1), intensity="windowed")
    assert all(les.mean_hu is None for les in find_lesions(_volume(mask), hu=windowed))

    # min_volume_mm3 drops the small one (32 voxels x 1.35 mm^3 = 43.2 mm^3).
    kept = find_lesions(_volume(mask), min_volume_mm3=50.0)
    assert [les.voxel_count for les in kept] == [600]


def test_corner_touching_voxels_are_one_lesion():
    mask = np.zeros((4, 6, 6), bool)
    mask[1, 1, 1] = True
    mask[2, 2, 2] = True  # touches the first only at a corner: same lesion under 26-connectivity
    mask[1, 4, 4] = True  # two voxels away from both: a separate lesion
    lesions = find_lesions(_volume(mask))
    assert [les.voxel_count for les in lesions] == [2, 1]


def test_empty_mask_gives_no_lesions():
    assert find_lesions(_volume(np.zeros((3, 8, 8)))) == []
    assert lesions_to_dicts([]) == []


def test_single_pixel_diameter_is_its_diagonal():
    mask = np.zeros((1, 5, 5), np.uint8)
    mask[0, 2, 2] = 1
    (lesion,) = find_lesions(_volume(mask))
    assert lesion.longest_axial_diameter_mm == pytest.approx(math.hypot(0.6, 0.9))


def test_lesions_to_dicts_is_json_safe():
    mask = _box_mask()
    prob = np.where(mask > 0, 0.8, 0.0)
    lesions = find_lesions(_volume(mask), probability=_volume(prob))
    dicts = lesions_to_dicts(lesions)
    text = json.dumps(dicts, allow_nan=False)
    back = json.loads(text)[0]
    assert back["id"] == 1 and back["slice_range"] == [2, 4]
    assert back["centroid_lps_mm"] == pytest.approx(list(lesions[0].centroid_lps_mm))
    assert back["mean_hu"] is None
    assert set(back) == set(Lesion.__dataclass_fields__)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="binary mask"):
        find_lesions(_volume(np.full((2, 4, 4), 0.5)))
    other = Volume(array=np.zeros((12, 60, 60), np.float32), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="probability volume must be on the mask's grid"):
        find_lesions(_volume(_box_mask()), probability=other)
    with pytest.raises(InputError, match="hu volume"):
        find_lesions(_volume(_box_mask()), hu=_volume(np.zeros((12, 60, 61))))


def test_whole_volume_mask_is_one_lesion_in_little_memory():
    # An untrained model can mark every voxel; measuring that must not build per-voxel lists.
    shape = (60, 256, 256)
    ones = _volume(np.ones(shape, np.float32))
    tracemalloc.start()
    try:
        (lesion,) = find_lesions(ones, hu=ones, probability=ones)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n_voxels = int(np.prod(shape))
    # The label image is 4 bytes per voxel (16 MB); per-voxel coordinates were 48+ (200 MB).
    assert peak < 24 * n_voxels, f"peak {peak / 1e6:.0f} MB"
    assert lesion.voxel_count == n_voxels and lesion.slice_range == (0, 59)
    assert lesion.centroid_zyx == pytest.approx((29.5, 127.5, 127.5))
    assert lesion.longest_axial_diameter_mm == pytest.approx(math.hypot(256 * 0.6, 256 * 0.9))
    assert lesion.mean_hu == 1.0 and lesion.max_probability == lesion.mean_probability == 1.0


def test_too_many_components_keeps_the_largest(caplog):
    mask = np.zeros((6, 44, 44), np.uint8)
    mask[::2, ::2, ::2] = 1  # 3 x 22 x 22 = 1452 isolated voxels
    mask[:, 40:, 40:] = 1  # one 6 x 4 x 4 block (it swallows the specks it touches)
    with caplog.at_level(logging.WARNING, logger="lungcad.inference.lesions"):
        lesions = find_lesions(_volume(mask))
    assert len(lesions) == MAX_LESIONS
    assert lesions[0].voxel_count == 96 and lesions[0].slice_range == (0, 5)
    assert "measuring only the 1000 largest" in caplog.text
    few = find_lesions(_volume(mask), max_lesions=3)
    assert [les.voxel_count for les in few] == [96, 1, 1]
    with pytest.raises(InputError, match="max_lesions"):
        find_lesions(_volume(mask), max_lesions=0)


def test_short_axis_of_an_ellipse_is_its_minor_axis():
    # An axial ellipse with semi-axes 12 mm (x) and 5 mm (y): long axis 24 mm, short 10 mm, to
    # within the pixel squares that stand out of the ellipse.
    y, x = np.mgrid[0:60, 0:60].astype(np.float64)
    inside = ((x - 30) * SPACING[2] / 12.0) ** 2 + ((y - 30) * SPACING[1] / 5.0) ** 2 <= 1.0
    mask = np.zeros((3, 60, 60), np.float32)
    mask[1] = inside
    (lesion,) = find_lesions(_volume(mask))
    assert 24.0 <= lesion.longest_axial_diameter_mm <= 24.0 + SPACING[2]
    assert 10.0 <= lesion.short_axis_mm <= 10.0 + 2 * SPACING[1]
    # A box of 10 x 20 pixels: the long axis is its diagonal, the short axis the box's width
    # across that diagonal (2ab / diagonal).
    (box,) = find_lesions(_volume(_box_mask()))
    a, b = 10 * 0.6, 20 * 0.9
    assert box.short_axis_mm == pytest.approx(2 * a * b / math.hypot(a, b))


def test_side_of_the_body_and_label_image():
    # A body of soft tissue (0 HU) in air, with one lesion on each side of its midline. LPS x
    # grows to the patient's left, so the lesion at high x is in the left lung.
    hu = np.full((6, 40, 80), -1000.0, np.float32)
    hu[:, 5:35, 10:70] = 0.0  # body: columns 10..69, midline between columns 39 and 40
    mask = np.zeros(hu.shape, np.float32)
    mask[1:3, 15:20, 50:56] = 1  # larger: lesion 1, patient's left
    mask[3:5, 15:18, 20:24] = 1  # lesion 2, patient's right
    volume = _volume(hu)
    lesions = find_lesions(volume.with_array(mask), hu=volume)
    assert [les.side for les in lesions] == ["left", "right"]
    assert find_lesions(volume.with_array(mask))[0].side is None  # no HU: no side
    # Flipped storage (x runs to the patient's right): the sides follow the patient, not x.
    flipped = Volume(array=hu, spacing=SPACING, origin=ORIGIN, direction=np.diag([-1.0, 1.0, 1.0]))
    assert [les.side for les in find_lesions(flipped.with_array(mask), hu=flipped)] == [
        "right",
        "left",
    ]
    labels = lesion_labels(volume.with_array(mask), lesions)
    assert labels.dtype == np.uint16
    assert set(np.unique(labels)) == {0, 1, 2}
    for lesion in lesions:
        assert int((labels == lesion.id).sum()) == lesion.voxel_count
        assert labels[lesion.anchor_zyx] == lesion.id
    # A speck dropped by min_volume_mm3 stays 0; lesions of another mask are refused.
    mask[5, 0, 0] = 1
    kept = find_lesions(volume.with_array(mask), min_volume_mm3=10.0)
    assert lesion_labels(volume.with_array(mask), kept)[5, 0, 0] == 0
    with pytest.raises(InputError, match="anchor"):
        lesion_labels(volume.with_array(np.zeros_like(mask)), lesions)
