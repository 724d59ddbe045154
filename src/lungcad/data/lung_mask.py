"""Classical lung segmentation: thresholds and morphology, no model needed.

:func:`lung_mask` works on 3D HU volumes and on single windowed 2D slices (PNG/JPEG exports,
``z = 1``). All sizes are in mm and converted to pixels with the volume's spacing, so the same
defaults work at 0.6 mm and at 3 mm. It is re-exported by :mod:`lungcad.data.preprocessing`, where
the rest of the preprocessing lives.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image
from skimage.segmentation import watershed

from lungcad.volume import Volume

log = logging.getLogger(__name__)

#: HU below which a voxel counts as air/lung (between lung parenchyma ~-850 and tissue ~40).
LUNG_THRESHOLD_HU = -400.0


def lung_mask(
    volume: Volume,
    *,
    threshold_hu: float = LUNG_THRESHOLD_HU,
    smoothing_mm: float | None = None,
    closing_mm: float = 10.0,
    separate_leaks: bool | None = None,
    leak_neck_mm: float = 10.0,
    opening_mm: float | None = None,
    airway_max_area_mm2: float = 700.0,
    airway_midline_fraction: float = 0.12,
    second_lung_min_fraction: float = 0.1,
) -> np.ndarray:
    """Segment both lungs with thresholds and morphology (no model needed).

    Steps, per axial slice unless said otherwise:

    1. Smooth in-plane and threshold: ``threshold_hu`` for HU volumes; for windowed images,
       whose display window is unknown, a cut derived from Otsu inside the body (see
       ``_windowed_threshold``).
    2. Air connected to the image border is outside the body. With ``separate_leaks`` the
       outside region is also split at necks narrower than ``2 * leak_neck_mm`` (a watershed
       on the distance to tissue), so lungs that touch the outside through gaps in a thin or
       speckled chest wall are kept (common in 8-bit exports where fat is as black as air).
       An opening by ``opening_mm`` then cuts thin dark layers (such fat) off the lungs; the
       lungs are grown back by the same radius afterwards.
    3. Small air regions near the body's left-right centre (trachea, main bronchi,
       oesophagus) are dropped.
    4. In 3D: the largest connected component is kept, and the second largest when it is at
       least ``second_lung_min_fraction`` of the largest (the two lungs; bowel gas goes).
    5. Each lung is closed with a disk of ``closing_mm`` (nodules against the pleura end up
       inside) and its holes are filled (vessels, nodules).

    Args:
        volume: HU volume ``(z, y, x)`` or a windowed volume (e.g. one JPEG slice, ``z = 1``).
        threshold_hu: air/lung vs tissue threshold for HU volumes.
        smoothing_mm: in-plane Gaussian sigma (mm) before thresholding; default 1 mm for HU
            (noise), 2 mm for windowed images (some exports render soft tissue as speckle).
        closing_mm: closing radius (mm) of each lung per slice; juxtapleural nodules up to
            about this radius end up inside the mask.
        separate_leaks: split leaking outside air at narrow necks (step 2); default on for
            windowed images, off for HU volumes (whose body outline is closed).
        leak_neck_mm: see step 2.
        opening_mm: see step 2; default 0 (off) for HU, 6 mm for windowed images.
        airway_max_area_mm2: per-slice air regions smaller than this (mm^2) whose centroid is
            within ``airway_midline_fraction`` of the body width from its centre are airways.
        airway_midline_fraction: see ``airway_max_area_mm2``.
        second_lung_min_fraction: see step 4.

    Returns:
        bool array ``(z, y, x)``; all False when no lung is found, logged as a WARNING for a
        volume and at DEBUG level for a single slice (``z = 1``), whose callers usually loop
        over many slices and should count the empty masks and log one summary.
    """
    hu = volume.intensity == "hu"
    array = np.asarray(volume.array, dtype=np.float32)
    spacing_yx = (float(volume.spacing[1]), float(volume.spacing[2]))
    empty = np.zeros(array.shape, dtype=bool)
    # One WARNING per call for a 3D volume; DEBUG for a single 2D slice, since callers that
    # loop over slices (features, inference on JPEG folders) would flood the log: they check
    # ``not mask.any()`` and report one count instead.
    level = logging.DEBUG if array.ndim == 3 and array.shape[0] == 1 else logging.WARNING
    if array.size == 0 or not np.isfinite(array).any():
        log.log(level, "lung_mask: empty or non-finite image; returning an empty mask")
        return empty
    array = np.nan_to_num(array, nan=float(np.nanmin(array)))
    if smoothing_mm is None:
        smoothing_mm = 1.0 if hu else 2.0
    if separate_leaks is None:
        separate_leaks = not hu
    if opening_mm is None:
        opening_mm = 0.0 if hu else 6.0

    smooth = array
    if smoothing_mm > 0:
        sigma = (0.0, smoothing_mm / spacing_yx[0], smoothing_mm / spacing_yx[1])
        smooth = ndi.gaussian_filter(array, sigma=sigma, mode="nearest")
    threshold = float(threshold_hu) if hu else _windowed_threshold(smooth, spacing_yx)
    dark = smooth < threshold

    candidates = np.zeros_like(dark)
    bodies = np.zeros_like(dark)
    for z in range(dark.shape[0]):
        inside, bodies[z] = _inside_air(
            dark[z], spacing_yx, leak_neck_mm if separate_leaks else None
        )
        if not hu and not _large_enough(inside, spacing_yx):
            # Display-windowed slices whose fat and chest wall render as black as air: the
            # lungs merge with the outside, so look for them inside the body's hull too, and
            # keep whichever finds more air (a small field of view keeps the first answer).
            hull_air, hull_body = _air_inside_body_hull(dark[z], spacing_yx)
            if hull_air.sum() > inside.sum():
                inside, bodies[z] = hull_air, hull_body
        candidates[z] = _remove_airways(
            inside, bodies[z], spacing_yx, airway_max_area_mm2, airway_midline_fraction
        )
    cores = candidates
    if opening_mm > 0:
        cores = np.stack([_open_2d(c, opening_mm, spacing_yx) for c in candidates])

    lungs = _largest_components(cores, second_lung_min_fraction)
    if opening_mm > 0:
        # Grow the lungs back into their own air, by the radius the opening took away.
        lungs = np.stack(
            [
                _dilate_2d(m, opening_mm, spacing_yx) & c
                for m, c in zip(lungs, candidates, strict=True)
            ]
        )
    if not lungs.any():
        log.log(
            level,
            "lung_mask: no lung found (threshold %.3g on %s intensities); returning an empty mask",
            threshold,
            volume.intensity,
        )
        return empty

    out = np.zeros_like(lungs)
    for z in range(lungs.shape[0]):
        if not lungs[z].any():
            continue
        labels, _ = ndi.label(lungs[z])
        for index, box in enumerate(ndi.find_objects(labels), start=1):
            piece = _close_2d(labels == index, closing_mm, spacing_yx, box)
            out[z] |= ndi.binary_fill_holes(piece)
        out[z] &= bodies[z]
    return out


def _otsu(values: np.ndarray, where: np.ndarray | None = None) -> float:
    """Otsu threshold of ``values`` (optionally only where ``where``), subsampled when huge."""
    sample = values[where] if where is not None else values.ravel()
    # The histogram needs far fewer than 10^8 voxels.
    sample = sample[:: max(1, sample.size // 1_000_000)]
    low, high = float(sample.min()), float(sample.max())
    if high <= low:
        return high
    return float(threshold_otsu(sample))


def _windowed_threshold(smooth: np.ndarray, spacing_yx: tuple[float, float]) -> float:
    """Lung vs soft-tissue threshold of a windowed image: Otsu inside a rough body mask.

    Display windows differ between exporters, so no fixed value works. The rough body is
    everything clearly above the outside-air level, closed by 5 mm and filled. Inside it the
    intensities are clipped at their 80th percentile so bright bone does not pull Otsu's cut
    into the soft tissue. For a lung-windowed CT slice the cut lands near -700 HU.
    """
    air_level = float(np.percentile(smooth[:, ::4, ::4], 1.0))
    rough_cut = air_level + 0.1 * (_otsu(smooth) - air_level)
    body = np.stack(
        [ndi.binary_fill_holes(_close_2d(s >= rough_cut, 5.0, spacing_yx)) for s in smooth]
    )
    values = smooth[body] if body.sum() >= 100 else smooth.ravel()
    values = values[:: max(1, values.size // 1_000_000)]
    low, high = np.percentile(values, [1.0, 80.0])
    # Halfway between the air level and Otsu's cut: where soft tissue is rendered as speckle
    # (8-bit exports that clip fat and lung to black) its smoothed level is low, and a cut
    # nearer the air level keeps the chest wall closed.
    return air_level + 0.5 * (_otsu(np.clip(values, low, high)) - air_level)


def _inside_air(
    dark: np.ndarray, spacing_yx: tuple[float, float], neck_mm: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Air inside the body in one slice, and the body (everything that is not outside air).

    Air connected to the image border is outside. With ``neck_mm``, deep parts of that outside
    region (farther than ``neck_mm`` from tissue) that are not connected to the border through
    other deep parts are pockets behind narrow necks, usually lungs seen through gaps in the
    chest wall; a watershed on the distance map splits them off at the necks.
    """
    labels, _ = ndi.label(dark)
    edge = np.zeros_like(dark)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    border_labels = np.unique(labels[edge & dark])
    outside = np.isin(labels, border_labels[border_labels > 0])
    # The body is the largest thing that is not outside air: the table and its hollow core
    # are a separate component and drop out here.
    body = _largest(ndi.binary_fill_holes(~outside))
    if neck_mm is not None and neck_mm > 0 and outside.any() and body.any():
        pockets = _pockets(outside, edge, spacing_yx, neck_mm)
        if pockets.any():
            # Keep pockets that lie within the body's outline (lungs behind gaps), not those
            # beside or under it (air between the body and the table or the arms).
            labels, n = ndi.label(pockets)
            centres = ndi.center_of_mass(pockets, labels, index=np.arange(1, n + 1))
            inside_hull = _in_convex_hull(body, np.asarray(centres, dtype=np.float64))
            keep = [i + 1 for i in range(n) if inside_hull[i]]
            body = ndi.binary_fill_holes(body | np.isin(labels, keep))
    return dark & body, body


#: Least area (mm^2) of air inside the body for the standard path to count as having found
#: lung; below it windowed slices fall back to the body-hull path.
_MIN_LUNG_AREA_MM2 = 1500.0
#: Tissue closing (mm) that joins the speckled chest wall into one body, and the band (mm)
#: under the body's hull taken as subcutaneous fat rather than lung.
_BODY_CLOSING_MM, _FAT_BAND_MM = 6.0, 12.0


def _large_enough(air: np.ndarray, spacing_yx: tuple[float, float]) -> bool:
    return float(air.sum()) * spacing_yx[0] * spacing_yx[1] >= _MIN_LUNG_AREA_MM2


def _air_inside_body_hull(
    dark: np.ndarray, spacing_yx: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Air inside the convex hull of the body, minus a band under the hull (one slice).

    For exports in a soft-tissue window the skin line is invisible (fat is black), so the
    body cannot be found as "not outside air". Its tissue (muscle, bone, organs) still forms
    one large bright structure once closed by a few mm; the table is a separate thin one. The
    lungs are the dark regions inside that structure's convex hull, away from its rim.

    Returns:
        ``(air inside the body, body)``, both ``(H, W)`` bool.
    """
    tissue = _close_2d(~dark, _BODY_CLOSING_MM, spacing_yx)
    labels, n = ndi.label(tissue)
    if n == 0:
        return np.zeros_like(dark), tissue
    # Of the largest pieces, the body is the one with the largest hull: the table is a thin
    # arc whose hull is a flat crescent, the body's hull holds the whole chest.
    sizes = np.bincount(labels.ravel())[1:]
    largest = np.argsort(sizes)[::-1][:3] + 1
    hull = max((convex_hull_image(labels == i) for i in largest), key=lambda h: int(h.sum()))
    inner = ndi.distance_transform_edt(np.pad(hull, 1), sampling=spacing_yx)[1:-1, 1:-1]
    return dark & (inner > _FAT_BAND_MM), hull


def _in_convex_hull(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Whether each ``(row, col)`` point lies in the convex hull of a 2D mask's pixels."""
    # The hull of the outline is the hull of the whole mask, for far fewer points.
    coords = np.argwhere(mask & ~ndi.binary_erosion(mask)).astype(np.float64)
    if len(coords) < 3 or np.linalg.matrix_rank(coords - coords[0]) < 2:
        return np.zeros(len(points), dtype=bool)
    hull = ConvexHull(coords)
    # Facet equations: normal . p + offset <= 0 inside; half a pixel of slack.
    return np.all(points @ hull.equations[:, :2].T + hull.equations[:, 2] <= 0.5, axis=1)


def _pockets(
    outside: np.ndarray, edge: np.ndarray, spacing_yx: tuple[float, float], neck_mm: float
) -> np.ndarray:
    """Parts of the outside air behind necks narrower than ``2 * neck_mm`` (watershed split)."""
    # Beyond the image there is air, so pad with air before measuring depth.
    depth = ndi.distance_transform_edt(
        np.pad(outside, 1, constant_values=True), sampling=spacing_yx
    )[1:-1, 1:-1]
    cores, n = ndi.label(depth > neck_mm)
    border_cores = np.unique(cores[edge])
    border_cores = border_cores[border_cores > 0]
    if n <= border_cores.size:
        return np.zeros_like(outside)
    markers = np.where(np.isin(cores, border_cores) | (edge & outside), 1, 0)
    deep = (cores > 0) & (markers == 0)
    markers[deep] = cores[deep] + 1
    return watershed(-depth, markers, mask=outside) > 1


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _remove_airways(
    air: np.ndarray,
    body: np.ndarray,
    spacing_yx: tuple[float, float],
    max_area_mm2: float,
    midline_fraction: float,
) -> np.ndarray:
    """Drop small air regions near the body's left-right centre (trachea, bronchi, oesophagus)."""
    labels, n = ndi.label(air)
    if n == 0 or not body.any():
        return air
    columns = np.nonzero(body.any(axis=0))[0]
    centre_x = 0.5 * (columns[0] + columns[-1])
    half_band = midline_fraction * (columns[-1] - columns[0] + 1)
    pixel_mm2 = spacing_yx[0] * spacing_yx[1]
    index = np.arange(1, n + 1)
    areas = ndi.sum_labels(air, labels, index=index) * pixel_mm2
    centroids = ndi.center_of_mass(air, labels, index=index)
    airways = [
        i
        for i, area, (_, cx) in zip(index, areas, centroids, strict=True)
        if area < max_area_mm2 and abs(cx - centre_x) <= half_band
    ]
    return air & ~np.isin(labels, airways) if airways else air


def _largest_components(mask: np.ndarray, second_min_fraction: float) -> np.ndarray:
    """Largest face-connected component plus the second when it is big enough (two lungs)."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    keep = [order[0]]
    if n > 1 and sizes[order[1]] >= second_min_fraction * sizes[order[0]]:
        keep.append(order[1])
    return np.isin(labels, keep)


def _dilate_2d(mask: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Binary dilation with a disk of ``radius_mm`` (via a distance transform in mm)."""
    if radius_mm <= 0 or not mask.any():
        return mask
    return ndi.distance_transform_edt(~mask, sampling=spacing_yx) <= radius_mm


def _open_2d(mask: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Binary opening with a disk of ``radius_mm``: removes parts thinner than its diameter."""
    if radius_mm <= 0 or not mask.any():
        return mask
    # Beyond the image counts as background, so pad before eroding.
    eroded = ndi.distance_transform_edt(np.pad(mask, 1), sampling=spacing_yx)[1:-1, 1:-1]
    return _dilate_2d(eroded > radius_mm, radius_mm, spacing_yx) & mask


def _close_2d(
    mask: np.ndarray,
    radius_mm: float,
    spacing_yx: tuple[float, float],
    box: tuple[slice, slice] | None = None,
) -> np.ndarray:
    """Binary closing with a disk of ``radius_mm`` (anisotropic pixels allowed).

    Uses Euclidean distance transforms in mm, which is exact for a disk and much faster than a
    large structuring element. ``box`` limits the work to the object's bounding box.
    """
    if radius_mm <= 0 or not mask.any():
        return mask
    pad = [int(math.ceil(radius_mm / s)) + 2 for s in spacing_yx]
    if box is None:
        box = (slice(0, mask.shape[0]), slice(0, mask.shape[1]))
    y0, y1 = max(box[0].start - pad[0], 0), min(box[0].stop + pad[0], mask.shape[0])
    x0, x1 = max(box[1].start - pad[1], 0), min(box[1].stop + pad[1], mask.shape[1])
    # Pad beyond the image too, so the image border does not stop the dilation.
    part = np.pad(mask[y0:y1, x0:x1], [(pad[0], pad[0]), (pad[1], pad[1])])
    dilated = ndi.distance_transform_edt(~part, sampling=spacing_yx) <= radius_mm
    closed = ndi.distance_transform_edt(dilated, sampling=spacing_yx) > radius_mm
    out = mask.copy()
    out[y0:y1, x0:x1] |= closed[pad[0] : pad[0] + (y1 - y0), pad[1] : pad[1] + (x1 - x0)]
    return out
