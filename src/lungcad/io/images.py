"""Read 2D slice images (PNG, JPEG, BMP, TIFF) as windowed intensities in [0, 1].

Such images are display renderings, not HU: 8-bit values are divided by 255 and 16-bit values
by 65535, colour is turned to grey (ITU-R 601 luma), and the result is marked
``intensity="windowed"``. Their pixel size is unknown, so spacing is 1 mm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lungcad.errors import InputError, MissingInputError
from lungcad.volume import Volume

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's "L"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_unit(image: Image.Image, path: Path) -> tuple[np.ndarray, int, list[str]]:
    """(H, W) float32 in [0, 1], bit depth and warnings for one decoded Pillow image."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32), 1, []
    if mode in ("L", "LA"):
        return np.asarray(image.getchannel("L"), dtype=np.float32) / 255.0, 8, []
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.float32) / 65535.0, 16, []
    if mode == "I":  # 32-bit integers: 16-bit data from some encoders lands here
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise InputError(
                f"32-bit integer image with values {values.min()}..{values.max()}; expected an "
                "8- or 16-bit greyscale slice. Save it as 16-bit PNG, or as NIfTI if it is HU.",
                path,
            )
        return values.astype(np.float32) / 65535.0, 16, []
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if values.min() < 0 or values.max() > 1:
            raise InputError(
                f"floating-point image with values {values.min():g}..{values.max():g}; a float "
                "slice must already be windowed to [0, 1]. Save HU data as NIfTI instead.",
                path,
            )
        return values, 32, []
    # Palette, RGB(A), CMYK, YCbCr...: grey from the RGB channels, alpha ignored.
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    warnings = []
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
        warnings.append(f"colour image ({mode}) converted to grey; CT slices are expected grey.")
    return np.clip(rgb @ _LUMA / 255.0, 0.0, 1.0), 8, warnings


def _read(path: str | Path) -> tuple[np.ndarray, int, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError("image file not found.", path)
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise InputError(
                    f"the image holds {frames} frames/pages; expected one 2D slice per file. "
                    "Save each slice as its own file, or the volume as NIfTI.",
                    path,
                )
            # Honour an EXIF orientation tag so the slice is the right way up.
            upright = ImageOps.exif_transpose(image)
            upright.load()
            return _to_unit(upright, path)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(
            f"cannot decode this image ({exc}); the file is corrupt, truncated or not a "
            "PNG/JPEG/BMP/TIFF image. Re-export it.",
            path,
        ) from exc


def read_slice_image(path: str | Path) -> np.ndarray:
    """Read one 2D image file as grey intensities in [0, 1].

    Args:
        path: PNG, JPEG, BMP or TIFF file; 1-, 8- or 16-bit, grey or colour.

    Returns:
        (H, W) float32 in [0, 1]: 8-bit values / 255, 16-bit / 65535, colour -> luma. A 0/255
        mask gives exactly 0.0 and 1.0.

    Raises:
        MissingInputError: the file does not exist.
        InputError: undecodable files, multi-frame files, values outside 8/16 bits.
    """
    return _read(path)[0]


def read_slice_volume(path: str | Path) -> Volume:
    """Read one 2D image file as a one-slice windowed Volume.

    Args:
        path: PNG, JPEG, BMP or TIFF file.

    Returns:
        Volume with ``array`` (1, H, W) float32 in [0, 1], ``intensity="windowed"``, spacing
        (1, 1, 1) mm (unknown; ``meta["spacing_known"]`` is False), identity direction (row 0
        anterior, column 0 the patient's right, as axial slices are displayed). ``meta``
        holds source_path, format ("image"), bit_depth, warnings, source_orientation.

    Raises:
        MissingInputError: the file does not exist.
        InputError: undecodable files, multi-frame files, values outside 8/16 bits.
    """
    array, bit_depth, warnings = _read(path)
    return Volume(
        array=array[None],
        intensity="windowed",
        meta={
            "source_path": str(path),
            "format": "image",
            "bit_depth": bit_depth,
            "spacing_known": False,
            "warnings": warnings,
            "source_orientation": "LPS",
        },
    )


def load_slice_array(path: str | Path, sample_id: str, what: str) -> np.ndarray:
    """A prepared slice's 2D ``.npy`` (image or mask), checked.

    The one reader of the slice files ``lungcad prepare`` writes, shared by training
    (``datasets.SliceDataset``), evaluation and the baselines' feature extraction. It lives
    here, not in :mod:`lungcad.data.dataset`, so feature-extraction workers need not import torch.

    Args:
        path: the ``.npy`` file (manifest folder / the record's ``image_path`` or
            ``mask_path``).
        sample_id: the record's ``sample_id`` (named in error messages).
        what: ``"image"`` or ``"mask"`` (named in error messages).

    Returns:
        The ``(H, W)`` array as stored (dtype unchanged).

    Raises:
        MissingInputError: the file is missing.
        InputError: it is not a 2D array.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"{what} of sample {sample_id!r} not found; was the prepared folder moved without "
            "its slices/ folder? Re-run `lungcad prepare` or check the manifest's folder.",
            path,
        )
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2:
        raise InputError(f"{what} must be a 2D (H, W) array; got shape {array.shape}", path)
    return array
