"""read_image / write_image / write_mask for NIfTI, MetaImage and 2D slice images."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from lungcad.errors import InputError, MissingInputError
from lungcad.io import read_image
from lungcad.io.images import read_slice_image
from lungcad.io.writers import write_image, write_mask
from lungcad.volume import Volume, orientation_code

# A non-trivial geometry: axes permuted and flipped (not LPS), non-unit spacing.
DIRECTION = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
SPACING = (2.5, 0.75, 0.5)  # z, y, x mm
ORIGIN = (10.5, -20.25, 30.0)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mhd", ".mha")


@pytest.fixture
def source_volume() -> Volume:
    hu = np.random.default_rng(0).normal(-300, 400, size=(8, 32, 32)).astype(np.float32)
    return Volume(hu, SPACING, ORIGIN, DIRECTION, "hu")


def _write_with_sitk(volume: Volume, path: Path) -> Path:
    """Write with SimpleITK directly, so reading is tested independently of our writer."""
    sitk.WriteImage(volume.to_sitk(), str(path))
    return path


@pytest.mark.parametrize("suffix", VOLUME_SUFFIXES)
def test_read_is_canonical_and_places_every_voxel_right(tmp_path, source_volume, suffix):
    path = _write_with_sitk(source_volume, tmp_path / f"ct{suffix}")
    volume = read_image(path)
    assert orientation_code(volume) == "LPS" and orientation_code(source_volume) != "LPS"
    assert volume.meta["source_orientation"] == orientation_code(source_volume)
    assert volume.meta["format"] == ("nifti" if ".nii" in suffix else "mhd")
    assert volume.intensity == "hu" and volume.array.dtype == np.float32
    assert volume.meta["warnings"] == []
    # Every sampled voxel sits at the same physical point in the file and in the Volume.
    canonical = volume.to_sitk()
    rng = np.random.default_rng(1)
    for zyx in rng.integers(0, source_volume.shape, size=(20, 3)):
        point = source_volume.index_to_physical(zyx)[0]
        x, y, z = canonical.TransformPhysicalPointToIndex(tuple(point))
        assert volume.array[z, y, x] == source_volume.array[tuple(zyx)]
    assert sorted(volume.spacing) == pytest.approx(sorted(SPACING), abs=1e-6)


@pytest.mark.parametrize("suffix", VOLUME_SUFFIXES)
def test_round_trip_is_exact_and_keeps_the_file_geometry(tmp_path, source_volume, suffix):
    original = _write_with_sitk(source_volume, tmp_path / f"in{suffix}")
    first = read_image(original)
    out = write_image(first, tmp_path / "out" / f"copy{suffix}")
    second = read_image(out)
    np.testing.assert_array_equal(second.array, first.array)
    assert second.same_geometry(first, atol=1e-6)
    on_disk, expected = sitk.ReadImage(str(out)), sitk.ReadImage(str(original))
    np.testing.assert_allclose(on_disk.GetDirection(), expected.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(on_disk.GetOrigin(), expected.GetOrigin(), atol=1e-5)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_write_mask_is_uint8_and_refuses_probabilities(tmp_path, source_volume):
    volume = read_image(_write_with_sitk(source_volume, tmp_path / "ct.nii.gz"))
    mask = volume.with_array((volume.array > 0).astype(np.float32))
    path = write_mask(mask, tmp_path / "mask.nii.gz")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkUInt8
    back = read_image(path)
    np.testing.assert_array_equal(back.array, mask.array)
    assert back.same_geometry(volume, atol=1e-6)
    with pytest.raises(InputError, match="integer labels"):
        write_mask(mask.with_array(mask.array * 0.3), tmp_path / "prob.nii.gz")
    with pytest.raises(InputError, match=r"\.png"):
        write_image(volume, tmp_path / "ct.png")


def test_windowed_looking_nifti_gets_a_warning(tmp_path, source_volume):
    unit = source_volume.with_array(np.zeros(source_volume.shape, dtype=np.float32))
    volume = read_image(_write_with_sitk(unit, tmp_path / "unit.nii.gz"))
    assert "not CT in HU" in volume.meta["warnings"][0]


# ---- bad volumes -----------------------------------------------------------------------


def test_four_d_nifti_is_refused(tmp_path):
    path = tmp_path / "dynamic.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 3), np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match=r"4D image") as info:
        read_image(path)
    assert info.value.path == str(path)


def test_multichannel_image_is_refused(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True), str(path)
    )
    with pytest.raises(InputError, match="multi-channel"):
        read_image(path)


def test_corrupt_volume_is_named(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti file" * 10)
    with pytest.raises(InputError, match="broken.nii.gz"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, source_volume, suffix):
    path = _write_with_sitk(source_volume, tmp_path / f"cut{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(InputError, match=r"truncated or corrupt NIfTI") as info:
        read_image(path)
    assert info.value.path == str(path)


def test_truncated_mhd_raw_is_refused(tmp_path, source_volume):
    path = _write_with_sitk(source_volume, tmp_path / "scan.mhd")
    raw = tmp_path / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"truncated.*declares 32768 bytes.*scan\.raw holds 1000"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels_are_refused(tmp_path, source_volume, suffix, bad):
    array = source_volume.array.copy()
    array[3, 5, 7:9] = bad
    path = _write_with_sitk(source_volume.with_array(array), tmp_path / f"nan{suffix}")
    with pytest.raises(InputError, match=r"2 of 8192 voxels are NaN or infinite") as info:
        read_image(path)
    assert info.value.path == str(path)
    all_nan = source_volume.with_array(np.full(source_volume.shape, np.nan, np.float32))
    with pytest.raises(InputError, match=r"8192 of 8192 voxels are NaN"):
        read_image(_write_with_sitk(all_nan, tmp_path / f"all_nan{suffix}"))


def test_mhd_without_its_raw_file(tmp_path, source_volume):
    path = _write_with_sitk(source_volume, tmp_path / "scan.mhd")
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(MissingInputError, match="scan.raw"):
        read_image(path)


def test_unknown_suffix_and_missing_path(tmp_path):
    odd = tmp_path / "scan.xyz"
    odd.write_text("?")
    with pytest.raises(InputError, match=r"unknown file type '\.xyz'") as info:
        read_image(odd)
    assert info.value.path == str(odd)
    with pytest.raises(MissingInputError, match="nothing.nii"):
        read_image(tmp_path / "nothing.nii")
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    with pytest.raises(InputError, match="series_uid"):
        read_image(png, series_uid="1.2.3")


# ---- 2D images ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_eight_bit_slice(tmp_path, suffix):
    pixels = np.random.default_rng(2).integers(0, 256, size=(20, 24), dtype=np.uint8)
    path = tmp_path / f"slice{suffix}"
    Image.fromarray(pixels).save(path)
    volume = read_image(path)
    assert volume.shape == (1, 20, 24) and volume.intensity == "windowed"
    assert volume.meta["bit_depth"] == 8 and volume.meta["format"] == "image"
    np.testing.assert_array_equal(volume.array[0], pixels.astype(np.float32) / 255.0)
    assert volume.spacing == (1.0, 1.0, 1.0) and volume.meta["spacing_known"] is False


def test_sixteen_bit_png(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 65536, size=(16, 12), dtype=np.uint16)
    path = tmp_path / "patch.png"
    Image.fromarray(pixels).save(path)
    volume = read_image(path)
    assert volume.meta["bit_depth"] == 16
    np.testing.assert_array_equal(volume.array[0], pixels.astype(np.float32) / 65535.0)


def test_jpeg_and_colour_slices(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    jpeg = tmp_path / "slice.jpg"
    Image.fromarray(ramp).save(jpeg, quality=95)
    np.testing.assert_allclose(read_slice_image(jpeg), ramp / 255.0, atol=0.03)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    path = tmp_path / "red.png"
    Image.fromarray(rgb).save(path)
    volume = read_image(path)
    np.testing.assert_allclose(volume.array, 0.299, atol=1e-6)
    assert "colour image" in volume.meta["warnings"][0]
    grey_rgb = np.repeat(ramp[..., None], 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "grey.png")
    np.testing.assert_allclose(read_slice_image(tmp_path / "grey.png"), ramp / 255.0, atol=1e-6)


def test_mask_png_gives_exact_zero_one(tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[3:6, 2:8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_slice_image(tmp_path / "mask.png"), mask / 255)


def test_bad_slice_images(tmp_path):
    pages = [Image.fromarray(np.full((6, 6), v, np.uint8)) for v in (0, 100, 200)]
    stack = tmp_path / "stack.tif"
    pages[0].save(stack, save_all=True, append_images=pages[1:])
    with pytest.raises(InputError, match="3 frames"):
        read_image(stack)
    truncated = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(InputError, match="cut.png"):
        read_slice_image(truncated)
    with pytest.raises(MissingInputError, match="gone.png"):
        read_slice_image(tmp_path / "gone.png")


# ---- damaged headers: refused, never read with made-up geometry or values -----------------


def _patched_nifti(path: Path, source_volume: Volume, **fields: float) -> Path:
    """A NIfTI whose header fields are overwritten after writing (as damage would)."""
    import struct

    _write_with_sitk(source_volume, path)
    data = bytearray(path.read_bytes())
    offsets = {"pixdim1": 80, "pixdim2": 84, "pixdim3": 88, "scl_slope": 112, "scl_inter": 116}
    for name, value in fields.items():
        struct.pack_into("<f", data, offsets[name], value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pixdim1": 0.0, "pixdim2": 0.0, "pixdim3": 0.0}, r"voxel size \(pixdim\).*zero"),
        ({"pixdim2": float("nan")}, r"voxel size \(pixdim\).*not finite"),
        ({"scl_slope": float("inf")}, r"value scaling \(scl_slope inf"),
        ({"scl_slope": 2.0, "scl_inter": float("-inf")}, r"value scaling"),
    ],
)
def test_nifti_with_damaged_geometry_or_scaling_is_refused(
    tmp_path, source_volume, fields, message
):
    # SimpleITK silently reads a zero or NaN pixdim as 1 mm and ignores an infinite slope.
    path = _patched_nifti(tmp_path / "bad.nii", source_volume, **fields)
    with pytest.raises(InputError, match=message) as info:
        read_image(path)
    assert info.value.path == str(path)


def _mhd(folder: Path, **fields: str) -> Path:
    """A 4x16x16 MET_SHORT MetaImage in ``folder`` (``ct.mhd`` + ``ct.raw``), fields replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    header = {
        "ObjectType": "Image",
        "NDims": "3",
        "BinaryData": "True",
        "CompressedData": "False",
        "Offset": "0 0 0",
        "ElementSpacing": "0.8 0.8 2.5",
        "DimSize": "16 16 4",
        "ElementType": "MET_SHORT",
        "ElementDataFile": "ct.raw",
        **fields,
    }
    data = header.pop("ElementDataFile")
    text = "".join(f"{k} = {v}\n" for k, v in header.items()) + f"ElementDataFile = {data}\n"
    (folder / "ct.mhd").write_text(text)
    raw = np.random.default_rng(0).integers(-1000, 400, 16 * 16 * 4).astype("<i2").tobytes()
    (folder / "ct.raw").write_bytes(raw)
    return folder / "ct.mhd"


def test_metaimage_data_file_must_lie_beside_its_header(tmp_path):
    """``ElementDataFile = ../../etc/hostname`` used to be followed and read."""
    outside = tmp_path / "secret.raw"
    outside.write_bytes(b"\0" * 2048)  # the right size: only the path check refuses it
    for name in ("../secret.raw", str(outside), "sub/ct.raw"):
        path = _mhd(tmp_path / "case", ElementDataFile=name)
        with pytest.raises(InputError, match="must lie beside its header") as info:
            read_image(path)
        assert info.value.path == str(path)
    assert read_image(_mhd(tmp_path / "good")).shape == (4, 16, 16)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ElementSpacing": "nan 1 1"}, r"ElementSpacing is 'nan 1 1'"),
        ({"ElementSpacing": "-1 1 1"}, r"ElementSpacing '-1 1 1' mm is not positive"),
        ({"Offset": ""}, r"Offset is ''"),  # SimpleITK then ignored the spacing: 1 mm
        ({"DimSize": "16 16 4 2"}, r"DimSize is '16 16 4 2'"),
        ({"NDims": "-1"}, r"NDims is '-1'"),  # SimpleITK crashed (segmentation fault)
        ({"ElementDataFile": "LIST"}, r"several files is not supported"),
        ({"CompressedData": "True", "DimSize": "4096 4096 60"}, r"compressed bytes"),
    ],
)
def test_metaimage_with_a_damaged_header_is_refused(tmp_path, fields, message):
    path = _mhd(tmp_path, **fields)
    with pytest.raises(InputError, match=message) as info:
        read_image(path)
    assert info.value.path == str(path)
