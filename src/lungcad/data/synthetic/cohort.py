"""Write a cohort of synthetic CTs in the layouts of the public lung datasets.

Under ``out_dir`` (written atomically: it appears complete or not at all):

* ``dicom/<case_id>/NNNN.dcm`` -- one CT series per case (:func:`write_dicom_series`);
* ``msd/`` -- Medical Segmentation Decathlon Task06: ``imagesTr/lung_XXX.nii.gz``,
  ``labelsTr/lung_XXX.nii.gz`` (1 = cancer) and ``dataset.json`` with the real file's keys;
* ``luna16/`` -- ``subset0/<seriesuid>.mhd/.raw``, ``annotations.csv`` (world LPS mm
  centres and diameters, as LUNA16) and ``candidates.csv`` (nodules = 1, vessel points = 0);
* ``slices2d/`` -- IQ-OTH/NCCD-like class folders ``Malignant cases/Malignant case (N).jpg``
  and ``Normal cases/Normal case (N).jpg``: 8-bit lung-window slices numbered in scan order,
  each patient's slices contiguous; a tumour case contributes the slices showing its tumour;
* ``patches2d/`` -- msd_lung_patches-like 48x48 patches at 2 mm: ``images/patch_NNN.png``
  (16-bit, lung window [0, 1] * 65535) and ``masks/patch_NNN.png`` (0/255);
* ``cohort.json`` -- site, seeds, every case's geometry, UIDs, nodules and files, and which
  2D image came from which case and slice (for patient-level splits).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid
from scipy import ndimage

from lungcad import __version__
from lungcad.data.preprocessing import LUNG_WINDOW, window_hu
from lungcad.data.synthetic.phantom import Phantom, make_phantom
from lungcad.data.synthetic.sites import SiteParams, get_site
from lungcad.errors import InputError
from lungcad.io.atomic import atomic_dir
from lungcad.io.dicom_writer import write_dicom_series
from lungcad.io.folders import check_output_dir
from lungcad.io.writers import write_image, write_mask

log = logging.getLogger(__name__)

FORMATS = ("dicom", "msd", "luna16", "slices2d", "patches2d")

_MALIGNANT, _NORMAL = "Malignant cases", "Normal cases"
_MIN_TUMOUR_AREA_MM2 = 20.0  # a 2D slice counts as showing the tumour from ~5 mm across


def _check_args(
    out_dir: Path, n_cases: int, tumour_fraction: float, formats: Sequence[str]
) -> tuple[str, ...]:
    if int(n_cases) < 1:
        raise InputError(f"need at least one case; got {n_cases}", "n_cases")
    if not 0.0 <= float(tumour_fraction) <= 1.0:
        raise InputError(
            f"tumour_fraction must be in [0, 1]; got {tumour_fraction}", "tumour_fraction"
        )
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(
            f"unknown formats {unknown or '(none given)'}; choose from {FORMATS}", "formats"
        )
    check_output_dir(out_dir, "cohort.json", "an earlier synthetic cohort")
    return formats


def _case_seeds(seed: int, site: SiteParams, n: int) -> list[int]:
    # The site name enters the seeds so an external cohort holds other patients than an
    # internal one made with the same seed (external validation needs unseen patients).
    ss = np.random.SeedSequence([int(seed), zlib.crc32(site.name.encode())])
    return [int(s.generate_state(1)[0]) for s in ss.spawn(n)]


def write_cohort(
    out_dir: str | Path,
    n_cases: int,
    *,
    site: SiteParams | str = "internal",
    seed: int = 0,
    tumour_fraction: float = 0.5,
    formats: Sequence[str] = FORMATS,
    matrix: int | None = None,
    normal_slices_per_case: int = 8,
    patches_per_case: int = 4,
    patch_size: int = 48,
    patch_spacing_mm: float = 2.0,
    window: tuple[float, float] = LUNG_WINDOW,
    tumour_size_mm: tuple[float, float] | None = None,
    tumour_density: str | None = None,
) -> dict[str, Any]:
    """Generate ``n_cases`` phantoms and write them in the requested layouts.

    Args:
        out_dir: cohort folder; replaced atomically if it holds an earlier cohort.
        n_cases: number of patients.
        site: scanner site (name in :data:`SITES` or a :class:`SiteParams`).
        seed: cohort seed; case seeds derive from it and the site name.
        tumour_fraction: share of cases with tumours (rounded; chosen at random).
        formats: any of :data:`FORMATS`.
        matrix: in-plane matrix replacing the site's (same field of view).
        normal_slices_per_case: 2D slices exported per tumour-free case.
        patches_per_case: tumour patches per tumour case (plus one tumour-free patch per case).
        patch_size: patch side in pixels.
        patch_spacing_mm: patch pixel spacing (mm).
        window: (level, width) HU display window of the 2D exports; the default lung window
            matches the manifest's convention (IQ-OTH/NCCD's own JPEGs look narrower).
        tumour_size_mm: ``(low, high)``: each tumour case gets one tumour whose diameter is
            drawn uniformly from this range (seeded by the case); None: the phantom's default
            (one to three nodules, the first 5-40 mm).
        tumour_density: with ``tumour_size_mm``: ``"solid"``, ``"part-solid"`` or
            ``"ground-glass"``; None: random.

    Returns:
        The content of ``cohort.json`` (site, seeds, cases with nodules and files, 2D index).

    Raises:
        InputError: bad counts, fraction or formats, or an ``out_dir`` that is not a cohort.
    """
    out_dir = Path(out_dir)
    formats = _check_args(out_dir, n_cases, tumour_fraction, formats)
    site = get_site(site)
    if matrix is not None:
        site = site.with_matrix(matrix)
    seeds = _case_seeds(seed, site, int(n_cases))
    order = np.random.default_rng(seeds[0] if seeds else 0).permutation(int(n_cases))
    n_tumour = int(round(float(tumour_fraction) * int(n_cases)))
    tumour_cases = set(order[:n_tumour].tolist())

    cohort: dict[str, Any] = {
        "generator": "lungcad.data.synthetic",
        "version": __version__,
        "seed": int(seed),
        "site": site.to_dict(),
        "n_cases": int(n_cases),
        "tumour_fraction": float(tumour_fraction),
        "formats": list(formats),
        "window": {"level": window[0], "width": window[1]},
        "cases": [],
        "slices2d": [],
        "patches2d": [],
    }
    annotations: list[list[Any]] = []
    candidates: list[list[Any]] = []
    counters = {_MALIGNANT: 0, _NORMAL: 0, "patch": 0}
    with atomic_dir(out_dir) as tmp:
        for i, case_seed in enumerate(seeds):
            tumour = i in tumour_cases
            options: dict[str, Any] = {}
            if tumour and tumour_size_mm is not None:
                low, high = tumour_size_mm
                size = float(np.random.default_rng(case_seed).uniform(low, high))
                options = {"n_nodules": 1, "size_mm": size}
                if tumour_density is not None:
                    options["density"] = tumour_density
            phantom = make_phantom(case_seed, site, tumour=tumour, **options)
            case = _case_record(i, case_seed, site, phantom)
            vol = phantom.volume
            if "dicom" in formats:
                write_dicom_series(
                    vol,
                    tmp / case["files"]["dicom"],
                    patient_id=case["patient_id"],
                    patient_name=f"Synthetic^{case['case_id']}",
                    study_instance_uid=case["study_instance_uid"],
                    series_instance_uid=case["series_instance_uid"],
                    frame_of_reference_uid=case["frame_of_reference_uid"],
                    study_date=case["study_date"],
                    study_time="093000",
                    study_description="Synthetic chest CT",
                    series_description=f"lungcad phantom ({site.name})",
                    manufacturer="lungcad synthetic",
                    uid_seed=case["uid_seed"],
                    extra={
                        "InstitutionName": site.institution,
                        "ConvolutionKernel": site.kernel,
                        "KVP": "120",
                    },
                )
            if "msd" in formats:
                write_image(vol, tmp / case["files"]["msd_image"])
                write_mask(
                    vol.with_array(phantom.tumour_mask.astype(np.float32)),
                    tmp / case["files"]["msd_label"],
                )
            if "luna16" in formats:
                write_image(vol, tmp / case["files"]["luna16_mhd"])
                uid = case["series_instance_uid"]
                for nod in phantom.nodules:
                    if nod.voxels:
                        annotations.append([uid, *nod.centre_lps, nod.diameter_mm])
                        candidates.append([uid, *nod.centre_lps, 1])
                for point in _negative_points(phantom, np.random.default_rng([case_seed, 99])):
                    candidates.append([uid, *point, 0])
            if "slices2d" in formats:
                cohort["slices2d"] += _write_slices2d(
                    tmp / "slices2d", phantom, case, counters, normal_slices_per_case, window
                )
            if "patches2d" in formats:
                cohort["patches2d"] += _write_patches2d(
                    tmp / "patches2d",
                    phantom,
                    case,
                    counters,
                    patches_per_case,
                    patch_size,
                    patch_spacing_mm,
                    window,
                    np.random.default_rng([case_seed, 98]),
                )
            cohort["cases"].append(case)
            log.debug("case %s written (%d nodules)", case["case_id"], len(phantom.nodules))
        for key, subdir in (("dicom", "dicom"), ("msd", "msd"), ("luna16", "luna16")):
            if key not in formats:
                for case in cohort["cases"]:
                    case["files"] = {
                        k: v for k, v in case["files"].items() if not k.startswith(subdir)
                    }
        if "msd" in formats:
            _write_msd_json(tmp / "msd" / "dataset.json", cohort["cases"])
        if "luna16" in formats:
            _write_csv(
                tmp / "luna16" / "annotations.csv",
                ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
                annotations,
            )
            _write_csv(
                tmp / "luna16" / "candidates.csv",
                ["seriesuid", "coordX", "coordY", "coordZ", "class"],
                candidates,
            )
        text = json.dumps(cohort, indent=1)
        (tmp / "cohort.json").write_text(text, encoding="utf-8")
    log.info("wrote %d synthetic cases (%d with tumour) to %s", n_cases, n_tumour, out_dir)
    return json.loads(text)  # exactly what cohort.json holds (tuples become lists)


def _case_record(i: int, case_seed: int, site: SiteParams, phantom: Phantom) -> dict[str, Any]:
    """Identity, UIDs, geometry, nodules and file paths (relative) of one case."""
    case_id = f"{site.name}_{i + 1:03d}"
    uid_seed = f"lungcad-synthetic/{site.name}/{case_seed}"
    series_uid = generate_uid(entropy_srcs=[uid_seed, "series"])
    date = _dt.date(2024, 1, 1) + _dt.timedelta(days=case_seed % 365)
    record = {
        "case_id": case_id,
        "seed": case_seed,
        "patient_id": case_id,
        "uid_seed": uid_seed,
        "study_date": date.strftime("%Y%m%d"),
        "study_instance_uid": generate_uid(entropy_srcs=[uid_seed, "study"]),
        "series_instance_uid": series_uid,
        "frame_of_reference_uid": generate_uid(entropy_srcs=[uid_seed, "frame-of-reference"]),
        **phantom.to_dict(),
        "files": {
            "dicom": f"dicom/{case_id}",
            "msd_image": f"msd/imagesTr/lung_{i + 1:03d}.nii.gz",
            "msd_label": f"msd/labelsTr/lung_{i + 1:03d}.nii.gz",
            "luna16_mhd": f"luna16/subset0/{series_uid}.mhd",
        },
    }
    return record


def _negative_points(phantom: Phantom, rng: np.random.Generator, n: int = 10) -> list[list[float]]:
    """World (LPS mm) points on lung vessels, LUNA16's typical false-positive candidates."""
    zyx = np.argwhere(phantom.labels == 5)
    if len(zyx) == 0:
        zyx = np.argwhere(phantom.lung_mask & (phantom.tumour_mask == 0))
    if len(zyx) == 0:
        return []
    pick = zyx[rng.choice(len(zyx), size=min(n, len(zyx)), replace=False)]
    return phantom.volume.index_to_physical(pick).tolist()


def _tumour_slices(phantom: Phantom) -> list[int]:
    """Slices showing the tumour: area >= 20 mm^2 (or the largest slice for tiny nodules)."""
    _, sy, sx = phantom.volume.spacing
    area = phantom.tumour_mask.sum(axis=(1, 2)) * sy * sx
    if area.max() <= 0:
        return []
    return np.flatnonzero(area >= min(_MIN_TUMOUR_AREA_MM2, area.max())).tolist()


def _lung_slices(phantom: Phantom, n: int) -> list[int]:
    """``n`` slices evenly spread over those with a sizeable lung cross-section."""
    area = phantom.lung_mask.sum(axis=(1, 2))
    good = np.flatnonzero(area >= 0.25 * area.max())
    if len(good) == 0:
        return []
    return sorted(
        set(good[np.linspace(0, len(good) - 1, min(n, len(good))).round().astype(int)].tolist())
    )


def _write_slices2d(
    root: Path,
    phantom: Phantom,
    case: dict,
    counters: dict,
    normal_per_case: int,
    window: tuple[float, float],
) -> list[dict[str, Any]]:
    """IQ-OTH/NCCD-style JPEGs of one case; returns the index entries."""
    malignant = phantom.has_tumour
    cls = _MALIGNANT if malignant else _NORMAL
    stem = "Malignant case" if malignant else "Normal case"
    slices = _tumour_slices(phantom) if malignant else _lung_slices(phantom, normal_per_case)
    (root / cls).mkdir(parents=True, exist_ok=True)
    entries = []
    for z in slices:
        counters[cls] += 1
        rel = f"slices2d/{cls}/{stem} ({counters[cls]}).jpg"
        pixels = np.rint(window_hu(phantom.volume.array[z], *window) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root.parent / rel, quality=95)
        entries.append(
            {
                "file": rel,
                "case_id": case["case_id"],
                "slice_index": int(z),
                "label": int(malignant),
            }
        )
    return entries


def _resample_slice(
    image: np.ndarray, mask: np.ndarray, spacing_yx: tuple[float, float], target_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    zoom = (spacing_yx[0] / target_mm, spacing_yx[1] / target_mm)
    img = ndimage.zoom(image, zoom, order=1, mode="nearest")
    msk = ndimage.zoom(mask.astype(np.float32), zoom, order=1, mode="nearest") >= 0.5
    return img, msk


def _crop(array: np.ndarray, centre: np.ndarray, size: int, fill: float) -> np.ndarray:
    half = size // 2
    padded = np.pad(array, size, mode="constant", constant_values=fill)
    cy, cx = (int(round(c)) + size for c in centre)
    return padded[cy - half : cy - half + size, cx - half : cx - half + size]


def _write_patches2d(
    root: Path,
    phantom: Phantom,
    case: dict,
    counters: dict,
    per_case: int,
    size: int,
    spacing_mm: float,
    window: tuple[float, float],
    rng: np.random.Generator,
) -> list[dict]:
    """msd_lung_patches-style 16-bit image + 0/255 mask patches of one case."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    spacing_yx = phantom.volume.spacing[1:]
    tumour_z = _tumour_slices(phantom)
    if len(tumour_z) > per_case:
        tumour_z = [
            tumour_z[k] for k in np.linspace(0, len(tumour_z) - 1, per_case).round().astype(int)
        ]
    jobs = [(z, True) for z in tumour_z]
    lung_z = [z for z in _lung_slices(phantom, 8) if not phantom.tumour_mask[z].any()]
    if lung_z:
        jobs.append((int(rng.choice(lung_z)), False))
    entries = []
    for z, on_tumour in jobs:
        img, msk = _resample_slice(
            phantom.volume.array[z], phantom.tumour_mask[z] > 0, spacing_yx, spacing_mm
        )
        _, lung = _resample_slice(
            phantom.volume.array[z], phantom.lung_mask[z], spacing_yx, spacing_mm
        )
        where = np.argwhere(msk) if on_tumour and msk.any() else np.argwhere(lung & ~msk)
        if len(where) == 0:
            continue
        centre = where.mean(axis=0) if on_tumour else where[rng.integers(len(where))]
        centre = centre + (rng.uniform(-0.15, 0.15, 2) * size if on_tumour else 0)
        patch = _crop(img, centre, size, fill=-1024.0)
        patch_mask = _crop(msk, centre, size, fill=0)
        counters["patch"] += 1
        name = f"patch_{counters['patch'] - 1:03d}.png"
        image16 = np.rint(window_hu(patch, *window) * 65535).astype(np.uint16)
        Image.fromarray(image16).save(root / "images" / name)
        Image.fromarray((patch_mask * 255).astype(np.uint8), mode="L").save(root / "masks" / name)
        entries.append(
            {
                "image": f"patches2d/images/{name}",
                "mask": f"patches2d/masks/{name}",
                "case_id": case["case_id"],
                "slice_index": int(z),
                "has_tumour": bool(patch_mask.any()),
            }
        )
    return entries


def _write_msd_json(path: Path, cases: list[dict]) -> None:
    """dataset.json with the keys of the real Task06_Lung file."""
    training = [
        {
            "image": "./" + c["files"]["msd_image"].removeprefix("msd/"),
            "label": "./" + c["files"]["msd_label"].removeprefix("msd/"),
        }
        for c in cases
    ]
    content = {
        "name": "Lung",
        "description": "Synthetic lung and cancer segmentation (lungcad phantoms)",
        "reference": "lungcad synthetic generator",
        "licence": "CC-BY-SA 4.0",
        "relase": f"lungcad {__version__}",  # sic: the real Task06 files spell it so
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "cancer"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    path.write_text(json.dumps(content, indent=4), encoding="utf-8")


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in row])
