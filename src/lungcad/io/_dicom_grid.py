"""Turn sorted DICOM slices into a Volume on a regular orthogonal grid.

Most CT series already are one: slices evenly spaced along the normal of their plane. Two
exceptions are resampled (and reported) rather than refused, because they are genuine
acquisitions: uneven spacing (e.g. a series merged from two reconstructions) and gantry tilt
(slice origins drift in-plane, so the stack is sheared). Not part of the public API.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lungcad.errors import InputError
from lungcad.io._checks import check_voxel_count
from lungcad.volume import Volume

AIR_HU = -1024.0  # fill value where a resampled grid reaches outside the scanned slices

_UNEVEN_FRACTION = 0.01  # positions off a regular grid by >1% of the spacing get resampled
_TILT_PIXELS = 0.1  # in-plane drift of the slice origins beyond 0.1 pixel is a gantry tilt
_NONLINEAR_PIXELS = 0.5  # ... which must follow a straight line within half a pixel
#: Largest gantry tilt (degrees) resampled; CT gantries tilt at most about 30 degrees, and a
#: steeper "tilt" is damaged positions whose resampled grid would be unbounded.
MAX_TILT_DEGREES = 45.0


def _regularise_depth(
    array: np.ndarray, positions: np.ndarray, normal: np.ndarray, warnings: list[str]
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Slices evenly spaced along the normal: (array, positions, spacing mm, resampled).

    Uneven slices are linearly interpolated along the normal, each output slice from its two
    neighbours (a loop in float32 keeps memory at one volume), keeping the first and last
    positions exactly.
    """
    depth, n = positions @ normal, len(positions)
    extent = float(depth[-1] - depth[0])
    spacing = extent / (n - 1)
    off_grid = np.abs(depth - (depth[0] + spacing * np.arange(n)))
    if off_grid.max() <= _UNEVEN_FRACTION * spacing:
        return array, positions, spacing, False
    steps = np.diff(depth)
    n_out = int(round(extent / float(np.median(steps)))) + 1
    spacing = extent / (n_out - 1)
    target = depth[0] + spacing * np.arange(n_out)
    left = np.clip(np.searchsorted(depth, target, side="right") - 1, 0, n - 2)
    weight = (target - depth[left]) / (depth[left + 1] - depth[left])
    out = np.empty((n_out,) + array.shape[1:], dtype=np.float32)
    for k, (j, w) in enumerate(zip(left, weight.astype(np.float32), strict=True)):
        out[k] = (1 - w) * array[j] + w * array[j + 1]
    w = weight[:, None]
    positions = (1 - w) * positions[left] + w * positions[left + 1]
    warnings.append(
        f"uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm): resampled linearly "
        f"from {n} to {n_out} slices at a regular {spacing:.4f} mm."
    )
    return out, positions, spacing, True


def _untilt(
    source: sitk.Image,
    drift: np.ndarray,
    normal: np.ndarray,
    warnings: list[str],
    where: str | Path,
) -> sitk.Image:
    """Resample a sheared stack onto the orthogonal grid of its first slice.

    ``source`` is the stack placed as if untilted (origin of slice 0, axes row, col, normal);
    slice k really lies ``drift * t`` further in-plane, t being its depth along the normal.
    The output grid covers every slice, keeps slice 0 exactly on its points, and is air
    outside the scan.
    """
    origin = np.asarray(source.GetOrigin())
    direction = np.asarray(source.GetDirection()).reshape(3, 3)
    step = np.asarray(source.GetSpacing())
    # ITK resampling maps each output point P to the input; P is in the tilted slice at depth
    # t = (P - origin).normal, so its unsheared source point is P - drift * t.
    shear = sitk.AffineTransform(3)
    shear.SetCenter(tuple(origin))
    shear.SetMatrix(tuple((np.eye(3) - np.outer(drift, normal)).ravel()))
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float) * (
        (np.asarray(source.GetSize()) - 1) * step
    )
    physical = corners @ direction.T + np.outer(corners[:, 2], drift)  # relative to origin
    frame = physical @ direction  # coordinates along row, col, normal
    low = np.floor(frame.min(axis=0) / step + 1e-6) * step
    high = np.ceil(frame.max(axis=0) / step - 1e-6) * step
    size = [int(s) for s in np.round((high - low) / step).astype(int) + 1]
    check_voxel_count(size, where)  # before ITK allocates the resampled grid
    image = sitk.Resample(
        source,
        size,
        shear,
        sitk.sitkLinear,
        tuple(origin + direction @ low),
        tuple(step),
        tuple(direction.ravel()),
        AIR_HU,
        sitk.sitkFloat32,
    )
    angle = float(np.degrees(np.arctan(np.linalg.norm(drift))))
    warnings.append(
        f"gantry tilt of {angle:.2f} degrees: resampled to an orthogonal grid of {size[2]}x"
        f"{size[1]}x{size[0]} voxels (outside the scanned slices filled with {AIR_HU:g} HU)."
    )
    return image


def stack_to_volume(
    array: np.ndarray,
    positions: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    pixel_spacing: np.ndarray,
    *,
    single_slice_spacing: float,
    source: str | Path,
) -> tuple[Volume, list[str], bool]:
    """Place sorted slices on a regular orthogonal grid.

    Args:
        array: (n, rows, columns) float32 HU, sorted by ascending depth along the normal,
            without duplicate positions or missing slices (checked by the caller).
        positions: (n, 3) ImagePositionPatient of those slices, LPS mm.
        row, col: (3,) orthonormal cosines of increasing column / row index.
        pixel_spacing: (2,) mm between rows, between columns (DICOM PixelSpacing).
        single_slice_spacing: z spacing (mm) used when there is only one slice.
        source: the folder, named in errors.

    Returns:
        (Volume in the stack's own orientation, warnings, resampled). The direction is
        (row, col, normal), the origin slice 0's position, z spacing from the positions.

    Raises:
        InputError: slice origins that wander in-plane other than along a straight line.
    """
    normal = np.cross(row, col)
    direction = np.column_stack([row, col, normal])
    dy, dx = (float(s) for s in pixel_spacing)
    warnings: list[str] = []
    if len(positions) == 1:
        if not (np.isfinite(single_slice_spacing) and single_slice_spacing > 0):
            single_slice_spacing = 1.0  # SliceThickness is optional (type 2): not a geometry
        warnings.append(
            f"single-slice series: z spacing set to {single_slice_spacing:g} mm (SliceThickness)."
        )
        volume = Volume(array, (single_slice_spacing, dy, dx), tuple(positions[0]), direction)
        return volume, warnings, False
    array, positions, spacing_z, uneven = _regularise_depth(array, positions, normal, warnings)
    origin = positions[0]
    along = (positions - origin) @ normal
    inplane = (positions - origin) - np.outer(along, normal)
    if np.linalg.norm(inplane, axis=1).max() <= _TILT_PIXELS * min(dx, dy):
        return Volume(array, (spacing_z, dy, dx), tuple(origin), direction), warnings, uneven
    drift = np.linalg.lstsq(along[:, None], inplane, rcond=None)[0][0]  # in-plane mm per mm
    residual = np.linalg.norm(inplane - np.outer(along, drift), axis=1)
    if residual.max() > _NONLINEAR_PIXELS * min(dx, dy):
        raise InputError(
            "slice origins (ImagePositionPatient) wander in-plane without following a straight "
            "line, so the slices do not form one volume; re-export the series.",
            source,
        )
    angle = float(np.degrees(np.arctan(np.linalg.norm(drift))))
    if angle > MAX_TILT_DEGREES:
        raise InputError(
            f"the slice origins (ImagePositionPatient) imply a gantry tilt of {angle:.1f} "
            f"degrees, more than the {MAX_TILT_DEGREES:g} a CT gantry tilts; the positions are "
            "damaged. Re-export the series.",
            source,
        )
    stack = Volume(array, (spacing_z, dy, dx), tuple(origin), direction).to_sitk()
    image = _untilt(stack, drift, normal, warnings, source)
    return Volume.from_sitk(image, intensity="hu"), warnings, True
