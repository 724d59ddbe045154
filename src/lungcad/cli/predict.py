"""``lungcad predict``: run a trained model on one study or a folder of studies.

Examples::

    lungcad predict --checkpoint runs/cls patient1/ --out results/patient1   # DICOM series
    lungcad predict --checkpoint runs/cls scan.nii.gz --out results/scan
    lungcad predict --checkpoint runs/cls slice.png --out results/slice
    lungcad predict --checkpoint runs/cls studies/ --out results/ --backend onnx --threads 2

INPUT is one study (a DICOM series folder, .nii/.nii.gz, .mhd/.mha, or a PNG/JPEG/BMP/TIFF
slice) or a folder of studies. A folder that holds DICOM files itself is one series; any other
folder is a batch: each sub-folder (a DICOM series, or one NIfTI/MetaImage file) and each
image file in it is a study, written to ``OUT/<name>/``, with ``OUT/batch_summary.json``
listing every study. Symbolic links that point back into the folder (loops) are skipped.

Every study goes through the input checks first (``lungcad.inference.input_checks``): a study
without lung is reported as "CANNOT ASSESS" with the reason and no probability; a
segmentation-only run reports "NO CLASSIFIER" (masks, no decision).

Exit codes: 0 when every study was analysed (a "cannot assess" finding is a result, not a
failure); 2 when a single study fails, or when no study of a folder could be analysed: one
line naming the file and the problem, and nothing is left in OUT; 1 when some studies of a
folder failed and others were analysed: each failure is logged with its path and error and
listed in the batch summary with its reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from lungcad.cli._options import add_checkpoint_option

NAME = "predict"
HELP = "segment and classify CT studies with a trained run (masks, DICOM SEG/SR, report)"

log = logging.getLogger(__name__)

EXIT_SOME_FAILED = 1
EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad predict``."""
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="a study (DICOM folder, NIfTI, MHD, PNG/JPEG) or a folder of studies",
    )
    add_checkpoint_option(parser)
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (one sub-folder per study for a batch)",
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="inference engine (onnx: ONNX Runtime; exported on first use)",
    )
    parser.add_argument("--onnx", metavar="FILE", help="exported ONNX model to use")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch and ONNX Runtime (default: torch's)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--series-uid", help="DICOM: the series to read when a folder has several")
    parser.add_argument(
        "--crop-to-lungs",
        action="store_true",
        help="crop slices to the lungs before resizing (only for models trained "
        "on lung crops; `lungcad prepare` makes whole slices)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="flip test-time augmentation: average each slice with its left-right mirror "
        "(twice the inference time; measured gains are small: docs/results.md; the run's "
        "thresholds were chosen without it)",
    )
    parser.add_argument(
        "--cam-slices",
        type=int,
        default=3,
        help="Grad-CAM heat maps for this many most suspicious slices (0: none)",
    )
    parser.add_argument("--no-seg", action="store_true", help="do not write seg.dcm")
    parser.add_argument("--no-sr", action="store_true", help="do not write sr.dcm and ko.dcm")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html")


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _is_loop(child: Path, folder: Path) -> bool:
    """True for a symbolic link to ``folder`` itself or to a folder above it (a loop)."""
    if not child.is_symlink():
        return False
    try:
        target = child.resolve(strict=True)
    except (OSError, RuntimeError):  # a broken link or a link to itself
        log.warning("%s: skipped: a broken or circular symbolic link", child)
        return True
    here = folder.resolve()
    if target == here or target in here.parents:
        log.warning("%s: skipped: a symbolic link back to %s (a loop)", child, target)
        return True
    return False


def find_studies(path: Path) -> list[Path] | None:
    """The studies in a batch folder, or None when ``path`` is a single study."""
    from lungcad.io import SUPPORTED_SUFFIXES

    if not path.is_dir():
        return None
    children = sorted(
        p for p in path.iterdir() if not p.name.startswith(".") and not _is_loop(p, path)
    )
    if any(p.is_file() and _is_dicom_file(p) for p in children):
        return None
    lowered = tuple(s for s in SUPPORTED_SUFFIXES if s not in (".dcm", ".dicom", ".ima"))
    return [p for p in children if p.is_dir() or p.name.lower().endswith(lowered)]


def _study_source(path: Path) -> Path:
    """What to read for one study of a batch: a sub-folder without DICOM files that holds one
    volume file (a LUNA16-style ``case/scan.mhd`` + ``.raw``, or ``case/scan.nii.gz``) is
    that file; anything else is read as it is."""
    if not path.is_dir():
        return path
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(_is_dicom_file(p) for p in files):
        return path
    volumes = [p for p in files if p.name.lower().endswith((".nii", ".nii.gz", ".mhd", ".mha"))]
    return volumes[0] if len(volumes) == 1 else path


def _study_name(path: Path, used: set[str]) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mhd", ".mha"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = path.stem if path.is_file() else name
    unique, n = name, 1
    while unique in used:
        n += 1
        unique = f"{name}_{n}"
    used.add(unique)
    return unique


def _predict_one(predictor, args: argparse.Namespace, source: Path, out: Path) -> dict:
    from lungcad.inference.outputs import write_study_outputs

    volume, result = predictor.predict_path(
        source,
        series_uid=args.series_uid,
        progress=sys.stderr.isatty(),
        cam=args.cam_slices > 0,
        cam_slices=args.cam_slices,
    )
    write_study_outputs(
        volume,
        result,
        out,
        seg=not args.no_seg,
        sr=not args.no_sr,
        report=not args.no_report,
        cam=args.cam_slices > 0,
    )
    finding = result.finding
    check = result.input_check
    return {
        "finding": finding.status,
        "probability": finding.probability,
        "threshold": finding.threshold,
        "reason": finding.reason,
        "single_slice": bool(check is not None and check.single_slice),
        "lesions": len(result.lesions),
        "seconds": round(result.timings["total_s"], 3),
    }


def describe(row: dict[str, Any]) -> str:
    """The finding of a study as the one line ``predict`` prints."""
    if row["probability"] is None:
        return f"{row['finding'].upper()}: {row['reason']}"
    decision = "CANCER SUSPECTED" if row["finding"] == "cancer suspected" else row["finding"]
    scope = ", single-slice decision" if row.get("single_slice") else ""
    return (
        f"{decision} (probability {row['probability']:.3f}, threshold "
        f"{row['threshold']:.3f}{scope})"
    )


def _missing_dirs(out: Path) -> list[Path]:
    """``out`` and the folders above it that do not exist yet (deepest first)."""
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_new_dirs(created: list[Path]) -> None:
    """Remove the folders this run created, deepest first, where they are still empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): whatever is in it was not ours to remove


def run(args: argparse.Namespace) -> int:
    """Predict, write each study's outputs, print one line per study; 1 if any failed."""
    from tqdm.auto import tqdm

    from lungcad.errors import InputError, MissingInputError
    from lungcad.inference.predictor import Predictor
    from lungcad.io.atomic import write_json_atomic

    source = Path(args.input)
    if not source.exists():
        raise MissingInputError(
            "input not found; pass a DICOM series folder, an image file or a folder of studies",
            source,
        )
    if args.cam_slices < 0:
        raise InputError(f"--cam-slices must be >= 0; got {args.cam_slices}", "--cam-slices")
    studies = find_studies(source)
    if studies is not None and not studies:
        raise MissingInputError(
            "folder holds no studies (DICOM files, sub-folders, or NIfTI/MHD/PNG/JPEG files)",
            source,
        )
    predictor = Predictor.from_checkpoint(
        args.checkpoint,
        device=args.device,
        backend=args.backend,
        batch_size=args.batch_size,
        num_threads=args.threads,
        onnx_path=args.onnx,
        crop_to_lungs=args.crop_to_lungs,
        tta=args.tta,
    )
    out = Path(args.out)
    created = _missing_dirs(out)
    if studies is None:
        try:
            row = _predict_one(predictor, args, source, out)
        except BaseException:
            _remove_new_dirs(created)  # a failed study leaves nothing behind
            raise
        print(
            f"{source}: {describe(row)}, {row['lesions']} lesion(s), "
            f"{row['seconds']:.1f} s -> {out}"
        )
        return 0

    rows: list[dict[str, Any]] = []
    failed, used = 0, set[str]()
    try:
        for study in tqdm(studies, desc="studies", unit="study", disable=not sys.stderr.isatty()):
            name = _study_name(study, used)
            row = {"study": name, "input": str(study), "output": str(out / name)}
            try:
                row.update(
                    status="ok", **_predict_one(predictor, args, _study_source(study), out / name)
                )
                print(f"{study}: {describe(row)} -> {out / name}")
            except Exception as exc:  # one bad study must not stop the batch; reported below
                failed += 1
                log.error("%s: failed: %s", study, exc)
                log.debug("traceback of %s", study, exc_info=True)
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
    except BaseException:
        if not any(row["status"] == "ok" for row in rows):
            _remove_new_dirs(created)
        raise
    if failed == len(rows):
        _remove_new_dirs(created)  # nothing was analysed: no summary of nothing
        first = next(row for row in rows if row["status"] == "failed")
        log.error(
            "%s: no study could be analysed (%d of %d failed); the first: %s",
            source,
            failed,
            len(rows),
            first["error"],
        )
        return EXIT_BAD_INPUT
    write_json_atomic(
        out / "batch_summary.json",
        {"input": str(source), "studies": rows, "failed": failed, "ok": len(rows) - failed},
    )
    print(
        f"{len(rows) - failed} of {len(rows)} studies done, {failed} failed; summary: "
        f"{out / 'batch_summary.json'}"
    )
    return EXIT_SOME_FAILED if failed else 0
