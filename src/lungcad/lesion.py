"""The lesion record: one connected tumour component and its measurements in physical units.

A plain record shared by the stage that finds lesions (:mod:`lungcad.inference.lesions`) and
the writers that report them (:mod:`lungcad.io.dicom_outputs`), so neither depends on the other.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        short_axis_mm: on that slice, the lesion's caliper width perpendicular to the long
            axis (the RECIST short axis), in mm, over the same pixel squares; 0 < short <= long.
        diameter_slice: z index of the slice where the long axis was measured.
        centroid_zyx: mean voxel index (z, y, x) of the lesion (fractional).
        centroid_lps_mm: the centroid's patient position (x, y, z) in LPS mm.
        slice_range: first and last z index the lesion occupies (inclusive).
        anchor_zyx: one voxel of the lesion (its first in z, y, x raster order): with the mask
            it finds the lesion's connected component again
            (:func:`lungcad.inference.lesions.lesion_labels`).
        mean_hu: mean HU inside the lesion, or None when no HU volume was given.
        max_probability: largest model probability inside the lesion, or None.
        mean_probability: mean model probability inside the lesion, or None.
        side: ``"right"`` or ``"left"`` (the patient's): which side of the body's left-right
            midline on ``diameter_slice`` (HU > -500) the centroid lies; None without HU.
            lungcad does not segment lobes, so the lobe is not reported.
    """

    id: int
    voxel_count: int
    volume_ml: float
    longest_axial_diameter_mm: float
    short_axis_mm: float
    diameter_slice: int
    centroid_zyx: tuple[float, float, float]
    centroid_lps_mm: tuple[float, float, float]
    slice_range: tuple[int, int]
    anchor_zyx: tuple[int, int, int]
    mean_hu: float | None = None
    max_probability: float | None = None
    mean_probability: float | None = None
    side: str | None = None
