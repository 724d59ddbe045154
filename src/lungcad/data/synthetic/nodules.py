"""Lung nodules and tumours: placement inside the lungs and rendering with partial volume.

Shapes are signed-distance functions in mm around the nodule centre: ``round`` (a slightly
elongated ellipsoid), ``lobulated`` (a union of overlapping spheres) and ``spiculated`` (a
lobulated core with thin tapering spicules). Densities follow the radiological classes:
``solid`` (~+30 HU), ``ground-glass`` (~-520 HU, raises the lung's density without hiding its
vessels) and ``part-solid`` (ground glass with a solid core of ~45% of the diameter).
The nominal ``diameter_mm`` is the core's extent (spicules excluded, as in LIDC/LUNA16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lungcad.data.synthetic.anatomy import Anatomy, lung_sides, tube_signed_distance
from lungcad.errors import InputError

SHAPES = ("round", "lobulated", "spiculated")
DENSITIES = ("solid", "part-solid", "ground-glass")

_SOLID_HU = 30.0
_GGO_HU = -520.0
_CORE_FRACTION = 0.45  # part-solid: solid core diameter / lesion diameter
_BONE, _TUMOUR, _TABLE = 3, 7, 8


@dataclass
class Nodule:
    """One nodule's ground truth.

    Attributes:
        centre_zyx: centre as (fractional) voxel index ``(z, y, x)``.
        centre_lps: centre in patient LPS mm ``(x, y, z)`` (world coordinates, as LUNA16).
        diameter_mm: nominal diameter (extent of the lesion body, spicules excluded).
        shape: one of :data:`SHAPES`.
        density: one of :data:`DENSITIES`.
        voxels: voxels of this nodule in the mask (0 only if it left the field of view).
        volume_mm3: ``voxels`` times the voxel volume.
    """

    centre_zyx: tuple[float, float, float]
    centre_lps: tuple[float, float, float]
    diameter_mm: float
    shape: str
    density: str
    voxels: int = 0
    volume_mm3: float = 0.0


def _probe_directions() -> np.ndarray:
    axes = np.vstack([np.eye(3), -np.eye(3)])
    diag = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], float)
    return np.vstack([axes, diag / np.sqrt(3)])


def place_nodules(
    rng: np.random.Generator,
    anat: Anatomy,
    specs: list[tuple[float, str, str]],
    grid: dict,
) -> list[Nodule]:
    """Choose centres inside the lungs (and the field of view) for ``specs``.

    A centre must lie in a lung with the lung all around it at 70% of the radius (relaxed to
    40%, then to the centre only, for large lesions), inside the scanned volume, and apart
    from the nodules placed before it.

    Raises:
        InputError: the grid shows no lung where the nodule could go.
    """
    if not specs:
        return []
    xs, ys, zs = (a.ravel() for a in grid["patient"])
    n = 8000
    pts = np.column_stack(
        [
            rng.uniform(-anat.inner_a, anat.inner_a, n),
            rng.uniform(anat.cage_yc - anat.inner_b, anat.cage_yc + anat.inner_b, n),
            rng.uniform(min(anat.dome_z) - 10.0, anat.apex_z, n),
        ]
    )
    right, left = lung_sides(anat, pts[:, 0], pts[:, 1], pts[:, 2])
    pts = pts[right | left]
    probes = _probe_directions()
    spacing = np.array(grid["spacing"][::-1])  # x, y, z
    origin, offset = np.array(grid["origin"]), grid["offset_xyz"]
    placed: list[Nodule] = []
    centres: list[tuple[np.ndarray, float]] = []
    for diameter, shape, density in specs:
        radius = diameter / 2.0
        lo = np.array([xs[0], ys[0], zs[0]]) + 0.3 * radius
        hi = np.array([xs[-1], ys[-1], zs[-1]]) - 0.3 * radius
        ok = np.all((pts >= lo) & (pts <= hi), axis=1)
        for c, r in centres:
            ok &= np.linalg.norm(pts - c, axis=1) > 0.6 * (radius + r) + 3.0
        cand = pts[ok]
        chosen = None
        for frac in (0.7, 0.4, 0.0):
            if len(cand) == 0:
                break
            probe_pts = (cand[:, None, :] + frac * radius * probes[None]).reshape(-1, 3)
            r_in, l_in = lung_sides(anat, probe_pts[:, 0], probe_pts[:, 1], probe_pts[:, 2])
            valid = np.flatnonzero((r_in | l_in).reshape(len(cand), -1).all(axis=1))
            if valid.size:
                chosen = cand[valid[0]]
                break
        if chosen is None:
            raise InputError(
                f"no room for a {diameter:.1f} mm nodule in the lungs inside this field of view "
                f"(grid {grid['shape']}); use a larger grid or a smaller nodule",
                "shape_zyx",
            )
        world = chosen + offset
        index_xyz = (world - origin) / spacing
        placed.append(
            Nodule(
                centre_zyx=(float(index_xyz[2]), float(index_xyz[1]), float(index_xyz[0])),
                centre_lps=(float(world[0]), float(world[1]), float(world[2])),
                diameter_mm=float(diameter),
                shape=shape,
                density=density,
            )
        )
        centres.append((chosen, radius))
    return placed


def _random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _sphere_union(centres: np.ndarray, radii: np.ndarray) -> Callable:
    def sd(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.full(np.broadcast(x, y, z).shape, np.inf)
        for (cx, cy, cz), r in zip(centres, radii, strict=True):
            out = np.minimum(out, np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) - r)
        return out

    return sd


def _shape_sdf(rng: np.random.Generator, shape: str, radius: float) -> tuple[Callable, Callable]:
    """(body sdf, full sdf incl. spicules) in local mm coordinates, extent ~``radius``."""
    if shape == "round":
        axes = radius * np.array([1.0, *rng.uniform(0.85, 1.0, 2)])
        rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))

        def body(x, y, z):
            u = (rot[0, 0] * x + rot[1, 0] * y + rot[2, 0] * z) / axes[0]
            v = (rot[0, 1] * x + rot[1, 1] * y + rot[2, 1] * z) / axes[1]
            w = (rot[0, 2] * x + rot[1, 2] * y + rot[2, 2] * z) / axes[2]
            return (np.sqrt(u * u + v * v + w * w) - 1.0) * axes.min()

        return body, body
    if shape == "lobulated":
        k = int(rng.integers(4, 7))
        centres = np.vstack([[0, 0, 0], 0.38 * radius * _random_unit(rng, k)])
        radii = np.r_[0.72 * radius, np.full(k, 0.6 * radius)]
        body = _sphere_union(centres, radii)
        return body, body
    centres = np.vstack([[0, 0, 0], 0.35 * radius * _random_unit(rng, 3)])
    body = _sphere_union(centres, np.r_[0.8 * radius, np.full(3, 0.6 * radius)])
    dirs = _random_unit(rng, int(rng.integers(8, 15)))
    lengths = rng.uniform(0.3, 0.9, len(dirs)) * radius
    spicules = np.column_stack(
        [
            0.6 * radius * dirs,
            (radius + lengths)[:, None] * dirs,
            np.full(len(dirs), max(0.5, 0.1 * radius)),
            np.full(len(dirs), 0.2),
        ]
    )

    def full(x, y, z):
        return np.minimum(body(x, y, z), tube_signed_distance(spicules, x, y, z))

    return body, full


def render_nodules(
    hu: np.ndarray,
    labels: np.ndarray,
    nodules: list[Nodule],
    grid: dict,
    texture: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Paint ``nodules`` into ``hu`` and ``labels`` (in place); return the nodule label map.

    Args:
        hu: noise-free HU image ``(z, y, x)``, modified in place.
        labels: tissue labels, modified in place (tumour = 7).
        nodules: placed nodules; their ``voxels`` and ``volume_mm3`` are filled in.
        grid: the grid dict of the phantom (patient axis coordinates, spacing, offset).
        texture: unit-variance smooth noise ``(z, y, x)`` for internal texture.
        rng: random source for the shapes.

    Returns:
        ``(z, y, x)`` uint8 map, ``i + 1`` inside ``nodules[i]``.
    """
    xs, ys, zs = (a.ravel() for a in grid["patient"])
    h = float(min(grid["spacing"][1:]))
    out = np.zeros(hu.shape, np.uint8)
    voxel_mm3 = float(np.prod(grid["spacing"]))
    for i, nod in enumerate(nodules):
        radius = nod.diameter_mm / 2.0
        body, full = _shape_sdf(rng, nod.shape, radius)
        centre = np.asarray(nod.centre_lps) - grid["offset_xyz"]
        reach = radius * (1.9 if nod.shape == "spiculated" else 1.0) + 2.0 * h
        box = []
        for axis, c in zip((xs, ys, zs), centre, strict=True):
            box.append(
                slice(
                    int(np.searchsorted(axis, c - reach)),
                    int(np.searchsorted(axis, c + reach, side="right")),
                )
            )
        bx, by, bz = box
        lx = (xs[bx] - centre[0])[None, None, :]
        ly = (ys[by] - centre[1])[None, :, None]
        lz = (zs[bz] - centre[2])[:, None, None]
        region = (bz, by, bx)
        sd = full(lx, ly, lz)
        mask = sd <= 0
        # A nodule smaller than a voxel still marks the voxel holding its centre.
        cz, cy, cx = (int(round(v)) for v in nod.centre_zyx)
        if all(0 <= v < n for v, n in zip((cz, cy, cx), hu.shape, strict=True)):
            mask[cz - bz.start, cy - by.start, cx - bx.start] = True
        keep = ~np.isin(labels[region], (_BONE, _TABLE))
        mask &= keep
        occ = np.clip(0.5 - sd / h, 0.0, 1.0) * keep
        occ = np.maximum(occ, mask * 0.5)
        sub, tex = hu[region], texture[region]
        if nod.density == "solid":
            sub += occ * (_SOLID_HU + 12.0 * tex - sub)
        else:
            ggo = sub + occ * (_GGO_HU + 40.0 * tex - sub)
            np.maximum(sub, ggo, out=sub)  # ground glass does not hide vessels
            if nod.density == "part-solid":
                core = body(lx / _CORE_FRACTION, ly / _CORE_FRACTION, lz / _CORE_FRACTION)
                occ_core = np.clip(0.5 - core * _CORE_FRACTION / h, 0.0, 1.0) * keep
                sub += occ_core * (_SOLID_HU + 12.0 * tex - sub)
        labels[region][mask] = _TUMOUR
        out[region][mask & (out[region] == 0)] = i + 1
        nod.voxels = int((out == i + 1).sum())
        nod.volume_mm3 = nod.voxels * voxel_mm3
    return out
