"""Lesions: the connected components of a tumour mask, measured in physical units.

A predicted (or reference) tumour mask is split into 3D connected components (26-connectivity:
voxels touching by a face, an edge or a corner belong to the same lesion). Each lesion gets
the measurements a radiologist reads off a CT: its volume (mL), its longest axial diameter
and the short axis perpendicular to it (mm, as with a caliper on one axial slice, RECIST
style), where it is (voxel centroid, the patient LPS position in mm and, with HU, the side of
the body), which slices it spans, and, when given, its mean HU and the model's probability
inside it. :func:`lesion_labels` turns a mask and its lesions back into a label image (voxel
value = lesion id), as the DICOM SEG stores one segment per lesion.

All geometry comes from the mask's :class:`~lungcad.volume.Volume` (spacing in mm, origin and
direction), so anisotropic voxels (e.g. 2.5 mm slices of 0.7 mm pixels) are measured right.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from lungcad.errors import InputError
from lungcad.io.atomic import json_safe
from lungcad.lesion import Lesion
from lungcad.volume import Volume

log = logging.getLogger(__name__)

# 26-connectivity: the full 3x3x3 neighbourhood.
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
# Most lesions find_lesions measures by default; the largest are kept (see find_lesions).
MAX_LESIONS = 1000
# Voxels per z slab for whole-volume passes (bincount, binary check): bounds temporaries.
_SLAB_VOXELS = 1 << 21
# Body = HU above this (soft tissue, bone, table); its left-right extent gives the midline.
_BODY_HU = -500.0


def find_lesions(
    mask: Volume,
    hu: Volume | None = None,
    probability: Volume | None = None,
    min_volume_mm3: float = 0.0,
    max_lesions: int = MAX_LESIONS,
) -> list[Lesion]:
    """Split a binary mask into 3D connected lesions and measure each one.

    Memory stays near the label image (4 bytes per voxel) even for a mask that fills the
    whole volume (e.g. from an untrained model): each lesion is measured slice by slice inside
    its bounding box (``scipy.ndimage.find_objects``), never as a list of voxel coordinates.

    Args:
        mask: binary tumour mask, array (z, y, x) of 0/1 (or bool), with the image's geometry.
        hu: optional CT volume on the same grid; its mean inside each lesion is reported when
            its intensity is ``"hu"`` (windowed intensities are not HU, so they give None).
        probability: optional model probability volume (z, y, x) in [0, 1] on the same grid.
        min_volume_mm3: lesions smaller than this (mm^3) are dropped, e.g. to ignore specks.
        max_lesions: at most this many lesions are measured and returned: when more
            components remain after ``min_volume_mm3``, only the ``max_lesions`` largest are
            kept and a warning is logged. Thousands of components mean a noisy mask (an
            untrained model, a low threshold), not thousands of tumours, and measuring them all
            would take long for no use.

    Returns:
        Lesions sorted by volume, largest first, with ids 1..n; ``[]`` for an empty mask.

    Raises:
        InputError: when the mask is not binary, hu/probability are on another grid, or
            min_volume_mm3 / max_lesions are out of range.
    """
    array = np.asarray(mask.array)
    if array.dtype != bool and any(
        np.any((array[z] != 0) & (array[z] != 1)) for z in _slabs(array.shape)
    ):
        raise InputError(
            f"find_lesions needs a binary mask of 0/1; got values in "
            f"[{float(np.nanmin(array))}, {float(np.nanmax(array))}]. Threshold a probability "
            "map first (e.g. probability >= 0.5).",
            mask.meta.get("source_path"),
        )
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
    if max_lesions < 1:
        raise InputError(f"max_lesions must be >= 1; got {max_lesions}")

    labels, n = ndimage.label(array, structure=_STRUCTURE_26)  # non-zero voxels are features
    if n == 0:
        return []
    counts = _label_counts(labels, n)
    voxel_mm3 = float(np.prod(mask.spacing))
    keep = np.flatnonzero(counts[1:] * voxel_mm3 >= min_volume_mm3) + 1
    if len(keep) > max_lesions:
        largest = np.argsort(-counts[keep], kind="stable")[:max_lesions]
        log.warning(
            "find_lesions: %d connected components; measuring only the %d largest "
            "(max_lesions). So many components usually mean a noisy mask (untrained model, "
            "low threshold).",
            len(keep),
            max_lesions,
        )
        keep = np.sort(keep[largest])
    boxes = ndimage.find_objects(labels)
    hu_array = hu.array if hu is not None and hu.intensity == "hu" else None
    prob_array = probability.array if probability is not None else None

    measured = []
    for label in keep:
        m = _measure(labels, int(label), boxes[label - 1], mask.spacing, hu_array, prob_array)
        centroid = np.asarray(m.pop("centroid_zyx"))
        centroid_lps = tuple(float(c) for c in mask.index_to_physical(centroid)[0])
        side = None
        if hu_array is not None:
            side = _side(mask, hu_array, m["diameter_slice"], centroid_lps[0])
        measured.append(
            {
                "volume_ml": m["voxel_count"] * voxel_mm3 / 1000.0,
                "centroid_zyx": tuple(float(c) for c in centroid),
                "centroid_lps_mm": centroid_lps,
                "side": side,
                **m,
            }
        )
    # Largest first; ties broken by position so the numbering is deterministic.
    measured.sort(key=lambda m: (-m["voxel_count"], m["centroid_zyx"]))
    return [Lesion(id=i, **m) for i, m in enumerate(measured, start=1)]


def lesion_labels(mask: Volume, lesions: list[Lesion]) -> np.ndarray:
    """The label image of ``lesions``: each lesion's voxels hold its id, all others 0.

    The mask is labelled again with the same 26-connectivity, and each lesion's
    ``anchor_zyx`` picks its component; components find_lesions dropped (too small, beyond
    ``max_lesions``) stay 0.

    Args:
        mask: the binary mask (z, y, x) the lesions were found in.
        lesions: :func:`find_lesions` of that mask.

    Returns:
        (z, y, x) uint16 label image (ids 1..n, at most 65535 lesions).

    Raises:
        InputError: a lesion's anchor is not a mask voxel (lesions of another mask).
    """
    array = np.asarray(mask.array)
    labels, n = ndimage.label(array, structure=_STRUCTURE_26)
    lookup = np.zeros(n + 1, dtype=np.uint16)
    for lesion in lesions:
        component = int(labels[lesion.anchor_zyx])
        if component == 0:
            raise InputError(
                f"lesion {lesion.id}'s anchor voxel {lesion.anchor_zyx} is not in the mask; "
                "the lesions were found in another mask.",
                mask.meta.get("source_path"),
            )
        lookup[component] = lesion.id
    return lookup[labels]


def _side(mask: Volume, hu: np.ndarray, z: int, centroid_x_mm: float) -> str:
    """``"left"`` or ``"right"``: the centroid's side of the body's midline on slice ``z``.

    The midline is the middle of the body's (HU > -500) left-right extent in patient
    coordinates (LPS x grows to the patient's left); a slice without body uses the whole slice.
    """
    body = hu[z] > _BODY_HU
    rows, cols = np.nonzero(body) if body.any() else np.indices(body.shape).reshape(2, -1)
    dz, dy, dx = mask.spacing
    d = mask.direction  # columns: index axes (x, y, z)
    x_mm = mask.origin[0] + d[0, 0] * cols * dx + d[0, 1] * rows * dy + d[0, 2] * z * dz
    midline = 0.5 * (float(x_mm.min()) + float(x_mm.max()))
    return "left" if centroid_x_mm > midline else "right"


def _slabs(shape: tuple[int, ...]) -> list[slice]:
    """z ranges of about ``_SLAB_VOXELS`` voxels each, so whole-volume temporaries stay small."""
    per_slice = max(int(np.prod(shape[1:])), 1)
    step = max(_SLAB_VOXELS // per_slice, 1)
    return [slice(z, z + step) for z in range(0, shape[0], step)]


def _label_counts(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxels per label 0..n, (n + 1,) int64; counted per slab (bincount copies to intp)."""
    counts = np.zeros(n + 1, dtype=np.int64)
    for z in _slabs(labels.shape):
        counts += np.bincount(labels[z].ravel(), minlength=n + 1)
    return counts


def _measure(
    labels: np.ndarray,
    label: int,
    box: tuple[slice, slice, slice],
    spacing: tuple[float, float, float],
    hu_array: np.ndarray | None,
    prob_array: np.ndarray | None,
) -> dict[str, Any]:
    """Measure one lesion slice by slice inside its bounding box.

    Only one 2D slice of the box is held at a time. Index sums are exact integers, so the
    centroid equals the mean of the voxel coordinates; HU and probability sums are float64.

    Returns:
        The Lesion fields except id, volume_ml and centroid_lps_mm; ``centroid_zyx`` as an
        (3,) float64 array.
    """
    rows = np.arange(box[1].start, box[1].stop)
    cols = np.arange(box[2].start, box[2].stop)
    count, sum_z, sum_y, sum_x = 0, 0, 0, 0
    hu_sum, prob_sum, prob_max = 0.0, 0.0, -np.inf
    best, best_short, best_z = 0.0, 0.0, box[0].start
    anchor: tuple[int, int, int] | None = None
    for z in range(box[0].start, box[0].stop):
        inside = labels[z, box[1], box[2]] == label
        n = int(np.count_nonzero(inside))
        if n == 0:
            continue
        if anchor is None:
            r, c = np.unravel_index(int(np.argmax(inside)), inside.shape)  # first True pixel
            anchor = (z, int(rows[r]), int(cols[c]))
        count += n
        sum_z += z * n
        sum_y += int(inside.sum(axis=1) @ rows)
        sum_x += int(inside.sum(axis=0) @ cols)
        if hu_array is not None:
            hu_sum += float(hu_array[z, box[1], box[2]][inside].sum(dtype=np.float64))
        if prob_array is not None:
            values = prob_array[z, box[1], box[2]][inside]
            prob_sum += float(values.sum(dtype=np.float64))
            prob_max = max(prob_max, float(values.max()))
        diameter, short = _axial_diameter(inside, spacing)
        if diameter > best:
            best, best_short, best_z = diameter, short, z
    return {
        "voxel_count": count,
        "longest_axial_diameter_mm": best,
        "short_axis_mm": best_short,
        "diameter_slice": best_z,
        "anchor_zyx": anchor,
        "centroid_zyx": np.array([sum_z, sum_y, sum_x], dtype=np.float64) / count,
        "slice_range": (int(box[0].start), int(box[0].stop - 1)),
        "mean_hu": None if hu_array is None else hu_sum / count,
        "max_probability": None if prob_array is None else prob_max,
        "mean_probability": None if prob_array is None else prob_sum / count,
    }


def lesions_to_dicts(lesions: list[Lesion]) -> list[dict[str, Any]]:
    """Lesions as JSON-safe dicts (Python ints/floats, lists, None; no NaN) (for reports, the REST
    service and ``json.dumps``)."""
    return [{key: json_safe(value) for key, value in asdict(lesion).items()} for lesion in lesions]


def _axial_diameter(inside: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float]:
    """Long and short axis (mm) of one slice of a lesion.

    The long axis is the longest in-plane caliper (Feret) diameter; the short axis is the
    caliper width perpendicular to it (the extent of the pixel corners projected on the
    perpendicular direction), as RECIST measures it.

    Args:
        inside: (y, x) bool array of the lesion on one slice (within its bounding box), with
            at least one True pixel.
        spacing: (z, y, x) voxel size in mm.

    Returns:
        ``(long_mm, short_mm)``.
    """
    dy, dx = spacing[1], spacing[2]
    rows = np.flatnonzero(inside.any(axis=1))
    # The caliper diameter of a union of pixel squares is reached between pixel corners on
    # its convex hull, and those are corners of the leftmost/rightmost pixel of some row:
    # 4 candidate corners per row instead of 4 per pixel.
    cols = inside[rows]
    first = cols.argmax(axis=1)
    last = cols.shape[1] - 1 - cols[:, ::-1].argmax(axis=1)
    points = np.concatenate(
        [
            np.stack([rows + dr, c + dc], axis=1)
            for dr in (-0.5, 0.5)
            for c, dc in ((first, -0.5), (last, 0.5))
        ]
    ) * (dy, dx)
    if len(points) > 16:
        # Pixel corners always span a full 2D rectangle, so the hull is never degenerate.
        points = points[ConvexHull(points).vertices]
    diff = points[:, None, :] - points[None, :, :]
    distance = np.sqrt((diff**2).sum(axis=-1))
    i, j = np.unravel_index(int(np.argmax(distance)), distance.shape)
    longest = float(distance[i, j])
    axis = diff[i, j] / longest
    across = points @ np.array([-axis[1], axis[0]])  # projection on the perpendicular
    return longest, float(across.max() - across.min())
