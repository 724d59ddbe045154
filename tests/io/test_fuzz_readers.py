"""Fuzzing the readers: mutated DICOM, NIfTI, MetaImage and PNG files, headers and bytes.

Property: :func:`lungcad.io.read_image` on any mutation of a valid file either refuses it with
a clean error naming the file (``InputError`` / ``MissingInputError``) or returns a valid
Volume (finite positive spacing, every axis at least 1, finite float32 values). No other
exception, no hang (hypothesis' per-example deadline) and bounded memory (a header that
declares a huge image is refused before anything is allocated; the peak RSS of the whole run
is checked).

Examples are derandomised, so a run is repeatable; the ``ci`` profile (``CI=true``) runs
more of them. ``LUNGCAD_FUZZ_EXAMPLES=N`` sets the number and draws new random examples, to
explore further locally.
"""

from __future__ import annotations

import io
import os
import resource
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from lungcad.errors import InputError, MissingInputError
from lungcad.io import read_image
from lungcad.volume import Volume

# Measured on 2 shared CPU cores: 100 examples per test take about 20 s for the whole file,
# 400 take 69 s.
_DEFAULT_EXAMPLES = {"dev": 100, "ci": 300}
for _name, _examples in _DEFAULT_EXAMPLES.items():
    settings.register_profile(
        f"lungcad-fuzz-{_name}",
        max_examples=int(os.environ.get("LUNGCAD_FUZZ_EXAMPLES", _examples)),
        deadline=10_000,  # ms per example (a loaded CI machine): a reader that hangs fails here
        derandomize="LUNGCAD_FUZZ_EXAMPLES" not in os.environ,  # exploring: new examples
        database=None,  # nothing written into the tree
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
FUZZ = settings.get_profile(
    "lungcad-fuzz-ci" if os.environ.get("CI", "").lower() == "true" else "lungcad-fuzz-dev"
)
#: The whole file may raise the process' peak RSS by at most this (MB): small inputs, so only
#: a reader that allocates what a mutated header declares gets near it.
RSS_BUDGET_MB = 600

# Damaged files make pydicom and numpy warn as they read them; the property is what counts.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: The process' peak RSS when this file's first test starts (set by the fixture below, not at
#: import: in a whole-suite run every module is imported before any test runs, and the tests
#: of other files before this one raise the peak on their own).
_START_RSS_MB: list[float] = []


@pytest.fixture(autouse=True, scope="module")
def _peak_before_fuzzing() -> None:
    _START_RSS_MB.append(_peak_rss_mb())


def _fresh(tmp_path: Path) -> Path:
    """A new folder per example (hypothesis runs every example in one test call)."""
    return Path(tempfile.mkdtemp(dir=tmp_path))


def _check(path: Path) -> None:
    """The property: a clean refusal naming the file, or a valid Volume."""
    try:
        volume = read_image(path)
    except (InputError, MissingInputError) as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(exc)
        assert exc.path is not None, f"the error names no file: {exc}"
        return
    assert isinstance(volume, Volume)
    assert all(np.isfinite(s) and s > 0 for s in volume.spacing), volume.spacing
    assert all(np.isfinite(o) for o in volume.origin), volume.origin
    assert np.all(np.isfinite(volume.direction)), volume.direction
    assert volume.array.ndim == 3 and min(volume.array.shape) >= 1, volume.array.shape
    assert volume.array.dtype == np.float32
    assert np.isfinite(volume.array).all(), "non-finite voxel values"


# ---- byte-level mutations (any format) ---------------------------------------------------

_byte_edit = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("set"), st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True), st.just(b"")),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
)


def _mutate_bytes(data: bytes, edits: list, head: int | None = None) -> bytes:
    """Apply byte edits at relative positions (within the first ``head`` bytes when given:
    most of a file is pixels, and a header edit finds more bugs)."""
    out = bytearray(data)
    for kind, where, value in edits:
        span = min(len(out), head) if head else len(out)
        if span == 0:
            break
        i = int(where * span)
        if kind == "flip":
            out[i] ^= value
        elif kind == "set":
            out[i : i + len(value)] = value
        elif kind == "cut":
            del out[i:]
        else:
            out[i:i] = value
    return bytes(out)


# ---- NIfTI ---------------------------------------------------------------------------------


def _nifti_bytes() -> bytes:
    array = np.random.default_rng(0).integers(-1000, 400, (16, 16, 4)).astype(np.int16)
    image = nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0]))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    return image.to_bytes()


_NIFTI = _nifti_bytes()
# Header fields (offset, struct format) that describe geometry and values.
_NIFTI_FIELDS = {
    "dim": (40, "<8h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "quatern": (256, "<6f"),
    "srow": (280, "<12f"),
}
_special_floats = st.sampled_from([0.0, -0.0, -1.0, 1e-30, 1e30, 3.4e38, np.nan, np.inf, -np.inf])
_f32 = st.one_of(_special_floats, st.floats(width=32, allow_nan=True, allow_infinity=True))
_i16 = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 4, 5, 7, 8, 32767, -32768]), st.integers(-32768, 32767)
)


@st.composite
def _nifti_header_edit(draw) -> tuple[str, tuple]:
    name = draw(st.sampled_from(sorted(_NIFTI_FIELDS)))
    offset, fmt = _NIFTI_FIELDS[name]
    n = struct.calcsize(fmt) // struct.calcsize("<" + fmt[-1])
    values = struct.unpack_from(fmt, _NIFTI, offset)
    i = draw(st.integers(0, n - 1))
    new = draw(_f32 if fmt[-1] == "f" else _i16)
    return name, values[:i] + (new,) + values[i + 1 :]


def _set_nifti_field(data: bytes, name: str, values: tuple) -> bytes:
    offset, fmt = _NIFTI_FIELDS[name]
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


@FUZZ
@given(edits=st.lists(_nifti_header_edit(), min_size=1, max_size=3))
def test_nifti_header_mutations(tmp_path: Path, edits) -> None:
    data = _NIFTI
    for name, values in edits:
        data = _set_nifti_field(data, name, values)
    path = _fresh(tmp_path) / "fuzz.nii"
    path.write_bytes(data)
    _check(path)


@FUZZ
@given(edits=st.lists(_byte_edit, min_size=1, max_size=4), gz=st.booleans())
def test_nifti_byte_mutations(tmp_path: Path, edits, gz: bool) -> None:
    import gzip

    data = _mutate_bytes(_NIFTI, edits, head=352)
    path = _fresh(tmp_path) / ("fuzz.nii.gz" if gz else "fuzz.nii")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    _check(path)


# ---- MetaImage -----------------------------------------------------------------------------

_MHD_FIELDS = {
    "ObjectType": "Image",
    "NDims": "3",
    "BinaryData": "True",
    "BinaryDataByteOrderMSB": "False",
    "CompressedData": "False",
    "TransformMatrix": "1 0 0 0 1 0 0 0 1",
    "Offset": "-10 20.5 30",
    "ElementSpacing": "0.8 0.8 2.5",
    "DimSize": "16 16 4",
    "ElementType": "MET_SHORT",
    "ElementDataFile": "ct.raw",
}
_RAW = np.random.default_rng(1).integers(-1000, 400, (4, 16, 16)).astype("<i2").tobytes()
_mhd_values = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "nan",
            "inf",
            "nan 1 1",
            "0 1 1",
            "-1 1 1",
            "1e308 1 1",
            "1 1",
            "1 1 1 1",
            "16 16 4 2",
            "100000 100000 100000",
            "4294967296 1 1",
            "MET_FLOAT",
            "MET_DOUBLE",
            "MET_UCHAR",
            "MET_OTHER",
            "True",
            "LOCAL",
            "LIST",
            "ct%d.raw 1 2 1",
            "../ct.raw",
            "../outside.raw",
            "/etc/hostname",
            "sub/ct.raw",
            "missing.raw",
            "1 0 0 0 0 0 0 0 1",
            "nan 0 0 0 1 0 0 0 1",
        ]
    ),
    st.text(alphabet="0123456789.-e ", max_size=12),
)


@FUZZ
@given(
    edits=st.dictionaries(
        st.sampled_from(sorted(_MHD_FIELDS)), _mhd_values, min_size=1, max_size=3
    ),
    raw_edits=st.lists(_byte_edit, max_size=2),
)
def test_metaimage_header_mutations(tmp_path: Path, edits, raw_edits) -> None:
    base = _fresh(tmp_path)
    folder = base / "case"
    folder.mkdir()
    # A decoy of the right size outside the folder: a header pointing there must be refused,
    # not read (it would otherwise pass the size check).
    (base / "outside.raw").write_bytes(_RAW)
    fields = {**_MHD_FIELDS, **edits}
    header = "".join(f"{k} = {v}\n" for k, v in fields.items() if k != "ElementDataFile")
    header += f"ElementDataFile = {fields['ElementDataFile']}\n"  # must come last
    (folder / "ct.mhd").write_text(header, encoding="latin-1")
    (folder / "ct.raw").write_bytes(_mutate_bytes(_RAW, raw_edits))
    _check(folder / "ct.mhd")
    if "outside" in fields["ElementDataFile"] or fields["ElementDataFile"].startswith("/"):
        with pytest.raises(InputError, match="beside"):
            read_image(folder / "ct.mhd")


def _mha_bytes() -> bytes:
    header = "".join(
        f"{k} = {v}\n" for k, v in _MHD_FIELDS.items() if k != "ElementDataFile"
    ).encode()
    return header + b"ElementDataFile = LOCAL\n" + _RAW


_MHA = _mha_bytes()


@FUZZ
@given(edits=st.lists(_byte_edit, min_size=1, max_size=4))
def test_mha_byte_mutations(tmp_path: Path, edits) -> None:
    path = _fresh(tmp_path) / "fuzz.mha"
    path.write_bytes(_mutate_bytes(_MHA, edits, head=_MHA.index(b"LOCAL") + 6))
    _check(path)


# ---- PNG -----------------------------------------------------------------------------------


def _png_bytes(mode: str = "L", size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(2)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size[::-1]).astype(np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, size[::-1]).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@FUZZ
@given(
    mode=st.sampled_from(["L", "RGB", "RGBA", "P", "1", "LA", "I;16"]),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    edits=st.lists(_byte_edit, max_size=3),
)
def test_png_mutations(tmp_path: Path, mode: str, size, edits) -> None:
    path = _fresh(tmp_path) / "fuzz.png"
    path.write_bytes(_mutate_bytes(_png_bytes(mode, size), edits, head=64))
    _check(path)


# ---- DICOM ---------------------------------------------------------------------------------

_DICOM_SLICES = 3


def _dicom_dataset(k: int, series_uid: str) -> Dataset:
    pixels = np.random.default_rng(k).integers(-1000, 400, (12, 10)).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{100 + k}"  # fixed: same bytes
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "FUZZ"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.10"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.11"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = ["-10", "20", f"{2.5 * k:g}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["0.8", "0.7"]
    ds.SliceThickness = "2.5"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    ds.PixelData = pixels.tobytes()
    return ds


_DS_VALUES = st.one_of(
    st.sampled_from(
        ["", "0", "-0", "-1", "nan", "NaN", "inf", "-inf", "1e308", "1e-320", "abc", "1\\2\\3\\4"]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: f"{f:.6g}"),
)
_US_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 7, 8, 12, 16, 32, 64, 65535]), st.integers(0, 65535)
)
#: element keyword -> values to set (a list for multi-valued elements).
_DICOM_EDITS: dict[str, st.SearchStrategy] = {
    "PixelSpacing": st.lists(_DS_VALUES, min_size=1, max_size=3),
    "ImagePositionPatient": st.lists(_DS_VALUES, min_size=2, max_size=4),
    "ImageOrientationPatient": st.lists(_DS_VALUES, min_size=5, max_size=7),
    "RescaleSlope": _DS_VALUES,
    "RescaleIntercept": _DS_VALUES,
    "SliceThickness": _DS_VALUES,
    "Rows": _US_VALUES,
    "Columns": _US_VALUES,
    "BitsAllocated": _US_VALUES,
    "BitsStored": _US_VALUES,
    "HighBit": _US_VALUES,
    "PixelRepresentation": st.sampled_from([0, 1, 2]),
    "SamplesPerPixel": st.sampled_from([0, 1, 3, 4]),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "RGB", "PALETTE COLOR", "", "X"]),
    "NumberOfFrames": st.sampled_from(["0", "1", "2", "-1", "abc", "99999"]),
    "Modality": st.sampled_from(["", "MR", "ct", "SEG"]),
    "SeriesInstanceUID": st.sampled_from(["", "1.2.3"]),
}


@st.composite
def _dicom_edit(draw) -> tuple[int, str, object]:
    slice_index = draw(st.integers(0, _DICOM_SLICES - 1))
    keyword = draw(st.sampled_from(sorted(_DICOM_EDITS)))
    value = draw(st.one_of(st.just(None), _DICOM_EDITS[keyword]))  # None: delete it
    return slice_index, keyword, value


def _set_raw(ds: Dataset, keyword: str, value: str | list[str]) -> None:
    """Store a text value as the raw bytes a damaged file would hold (no pydicom checks)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    text = "\\".join(value) if isinstance(value, list) else value
    data = text.encode("latin-1", "replace")
    data += b" " * (len(data) % 2)  # DICOM values have even length
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(data), data, 0, False, True)


def _write_dicom(folder: Path, edit: Callable[[int, Dataset], None]) -> None:
    folder.mkdir()
    series_uid = "1.2.826.0.1.3680043.8.498.12"
    with pydicom.config.disable_value_validation():
        for k in range(_DICOM_SLICES):
            ds = _dicom_dataset(k, series_uid)
            edit(k, ds)
            ds["PixelData"].VR = "OW"  # explicit, so deleting BitsAllocated still writes
            ds.save_as(folder / f"s{k}.dcm", enforce_file_format=False)


@FUZZ
@given(edits=st.lists(_dicom_edit(), min_size=1, max_size=3))
def test_dicom_header_mutations(tmp_path: Path, edits) -> None:
    def edit(k: int, ds: Dataset) -> None:
        for index, keyword, value in edits:
            if index != k:
                continue
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            elif isinstance(value, int):
                setattr(ds, keyword, value)
            else:
                _set_raw(ds, keyword, value)

    folder = _fresh(tmp_path) / "series"
    _write_dicom(folder, edit)
    _check(folder)


@FUZZ
@given(
    slice_index=st.integers(0, _DICOM_SLICES - 1),
    edits=st.lists(_byte_edit, min_size=1, max_size=3),
)
def test_dicom_byte_mutations(tmp_path: Path, slice_index: int, edits) -> None:
    folder = _fresh(tmp_path) / "series"
    _write_dicom(folder, lambda k, ds: None)
    target = folder / f"s{slice_index}.dcm"
    data = target.read_bytes()
    target.write_bytes(_mutate_bytes(data, edits, head=len(data) - 240))  # mostly the header
    _check(folder)


def test_memory_stayed_bounded() -> None:
    """Runs after the fuzz tests of this file (pytest keeps file order): no mutated header
    made a reader allocate what it declared."""
    peak_mb, start_mb = _peak_rss_mb(), _START_RSS_MB[0]
    assert peak_mb - start_mb < RSS_BUDGET_MB, (peak_mb, start_mb)
