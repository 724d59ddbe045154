"""3D layouts: MSD Task06 Lung (NIfTI + tumour labels) and LUNA16 (MHD + nodule table).

Each scan is read in lungcad's canonical LPS orientation, windowed to [0, 1] with the lung
window and cut into axial slices; which slices are kept is set by ``PrepareSettings.slices``.
One group per case / series.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lungcad.data.layouts.common import LAYOUT_HELP, SliceWriter, read_volume, visible
from lungcad.data.layouts.settings import PrepareSettings
from lungcad.data.lung_mask import lung_mask
from lungcad.data.manifest import SliceRecord
from lungcad.data.preprocessing import to_unit_range
from lungcad.errors import InputError, MissingInputError
from lungcad.volume import Volume

log = logging.getLogger(__name__)

# A slice counts as a lung slice when at least this fraction of its pixels is lung; it keeps
# apex/base slivers (a few pixels of lung) out of the non-tumour sample.
LUNG_MIN_FRACTION = 0.005
LUNA_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


def world_to_index(volume: Volume, points_xyz: np.ndarray) -> np.ndarray:
    """Map ``(N, 3)`` LPS world points ``(x, y, z)`` mm to continuous voxel indices ``(z, y, x)``.

    The inverse of :meth:`Volume.index_to_physical`.
    """
    points = np.atleast_2d(np.asarray(points_xyz, dtype=np.float64))
    ijk = np.linalg.solve(volume.direction, (points - np.asarray(volume.origin)).T).T
    return (ijk / np.asarray(volume.spacing[::-1]))[:, ::-1]


def nodule_sphere_mask(
    volume: Volume, centers_xyz: np.ndarray, diameters_mm: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Mask of spheres (LUNA16 nodules) on the volume's grid.

    A voxel is inside when its centre lies within ``diameter / 2`` mm of the nodule centre
    (distance measured in physical space, so anisotropic spacing is respected); the voxel
    nearest the centre is always set so a nodule smaller than a voxel is not lost. Nodules
    outside the image are skipped (see :func:`world_to_index` to find them).

    Args:
        volume: the CT volume (any orientation; its geometry is used).
        centers_xyz: ``(N, 3)`` nodule centres, LPS world mm ``(x, y, z)``.
        diameters_mm: ``(N,)`` nodule diameters in mm.

    Returns:
        uint8 ``(z, y, x)`` mask, 1 inside a nodule.
    """
    mask = np.zeros(volume.shape, dtype=np.uint8)
    spacing_zyx = np.asarray(volume.spacing)
    shape = np.asarray(volume.shape)
    # Physical offset of a unit step along index axis (z, y, x): direction columns reversed.
    axes_mm = (volume.direction * np.asarray(volume.spacing[::-1])).T[::-1]
    centers = world_to_index(volume, np.reshape(centers_xyz, (-1, 3)))
    for center, diameter in zip(centers, diameters_mm, strict=True):
        radius = float(diameter) / 2.0
        half = np.ceil(radius / spacing_zyx) + 1
        lo = np.maximum(np.floor(center - half), 0).astype(int)
        hi = np.minimum(np.ceil(center + half), shape - 1).astype(int)
        if np.any(lo > hi):
            continue
        grid = np.stack(
            np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)), indexing="ij"),
            axis=-1,
        )
        offsets_mm = (grid - center) @ axes_mm
        inside = np.linalg.norm(offsets_mm, axis=-1) <= radius
        box = tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))
        mask[box] |= inside.astype(np.uint8)
        nearest = np.rint(center).astype(int)
        if np.all(nearest >= 0) and np.all(nearest < shape):
            mask[tuple(nearest)] = 1
    return mask


def _choose_slices(
    volume: Volume,
    tumour_per_slice: np.ndarray,
    settings: PrepareSettings,
    case: str,
    warnings: list[str],
) -> np.ndarray:
    """Axial indices to keep, sorted (see ``PrepareSettings.slices``)."""
    n = len(tumour_per_slice)
    if settings.slices == "all":
        return np.arange(n)
    lung = lung_mask(volume)
    lung_slices = lung.reshape(n, -1).mean(axis=1) >= LUNG_MIN_FRACTION
    if not lung_slices.any():
        warnings.append(f"{case}: no lung found; non-tumour slices drawn from the whole scan")
        lung_slices = np.ones(n, dtype=bool)
    if settings.slices == "lung":
        return np.flatnonzero(lung_slices | tumour_per_slice)
    positives = np.flatnonzero(tumour_per_slice)
    candidates = np.flatnonzero(lung_slices & ~tumour_per_slice)
    wanted = max(round(settings.negative_ratio * len(positives)), settings.min_negatives)
    # Seeded per case (not per run order) so adding a case does not change the others.
    rng = np.random.default_rng([settings.seed, zlib.crc32(case.encode())])
    negatives = rng.choice(candidates, size=min(wanted, len(candidates)), replace=False)
    return np.sort(np.concatenate([positives, negatives]).astype(int))


def _volume_records(
    writer: SliceWriter,
    volume: Volume,
    tumour: np.ndarray,
    case: str,
    source: str,
    settings: PrepareSettings,
    warnings: list[str],
) -> list[SliceRecord]:
    """Slices of one canonical LPS volume with its tumour mask (z, y, x) as records."""
    tumour = tumour > 0
    per_slice = np.asarray(tumour.reshape(tumour.shape[0], -1).any(axis=1))
    chosen = _choose_slices(volume, per_slice, settings, case, warnings)
    unit = to_unit_range(volume)
    spacing_yx = (volume.spacing[1], volume.spacing[2])
    labels = slice_labels(tumour, spacing_yx, settings.min_tumour_area_mm2)
    return [
        writer.add(
            f"{case}_z{z:04d}", case, z, unit[z], tumour[z], int(labels[z]), spacing_yx, source
        )
        for z in chosen
    ]


def slice_labels(
    tumour: np.ndarray, spacing_yx: tuple[float, float], min_area_mm2: float
) -> np.ndarray:
    """Cancer label of each axial slice from its tumour area.

    Args:
        tumour: bool ``(z, y, x)`` tumour mask.
        spacing_yx: pixel size (row, column) in mm.
        min_area_mm2: least tumour area (mm^2) for label 1.

    Returns:
        int64 ``(z,)``: 0 without tumour, 1 with at least ``min_area_mm2`` of tumour, -1
        (unknown) with less: too little to call the slice cancerous, too much to call it not.
    """
    pixels = tumour.reshape(tumour.shape[0], -1).sum(axis=1)
    area_mm2 = pixels * float(spacing_yx[0]) * float(spacing_yx[1])
    return np.where(pixels == 0, 0, np.where(area_mm2 >= min_area_mm2, 1, -1)).astype(np.int64)


def msd_cases(data: Path) -> list[tuple[str, Path, Path]]:
    """The cases of an MSD Task06 folder as ``(case id, image, label)``, as ``prepare`` reads them.

    The ``training`` list of ``dataset.json`` when it has one, else ``imagesTr/*.nii*`` paired
    with ``labelsTr/`` by name; the case id is the image's name without ``.nii(.gz)``.

    Raises:
        InputError: ``dataset.json`` is not valid or lists no case.
        MissingInputError: a listed image or label is missing.
    """
    return _msd_cases(data)


def _msd_cases(data: Path) -> list[tuple[str, Path, Path]]:
    meta_path = data / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"dataset.json is not valid JSON ({exc})", meta_path) from exc
    pairs: list[tuple[Path, Path]] = []
    if isinstance(meta, dict) and isinstance(meta.get("training"), list):
        for entry in meta["training"]:
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise InputError("each 'training' entry needs 'image' and 'label'", meta_path)
            pairs.append((data / entry["image"], data / entry["label"]))
    else:  # no list in dataset.json: pair imagesTr and labelsTr by file name
        for image in visible((data / "imagesTr").glob("*.nii*")):
            pairs.append((image, data / "labelsTr" / image.name))
    if not pairs:
        raise InputError(
            "no training cases listed in dataset.json or found in imagesTr/", meta_path
        )
    cases = []
    for image, label in pairs:
        for path, what in ((image, "image"), (label, "label")):
            if not path.is_file():
                raise MissingInputError(
                    f"MSD {what} listed in dataset.json is missing; "
                    "expected imagesTr/ and labelsTr/ with the same names",
                    path,
                )
        cases.append((image.name.split(".nii")[0], image, label))
    return cases


def prepare_msd(
    data: Path, writer: SliceWriter, settings: PrepareSettings, warnings: list[str]
) -> tuple[list[SliceRecord], list[Path]]:
    cases = _msd_cases(data)
    source = f"msd:{data.name}"
    records: list[SliceRecord] = []
    for i, (case, image_path, label_path) in enumerate(cases):
        log.info("msd %d/%d: %s", i + 1, len(cases), case)
        volume = read_volume(image_path)
        label = read_volume(label_path)
        if not volume.same_geometry(label, atol=1e-2):
            raise InputError(
                f"label geometry (shape {label.shape}, spacing {label.spacing}) "
                f"differs from its image's (shape {volume.shape}, spacing "
                f"{volume.spacing})",
                label_path,
            )
        records += _volume_records(
            writer, volume, label.array > 0.5, case, source, settings, warnings
        )
    return records, [data / "dataset.json"] + [p for _, a, b in cases for p in (a, b)]


def _read_luna_annotations(path: Path) -> dict[str, list[tuple[float, float, float, float]]]:
    nodules: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        for column in LUNA_COLUMNS:
            if column not in (reader.fieldnames or []):
                raise InputError(
                    f"annotations.csv has no column {column!r}; expected {','.join(LUNA_COLUMNS)}",
                    path,
                )
        for line, row in enumerate(reader, start=2):
            try:
                values = tuple(float(row[c]) for c in LUNA_COLUMNS[1:])
            except (TypeError, ValueError) as exc:
                raise InputError(
                    f"line {line}: coordX, coordY, coordZ and diameter_mm must be "
                    f"numbers in mm ({exc})",
                    path,
                ) from exc
            nodules[row["seriesuid"].strip()].append(values)  # type: ignore[arg-type]
    return nodules


def prepare_luna16(
    data: Path, writer: SliceWriter, settings: PrepareSettings, warnings: list[str]
) -> tuple[list[SliceRecord], list[Path]]:
    annotations = _read_luna_annotations(data / "annotations.csv")
    scans = visible(data.glob("subset*/*.mhd"))
    if not scans:
        raise InputError("no subset*/*.mhd scans found; " + LAYOUT_HELP, data)
    source = f"luna16:{data.name}"
    records: list[SliceRecord] = []
    for i, scan in enumerate(scans):
        uid = scan.stem
        log.info("luna16 %d/%d: %s", i + 1, len(scans), uid)
        volume = read_volume(scan)
        found = np.asarray(annotations.get(uid, []), dtype=np.float64).reshape(-1, 4)
        index = np.rint(world_to_index(volume, found[:, :3])) if len(found) else found[:, :3]
        outside = np.any((index < 0) | (index >= np.asarray(volume.shape)), axis=1)
        for row in found[outside]:
            warnings.append(
                f"{uid}: nodule at ({row[0]:.1f}, {row[1]:.1f}, {row[2]:.1f}) mm "
                "lies outside the scan; skipped"
            )
        mask = nodule_sphere_mask(volume, found[:, :3], found[:, 3])
        records += _volume_records(writer, volume, mask, uid, source, settings, warnings)
    missing = sorted(set(annotations) - {s.stem for s in scans})
    if missing:
        warnings.append(
            f"{len(missing)} annotated series not among the scans (other subsets?), "
            f"e.g. {missing[0]}"
        )
    raws = [
        s.with_suffix(x) for s in scans for x in (".raw", ".zraw") if s.with_suffix(x).is_file()
    ]
    return records, [data / "annotations.csv", *scans, *raws]
