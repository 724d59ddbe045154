"""The Volume: one CT image with its geometry, used everywhere in lungcad.

Conventions (read these once; most field bugs in CT software are here):

* ``array`` is indexed ``[z, y, x]`` (slice, row, column), numpy order, float32.
* ``spacing`` is in the same order as the array axes: ``(z, y, x)`` in mm.
* ``origin`` is the physical position of voxel ``[0, 0, 0]`` in patient LPS coordinates,
  ``(x, y, z)`` in mm, exactly as DICOM and ITK store it.
* ``direction`` is ITK's 3x3 direction-cosine matrix: column ``j`` is the LPS unit vector of
  index axis ``j`` where index axes are ``(i, j, k) = (x, y, z)`` (the array's axes reversed).
* ``intensity`` is ``"hu"`` for calibrated CT (Hounsfield units) or ``"windowed"`` for
  display images already mapped to [0, 1] (PNG/JPEG slices); windowed data is not HU and must
  not be treated as such.

Inside lungcad every reader returns volumes in one canonical orientation, ``LPS`` in ITK's
code (index x grows to the patient's Left, y to Posterior, z to Superior); the orientation the
file had is kept in ``meta["source_orientation"]`` so results can be written back in the
input's own geometry with :func:`reorient`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

CANONICAL_ORIENTATION = "LPS"
INTENSITY_KINDS = ("hu", "windowed")


@dataclass
class Volume:
    """A 3D image (a 2D slice is a volume with one z slice) plus its geometry.

    Attributes:
        array: ``(z, y, x)`` float32 voxel values, HU or windowed [0, 1].
        spacing: ``(z, y, x)`` voxel size in mm.
        origin: ``(x, y, z)`` LPS position in mm of voxel ``[0, 0, 0]``.
        direction: ``(3, 3)`` ITK direction cosines (columns = index axes x, y, z).
        intensity: ``"hu"`` or ``"windowed"``.
        meta: free-form metadata (source path, modality, UIDs, warnings, ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    intensity: str = "hu"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D (z, y, x); got shape {self.array.shape}")
        if self.intensity not in INTENSITY_KINDS:
            raise ValueError(
                f"Volume.intensity must be one of {INTENSITY_KINDS}; got {self.intensity!r}"
            )
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"Volume.spacing must be positive (mm); got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    def with_array(self, array: np.ndarray, intensity: str | None = None) -> Volume:
        """A new Volume with the same geometry and metadata but another array (same shape)."""
        if array.shape != self.array.shape:
            raise ValueError(f"with_array needs shape {self.array.shape}; got {array.shape}")
        return Volume(
            array=array,
            spacing=self.spacing,
            origin=self.origin,
            direction=self.direction.copy(),
            intensity=intensity or self.intensity,
            meta=copy.deepcopy(self.meta),
        )

    def same_geometry(self, other: Volume, atol: float = 1e-4) -> bool:
        """True when shape, spacing, origin and direction agree (mm tolerance ``atol``)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=1e-6)
        )

    def index_to_physical(self, zyx: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` voxel indices ``(z, y, x)`` (may be fractional) to LPS mm (x, y, z)."""
        zyx = np.atleast_2d(np.asarray(zyx, dtype=np.float64))
        ijk = zyx[:, ::-1] * np.asarray(self.spacing[::-1])
        return ijk @ self.direction.T + np.asarray(self.origin)

    def to_sitk(self) -> sitk.Image:
        """This volume as a SimpleITK image (array copied; geometry exact)."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(float(d) for d in self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(
        cls,
        image: sitk.Image,
        intensity: str = "hu",
        meta: dict[str, Any] | None = None,
        dtype: type = np.float32,
    ) -> Volume:
        """Build a Volume from a 3D SimpleITK image (a 2D image becomes one z slice)."""
        if image.GetDimension() == 2:
            image = sitk.JoinSeries(image)
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 2D or 3D image; got {image.GetDimension()}D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                "expected a single-channel image; got "
                f"{image.GetNumberOfComponentsPerPixel()} channels"
            )
        return cls(
            array=sitk.GetArrayFromImage(image).astype(dtype, copy=False),
            spacing=tuple(image.GetSpacing()[::-1]),
            origin=tuple(image.GetOrigin()),
            direction=np.asarray(image.GetDirection()).reshape(3, 3),
            intensity=intensity,
            meta=dict(meta or {}),
        )


def orientation_code(volume: Volume) -> str:
    """ITK orientation code (e.g. ``"LPS"``, ``"RAI"``) of the volume's index axes x, y, z."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        tuple(float(d) for d in volume.direction.ravel())
    )


def reorient(volume: Volume, code: str = CANONICAL_ORIENTATION) -> Volume:
    """Permute/flip the array so the index axes follow ``code``; geometry stays exact.

    This is a lossless axis permutation and flip (no interpolation); voxel positions in
    patient space do not move. ``reorient(reorient(v, "LPS"), orientation_code(v))`` is ``v``.

    Args:
        volume: any Volume.
        code: three-letter ITK orientation code such as ``"LPS"`` or ``"RAI"``.

    Returns:
        A new Volume (meta copied) whose ``orientation_code`` is ``code``.
    """
    if orientation_code(volume) == code:
        return volume.with_array(volume.array)
    image = sitk.DICOMOrient(volume.to_sitk(), code)
    out = Volume.from_sitk(
        image,
        intensity=volume.intensity,
        meta=copy.deepcopy(volume.meta),
        dtype=volume.array.dtype.type,
    )
    return out


def to_canonical(volume: Volume) -> Volume:
    """Reorient to lungcad's canonical ``LPS`` and remember the source orientation in meta."""
    source = orientation_code(volume)
    out = reorient(volume, CANONICAL_ORIENTATION)
    out.meta.setdefault("source_orientation", source)
    return out


def to_source_orientation(volume: Volume) -> Volume:
    """Undo :func:`to_canonical`: back to ``meta["source_orientation"]`` (if recorded)."""
    source = volume.meta.get("source_orientation")
    if not source:
        return volume.with_array(volume.array)
    return reorient(volume, source)
