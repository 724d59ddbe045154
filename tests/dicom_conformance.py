"""What the field's own tools make of lungcad's DICOM results: dicom3tools and dcmqi.

* :func:`assert_conformant`: ``dciodvfy`` (dicom3tools, Debian package ``dicom3tools``,
  ``make system-deps``) reports no Error for a SEG, SR or KOS (warnings are allowed);
* :func:`assert_seg_matches_nifti`: dcmqi's ``segimage2itkimage`` (PyPI ``dcmqi``, in the dev
  extra) rebuilds each segment of a SEG, and those voxels and that grid are the ones of
  lungcad's NIfTI mask, compared in patient space (the SEG may store another orientation).

A missing tool skips the test on a user's machine and fails it under CI
(:func:`tests.system_tools.require_tool`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from tests.system_tools import require_tool

__all__ = ["assert_conformant", "assert_seg_matches_nifti", "dciodvfy_errors"]


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines ``dciodvfy`` reports for ``path`` (it writes its findings on stderr)."""
    require_tool(
        shutil.which("dciodvfy") is not None,
        "dciodvfy (dicom3tools) is not installed: make system-deps",
    )
    run = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def assert_conformant(*paths: Path) -> None:
    """Every file passes ``dciodvfy`` with no Error."""
    for path in paths:
        errors = dciodvfy_errors(path)
        assert not errors, f"dciodvfy {path.name}:\n" + "\n".join(errors)


def _segimage2itkimage() -> str | None:
    # pip puts dcmqi's executables beside the interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / "segimage2itkimage"
    return str(beside) if beside.is_file() else shutil.which("segimage2itkimage")


def dcmqi_segments(seg: Path, work: Path) -> dict[int, sitk.Image]:
    """Segment number -> the binary image dcmqi's ``segimage2itkimage`` rebuilds from ``seg``."""
    tool = _segimage2itkimage()
    require_tool(tool is not None, "segimage2itkimage (dcmqi) is not installed: pip install dcmqi")
    assert tool is not None
    work.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [tool, "--inputDICOM", str(seg), "--outputDirectory", str(work), "--outputType", "nifti"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    meta = json.loads((work / "meta.json").read_text())
    segments: dict[int, sitk.Image] = {}
    # One file per group of segments ("1.nii.gz", ...); in it, segment n has the value n.
    for group, attributes in enumerate(meta["segmentAttributes"], start=1):
        image = sitk.ReadImage(str(work / f"{group}.nii.gz"))
        for segment in attributes:
            number = int(segment["labelID"])
            segments[number] = sitk.Equal(image, number)
    return segments


def _physical(image: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) index (x, y, z) -> (N, 3) LPS mm."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return ijk * np.asarray(image.GetSpacing()) @ direction.T + np.asarray(image.GetOrigin())


def _index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """(N, 3) LPS mm -> (N, 3) continuous index (x, y, z)."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return (points - np.asarray(image.GetOrigin())) @ direction / np.asarray(image.GetSpacing())


def assert_seg_matches_nifti(seg: Path, nifti: Path, work: Path) -> None:
    """dcmqi rebuilds ``seg`` to exactly the voxels of lungcad's NIfTI mask, on its grid.

    ``nifti`` holds a binary mask (the union of all segments is compared) or a label image
    (segment ``n`` is compared with label ``n``). Every voxel dcmqi sets must land, in patient
    space, on a voxel centre of the NIfTI grid (within 0.01 voxel) and all of them must be
    covered; dcmqi's grid has the NIfTI's spacing and axes (up to their order and sign).
    """
    truth_image = sitk.ReadImage(str(nifti))
    truth = sitk.GetArrayFromImage(truth_image)  # (z, y, x)
    segments = dcmqi_segments(seg, work)
    assert segments, "dcmqi found no segment"
    binary = truth.max() <= 1
    union = np.zeros(truth.shape, bool)
    truth_axes = np.asarray(truth_image.GetDirection()).reshape(3, 3)
    for number, image in sorted(segments.items()):
        axes = np.asarray(image.GetDirection()).reshape(3, 3)
        # Same axes up to order and sign, and the same spacing along each of them.
        pairing = np.abs(axes.T @ truth_axes)
        assert np.allclose(np.sort(pairing, axis=1)[:, -1], 1.0, atol=1e-4), (axes, truth_axes)
        order = np.argmax(pairing, axis=1)
        assert np.allclose(
            np.asarray(image.GetSpacing()), np.asarray(truth_image.GetSpacing())[order], rtol=1e-5
        ), (image.GetSpacing(), truth_image.GetSpacing())
        voxels = np.argwhere(sitk.GetArrayFromImage(image) > 0)[:, ::-1]  # (x, y, z)
        xyz = _index(truth_image, _physical(image, voxels.astype(np.float64)))
        nearest = np.rint(xyz).astype(int)
        assert np.abs(xyz - nearest).max(initial=0.0) < 1e-2, "SEG voxels off the mask grid"
        inside = (nearest >= 0).all(axis=1) & (nearest < truth_image.GetSize()).all(axis=1)
        assert inside.all(), "SEG voxels outside the mask's extent"
        rebuilt = np.zeros(truth.shape, bool)
        rebuilt[nearest[:, 2], nearest[:, 1], nearest[:, 0]] = True
        if not binary:
            assert np.array_equal(rebuilt, truth == number), f"segment {number} differs"
        union |= rebuilt
    assert np.array_equal(union, truth > 0), (
        f"dcmqi rebuilt {int(union.sum())} voxels, the mask has {int((truth > 0).sum())}; "
        f"{int((union & (truth > 0)).sum())} in common"
    )
