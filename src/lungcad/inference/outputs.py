"""Write everything a study's prediction produced into one folder, atomically.

``write_study_outputs(source, result, out_dir)`` writes::

    mask.nii.gz         uint8 tumour mask in the input file's own geometry (orientation,
                        spacing, origin), so it overlays the input in any viewer
    probability.nii.gz  float32 tumour probability, same geometry
    seg.dcm, sr.dcm,    DICOM input only, after IHE AI Results: Segmentation (one segment
    ko.dcm              per lesion; none without lesions), Comprehensive 3D SR (lesions and
                        the study finding) and Key Object Selection (key images), new series
                        in the source study (``lungcad.io.dicom_outputs``)
    findings.json       the study finding (decision with probability and threshold, or
                        "cannot assess" / "no classifier" with the reason), the input
                        checks, slice probabilities, lesions, model info, input hashes,
                        timings
    preview.png         montage of the slices with the most tumour, mask in red
    cam_zNNNN.png       Grad-CAM heat maps of the most suspicious slices
    report.html         self-contained HTML report (pictures embedded)

The folder is assembled beside ``out_dir`` and renamed into place when complete, so a reader
never sees half a result; an earlier result in ``out_dir`` is replaced, anything else refused.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from lungcad import __version__
from lungcad.data.preprocessing import to_unit_range
from lungcad.errors import InputError
from lungcad.inference.lesions import lesions_to_dicts
from lungcad.io.atomic import atomic_dir, write_json_atomic
from lungcad.io.folders import check_output_dir
from lungcad.provenance import utc_timestamp
from lungcad.training.checkpoint import file_sha256
from lungcad.volume import Volume, orientation_code

if TYPE_CHECKING:
    from lungcad.inference.predictor import StudyResult

log = logging.getLogger(__name__)

__all__ = [
    "FINDINGS_FILE",
    "SERVER_PATH_KEYS",
    "findings",
    "input_hashes",
    "preview_montage",
    "write_study_outputs",
]

FINDINGS_FILE = "findings.json"
#: Keys of ``Predictor.info`` that are server file paths: never written into findings.json or
#: the report (which travel to clients and PACS), nor served by the REST API. The checkpoint
#: is named by its SHA-256, the input by the SHA-256 of its files.
SERVER_PATH_KEYS = ("checkpoint_path", "onnx_path")
PREVIEW_SLICES = 6
TILE = 256  # preview tile side in pixels
_RED = np.array([1.0, 0.15, 0.1])


def input_hashes(source: Volume) -> dict[str, Any]:
    """SHA-256 of the files a study was read from (so findings name their exact input).

    One file: its SHA-256. Several (a DICOM series, an .mhd with its data file): the SHA-256
    of the sorted per-file digests, one ``"<hex>  <name>"`` line each (sha256sum's format).
    """
    files = [Path(p) for p in source.meta.get("slice_files") or []]
    path = source.meta.get("source_path")
    if not files and path and Path(path).is_file():
        files = [Path(path)]
        if files[0].suffix.lower() == ".mhd":
            files += [
                p
                for p in files[0].parent.glob(files[0].stem + ".*")
                if p.suffix.lower() in (".raw", ".zraw")
            ]
    digests = [f"{file_sha256(file)}  {file.name}" for file in files]
    if not digests:
        return {"sha256": None, "files": 0}
    if len(digests) == 1:
        return {"sha256": digests[0].split()[0], "files": 1, "method": "sha256 of the file"}
    combined = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    return {
        "sha256": combined,
        "files": len(digests),
        "method": "sha256 of the sorted '<sha256>  <file name>' lines of all files",
    }


def _json_float(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def findings(source: Volume, result: StudyResult, outputs: list[str]) -> dict[str, Any]:
    """The findings.json document (JSON-safe: NaN becomes null)."""
    meta = source.meta
    return {
        "lungcad_version": __version__,
        "created_utc": utc_timestamp(),
        "input": {  # no path: it names the server's folders and, for uploads, the client's files
            "format": meta.get("format"),
            "shape_zyx": list(source.shape),
            "spacing_zyx_mm": list(source.spacing),
            "spacing_known": meta.get("spacing_known", True),
            "origin_lps_mm": list(source.origin),
            "file_orientation": meta.get("source_orientation", orientation_code(source)),
            "intensity": source.intensity,
            "study_instance_uid": meta.get("study_instance_uid"),
            "series_instance_uid": meta.get("series_instance_uid"),
            **{f"input_{k}": v for k, v in input_hashes(source).items()},
        },
        # The finding: status/decision, is_cancer, probability and threshold (None unless
        # assessed) and the reason when there is no decision (lungcad.finding).
        "study": {
            **result.finding.to_dict(),
            "rule": "cancer suspected if probability >= threshold",
            "aggregation": result.aggregation,
            "calibrated": result.model_info.get("calibration") is not None,
            "n_lesions": len(result.lesions),
            "tumour_volume_ml": float(sum(les.volume_ml for les in result.lesions)),
        },
        "input_check": None if result.input_check is None else result.input_check.to_dict(),
        "slices": {
            "evaluated": [int(z) for z in result.lung_slices],
            "probabilities": [_json_float(p) for p in result.slice_probabilities],
            "crop_box_yx": None
            if result.crop_box is None
            else [[s.start, s.stop] for s in result.crop_box],
            "cam_slices": list(result.cam_slices),
        },
        "lesions": lesions_to_dicts(result.lesions),
        "model": {k: v for k, v in result.model_info.items() if k not in SERVER_PATH_KEYS},
        "timings_s": {k: round(float(v), 4) for k, v in result.timings.items()},
        "warnings": list(result.warnings),
        "outputs": outputs,
        "intended_use": result.model_info.get("intended_use"),
    }


def _display(source: Volume, z: int) -> np.ndarray:
    """Slice z as grey [0, 1] for display (lung window for HU)."""
    slab = Volume(array=source.array[z : z + 1], spacing=source.spacing, intensity=source.intensity)
    return to_unit_range(slab)[0]


def _tile(rgb: np.ndarray, size: int = TILE) -> Image.Image:
    image = Image.fromarray(rgb)
    scale = size / max(image.size)
    new = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(new, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)


def _overlay(grey: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgb = np.repeat(grey[..., None], 3, axis=2)
    inside = mask > 0
    rgb[inside] = (1 - alpha) * rgb[inside] + alpha * _RED
    return np.round(255 * np.clip(rgb, 0, 1)).astype(np.uint8)


def preview_montage(source: Volume, result: StudyResult, n: int = PREVIEW_SLICES) -> bytes:
    """PNG montage of the slices with the most tumour (or, with none, the most suspicious).

    Each tile shows the lung-windowed slice with the predicted mask in red and a caption with
    the slice index, its cancer probability and tumour area in pixels.
    """
    area = result.mask.array.reshape(result.mask.shape[0], -1).sum(axis=1)
    if area.any():
        order = [int(z) for z in np.argsort(-area, kind="stable") if area[z] > 0][:n]
    else:
        probs = np.nan_to_num(result.slice_probabilities, nan=-1.0)
        order = [int(z) for z in np.argsort(-probs, kind="stable")][:n]
    order = sorted(order)
    tiles = []
    for z in order:
        tile = _tile(_overlay(_display(source, z), result.mask.array[z]))
        canvas = Image.new("RGB", (TILE, TILE + 16), "black")
        canvas.paste(tile, ((TILE - tile.size[0]) // 2, 16))
        p = result.slice_probabilities[z]
        caption = f"z={z} p={p:.2f} tumour {int(area[z])} px" if np.isfinite(p) else f"z={z}"
        ImageDraw.Draw(canvas).text((4, 2), caption, fill=(255, 255, 255))
        tiles.append(canvas)
    cols = min(3, max(1, len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    sheet = Image.new("RGB", (cols * TILE, rows * (TILE + 16)), "black")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * TILE, (i // cols) * (TILE + 16)))
    return _png(sheet)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def cam_pictures(source: Volume, result: StudyResult) -> dict[str, bytes]:
    """``cam_zNNNN.png`` -> PNG bytes: heat map over the slice, beside the plain slice."""
    from lungcad.inference.explain import cam_overlay

    pictures: dict[str, bytes] = {}
    if result.cam is None:
        return pictures
    for z in result.cam_slices:
        grey = _display(source, z)
        plain = np.round(255 * np.repeat(grey[..., None], 3, axis=2)).astype(np.uint8)
        heat = cam_overlay(grey, result.cam.array[z])
        pictures[f"cam_z{z:04d}.png"] = _png(_tile(np.concatenate([plain, heat], axis=1), 2 * TILE))
    return pictures


def write_study_outputs(
    source: Volume,
    result: StudyResult,
    out_dir: str | Path,
    *,
    seg: bool = True,
    sr: bool = True,
    report: bool = True,
    cam: bool = True,
) -> dict[str, Path]:
    """Write a study's results into ``out_dir`` (atomically; see the module docstring).

    Args:
        source: the input Volume the result was computed on (canonical, with its meta).
        result: the prediction.
        out_dir: the study's output folder (new, empty, or an earlier result to replace).
        seg: write ``seg.dcm`` (DICOM input with lesions only).
        sr: write ``sr.dcm`` and ``ko.dcm`` (DICOM input only).
        report: write ``report.html``.
        cam: write the Grad-CAM pictures (when the result has heat maps).

    Returns:
        Output name -> final path.

    Raises:
        InputError: ``out_dir`` holds something other than an earlier result; the result is
            not on the source's grid.
    """
    from lungcad.inference.study_report import write_study_report
    from lungcad.io.writers import write_image, write_mask

    out_dir = Path(out_dir)
    check_output_dir(out_dir, FINDINGS_FILE, "an earlier lungcad result")
    if not result.mask.same_geometry(source):
        raise InputError(
            "the result is not on the source's grid; pass the Volume that was predicted on", out_dir
        )
    is_dicom = source.meta.get("format") == "dicom" and bool(source.meta.get("slice_files"))
    info = result.model_info
    version = f"{__version__}+{(info.get('checkpoint_sha256') or '')[:12]}"
    with atomic_dir(out_dir) as tmp:
        write_mask(result.mask, tmp / "mask.nii.gz")
        write_image(result.probability, tmp / "probability.nii.gz")
        dicom = None
        if is_dicom and (seg or sr):
            from lungcad.inference.lesions import lesion_labels
            from lungcad.io.dicom_outputs import Algorithm, write_dicom_results

            # The IHE AI Results set: SEG (one segment per lesion; none without lesions),
            # SR (lesions and the study finding) and KOS (key images), sharing their UIDs.
            dicom = write_dicom_results(
                source,
                result.mask.with_array(lesion_labels(result.mask, result.lesions)),
                result.lesions,
                result.finding,
                tmp,
                algorithm=Algorithm(
                    version=version, configuration_hash=str(info.get("config_hash") or "")
                ),
                slice_probabilities=result.slice_probabilities,
                seg=seg,
                sr=sr,
                kos=sr,
            )
        pictures = {"preview.png": preview_montage(source, result)}
        if cam:
            pictures.update(cam_pictures(source, result))
        for name, data in pictures.items():
            (tmp / name).write_bytes(data)
        names = sorted(p.name for p in tmp.iterdir())
        names += [FINDINGS_FILE] + (["report.html"] if report else [])
        doc = findings(source, result, sorted(names))
        if dicom is not None:
            doc["dicom"] = dicom.to_dict()
        write_json_atomic(tmp / FINDINGS_FILE, doc)
        if report:
            write_study_report(tmp / "report.html", doc, pictures)
    return {name: out_dir / name for name in sorted(names)}
