"""A patient's chest anatomy as analytic shapes in millimetres.

Everything here lives in *patient* coordinates (LPS mm relative to the body centre and the
scan centre: x to the patient's left, y posterior, z superior) and is independent of the
scanner grid, so one seed is one patient whichever site scans it. Shapes are implicit
functions evaluated by numpy broadcasting on any arrays of x, y, z (a voxel grid or a list of
points); tubular structures (aorta, airways, vessels) are lists of tapered segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A tapered tube segment: ax, ay, az, bx, by, bz, radius at a, radius at b (mm).
Segments = np.ndarray


@dataclass
class Anatomy:
    """Randomly drawn body dimensions (mm) of one synthetic patient.

    The cage is the ellipse on which the ribs lie; the lungs fill its inside apart from the
    mediastinum, heart, aorta and spine, between the diaphragm domes and the apices.
    """

    x_shift: float  # body centre in image coordinates (mm); the image centre is (0, 0)
    y_shift: float
    z_centre: float  # LPS z of the scan centre (table position)
    body_a: float  # body superellipse half-width (x) and half-depth (y)
    body_b: float
    body_p: float
    fat: float  # subcutaneous fat thickness
    cage_a: float  # rib-cage ellipse half-axes and centre
    cage_b: float
    cage_yc: float
    med_w: float  # half-width of the mediastinum
    apex_z: float
    apex_drop: float
    dome_z: tuple[float, float]  # (right, left) diaphragm height at the dome's rim
    dome_h: float
    carina_z: float
    trachea_y: float
    spine_y: float
    heart: tuple[float, float, float, float, float, float]  # centre xyz, semi-axes xyz
    rib_pitch: float
    rib_slope: float  # mm of descent per radian round the cage
    rib_phase: float
    stomach: tuple[float, float, float, float, float, float] | None
    deform: np.ndarray  # (K, 5): kx, ky, kz, phase, amplitude of the lung-surface waviness
    aorta: Segments = field(default_factory=lambda: np.zeros((0, 8)))
    central_airways: Segments = field(default_factory=lambda: np.zeros((0, 8)))
    airways: Segments = field(default_factory=lambda: np.zeros((0, 8)))
    vessels: Segments = field(default_factory=lambda: np.zeros((0, 8)))

    @property
    def inner_a(self) -> float:
        """Half-width of the pleural cavity (inside the ribs) at its widest."""
        return self.cage_a - 5.0

    @property
    def inner_b(self) -> float:
        """Half-depth of the pleural cavity at its widest."""
        return self.cage_b - 5.0

    def cage_scale(self, z: np.ndarray) -> np.ndarray:
        """Relative cage width at height ``z``: the thorax narrows towards the apices."""
        t = np.clip((z - self.carina_z) / (self.apex_z - self.carina_z), 0.0, 1.2)
        return 1.0 - 0.22 * t**2


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy (dimensions, then airway and vessel trees)."""
    body_a = rng.uniform(145, 170)
    body_b = rng.uniform(100, 120)
    fat = rng.uniform(8, 20)
    cage_a = body_a - fat - rng.uniform(10, 16)
    cage_b = body_b - fat - rng.uniform(8, 12)
    cage_yc = rng.uniform(0, 6)
    spine_y = cage_yc + cage_b - 5.0 - 30.0
    dome_right = rng.uniform(-58, -50)
    heart_axes = (rng.uniform(55, 65), rng.uniform(42, 50), rng.uniform(40, 48))
    dome_left = dome_right - rng.uniform(5, 12)
    heart = (
        rng.uniform(18, 30),
        cage_yc - 0.35 * (cage_b - 5.0),
        dome_left + 22.0,
        *heart_axes,
    )
    k = 6
    wavelengths = rng.uniform(60, 160, size=k)
    dirs = rng.normal(size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    deform = np.column_stack(
        [
            dirs * (2 * np.pi / wavelengths)[:, None],
            rng.uniform(0, 2 * np.pi, k),
            rng.uniform(0.01, 0.03, k),
        ]
    )
    stomach = None
    if rng.random() < 0.6:
        stomach = (
            rng.uniform(45, 65),
            cage_yc - rng.uniform(15, 35),
            dome_left - 14.0,
            rng.uniform(25, 38),
            rng.uniform(18, 28),
            rng.uniform(7, 11),
        )
    anat = Anatomy(
        x_shift=rng.uniform(-8, 8),
        y_shift=rng.uniform(-15, 5),
        z_centre=rng.uniform(-320, -180),
        body_a=body_a,
        body_b=body_b,
        body_p=rng.uniform(2.2, 2.7),
        fat=fat,
        cage_a=cage_a,
        cage_b=cage_b,
        cage_yc=cage_yc,
        med_w=rng.uniform(17, 24),
        apex_z=rng.uniform(62, 72),
        apex_drop=rng.uniform(45, 60),
        dome_z=(dome_right, dome_left),
        dome_h=rng.uniform(25, 35),
        carina_z=rng.uniform(12, 22),
        trachea_y=spine_y - 36.0,
        spine_y=spine_y,
        heart=heart,
        rib_pitch=rng.uniform(24, 30),
        rib_slope=rng.uniform(30, 40),
        rib_phase=rng.uniform(0, 30),
        stomach=stomach,
        deform=deform,
    )
    anat.aorta = _aorta(anat)
    anat.central_airways = _central_airways(anat)
    pools = [_lung_points(anat, side, rng) for side in (-1, 1)]
    lobar, vessels = [], []
    for side, pool in zip((-1, 1), pools, strict=True):
        bronchus_end = anat.central_airways[1 if side < 0 else 2, 3:6]
        lobar.append(
            _grow_tree(
                rng, bronchus_end, np.array([side, 0.2, -0.6]), 3.8, 22.0, 4, 0.8, anat, side, pool
            )
        )
        # Arteries to the upper and middle lung, veins from the lower lung.
        for dz, dy, dirz in ((-4.0, -4.0, 0.8), (-10.0, -6.0, 0.0), (-30.0, -10.0, -0.6)):
            root = np.array([side * (anat.med_w + 4.0), anat.cage_yc + dy, anat.carina_z + dz])
            vessels.append(
                _grow_tree(
                    rng, root, np.array([side, 0.0, dirz]), 5.5, 28.0, 7, 0.79, anat, side, pool
                )
            )
    anat.airways = np.concatenate(lobar)
    anat.vessels = np.concatenate(vessels)
    return anat


def _aorta(an: Anatomy) -> Segments:
    """Descending aorta beside the spine, arch, ascending aorta into the heart (radius 12)."""
    top = an.carina_z + 22.0
    desc = np.array([18.0, an.spine_y - 22.0])
    asc = np.array([6.0, an.heart[1] + 8.0])
    angles = np.linspace(0, np.pi, 6)
    arch = [(desc + (asc - desc) * (1 - np.cos(t)) / 2, top + 14.0 * np.sin(t)) for t in angles]
    points = [(desc[0], desc[1], -300.0)]
    points += [(xy[0], xy[1], z) for xy, z in arch]
    points += [(asc[0], asc[1], an.heart[2])]
    pts = np.array(points)
    radius = 12.0
    return np.column_stack(
        [pts[:-1], pts[1:], np.full(len(pts) - 1, radius), np.full(len(pts) - 1, radius)]
    )


def _central_airways(an: Anatomy) -> Segments:
    """Trachea (from above the scan to the carina) and the two main bronchi."""
    carina = np.array([-2.0, an.trachea_y, an.carina_z])
    top = np.array([-2.0, an.trachea_y - 6.0, 300.0])
    right = np.array([-(an.med_w + 10.0), an.trachea_y + 6.0, an.carina_z - 16.0])
    left = np.array([an.med_w + 14.0, an.trachea_y + 10.0, an.carina_z - 26.0])
    return np.array(
        [
            [*top, *carina, 8.5, 8.0],
            [*carina, *right, 6.5, 5.5],
            [*carina, *left, 6.0, 5.0],
        ]
    )


def lung_sides(
    an: Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    aorta_sd: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Right and left lung (bool, broadcast shape of x, y, z) in patient mm coordinates.

    ``aorta_sd`` may pass a precomputed signed distance to the aorta (same shape) to save time.
    """
    wave = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), np.float32)
    for kx, ky, kz, phase, amp in an.deform:
        wave = wave + np.float32(amp) * np.sin(kx * x + ky * y + kz * z + phase).astype(np.float32)
    scale = an.cage_scale(z)
    yrel = (y - an.cage_yc) / an.inner_b
    cavity = (x / (scale * an.inner_a)) ** 2 + (yrel / scale) ** 2 + wave < 1.0
    cavity &= ~((np.abs(x) < 32.0) & (y > an.spine_y - 24.0))  # spine and paravertebral muscle
    hx, hy, hz, ha, hb, hc = an.heart
    cavity &= ((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2 > 1.0
    if aorta_sd is None:
        aorta_sd = tube_signed_distance(an.aorta, x, y, z)
    cavity &= aorta_sd > 1.5
    out = []
    for side, dome_z in zip((-1, 1), an.dome_z, strict=True):
        r2 = ((x - side * 0.5 * an.inner_a) / (0.55 * an.inner_a)) ** 2 + (
            (y - an.cage_yc - 0.1 * an.inner_b) / (0.9 * an.inner_b)
        ) ** 2
        lung = cavity & (side * x > an.med_w)
        lung &= z < an.apex_z - an.apex_drop * r2
        # Domes are lower at the rim and posteriorly (the costophrenic recesses).
        lung &= z > dome_z + an.dome_h * (1.0 - r2) - 10.0 * np.clip(yrel, 0, 1)
        out.append(lung)
    return out[0], out[1]


def diaphragm_z(an: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height (mm) of the diaphragm surface under each (x, y); right side for x < 0."""
    side = np.where(x < 0, -1.0, 1.0)
    dome = np.where(x < 0, an.dome_z[0], an.dome_z[1])
    r2 = ((x - side * 0.5 * an.inner_a) / (0.55 * an.inner_a)) ** 2 + (
        (y - an.cage_yc - 0.1 * an.inner_b) / (0.9 * an.inner_b)
    ) ** 2
    yrel = (y - an.cage_yc) / an.inner_b
    return dome + an.dome_h * (1.0 - r2) - 10.0 * np.clip(yrel, 0, 1)


def tube_signed_distance(
    segments: Segments, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """Signed distance (mm, negative inside) to the union of tapered segments, broadcast."""
    shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
    best = np.full(shape, np.inf, dtype=np.float32)
    for seg in segments:
        np.minimum(best, _segment_sd(seg, x, y, z), out=best)
    return best


def _segment_sd(seg: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    ax, ay, az, bx, by, bz, r0, r1 = (float(v) for v in seg)
    ux, uy, uz = bx - ax, by - ay, bz - az
    length2 = max(ux * ux + uy * uy + uz * uz, 1e-9)
    dx, dy, dz = x - ax, y - ay, z - az
    t = np.clip((dx * ux + dy * uy + dz * uz) / length2, 0.0, 1.0)
    dist = np.sqrt((dx - t * ux) ** 2 + (dy - t * uy) ** 2 + (dz - t * uz) ** 2)
    return (dist - (r0 + t * (r1 - r0))).astype(np.float32)


def _lung_points(an: Anatomy, side: int, rng: np.random.Generator, n: int = 6000) -> np.ndarray:
    """Random points (N, 3) inside one lung, used as growth targets for the trees."""
    pts = np.column_stack(
        [
            rng.uniform(0, an.inner_a, n) * side,
            rng.uniform(an.cage_yc - an.inner_b, an.cage_yc + an.inner_b, n),
            rng.uniform(min(an.dome_z) - 15, an.apex_z, n),
        ]
    )
    inside = lung_sides(an, pts[:, 0], pts[:, 1], pts[:, 2])[0 if side < 0 else 1]
    return pts[inside]


def _grow_tree(
    rng: np.random.Generator,
    root: np.ndarray,
    direction: np.ndarray,
    radius: float,
    length: float,
    depth: int,
    taper: float,
    an: Anatomy,
    side: int,
    pool: np.ndarray,
) -> Segments:
    """A binary branching tree of tapered segments that grows towards points of one lung.

    Each branch bends towards a random lung point ahead of it, so the tree spreads through
    the lung; radius shrinks by ``taper`` per generation (Murray's law gives ~0.79) and a
    branch leaving the lung is shortened (up to three halvings) or dropped. One generation
    is grown at a time, all its branches together.
    """
    which = 0 if side < 0 else 1
    starts = np.asarray(root, float)[None]
    dirs = (direction / np.linalg.norm(direction))[None]
    lengths = np.array([length], float)
    segments = []
    for generation in range(depth + 1):
        ok = np.zeros(len(starts), bool)
        for _ in range(3):
            todo = np.flatnonzero(~ok)
            if todo.size == 0:
                break
            ends = starts[todo] + dirs[todo] * lengths[todo, None]
            inside = lung_sides(an, ends[:, 0], ends[:, 1], ends[:, 2])[which]
            ok[todo[inside]] = True
            lengths[todo[~inside]] *= 0.5
        starts, dirs, lengths = starts[ok], dirs[ok], lengths[ok]
        ends = starts + dirs * lengths[:, None]
        r0 = radius * taper**generation
        segments.append(
            np.column_stack(
                [starts, ends, np.full(len(starts), r0), np.full(len(starts), r0 * taper)]
            )
        )
        if generation == depth or len(starts) == 0 or len(pool) == 0:
            break
        # Two children per branch, each pulled towards a random lung point ahead of it.
        m = len(starts)
        cand = pool[rng.integers(0, len(pool), (m, 2, 8))]  # (m, 2, 8, 3)
        to_cand = cand - ends[:, None, None, :]
        ahead = np.einsum("mcki,mi->mck", to_cand, dirs) > 0
        first = np.argmax(ahead, axis=2)
        pull = np.take_along_axis(to_cand, first[:, :, None, None], axis=2)[:, :, 0, :]
        pull = np.where(ahead.any(axis=2)[:, :, None], pull, dirs[:, None, :])
        pull /= np.maximum(np.linalg.norm(pull, axis=2, keepdims=True), 1e-6)
        new = 0.5 * dirs[:, None, :] + 0.5 * pull + rng.normal(0, 0.25, (m, 2, 3))
        dirs = (new / np.linalg.norm(new, axis=2, keepdims=True)).reshape(-1, 3)
        starts = np.repeat(ends, 2, axis=0)
        lengths = np.repeat(lengths, 2) * rng.uniform(0.7, 0.9, 2 * m)
    return np.concatenate(segments) if segments else np.zeros((0, 8))
