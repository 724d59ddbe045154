"""Tests for lungcad.data.preprocessing: windowing, lung mask, crop, resample, resize, slices."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pytest

from lungcad.data.lung_mask import lung_mask
from lungcad.data.preprocessing import (
    LUNG_WINDOW,
    MEDIASTINAL_WINDOW,
    crop_to_lungs,
    extract_slices,
    iter_slices,
    lung_bbox,
    resample,
    resample_mask,
    resample_to_reference,
    resize_mask,
    resize_slice,
    to_unit_range,
    window_hu,
)
from lungcad.errors import InputError
from lungcad.volume import Volume

# ------------------------------------------------------------------------------------------
# A small chest phantom, built here so these tests do not depend on lungcad.data.synthetic.


@dataclass
class Chest:
    volume: Volume
    lungs: np.ndarray
    trachea: np.ndarray
    body: np.ndarray
    nodule: np.ndarray
    table_core: np.ndarray


def make_chest(
    shape: tuple[int, int, int] = (24, 96, 96),
    spacing: tuple[float, float, float] = (5.0, 3.5, 3.5),
    seed: int = 0,
) -> Chest:
    """Elliptic body (40 HU), two ellipsoid lungs (-850 HU), a trachea tube with main bronchi
    and outside air (-1000 HU), a table with a hollow core under the body, a 16 mm nodule
    (40 HU) inside the right lung touching its lateral pleura, and Gaussian noise (20 HU)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        *[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)],
        indexing="ij",
    )
    body = (x / 150.0) ** 2 + (y / 110.0) ** 2 <= 1.0
    lungs = np.zeros(shape, dtype=bool)
    for cx in (-65.0, 65.0):
        lungs |= ((x - cx) / 50.0) ** 2 + ((y + 5.0) / 75.0) ** 2 + ((z + 10.0) / 50.0) ** 2 <= 1
    trachea = (x**2 + (y + 30.0) ** 2 <= 9.0**2) & (z > 10.0)
    # Main bronchi join the trachea to both lungs, so all air is one 3D component (as in real
    # CT) and the trachea has to be removed slice by slice.
    bronchi = (np.abs(x) <= 70.0) & ((y + 30.0) ** 2 + (z - 4.0) ** 2 <= 6.0**2)
    table = (np.abs(x) <= 160.0) & (y >= 125.0) & (y <= 150.0)
    table_core = (np.abs(x) <= 150.0) & (y >= 132.0) & (y <= 143.0)
    nodule = ((x + 107.0) ** 2 + (y + 5.0) ** 2 + (z + 10.0) ** 2 <= 8.0**2) & lungs

    hu = np.full(shape, -1000.0)
    hu[body | table] = 40.0
    hu[table_core] = -1000.0
    hu[lungs] = -850.0
    hu[trachea | bronchi] = -1000.0
    hu[nodule] = 40.0
    hu += rng.normal(0.0, 20.0, shape)
    volume = Volume(
        hu.astype(np.float32), spacing=spacing, origin=(-170.0, -160.0, -60.0), intensity="hu"
    )
    return Chest(volume, lungs & ~nodule, trachea, body, nodule, table_core)


@pytest.fixture(scope="module")
def chest() -> Chest:
    return make_chest()


@pytest.fixture(scope="module")
def chest_mask(chest: Chest) -> np.ndarray:
    return lung_mask(chest.volume)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def windowed_slice(chest: Chest, z: int) -> Volume:
    """One axial slice of the phantom as a lung-windowed display image (like a JPEG)."""
    image = window_hu(chest.volume.array[z : z + 1], *LUNG_WINDOW)
    image = np.round(image * 255.0) / 255.0  # 8-bit quantisation
    return Volume(image, spacing=chest.volume.spacing, intensity="windowed")


# ------------------------------------------------------------------------------------------
# Windowing


def test_window_edges_map_exactly() -> None:
    level, width = LUNG_WINDOW
    hu = np.array([level - width / 2, level, level + width / 2, -3000.0, 3000.0, -975.0])
    out = window_hu(hu, level, width)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:5], np.array([0.0, 0.5, 1.0, 0.0, 1.0], np.float32))
    assert out[5] == pytest.approx((-975.0 + 1350.0) / 1500.0, abs=1e-7)
    level, width = MEDIASTINAL_WINDOW
    np.testing.assert_array_equal(
        window_hu(np.array([-160.0, 40.0, 240.0]), level, width),
        np.array([0.0, 0.5, 1.0], np.float32),
    )


def test_window_keeps_shape_and_rejects_bad_width() -> None:
    hu = np.zeros((2, 3, 4), dtype=np.int16)
    assert window_hu(hu).shape == (2, 3, 4)
    with pytest.raises(InputError, match="width"):
        window_hu(hu, -600.0, 0.0)


def test_to_unit_range_windows_hu_and_passes_windowed_through(chest: Chest) -> None:
    np.testing.assert_array_equal(to_unit_range(chest.volume), window_hu(chest.volume.array))
    raw = np.array([[[-0.2, 0.3, 1.4]]], dtype=np.float32)
    out = to_unit_range(Volume(raw, intensity="windowed"))
    np.testing.assert_array_equal(out, np.array([[[0.0, 0.3, 1.0]]], np.float32))
    assert raw[0, 0, 0] == np.float32(-0.2)  # input not modified


# ------------------------------------------------------------------------------------------
# Lung mask


def test_lung_mask_matches_phantom_lungs(chest: Chest, chest_mask: np.ndarray) -> None:
    assert chest_mask.dtype == bool and chest_mask.shape == chest.volume.shape
    assert dice(chest_mask, chest.lungs | chest.nodule) > 0.9


def test_lung_mask_excludes_trachea_outside_air_and_table(
    chest: Chest, chest_mask: np.ndarray
) -> None:
    assert chest.trachea.sum() > 100
    assert not (chest_mask & chest.trachea).any()
    assert not (chest_mask & ~chest.body).any()
    assert not (chest_mask & chest.table_core).any()
    # The trachea is connected to the lungs through the bronchi: only the per-slice airway
    # rule keeps it out.
    with_airways = lung_mask(chest.volume, airway_max_area_mm2=0.0)
    assert (with_airways & chest.trachea).sum() > 0.5 * chest.trachea.sum()


def test_lung_mask_includes_juxtapleural_nodule(chest: Chest, chest_mask: np.ndarray) -> None:
    assert chest.nodule.sum() > 10
    assert chest_mask[chest.nodule].mean() > 0.95
    without_closing = lung_mask(chest.volume, closing_mm=0.0)
    assert without_closing[chest.nodule].mean() < 0.5  # the closing is what brings it in


@pytest.mark.parametrize("z", [9, 15])  # mid-lung with nodule; upper lung with trachea
def test_lung_mask_on_windowed_2d_slice(chest: Chest, z: int) -> None:
    mask = lung_mask(windowed_slice(chest, z))
    assert mask.shape == (1, 96, 96)
    truth = chest.lungs[z : z + 1] | chest.nodule[z : z + 1]
    assert dice(mask, truth) > 0.9
    assert not (mask & chest.trachea[z : z + 1]).any()
    assert not (mask & ~chest.body[z : z + 1]).any()


def test_lung_mask_windowed_slice_with_gap_in_chest_wall(chest: Chest) -> None:
    z = 9
    volume = windowed_slice(chest, z)
    # Cut a 10 mm air channel from the right lung through the chest wall to the outside, as in
    # 8-bit exports where fat between ribs is as black as air.
    y0 = 48
    volume.array[0, y0 - 1 : y0 + 2, :18] = 0.0
    mask = lung_mask(volume)
    assert dice(mask, chest.lungs[z : z + 1] | chest.nodule[z : z + 1]) > 0.85
    assert not mask[0, :, :3].any()  # the channel's outer end is still outside
    leaking = lung_mask(volume, separate_leaks=False)
    assert leaking[0, :, :48].sum() < 0.2 * mask[0, :, :48].sum()  # right lung lost without


def test_lung_mask_without_lungs_is_empty_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    soft_tissue = Volume(np.full((3, 32, 32), 40.0, np.float32), spacing=(5.0, 2.0, 2.0))
    with caplog.at_level(logging.WARNING, logger="lungcad.data.lung_mask"):
        mask = lung_mask(soft_tissue)
    assert mask.shape == (3, 32, 32) and not mask.any()
    assert "no lung found" in caplog.text
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1  # one per call for a volume, not one per slice
    air = Volume(np.full((1, 16, 16), 0.0, np.float32), intensity="windowed")
    assert not lung_mask(air).any()


def test_lung_mask_on_one_empty_slice_logs_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    # Callers loop over hundreds of 2D slices; each must not log its own warning.
    tissue = Volume(
        np.full((1, 32, 32), 0.6, np.float32), spacing=(1.0, 1.0, 1.0), intensity="windowed"
    )
    with caplog.at_level(logging.DEBUG, logger="lungcad"):
        for _ in range(3):
            assert not lung_mask(tissue).any()
        crop_to_lungs(tissue)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert sum("no lung found" in r.getMessage() for r in caplog.records) == 4  # crop too
    assert any("empty lung mask" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------
# Bounding box and crop


def test_lung_bbox_margin_in_mm_and_clipping() -> None:
    mask = np.zeros((10, 20, 30), dtype=np.uint8)
    mask[5, 10, 15] = 1
    box = lung_bbox(mask, spacing=(2.0, 1.0, 0.5), margin_mm=3.0)
    assert box == (slice(3, 8), slice(7, 14), slice(9, 22))
    mask[0, 0, 29] = 1
    assert lung_bbox(mask, (2.0, 1.0, 0.5), 3.0) == (slice(0, 8), slice(0, 14), slice(9, 30))
    empty = np.zeros((4, 5, 6), dtype=bool)
    assert lung_bbox(empty, (1.0, 1.0, 1.0)) == (slice(0, 4), slice(0, 5), slice(0, 6))


def _oblique(volume: Volume) -> Volume:
    """The same volume with a rotated, flipped direction matrix (a non-trivial geometry)."""
    angle = np.deg2rad(20.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, -1.0]]
    )
    out = volume.with_array(volume.array)
    out.direction = rotation
    return out


def test_crop_keeps_physical_positions(chest: Chest, chest_mask: np.ndarray) -> None:
    volume = _oblique(chest.volume)
    cropped, box = crop_to_lungs(volume, chest_mask, margin_mm=10.0)
    np.testing.assert_array_equal(cropped.array, volume.array[box])
    assert cropped.shape[1] < volume.shape[1] and cropped.shape[2] < volume.shape[2]
    offset = np.array([s.start for s in box])
    assert cropped.meta["crop_offset_zyx"] == offset.tolist()
    rng = np.random.default_rng(1)
    voxels = rng.integers(0, cropped.shape, size=(20, 3))
    np.testing.assert_allclose(
        cropped.index_to_physical(voxels), volume.index_to_physical(voxels + offset), atol=1e-6
    )
    # every lung voxel is inside the crop
    assert chest_mask[box].sum() == chest_mask.sum()


def test_crop_with_empty_mask_returns_whole_volume(chest: Chest) -> None:
    cropped, box = crop_to_lungs(chest.volume, np.zeros(chest.volume.shape, bool))
    assert cropped.same_geometry(chest.volume)
    assert box == tuple(slice(0, n) for n in chest.volume.shape)
    with pytest.raises(InputError, match="shape"):
        crop_to_lungs(chest.volume, np.zeros((2, 2, 2), bool))


# ------------------------------------------------------------------------------------------
# Resampling and resizing


def _ramp_volume() -> Volume:
    z, y, x = np.meshgrid(np.arange(8), np.arange(30), np.arange(41), indexing="ij")
    ramp = (2.0 * z + 0.5 * y - 0.25 * x).astype(np.float32)
    return _oblique(Volume(ramp, spacing=(3.0, 0.8, 0.7), origin=(10.0, -20.0, 5.0)))


def test_resample_keeps_extent_origin_and_direction() -> None:
    volume = _ramp_volume()
    out = resample(volume, (1.5, 2.0, None), order=1)
    assert out.spacing == (1.5, 2.0, 0.7)
    assert out.shape == (16, 12, 41)  # 8*3/1.5, round(30*0.8/2), unchanged
    old_extent = np.array(volume.shape) * np.array(volume.spacing)
    new_extent = np.array(out.shape) * np.array(out.spacing)
    assert np.all(np.abs(new_extent - old_extent) <= np.array(out.spacing) / 2 + 1e-9)
    np.testing.assert_allclose(out.origin, volume.origin)
    np.testing.assert_allclose(out.direction, volume.direction)
    assert out.array.dtype == np.float32 and out.intensity == volume.intensity
    # A linear ramp is reproduced exactly by linear interpolation at interior points:
    # new voxel (k, j, i) sits at old index (k * 0.5, j * 2.5, i).
    k, j, i = 4, 5, 7
    expected = 2.0 * (k * 0.5) + 0.5 * (j * 2.5) - 0.25 * i
    assert out.array[k, j, i] == pytest.approx(expected, abs=1e-4)


def test_resample_to_same_spacing_is_identity_and_rejects_bad_input() -> None:
    volume = _ramp_volume()
    same = resample(volume, volume.spacing)
    assert same.same_geometry(volume)
    np.testing.assert_allclose(same.array, volume.array, atol=1e-5)
    with pytest.raises(InputError):
        resample(volume, (1.0, 1.0, 0.0))
    with pytest.raises(InputError):
        resample(volume, (1.0, 1.0, 1.0), order=2)


def test_resample_mask_is_nearest_and_goes_back_to_reference(
    chest: Chest, chest_mask: np.ndarray
) -> None:
    mask_volume = chest.volume.with_array(chest_mask.astype(np.uint8))
    coarse = resample_mask(mask_volume, (10.0, 7.0, 7.0))
    assert coarse.array.dtype == np.uint8
    assert set(np.unique(coarse.array)) <= {0, 1}
    ratio = coarse.array.sum() * np.prod(coarse.spacing) / (chest_mask.sum() * 5 * 3.5 * 3.5)
    assert ratio == pytest.approx(1.0, abs=0.15)
    # Crop, then paste back onto the original grid: identical inside the crop, 0 outside.
    cropped, box = crop_to_lungs(mask_volume, chest_mask, margin_mm=5.0)
    back = resample_to_reference(cropped, chest.volume, order=0)
    assert back.same_geometry(chest.volume)
    np.testing.assert_array_equal(back.array, chest_mask.astype(np.uint8))


def test_resize_slice_and_mask() -> None:
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 30) ** 2 + (xx - 34) ** 2 <= 15**2).astype(np.uint8)
    image = disc.astype(np.float32) * 0.8 + 0.1
    small = resize_slice(image, (32, 40))
    assert small.shape == (32, 40) and small.dtype == np.float32
    assert small.min() >= 0.1 - 1e-6 and small.max() <= 0.9 + 1e-6
    np.testing.assert_array_equal(resize_slice(image, (64, 64)), image)
    for shape in [(32, 32), (128, 96)]:
        resized = resize_mask(disc, shape)
        assert resized.dtype == np.uint8 and set(np.unique(resized)) <= {0, 1}
        scale = shape[0] * shape[1] / 64**2
        assert resized.sum() / scale == pytest.approx(disc.sum(), rel=0.05)
    with pytest.raises(InputError):
        resize_slice(np.zeros((1, 8, 8)), (4, 4))


# ------------------------------------------------------------------------------------------
# Slices


def test_iter_and_extract_slices(chest: Chest, chest_mask: np.ndarray) -> None:
    slices = list(iter_slices(chest.volume, chest_mask))
    assert [i for i, _, _ in slices] == list(range(chest.volume.shape[0]))
    index, image, mask = slices[9]
    np.testing.assert_array_equal(image, chest.volume.array[9])
    np.testing.assert_array_equal(mask, chest_mask[9])
    coronal = extract_slices(chest.volume.array, axis=1, indices=[3, 50])
    assert [i for i, _, _ in coronal] == [3, 50]
    assert coronal[1][1].shape == (24, 96) and coronal[1][2] is None
    np.testing.assert_array_equal(coronal[1][1], chest.volume.array[:, 50, :])
    with pytest.raises(InputError):
        list(iter_slices(chest.volume, chest_mask[:3]))


def test_letterbox_keeps_the_aspect_ratio_and_inverts() -> None:
    from lungcad.data.preprocessing import Letterbox

    box = Letterbox.fit((512, 623), (64, 64))
    assert box.scaled_shape == (53, 64) and box.offset == (5, 0)
    image = np.ones((512, 623), np.float32)
    fitted = box.apply(image)
    assert fitted.shape == (64, 64)
    assert fitted[:5].max() == 0 and fitted[-6:].max() == 0  # padded rows, not stretched
    np.testing.assert_allclose(fitted[box.region], 1.0)
    back = box.invert(fitted)
    assert back.shape == (512, 623)
    np.testing.assert_allclose(back, 1.0, atol=1e-6)
    # A disc stays round: its height and width inside the input are equal.
    yy, xx = np.mgrid[:512, :623]
    disc = ((yy - 256) ** 2 + (xx - 300) ** 2 <= 100**2).astype(np.uint8)
    small = box.apply(disc, mask=True)
    rows, cols = np.flatnonzero(small.any(1)), np.flatnonzero(small.any(0))
    assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 1
    assert small.dtype == np.uint8
    # A square slice of the target size is untouched.
    same = Letterbox.fit((64, 64), (64, 64))
    assert same.offset == (0, 0) and same.scaled_shape == (64, 64)
    with pytest.raises(InputError):
        Letterbox.fit((0, 5), (64, 64))


def test_model_input_pads_instead_of_squashing() -> None:
    from lungcad.data.dataset import slice_to_model_input

    wide = np.full((512, 801), 0.5, np.float32)
    square = np.full((512, 512), 0.5, np.float32)
    # Squashed, both would be all 0.5 and indistinguishable apart from texture; fitted, the
    # wide image is a band of 0.5 between black bars, at the same scale as the square one.
    out_wide, out_square = slice_to_model_input(wide, 64), slice_to_model_input(square, 64)
    assert out_square.min() == pytest.approx(0.5)
    assert out_wide[0].max() == 0.0 and out_wide[32].min() == pytest.approx(0.5)


def test_lungs_of_a_soft_tissue_window_export_are_found_inside_the_body_hull() -> None:
    """8-bit exports in a soft-tissue window render fat as black as air: each lung opens to
    the outside through the chest wall, so "air not connected to the border" finds nothing.
    The fallback finds the lungs inside the body's hull and ignores the table below it."""
    yy, xx = np.mgrid[:256, :256]
    image = np.zeros((256, 256), np.float32)
    body = ((yy - 120) / 90) ** 2 + ((xx - 128) / 115) ** 2 <= 1
    image[body] = 0.7
    lungs = np.zeros((256, 256), bool)
    for cx in (80, 176):
        lungs |= ((yy - 115) / 55) ** 2 + ((xx - cx) / 35) ** 2 <= 1
    image[lungs] = 0.0
    image[(abs(yy - 115) < 12) & ((xx < 60) | (xx > 196))] = 0.0  # gaps in the lateral walls
    image[(abs(np.hypot(yy - 40, xx - 128) - 205) < 3) & (yy > 215)] = 0.9  # the table
    found = lung_mask(Volume(array=image[None], spacing=(1.0, 1.0, 1.0), intensity="windowed"))[0]
    dice = 2 * (found & lungs).sum() / (found.sum() + lungs.sum())
    assert dice > 0.9
    assert not (found & ~body).any()


def test_letterbox_at_a_physical_scale_pads_or_crops_and_inverts() -> None:
    """At one scale a small field of view is padded and a wide one centre-cropped; the
    inverse puts the model output back on the slice grid (0 where the input cropped)."""
    from lungcad.data.preprocessing import Letterbox

    small = Letterbox.at_scale((100, 80), (64, 64), 0.5)  # 50x40 in the middle of 64x64
    assert small.scaled_shape == (50, 40) and small.offset == (7, 12)
    image = np.ones((100, 80), np.float32)
    fitted = small.apply(image)
    assert fitted[small.region].min() > 0.99 and fitted.sum() == pytest.approx(50 * 40, rel=1e-3)
    np.testing.assert_allclose(small.invert(fitted), 1.0, atol=1e-6)

    wide = Letterbox.at_scale((200, 200), (64, 64), 0.5)  # 100x100, 18 px cut on each side
    assert wide.scaled_shape == (100, 100) and wide.offset == (-18, -18)
    ramp = np.tile(np.linspace(0, 1, 200, dtype=np.float32), (200, 1))
    cropped = wide.apply(ramp)
    assert cropped.shape == (64, 64)
    # The centre of the slice stays the centre of the input.
    assert cropped[:, 32].mean() == pytest.approx(ramp[:, 100].mean(), abs=0.02)
    back = wide.invert(np.ones((64, 64), np.float32))
    assert back.shape == (200, 200)
    assert back[100, 100] == pytest.approx(1.0) and back[100, 5] == 0.0 and back[5, 100] == 0.0
    with pytest.raises(InputError):
        Letterbox.at_scale((10, 10), (64, 64), 0.0)
