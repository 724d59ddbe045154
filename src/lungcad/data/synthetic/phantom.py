"""Synthetic chest-CT phantoms in HU with tumours of known size, shape and density.

:func:`make_phantom` draws a patient (body, fat, ribs, sternum, spine, mediastinum, heart,
aorta, diaphragm, lungs with airway and vessel trees; see :mod:`.anatomy`), places nodules
in the lungs, and "scans" it at a site (:mod:`.sites`): blur, HU calibration, noise, slice
thickness and pixel spacing. The same seed is the same patient at any site, so sites can be
compared on identical anatomy; the tissue label map and tumour masks are exact ground truth.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from lungcad.data.synthetic.anatomy import (
    Anatomy,
    diaphragm_z,
    lung_sides,
    sample_anatomy,
    tube_signed_distance,
)
from lungcad.data.synthetic.nodules import DENSITIES, SHAPES, Nodule, place_nodules, render_nodules
from lungcad.data.synthetic.sites import SiteParams, get_site
from lungcad.errors import InputError
from lungcad.volume import Volume

log = logging.getLogger(__name__)

#: Codes of :attr:`Phantom.labels`.
TISSUE_LABELS: dict[int, str] = {
    0: "air",
    1: "fat",
    2: "soft tissue",
    3: "bone",
    4: "lung",
    5: "vessel",
    6: "airway",
    7: "tumour",
    8: "table",
}

# Nominal HU of the tissues before site effects.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 40.0,
    "mediastinal_fat": -80.0,
    "heart": 40.0,
    "aorta": 45.0,
    "liver": 60.0,
    "abdomen": 45.0,
    "lung": -860.0,
    "vessel": 40.0,
    "airway_wall": 0.0,
    "cortical": 700.0,
    "marrow": 250.0,
    "cartilage": 150.0,
    "disc": 80.0,
    "csf": 15.0,
    "table": 150.0,
}


@dataclass
class Phantom:
    """One synthetic CT with its ground truth.

    Attributes:
        volume: the CT, ``(z, y, x)`` float32 HU (integers, like a scanner's), canonical LPS.
        tumour_mask: ``(z, y, x)`` uint8, 1 inside any tumour/nodule.
        nodule_labels: ``(z, y, x)`` uint8, ``i + 1`` inside ``nodules[i]``, 0 elsewhere.
        lung_mask: ``(z, y, x)`` bool, both lungs (with their vessels, airways and nodules).
        labels: ``(z, y, x)`` uint8 tissue codes, see :data:`TISSUE_LABELS`.
        nodules: the nodules, with position, diameter, shape and density.
        seed: the seed that made the patient.
        site: the site that "scanned" it.
    """

    volume: Volume
    tumour_mask: np.ndarray
    nodule_labels: np.ndarray
    lung_mask: np.ndarray
    labels: np.ndarray
    nodules: list[Nodule]
    seed: int
    site: SiteParams

    @property
    def has_tumour(self) -> bool:
        """True when the phantom contains at least one nodule voxel."""
        return bool(self.tumour_mask.any())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: seed, site, geometry and nodules (no arrays)."""
        vol = self.volume
        return {
            "seed": self.seed,
            "site": self.site.name,
            "shape_zyx": list(vol.shape),
            "spacing_zyx": list(vol.spacing),
            "origin_xyz": list(vol.origin),
            "direction": vol.direction.ravel().tolist(),
            "has_tumour": self.has_tumour,
            "nodules": [asdict(n) for n in self.nodules],
        }


def make_phantom(
    seed: int,
    site: SiteParams | str = "internal",
    *,
    tumour: bool = True,
    n_nodules: int | None = None,
    size_mm: float | Sequence[float] | None = None,
    shape: str | Sequence[str] | None = None,
    density: str | Sequence[str] | None = None,
    shape_zyx: tuple[int, int, int] | None = None,
    matrix: int | None = None,
) -> Phantom:
    """Make one synthetic chest CT, deterministic in ``seed`` (and the site).

    Args:
        seed: patient seed: body, trees and nodules depend only on it; image noise and
            texture also depend on the site's grid.
        site: a :class:`SiteParams` or a name in :data:`SITES`.
        tumour: False makes a tumour-free case (``n_nodules`` etc. must then be unset).
        n_nodules: number of nodules; default 1 to 3 (or ``len(size_mm)`` when a list).
        size_mm: nodule diameter(s) in mm, 2..60; default: the first nodule log-uniform in
            5..40 mm, others 3..15 mm.
        shape: ``"round"``, ``"lobulated"`` or ``"spiculated"`` (one or per nodule); default random.
        density: ``"solid"`` (~+30 HU), ``"part-solid"`` or ``"ground-glass"`` (~-500 HU).
        shape_zyx: explicit ``(slices, rows, columns)``; pixel spacing stays
            ``fov / matrix`` and the slice thickness the site's, so this crops or pads the
            field of view and the coverage around the chest's centre.
        matrix: in-plane matrix (square) replacing the site's, same field of view.

    Returns:
        The :class:`Phantom`.

    Raises:
        InputError: inconsistent nodule arguments, unknown site/shape/density, or a grid
            that shows no lung to put a nodule in.
    """
    site = get_site(site)
    if matrix is not None:
        site = site.with_matrix(matrix)
    specs = _nodule_specs(
        np.random.default_rng([int(seed), 7]), tumour, n_nodules, size_mm, shape, density
    )
    anat = sample_anatomy(np.random.default_rng(int(seed)))
    grid = _grid(anat, site, shape_zyx)
    xs, ys, zs = grid["patient"]
    nodules = place_nodules(np.random.default_rng([int(seed), 11]), anat, specs, grid)
    rng_image = np.random.default_rng([int(seed), 13, *grid["shape"]])
    texture = _smooth_noise(rng_image, grid["shape"], grid["spacing"], sigma_mm=2.5)
    hu, labels, lung = _render_anatomy(anat, xs, ys, zs, grid["spacing"], texture)
    nodule_labels = render_nodules(
        hu, labels, nodules, grid, texture, np.random.default_rng([int(seed), 17])
    )
    hu = _scan(hu, site, grid["spacing"], rng_image)
    volume = Volume(
        array=hu,
        spacing=grid["spacing"],
        origin=grid["origin"],
        direction=np.eye(3),
        intensity="hu",
        meta={
            "modality": "CT",
            "synthetic": True,
            "seed": int(seed),
            "site": site.name,
            "slice_thickness_mm": site.slice_thickness_mm,
            "source_orientation": "LPS",
        },
    )
    return Phantom(
        volume=volume,
        tumour_mask=(nodule_labels > 0).astype(np.uint8),
        nodule_labels=nodule_labels,
        lung_mask=lung,
        labels=labels,
        nodules=nodules,
        seed=int(seed),
        site=site,
    )


def _as_list(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise InputError(
            f"{name} has {len(value)} entries for {n} nodules; give one per nodule "
            "or a single value",
            name,
        )
    return list(value)


def _nodule_specs(
    rng: np.random.Generator,
    tumour: bool,
    n_nodules: int | None,
    size_mm: float | Sequence[float] | None,
    shape: str | Sequence[str] | None,
    density: str | Sequence[str] | None,
) -> list[tuple[float, str, str]]:
    """(diameter mm, shape, density) per nodule, drawn where not given."""
    if not tumour:
        if n_nodules or size_mm is not None:
            raise InputError(
                "tumour=False contradicts n_nodules/size_mm; drop them or set tumour=True", "tumour"
            )
        return []
    if n_nodules is None:
        n_nodules = (
            len(size_mm)
            if isinstance(size_mm, Sequence)
            else int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        )
    if n_nodules < 1:
        raise InputError(
            f"a tumour case needs n_nodules >= 1; got {n_nodules}. Use tumour=False "
            "for a tumour-free case",
            "n_nodules",
        )
    if size_mm is None:
        # The first nodule is the index tumour (5-40 mm); further ones are smaller (3-15 mm).
        bounds = [(5.0, 40.0)] + [(3.0, 15.0)] * (n_nodules - 1)
        sizes = [float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) for lo, hi in bounds]
    else:
        sizes = [float(s) for s in _as_list(size_mm, n_nodules, "size_mm")]
    if any(not 2.0 <= s <= 60.0 for s in sizes):
        raise InputError(f"nodule diameters must be 2..60 mm; got {sizes}", "size_mm")
    shapes = _as_list(shape, n_nodules, "shape")
    densities = _as_list(density, n_nodules, "density")
    out = []
    for size, shp, den in zip(sizes, shapes, densities, strict=True):
        shp = shp or str(rng.choice(SHAPES, p=[0.35, 0.35, 0.3]))
        den = den or str(rng.choice(DENSITIES, p=[0.6, 0.2, 0.2]))
        if shp not in SHAPES:
            raise InputError(f"unknown nodule shape {shp!r}; expected one of {SHAPES}", "shape")
        if den not in DENSITIES:
            raise InputError(
                f"unknown nodule density {den!r}; expected one of {DENSITIES}", "density"
            )
        out.append((size, shp, den))
    return out


def _grid(anat: Anatomy, site: SiteParams, shape_zyx: tuple[int, int, int] | None) -> dict:
    """The site's voxel grid: shape, spacing, LPS origin and patient-space axis coordinates."""
    if shape_zyx is None:
        shape = (site.n_slices, site.matrix, site.matrix)
    else:
        given = tuple(int(s) for s in shape_zyx)
        if len(given) != 3 or min(given) < 1:
            raise InputError(
                f"shape_zyx must be three positive ints; got {shape_zyx!r}", "shape_zyx"
            )
        shape = (given[0], given[1], given[2])
    d, h, w = shape
    sz, sp = site.slice_thickness_mm, site.pixel_spacing_mm
    # The image centre is the scanner's isocentre (0, 0); the patient lies a little off it.
    origin = (-(w - 1) / 2 * sp, -(h - 1) / 2 * sp, anat.z_centre - (d - 1) / 2 * sz)
    x = (origin[0] + sp * np.arange(w) - anat.x_shift).astype(np.float32)
    y = (origin[1] + sp * np.arange(h) - anat.y_shift).astype(np.float32)
    z = (origin[2] + sz * np.arange(d) - anat.z_centre).astype(np.float32)
    return {
        "shape": shape,
        "spacing": (sz, sp, sp),
        "origin": origin,
        "patient": (x[None, None, :], y[None, :, None], z[:, None, None]),
        "offset_xyz": np.array([anat.x_shift, anat.y_shift, anat.z_centre]),
    }


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], sigma_mm: float
) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (tissue texture)."""
    field = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(field, [sigma_mm / s for s in spacing])
    return field / max(float(field.std()), 1e-6)


def _render_anatomy(
    an: Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    spacing: tuple[float, float, float],
    texture: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free HU image, tissue labels and lung mask of the anatomy on one grid."""
    shape = texture.shape
    hu = np.full(shape, HU["air"], np.float32)
    labels = np.zeros(shape, np.uint8)
    full = np.ones(shape, bool)

    def paint(mask: np.ndarray, value: Any, label: int) -> None:
        mask = mask & full
        hu[mask] = value[mask] if isinstance(value, np.ndarray) else value
        labels[mask] = label

    table_top = an.body_b + 3.0 - 0.0008 * x**2
    paint((y > table_top) & (y < table_top + 5.0) & (np.abs(x) < 200), HU["table"], 8)
    body = np.abs(x / an.body_a) ** an.body_p + np.abs(y / an.body_b) ** an.body_p < 1.0
    muscle = (
        np.abs(x / (an.body_a - an.fat)) ** an.body_p
        + np.abs(y / (an.body_b - an.fat)) ** an.body_p
    ) < 1.0
    paint(body, HU["fat"] + 12.0 * texture, 1)
    paint(muscle, HU["muscle"] + 8.0 * texture, 2)

    # Inside the rib cage: soft tissue with a fatty mediastinum above the diaphragm, liver
    # (right) and other abdominal organs below it; the lungs are painted over this later.
    scale = an.cage_scale(z)
    yrel = (y - an.cage_yc) / an.inner_b
    cavity = (x / (scale * an.inner_a)) ** 2 + (yrel / scale) ** 2 < 1.0
    dia = diaphragm_z(an, x, y)
    paint(cavity & (z > dia), HU["muscle"] + 8.0 * texture, 2)
    mediastinum = (np.abs(x) < an.med_w + 8.0) & (y < an.spine_y - 18.0) & (z < an.apex_z)
    paint(cavity & mediastinum & (z > dia), HU["mediastinal_fat"] + 10.0 * texture, 1)
    below = cavity & (z <= dia)
    paint(below, np.where(x < 0, HU["liver"], HU["abdomen"]) + 8.0 * texture, 2)
    hx, hy, hz, ha, hb, hc = an.heart
    paint(
        ((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2 < 1.0,
        HU["heart"] + 6.0 * texture,
        2,
    )
    aorta_sd = _tubes_on_grid(an.aorta, x, y, z)
    paint(aorta_sd < 0, HU["aorta"] + 6.0 * texture, 2)
    if an.stomach is not None:
        sx, sy, sz_, sa, sb, sc = an.stomach
        bubble = ((x - sx) / sa) ** 2 + ((y - sy) / sb) ** 2 + ((z - sz_) / sc) ** 2 < 1.0
        paint(bubble & (z < dia - 8.0), HU["air"], 0)
    _paint_bones(an, x, y, z, paint)

    right, left = lung_sides(an, x, y, z, aorta_sd)
    lung = (right | left) & full
    gravity = 50.0 * np.clip(0.5 + 0.5 * yrel, 0.0, 1.0)  # dependent (posterior) lung is denser
    paint(lung, HU["lung"] + gravity + 25.0 * texture, 4)

    h = float(min(spacing[1:]))
    vessel = np.clip(0.5 - _tubes_on_grid(an.vessels, x, y, z) / h, 0.0, 1.0) * lung
    hu += vessel * (HU["vessel"] - hu)
    labels[vessel > 0.5] = 5
    airway_sd = _tubes_on_grid(np.concatenate([an.central_airways, an.airways]), x, y, z)
    wall_sd = airway_sd - np.float32(1.2)  # airway wall outside the lumen
    wall = np.clip(0.5 - wall_sd / h, 0.0, 1.0)
    lumen = np.clip(0.5 - airway_sd / h, 0.0, 1.0)
    hu += wall * (HU["airway_wall"] - hu)
    hu += lumen * (HU["air"] - hu)
    labels[wall > 0.5] = 6
    return hu, labels, lung


def _paint_bones(an: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray, paint) -> None:
    """Ribs (oblique bands on the cage), costal cartilage, sternum and vertebrae."""
    scale = an.cage_scale(z)
    rho = np.sqrt((x / an.cage_a) ** 2 + ((y - an.cage_yc) / an.cage_b) ** 2) / scale
    radial = (rho - 1.0) * scale * np.sqrt(an.cage_a * an.cage_b)  # ~mm outwards from the cage
    # Ribs descend from the spine round to the front: a rib's height falls with the angle
    # from the posterior midline, so an axial slice cuts each rib in a short arc.
    angle = np.arctan2(np.abs(x), y - an.cage_yc)  # 0 posterior, pi anterior
    g = z + an.rib_slope * angle - an.rib_phase
    dz = (g + an.rib_pitch / 2) % an.rib_pitch - an.rib_pitch / 2
    e = np.sqrt((radial / 5.0) ** 2 + (dz / 6.0) ** 2)
    front = (np.abs(x) < 0.3 * an.cage_a) & (y < an.cage_yc)
    rib = (e < 1.0) & ~front
    paint(rib, np.where(e > 0.55, HU["cortical"], HU["marrow"]), 3)
    paint((e < 1.0) & front & (np.abs(x) >= 14.0), HU["cartilage"], 3)
    paint((np.abs(radial) < 5.0) & (np.abs(x) < 14.0) & (y < an.cage_yc), HU["cortical"] - 250, 3)

    # Vertebrae: body (discs every ~25 mm), canal, laminae and spinous process.
    vy = an.spine_y
    disc = ((z - an.rib_phase) % 25.0) < 5.0
    body_r = np.sqrt(x**2 + (y - vy) ** 2)
    paint(
        body_r < 17.0,
        np.where(disc, HU["disc"], np.where(body_r > 14.0, HU["cortical"], HU["marrow"])),
        3,
    )
    canal = np.sqrt(x**2 + (y - vy - 26.0) ** 2) < 7.0
    lamina = (np.abs(x) < 20.0) & (np.abs(y - vy - 30.0) < 5.0)
    spinous = (x / 5.0) ** 2 + ((y - vy - 46.0) / 13.0) ** 2 < 1.0
    paint((lamina | spinous) & ~canal, HU["cortical"] - 150, 3)
    paint(canal, HU["csf"], 2)


def _tubes_on_grid(segments: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Signed distance (mm) to a union of tapered segments on a grid, one small box each.

    ``x``, ``y``, ``z`` are the grid's increasing axis coordinates shaped for broadcasting.
    Looping over segments (hundreds), not voxels, keeps this vectorised and fast.
    """
    xs, ys, zs = x.ravel(), y.ravel(), z.ravel()
    out = np.full((zs.size, ys.size, xs.size), np.float32(1e3))
    margin = 3.0 * float(
        max(xs[1] - xs[0] if xs.size > 1 else 1.0, ys[1] - ys[0] if ys.size > 1 else 1.0)
    )
    for seg in segments:
        a, b, r = seg[:3], seg[3:6], max(seg[6], seg[7]) + margin
        lo, hi = np.minimum(a, b) - r, np.maximum(a, b) + r
        i0, i1 = np.searchsorted(xs, lo[0]), np.searchsorted(xs, hi[0], side="right")
        j0, j1 = np.searchsorted(ys, lo[1]), np.searchsorted(ys, hi[1], side="right")
        k0, k1 = np.searchsorted(zs, lo[2]), np.searchsorted(zs, hi[2], side="right")
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            continue
        box = out[k0:k1, j0:j1, i0:i1]
        sd = tube_signed_distance(
            seg[None], xs[None, None, i0:i1], ys[None, j0:j1, None], zs[k0:k1, None, None]
        )
        np.minimum(box, sd, out=box)
    return out


def _scan(
    hu: np.ndarray, site: SiteParams, spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Apply the site: kernel blur + slice profile, HU calibration, correlated noise, rounding."""
    sz, sy, sx = spacing
    slice_sigma = site.slice_thickness_mm / 2.355  # slice profile with FWHM = thickness
    sigma = (np.hypot(site.blur_mm, slice_sigma) / sz, site.blur_mm / sy, site.blur_mm / sx)
    out = ndimage.gaussian_filter(hu, sigma) if max(sigma) > 0.05 else hu.copy()
    out = site.hu_scale * out + site.hu_offset
    if site.noise_hu > 0:
        # CT noise is spatially correlated over about a pixel; normalise to the asked std.
        noise = ndimage.gaussian_filter(
            rng.standard_normal(hu.shape, dtype=np.float32), (0.0, 0.6, 0.6)
        )
        out += noise * np.float32(site.noise_hu / max(float(noise.std()), 1e-6))
    return np.clip(np.rint(out), -1024, 3071).astype(np.float32)
