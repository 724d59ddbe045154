"""Preprocessing: plain functions on arrays and Volumes (one version of each).

* Windowing: :func:`window_hu` maps Hounsfield units to [0, 1]; :func:`to_unit_range` does the
  same for a Volume and passes already-windowed images through.
* Lung mask: :func:`lung_mask` (from :mod:`lungcad.data.lung_mask`, re-exported here) is a
  classical threshold-and-morphology segmentation for 3D HU volumes and single windowed 2D
  slices (JPEG/PNG, ``z = 1``).
* Geometry: :func:`lung_bbox` / :func:`crop_to_lungs` crop with a margin in mm and keep the
  crop in the same physical place; :func:`resample`, :func:`resample_mask` and
  :func:`resample_to_reference` resample with SimpleITK (physical geometry exact);
  :func:`resize_slice` / :func:`resize_mask` resize 2D arrays to a model's input size.
* Slices: :func:`iter_slices` / :func:`extract_slices` walk a volume (and its mask) slice by slice.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.transform import resize as _sk_resize

from lungcad.data.lung_mask import lung_mask
from lungcad.errors import InputError
from lungcad.volume import Volume

__all__ = [
    "LUNG_WINDOW",
    "MEDIASTINAL_WINDOW",
    "crop_to_lungs",
    "extract_slices",
    "iter_slices",
    "lung_bbox",
    "resample",
    "resample_mask",
    "resample_to_reference",
    "resize_mask",
    "resize_slice",
    "to_unit_range",
    "window_hu",
]

log = logging.getLogger(__name__)

#: (level, width) in HU of the usual lung window: [-1350, 150] HU -> [0, 1].
LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
#: (level, width) in HU of the usual mediastinal (soft-tissue) window: [-160, 240] HU -> [0, 1].
MEDIASTINAL_WINDOW: tuple[float, float] = (40.0, 400.0)

_INTERPOLATORS = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}


# --------------------------------------------------------------------------------------------
# Windowing


def window_hu(
    hu: np.ndarray, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]
) -> np.ndarray:
    """Map HU to [0, 1] through a display window.

    ``level - width / 2`` maps to 0, ``level`` to 0.5 and ``level + width / 2`` to 1; values
    outside the window are clipped.

    Args:
        hu: array of any shape in Hounsfield units.
        level: window centre in HU.
        width: window width in HU (> 0).

    Returns:
        float32 array of the same shape with values in [0, 1].
    """
    if not width > 0:
        raise InputError(f"window width must be > 0 HU; got {width}. Use e.g. {LUNG_WINDOW}.")
    low = float(level) - float(width) / 2.0
    # float64 arithmetic so the window edges map to exactly 0 and 1.
    out = (np.asarray(hu, dtype=np.float64) - low) / float(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_unit_range(
    volume: Volume, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]
) -> np.ndarray:
    """A Volume's intensities in [0, 1]: HU are windowed, windowed images are clipped.

    Args:
        volume: a Volume with ``intensity`` ``"hu"`` or ``"windowed"``.
        level: window centre in HU (used for HU volumes only).
        width: window width in HU (used for HU volumes only).

    Returns:
        ``(z, y, x)`` float32 array in [0, 1] (a new array; the volume is not changed).
    """
    if volume.intensity == "hu":
        return window_hu(volume.array, level, width)
    # A display image is already windowed by whoever exported it; its window is unknown.
    return np.clip(volume.array, 0.0, 1.0).astype(np.float32, copy=True)


# --------------------------------------------------------------------------------------------
# Cropping


def lung_bbox(
    mask: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    margin_mm: float = 10.0,
) -> tuple[slice, slice, slice]:
    """Bounding box of a mask, grown by a margin in mm and clipped to the array.

    Args:
        mask: ``(z, y, x)`` array, non-zero = inside.
        spacing: ``(z, y, x)`` voxel size in mm.
        margin_mm: margin added on every side (mm; rounded up to whole voxels).

    Returns:
        ``(z, y, x)`` slices; the whole array when the mask is empty.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(f"lung_bbox needs a (z, y, x) mask; got shape {mask.shape}")
    if margin_mm < 0:
        raise InputError(f"margin_mm must be >= 0; got {margin_mm}")
    boxes = ndi.find_objects((mask != 0).astype(np.uint8))
    if not boxes or boxes[0] is None:
        return tuple(slice(0, n) for n in mask.shape)  # type: ignore[return-value]
    out = []
    for axis_slice, size, step in zip(boxes[0], mask.shape, spacing, strict=True):
        margin = int(math.ceil(margin_mm / float(step) - 1e-9))
        out.append(slice(max(axis_slice.start - margin, 0), min(axis_slice.stop + margin, size)))
    return tuple(out)  # type: ignore[return-value]


def crop_to_lungs(
    volume: Volume, mask: np.ndarray | Volume | None = None, margin_mm: float = 10.0
) -> tuple[Volume, tuple[slice, slice, slice]]:
    """Crop a volume to its lungs (plus a margin), keeping its physical position.

    Args:
        volume: the Volume to crop.
        mask: ``(z, y, x)`` lung mask on the volume's grid; computed with :func:`lung_mask`
            when None.
        margin_mm: margin around the mask's bounding box (mm).

    Returns:
        ``(cropped, slices)``: the cropped Volume, whose origin is moved so every voxel keeps
        its LPS position (``meta["crop_offset_zyx"]`` and ``meta["crop_source_shape"]`` record
        the crop), and the ``(z, y, x)`` slices into the original array. An empty mask gives
        the whole volume.
    """
    if mask is None:
        mask = lung_mask(volume)
    mask_array = mask.array if isinstance(mask, Volume) else np.asarray(mask)
    if mask_array.shape != volume.shape:
        raise InputError(
            f"lung mask shape {mask_array.shape} does not match the volume's {volume.shape}; "
            "pass a mask on the volume's own grid (see resample_to_reference)"
        )
    if not mask_array.any():  # DEBUG for one slice: per-slice loops would flood the log
        level = logging.DEBUG if volume.shape[0] == 1 else logging.WARNING
        log.log(level, "crop_to_lungs: empty lung mask; keeping the whole volume")
    box = lung_bbox(mask_array, volume.spacing, margin_mm)
    offset = np.array([s.start for s in box], dtype=np.float64)
    meta = copy.deepcopy(volume.meta)
    meta["crop_offset_zyx"] = [int(o) for o in offset]
    meta["crop_source_shape"] = [int(n) for n in volume.shape]
    cropped = Volume(
        array=np.ascontiguousarray(volume.array[box]),
        spacing=volume.spacing,
        origin=tuple(volume.index_to_physical(offset)[0]),
        direction=volume.direction.copy(),
        intensity=volume.intensity,
        meta=meta,
    )
    return cropped, box


# --------------------------------------------------------------------------------------------
# Resampling and resizing


def resample(volume: Volume, spacing_zyx: Sequence[float | None], order: int = 1) -> Volume:
    """Resample to a new voxel size with SimpleITK; the physical extent is kept.

    The origin (centre of voxel 0) and direction stay the same; the new size is
    ``round(size * old_spacing / new_spacing)`` per axis (at least 1), so the extent differs from
    the old one by less than half a new voxel. Points past the last input voxel take the
    volume's minimum (air for CT).

    Args:
        volume: the Volume to resample.
        spacing_zyx: new ``(z, y, x)`` voxel size in mm; ``None`` keeps an axis as it is
            (e.g. ``(None, 1.0, 1.0)`` for in-plane only).
        order: interpolation order: 0 nearest, 1 linear, 3 B-spline.

    Returns:
        A new Volume (meta copied) with the requested spacing.
    """
    if order not in _INTERPOLATORS:
        raise InputError(f"resample order must be one of {sorted(_INTERPOLATORS)}; got {order}")
    if len(spacing_zyx) != 3:
        raise InputError(f"spacing_zyx needs 3 values (z, y, x) in mm; got {spacing_zyx}")
    new_spacing = [
        float(old) if new is None else float(new)
        for new, old in zip(spacing_zyx, volume.spacing, strict=True)
    ]
    if any(s <= 0 for s in new_spacing):
        raise InputError(f"spacing_zyx must be positive (mm); got {spacing_zyx}")
    new_size_zyx = [
        max(1, int(round(n * old / new)))
        for n, old, new in zip(volume.shape, volume.spacing, new_spacing, strict=True)
    ]
    source = _to_sitk(volume.array, volume)
    default = float(volume.array.min()) if volume.array.size else 0.0
    image = sitk.Resample(
        source,
        [int(n) for n in new_size_zyx[::-1]],
        sitk.Transform(),
        _INTERPOLATORS[order],
        source.GetOrigin(),
        tuple(new_spacing[::-1]),
        source.GetDirection(),
        default,
        source.GetPixelID(),
    )
    return _from_sitk(image, volume)


def resample_mask(mask_volume: Volume, spacing_zyx: Sequence[float | None]) -> Volume:
    """Resample a label/mask Volume with nearest-neighbour interpolation (labels stay labels).

    Args:
        mask_volume: Volume whose array holds labels (0/1 or small integers).
        spacing_zyx: new ``(z, y, x)`` voxel size in mm (``None`` keeps an axis).

    Returns:
        A new Volume with the same dtype as the input array.
    """
    return resample(mask_volume, spacing_zyx, order=0)


def resample_to_reference(
    moving: Volume, reference: Volume, order: int = 0, default_value: float = 0.0
) -> Volume:
    """Resample ``moving`` onto ``reference``'s grid (shape, spacing, origin, direction).

    Use it to put a mask computed on a cropped/resampled volume back on the original grid.

    Args:
        moving: the Volume to resample (e.g. a mask on a cropped, resampled grid).
        reference: the Volume whose grid the result takes.
        order: interpolation order: 0 nearest (masks), 1 linear, 3 B-spline.
        default_value: value for points outside ``moving`` (0 = background for masks).

    Returns:
        A Volume on ``reference``'s grid with ``moving``'s intensity kind, dtype and meta.
    """
    if order not in _INTERPOLATORS:
        raise InputError(f"resample order must be one of {sorted(_INTERPOLATORS)}; got {order}")
    source = _to_sitk(moving.array, moving)
    target = _to_sitk(np.zeros(reference.shape, dtype=np.uint8), reference)
    image = sitk.Resample(
        source,
        target,
        sitk.Transform(),
        _INTERPOLATORS[order],
        float(default_value),
        source.GetPixelID(),
    )
    return _from_sitk(image, moving)


def _to_sitk(array: np.ndarray, geometry: Volume) -> sitk.Image:
    # SimpleITK has no bool pixel type; masks travel as uint8.
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in geometry.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in geometry.origin))
    image.SetDirection(tuple(float(d) for d in geometry.direction.ravel()))
    return image


def _from_sitk(image: sitk.Image, like: Volume) -> Volume:
    out = Volume.from_sitk(
        image, intensity=like.intensity, meta=copy.deepcopy(like.meta), dtype=like.array.dtype.type
    )
    return out


def resize_slice(image: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize a 2D image to ``shape`` (pixels), anti-aliased when shrinking.

    Args:
        image: ``(H, W)`` array (e.g. windowed intensities in [0, 1]).
        shape: target ``(H, W)``.
        order: spline order (0 nearest, 1 bilinear, 3 cubic).

    Returns:
        ``(H, W)`` float32 array within the input's value range.
    """
    image = np.asarray(image)
    _check_2d(image, shape)
    if tuple(image.shape) == tuple(shape):
        return image.astype(np.float32, copy=True)
    shrinking = any(new < old for new, old in zip(shape, image.shape, strict=True))
    out = _sk_resize(
        image.astype(np.float32),
        tuple(int(s) for s in shape),
        order=order,
        mode="edge",
        anti_aliasing=bool(shrinking and order > 0),
        preserve_range=True,
    )
    # Higher orders overshoot; keep the original range (e.g. [0, 1]).
    return np.clip(out, float(image.min()), float(image.max())).astype(np.float32)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2D binary mask to ``shape``: area-weighted resize, then threshold at 0.5.

    Smoother and less biased than nearest neighbour, and thin structures are not randomly
    dropped or kept when shrinking.

    Args:
        mask: ``(H, W)`` array, non-zero = inside.
        shape: target ``(H, W)``.

    Returns:
        ``(H, W)`` array of the input's dtype with values 0/1.
    """
    mask = np.asarray(mask)
    _check_2d(mask, shape)
    binary = (mask != 0).astype(np.float32)
    if tuple(mask.shape) == tuple(shape):
        return binary.astype(mask.dtype)
    return (resize_slice(binary, shape, order=1) >= 0.5).astype(mask.dtype)


@dataclass(frozen=True)
class Letterbox:
    """Where a slice sits inside a model input of another shape, its aspect ratio kept.

    :meth:`fit` scales the slice by one factor on both axes so it fits the target, then
    centres it and pads with zeros (air in windowed units). Squashing instead would make a
    slice's shape part of its appearance, and where image sizes differ by class (IQ-OTH/NCCD:
    only malignant images are 623x512 or 801x512) that is a label shortcut.

    :meth:`at_scale` instead scales by a given factor (the slice's pixel spacing over the
    model's pixel size), so every input shows the same mm per pixel whatever the field of
    view: the slice is centred and padded, or centre-cropped where it is larger than the
    target (a field of view wider than ``target * pixel_mm``; the lungs lie near the centre).

    Attributes:
        source_shape: the slice's ``(H, W)``.
        target_shape: the model input's ``(H', W')``.
        scaled_shape: the slice's size after scaling, ``(h, w)``; larger than the target
            where :meth:`at_scale` crops.
        offset: ``(top, left)`` of the scaled slice in the target; negative where cropped.
    """

    source_shape: tuple[int, int]
    target_shape: tuple[int, int]
    scaled_shape: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def fit(cls, source_shape: Sequence[int], target_shape: Sequence[int]) -> Letterbox:
        """The letterbox of a ``source_shape`` slice in a ``target_shape`` input."""
        (h, w), (th, tw) = _positive_shapes(source_shape, target_shape)
        scale = min(th / h, tw / w)
        sh, sw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
        return cls((h, w), (th, tw), (sh, sw), ((th - sh) // 2, (tw - sw) // 2))

    @classmethod
    def at_scale(
        cls, source_shape: Sequence[int], target_shape: Sequence[int], scale: float
    ) -> Letterbox:
        """A ``source_shape`` slice scaled by ``scale`` (e.g. spacing mm / model pixel mm),
        centred in a ``target_shape`` input (padded or centre-cropped)."""
        (h, w), (th, tw) = _positive_shapes(source_shape, target_shape)
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"scale must be a positive number; got {scale}")
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        return cls((h, w), (th, tw), (sh, sw), ((th - sh) // 2, (tw - sw) // 2))

    @property
    def region(self) -> tuple[slice, slice]:
        """The index, inside the target, of the pixels the slice covers (rows, columns)."""
        return self._overlap()[0]

    def _overlap(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """``(target index, scaled-slice index)`` of the part of the scaled slice in view."""
        target, scaled = [], []
        for off, size, total in zip(self.offset, self.scaled_shape, self.target_shape, strict=True):
            t0, t1 = max(off, 0), min(off + size, total)
            target.append(slice(t0, t1))
            scaled.append(slice(t0 - off, t1 - off))
        return (target[0], target[1]), (scaled[0], scaled[1])

    def apply(self, image: np.ndarray, *, mask: bool = False) -> np.ndarray:
        """``(H, W)`` slice -> ``(H', W')`` input: scaled (bilinear, or area-weighted and
        thresholded for a mask), zero-padded or cropped. float32 (image) or the mask's dtype."""
        scaled = (
            resize_mask(image, self.scaled_shape)
            if mask
            else resize_slice(image, self.scaled_shape, order=1)
        )
        if self.scaled_shape == self.target_shape and self.offset == (0, 0):
            return scaled
        out = np.zeros(self.target_shape, dtype=scaled.dtype)
        target, source = self._overlap()
        out[target] = scaled[source]
        return out

    def invert(self, model_map: np.ndarray, order: int = 1) -> np.ndarray:
        """``(H', W')`` model output (probabilities, CAM) -> ``(H, W)`` on the slice's grid;
        0 where the input cropped the slice."""
        target, source = self._overlap()
        model_map = np.asarray(model_map)
        full = np.zeros(self.scaled_shape, dtype=np.float32)
        full[source] = model_map[target]
        return resize_slice(full, self.source_shape, order=order)


def _positive_shapes(
    source_shape: Sequence[int], target_shape: Sequence[int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    (h, w), (th, tw) = (int(s) for s in source_shape), (int(s) for s in target_shape)
    if min(h, w, th, tw) < 1:
        raise InputError(
            f"shapes must be positive; got {tuple(source_shape)} -> {tuple(target_shape)}"
        )
    return (h, w), (th, tw)


def _check_2d(array: np.ndarray, shape: Sequence[int]) -> None:
    if array.ndim != 2:
        raise InputError(f"expected a 2D (H, W) array; got shape {array.shape}")
    if len(shape) != 2 or any(int(s) < 1 for s in shape):
        raise InputError(f"target shape must be two positive sizes (H, W); got {shape}")


# --------------------------------------------------------------------------------------------
# Slices


def iter_slices(
    volume: Volume | np.ndarray,
    mask: Volume | np.ndarray | None = None,
    axis: int = 0,
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield ``(index, image2d, mask2d)`` for every slice along ``axis``.

    Args:
        volume: Volume or ``(z, y, x)`` array.
        mask: optional Volume or array of the same shape; ``mask2d`` is None without one.
        axis: 0 axial, 1 coronal, 2 sagittal (array axes).

    Yields:
        The slice index and views (not copies) of the 2D image and mask.
    """
    array = volume.array if isinstance(volume, Volume) else np.asarray(volume)
    mask_array = None
    if mask is not None:
        mask_array = mask.array if isinstance(mask, Volume) else np.asarray(mask)
        if mask_array.shape != array.shape:
            raise InputError(f"mask shape {mask_array.shape} differs from image {array.shape}")
    if array.ndim != 3 or axis not in (0, 1, 2):
        raise InputError(f"need a (z, y, x) array and axis 0, 1 or 2; got {array.shape}, {axis}")
    for index in range(array.shape[axis]):
        image2d = np.take(array, index, axis=axis)
        mask2d = None if mask_array is None else np.take(mask_array, index, axis=axis)
        yield index, image2d, mask2d


def extract_slices(
    volume: Volume | np.ndarray,
    mask: Volume | np.ndarray | None = None,
    axis: int = 0,
    indices: Sequence[int] | None = None,
) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """The ``(index, image2d, mask2d)`` triples of :func:`iter_slices` as a list (copies).

    Args:
        volume: Volume or ``(z, y, x)`` array.
        mask: optional mask of the same shape.
        axis: 0 axial, 1 coronal, 2 sagittal.
        indices: keep only these slice indices (all when None).
    """
    wanted = None if indices is None else {int(i) for i in indices}
    return [
        (i, image.copy(), None if m is None else m.copy())
        for i, image, m in iter_slices(volume, mask, axis)
        if wanted is None or i in wanted
    ]
