"""Axial slice PNGs for the web viewer: window presets, tumour mask and Grad-CAM overlays.

What a finished job keeps for rendering (``JOB/render/``, written once, atomically, by
:func:`save_render_data`) — plain ``.npy`` arrays on the study's canonical LPS grid, opened
memory-mapped so a slice request reads only that slice (a 512x512 slice renders in a few ms):

* ``image.npy`` ``(z, y, x)``: int16 HU (rounded; display only), or float16 [0, 1] for
  windowed input;
* ``mask.npy`` ``(z, y, x)`` uint8 0/1: the predicted tumour mask;
* ``cam.npy`` ``(z, y, x)`` uint8 0..255 (heat x 255), only when the result had Grad-CAM maps;
* ``render.json``: intensity kind, shape, spacing and the slices with a heat map.

These hold no patient identifiers (pixels only), unlike the uploaded DICOM files, which the
service deletes once the job is done. The NIfTI outputs would do as well, but they are in the
file's own orientation and compressed; reading one slice of them costs the whole volume.

Display convention: the canonical array's column 0 is the patient's right and row 0 anterior,
so drawing ``array[z]`` as is gives the radiological view (patient's right on the image left,
anterior up), the way radiologists read axial CT.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lungcad.data.preprocessing import LUNG_WINDOW, MEDIASTINAL_WINDOW, window_hu
from lungcad.errors import InputError
from lungcad.io.atomic import atomic_dir
from lungcad.volume import Volume

__all__ = [
    "BONE_WINDOW",
    "WINDOWS",
    "SliceRenderer",
    "encode_png",
    "render_slice",
    "save_render_data",
]

#: (level, width) in HU; bone after the usual W 1800 / L 400 preset.
BONE_WINDOW: tuple[float, float] = (400.0, 1800.0)
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": LUNG_WINDOW,
    "mediastinal": MEDIASTINAL_WINDOW,
    "bone": BONE_WINDOW,
}
MASK_RGB = np.array([255.0, 32.0, 16.0], dtype=np.float32)
MASK_ALPHA = 0.45
CAM_ALPHA = 0.5

IMAGE_FILE = "image.npy"
MASK_FILE = "mask.npy"
CAM_FILE = "cam.npy"
INFO_FILE = "render.json"


def _jet(heat: np.ndarray) -> np.ndarray:
    """The "jet" colour map (blue-cyan-yellow-red) of ``heat`` in [0, 1]: ``(..., 3)`` in [0, 1].

    The piecewise-linear form of matplotlib's ``jet``; computed here so a slice request does
    not import matplotlib.
    """
    h = 4.0 * heat[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(h - centres), 0.0, 1.0)


@functools.lru_cache(maxsize=len(WINDOWS))
def _window_lut(window: str) -> np.ndarray:
    """uint8 grey for every int16 HU value (index ``hu + 32768``) through a window."""
    hu = np.arange(-32768, 32768, dtype=np.float64)
    return np.round(window_hu(hu, *WINDOWS[window]) * 255.0).astype(np.uint8)


def _grey(image: np.ndarray, intensity: str, window: str) -> np.ndarray:
    """``(H, W)`` uint8 grey values of a slice."""
    image = np.asarray(image)
    if intensity != "hu":
        return np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    if image.dtype == np.int16:  # what the render store keeps: a table look-up, ~1 ms
        return _window_lut(window)[image.astype(np.int32) + 32768]
    return np.round(window_hu(image, *WINDOWS[window]) * 255.0).astype(np.uint8)


def render_slice(
    image: np.ndarray,
    *,
    intensity: str = "hu",
    window: str = "lung",
    mask: np.ndarray | None = None,
    cam: np.ndarray | None = None,
) -> np.ndarray:
    """One axial slice as RGB, windowed, with optional heat map and tumour mask.

    Args:
        image: ``(H, W)`` HU (``intensity="hu"``; int16 is fastest) or [0, 1] values
            (``"windowed"``, shown as is).
        intensity: ``"hu"`` or ``"windowed"``.
        window: a key of :data:`WINDOWS` (ignored for windowed images).
        mask: ``(H, W)`` tumour mask (non-zero = tumour), drawn red and semi-transparent.
        cam: ``(H, W)`` heat map in [0, 1] (Grad-CAM), drawn in "jet" with opacity growing
            with the heat, so cold regions stay grey.

    Returns:
        ``(H, W, 3)`` uint8 RGB in radiological display (the array as is; see module notes).

    Raises:
        InputError: unknown window name.
    """
    if window not in WINDOWS:
        raise InputError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}", "window")
    rgb = np.repeat(_grey(image, intensity, window)[..., None], 3, axis=2)
    # Blend only where an overlay is: most of a slice has neither heat nor tumour.
    if cam is not None:
        heat = np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0)
        hot = heat > 0
        if hot.any():
            h = heat[hot][:, None]
            blended = (1.0 - CAM_ALPHA * h) * rgb[hot] + CAM_ALPHA * h * 255.0 * _jet(h[:, 0])
            rgb[hot] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    if mask is not None:
        inside = np.asarray(mask) > 0
        if inside.any():
            blended = (1.0 - MASK_ALPHA) * rgb[inside] + MASK_ALPHA * MASK_RGB
            rgb[inside] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return rgb


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W, 3)`` uint8 image (fast zlib level: slices are re-rendered).

    An image with no colour (no overlay on this slice) is written as 8-bit grey: a third of
    the bytes to compress, and the browser shows it the same.
    """
    buffer = io.BytesIO()
    grey = rgb[..., 0]
    if np.array_equal(grey, rgb[..., 1]) and np.array_equal(grey, rgb[..., 2]):
        image = Image.fromarray(np.ascontiguousarray(grey), mode="L")
    else:
        image = Image.fromarray(rgb, mode="RGB")
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def save_render_data(
    folder: str | Path,
    volume: Volume,
    mask: np.ndarray,
    cam: np.ndarray | None = None,
    cam_slices: list[int] | None = None,
) -> Path:
    """Keep what the slice endpoint needs after a job (see the module notes), atomically.

    Args:
        folder: ``JOB/render`` (replaced if present).
        volume: the canonical input volume ``(z, y, x)``.
        mask: ``(z, y, x)`` tumour mask on the same grid.
        cam: ``(z, y, x)`` heat maps in [0, 1], or None.
        cam_slices: slices that have a heat map.

    Returns:
        ``folder``.
    """
    if mask.shape != volume.shape or (cam is not None and cam.shape != volume.shape):
        raise InputError(f"mask/cam shape must match the volume {volume.shape}", folder)
    with atomic_dir(folder) as tmp:
        if volume.intensity == "hu":
            image = np.clip(np.rint(volume.array), -32768, 32767).astype(np.int16)
        else:
            image = np.clip(volume.array, 0.0, 1.0).astype(np.float16)
        np.save(tmp / IMAGE_FILE, image)
        np.save(tmp / MASK_FILE, (np.asarray(mask) > 0).astype(np.uint8))
        if cam is not None:
            np.save(tmp / CAM_FILE, np.rint(np.clip(cam, 0.0, 1.0) * 255).astype(np.uint8))
        info = {
            "intensity": volume.intensity,
            "shape_zyx": list(volume.shape),
            "spacing_zyx": list(volume.spacing),
            "has_cam": cam is not None,
            "cam_slices": [int(z) for z in (cam_slices or [])],
        }
        (tmp / INFO_FILE).write_text(json.dumps(info), encoding="utf-8")
    return Path(folder)


@dataclass
class SliceRenderer:
    """Renders slices of a finished job from its ``render/`` folder (memory-mapped).

    Args:
        folder: the folder written by :func:`save_render_data`.
    """

    folder: Path

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.info = json.loads((self.folder / INFO_FILE).read_text(encoding="utf-8"))
        self.image = np.load(self.folder / IMAGE_FILE, mmap_mode="r")
        self.mask = np.load(self.folder / MASK_FILE, mmap_mode="r")
        cam_path = self.folder / CAM_FILE
        self.cam = np.load(cam_path, mmap_mode="r") if cam_path.is_file() else None

    @property
    def n_slices(self) -> int:
        """Number of axial slices."""
        return int(self.image.shape[0])

    def png(
        self, z: int, *, window: str = "lung", overlay: bool = True, cam: bool = False
    ) -> bytes:
        """PNG of axial slice ``z`` (see :func:`render_slice`).

        Args:
            z: slice index, ``0 <= z < n_slices``.
            window: ``"lung"``, ``"mediastinal"`` or ``"bone"``.
            overlay: draw the tumour mask.
            cam: draw the Grad-CAM heat map (when the job has one; else no heat map).

        Raises:
            IndexError: ``z`` out of range.
        """
        if not 0 <= z < self.n_slices:
            raise IndexError(f"slice {z} out of range 0..{self.n_slices - 1}")
        heat = None
        if cam and self.cam is not None:
            heat = np.asarray(self.cam[z], dtype=np.float32) / 255.0
        rgb = render_slice(
            np.asarray(self.image[z]),
            intensity=self.info["intensity"],
            window=window,
            mask=np.asarray(self.mask[z]) if overlay else None,
            cam=heat,
        )
        return encode_png(rgb)
