"""``lungcad predict``: run a trained model on one study or a folder of studies.

Examples::

    lungcad predict --checkpoint runs/cls patient1/ --out results/patient1   # DICOM series
    lungcad predict --checkpoint runs/cls scan.nii.gz --out results/scan
    lungcad predict --checkpoint runs/cls slice.png --out results/slice
    lungcad predict --checkpoint runs/cls studies/ --out results/ --backend onnx --threads 2

INPUT is one study (a DICOM series folder, .nii/.nii.gz, .mhd/.mha, or a PNG/JPEG/BMP/TIFF
slice) or a folder of studies. A folder that holds DICOM files itself is one series; any other
folder is a batch: each sub-folder and each image file in it is a study, written to
``OUT/<name>/``, with ``OUT/batch_summary.json`` listing every study. A study that fails is
logged with its path and error and the others go on; the exit code is then 1.
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


def find_studies(path: Path) -> list[Path] | None:
    """The studies in a batch folder, or None when ``path`` is a single study."""
    from lungcad.io import SUPPORTED_SUFFIXES

    if not path.is_dir():
        return None
    children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if any(p.is_file() and _is_dicom_file(p) for p in children):
        return None
    lowered = tuple(s for s in SUPPORTED_SUFFIXES if s not in (".dcm", ".dicom", ".ima"))
    return [p for p in children if p.is_dir() or p.name.lower().endswith(lowered)]


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
    return {
        "probability": result.study_probability,
        "is_cancer": result.is_cancer,
        "threshold": result.threshold,
        "lesions": len(result.lesions),
        "seconds": round(result.timings["total_s"], 3),
    }


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
    )
    out = Path(args.out)
    if studies is None:
        row = _predict_one(predictor, args, source, out)
        decision = "CANCER SUSPECTED" if row["is_cancer"] else "no cancer suspected"
        print(
            f"{source}: {decision} (probability {row['probability']:.3f}, threshold "
            f"{row['threshold']:.3f}, {row['lesions']} lesion(s), {row['seconds']:.1f} s) "
            f"-> {out}"
        )
        return 0

    rows: list[dict[str, Any]] = []
    failed, used = 0, set[str]()
    for study in tqdm(studies, desc="studies", unit="study", disable=not sys.stderr.isatty()):
        name = _study_name(study, used)
        row = {"study": name, "input": str(study), "output": str(out / name)}
        try:
            row.update(status="ok", **_predict_one(predictor, args, study, out / name))
            print(
                f"{study}: {'CANCER SUSPECTED' if row['is_cancer'] else 'no cancer suspected'}"
                f" (probability {row['probability']:.3f}) -> {out / name}"
            )
        except Exception as exc:  # one bad study must not stop the batch; reported below
            failed += 1
            log.error("%s: failed: %s", study, exc)
            log.debug("traceback of %s", study, exc_info=True)
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    write_json_atomic(
        out / "batch_summary.json",
        {"input": str(source), "studies": rows, "failed": failed, "ok": len(rows) - failed},
    )
    print(
        f"{len(rows) - failed} of {len(rows)} studies done, {failed} failed; summary: "
        f"{out / 'batch_summary.json'}"
    )
    return EXIT_SOME_FAILED if failed else 0
