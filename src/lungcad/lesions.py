"""Lesions: the connected components of a tumour mask, measured in physical units.

A predicted (or reference) tumour mask is split into 3D connected components (26-connectivity:
voxels touching by a face, an edge or a corner belong to the same lesion). Each lesion gets
the measurements a radiologist reads off a CT: its volume (mL), its longest axial diameter
(mm, as with a caliper on one axial slice, RECIST style), where it is (voxel centroid and the
patient LPS position in mm), which slices it spans, and, when given, its mean HU and the
model's probability inside it.

All geometry comes from the mask's :class:`~lungcad.volume.Volume` (spacing in mm, origin and
direction), so anisotropic voxels (e.g. 2.5 mm slices of 0.7 mm pixels) are measured right.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from lungcad.errors import InputError
from lungcad.volume import Volume

__all__ = ["Lesion", "find_lesions", "lesions_to_dicts"]

# 26-connectivity: the full 3x3x3 neighbourhood.
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Lesion:
    """One connected component of a tumour mask.

    Attributes:
        id: 1..n, numbered by volume, largest first.
        voxel_count: number of mask voxels in the lesion.
        volume_ml: voxel_count times the voxel volume, in mL (1 mL = 1000 mm^3).
        longest_axial_diameter_mm: the largest, over the lesion's axial slices, of the longest
            in-plane caliper (Feret) diameter of the lesion's pixels on that slice, in mm. Pixels
            count as squares of size (spacing_y, spacing_x), so a box of a x b pixels measures
            sqrt((a*dy)^2 + (b*dx)^2).
        diameter_slice: z index of the slice where that diameter was measured.
        centroid_zyx: mean voxel index (z, y, x) of the lesion (fractional).
        centroid_lps_mm: the centroid's patient position (x, y, z) in LPS mm.
        slice_range: first and last z index the lesion occupies (inclusive).
        mean_hu: mean HU inside the lesion, or None when no HU volume was given.
        max_probability: largest model probability inside the lesion, or None.
        mean_probability: mean model probability inside the lesion, or None.
    """

    id: int
    voxel_count: int
    volume_ml: float
    longest_axial_diameter_mm: float
    diameter_slice: int
    centroid_zyx: tuple[float, float, float]
    centroid_lps_mm: tuple[float, float, float]
    slice_range: tuple[int, int]
    mean_hu: float | None = None
    max_probability: float | None = None
    mean_probability: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The lesion as a JSON-safe dict (Python ints/floats, lists, None; no NaN)."""
        return {key: _json_safe(value) for key, value in asdict(self).items()}


def find_lesions(
    mask: Volume,
    hu: Volume | None = None,
    probability: Volume | None = None,
    min_volume_mm3: float = 0.0,
) -> list[Lesion]:
    """Split a binary mask into 3D connected lesions and measure each one.

    Args:
        mask: binary tumour mask, array (z, y, x) of 0/1 (or bool), with the image's geometry.
        hu: optional CT volume on the same grid; its mean inside each lesion is reported when
            its intensity is ``"hu"`` (windowed intensities are not HU, so they give None).
        probability: optional model probability volume (z, y, x) in [0, 1] on the same grid.
        min_volume_mm3: lesions smaller than this (mm^3) are dropped, e.g. to ignore specks.

    Returns:
        Lesions sorted by volume, largest first, with ids 1..n; ``[]`` for an empty mask.

    Raises:
        InputError: when the mask is not binary or hu/probability are on another grid.
    """
    array = np.asarray(mask.array)
    if array.dtype != bool:
        if np.any((array != 0) & (array != 1)):
            raise InputError(
                f"find_lesions needs a binary mask of 0/1; got values in "
                f"[{float(np.nanmin(array))}, {float(np.nanmax(array))}]. Threshold a probability "
                "map first (e.g. probability >= 0.5).",
                mask.meta.get("source_path"),
            )
        array = array != 0
    for name, other in (("hu", hu), ("probability", probability)):
        if other is not None and not mask.same_geometry(other):
            raise InputError(
                f"find_lesions: the {name} volume must be on the mask's grid (shape {mask.shape}, "
                f"spacing {mask.spacing}, origin {mask.origin}); got shape {other.shape}, "
                f"spacing {other.spacing}, origin {other.origin}. Resample one onto the other.",
                other.meta.get("source_path"),
            )
    if min_volume_mm3 < 0:
        raise InputError(f"min_volume_mm3 must be >= 0; got {min_volume_mm3}")

    labels, n = ndimage.label(array, structure=_STRUCTURE_26)
    if n == 0:
        return []
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    voxel_mm3 = float(np.prod(mask.spacing))
    boxes = ndimage.find_objects(labels)
    hu_array = hu.array if hu is not None and hu.intensity == "hu" else None
    prob_array = probability.array if probability is not None else None

    measured = []
    for label in range(1, n + 1):
        count = int(counts[label])
        if count * voxel_mm3 < min_volume_mm3:
            continue
        box = boxes[label - 1]
        inside = labels[box] == label
        zyx = np.argwhere(inside) + [s.start for s in box]
        centroid = zyx.mean(axis=0)
        diameter, diameter_z = _longest_axial_diameter(inside, box[0].start, mask.spacing)
        measured.append(
            {
                "voxel_count": count,
                "volume_ml": count * voxel_mm3 / 1000.0,
                "longest_axial_diameter_mm": diameter,
                "diameter_slice": diameter_z,
                "centroid_zyx": tuple(float(c) for c in centroid),
                "centroid_lps_mm": tuple(float(c) for c in mask.index_to_physical(centroid)[0]),
                "slice_range": (int(box[0].start), int(box[0].stop - 1)),
                "mean_hu": None if hu_array is None else float(hu_array[box][inside].mean()),
                "max_probability": None if prob_array is None
                else float(prob_array[box][inside].max()),
                "mean_probability": None if prob_array is None
                else float(prob_array[box][inside].mean()),
            }
        )
    # Largest first; ties broken by position so the numbering is deterministic.
    measured.sort(key=lambda m: (-m["voxel_count"], m["centroid_zyx"]))
    return [Lesion(id=i, **m) for i, m in enumerate(measured, start=1)]


def lesions_to_dicts(lesions: list[Lesion]) -> list[dict[str, Any]]:
    """Lesions as JSON-safe dicts (for reports, the REST service and ``json.dumps``)."""
    return [lesion.to_dict() for lesion in lesions]


def _longest_axial_diameter(
    inside: np.ndarray, z0: int, spacing: tuple[float, float, float]
) -> tuple[float, int]:
    """Largest in-plane Feret diameter (mm) over the axial slices of one lesion.

    Args:
        inside: (z, y, x) bool array of the lesion within its bounding box.
        z0: z index of the box's first slice.
        spacing: (z, y, x) voxel size in mm.

    Returns:
        (diameter in mm, z index of the slice it was measured on).
    """
    dy, dx = spacing[1], spacing[2]
    best, best_z = 0.0, z0
    for k in range(inside.shape[0]):
        rows = np.flatnonzero(inside[k].any(axis=1))
        if rows.size == 0:
            continue
        # The caliper diameter of a union of pixel squares is reached between pixel corners on
        # its convex hull, and those are corners of the leftmost/rightmost pixel of some row:
        # 4 candidate corners per row instead of 4 per pixel.
        cols = inside[k][rows]
        first = cols.argmax(axis=1)
        last = cols.shape[1] - 1 - cols[:, ::-1].argmax(axis=1)
        points = np.concatenate(
            [
                np.stack([rows + dr, c + dc], axis=1)
                for dr in (-0.5, 0.5)
                for c, dc in ((first, -0.5), (last, 0.5))
            ]
        ) * (dy, dx)
        diameter = _max_pairwise_distance(points)
        if diameter > best:
            best, best_z = diameter, z0 + k
    return best, best_z


def _max_pairwise_distance(points: np.ndarray) -> float:
    """Largest distance between any two of ``points`` (N, 2), via their convex hull."""
    if len(points) > 16:
        # Pixel corners always span a full 2D rectangle, so the hull is never degenerate.
        points = points[ConvexHull(points).vertices]
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(axis=-1)).max())


def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
