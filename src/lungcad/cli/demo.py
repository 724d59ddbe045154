"""``lungcad demo``: the whole pipeline on embedded synthetic data, end to end.

It makes an internal and an external synthetic cohort (no download needed), reads them back
through the readers (DICOM series, NIfTI), computes lung masks, writes previews and a dataset
summary, then prepares manifests, trains a small two-stage model, evaluates it internally and
externally and predicts on one external DICOM study. Sizes are chosen to finish in a few
minutes on 2 CPU cores; the numbers it prints are real but come from a tiny model and tiny
data, so they show that the pipeline works, not how well lungcad works.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

NAME = "demo"
HELP = "run the whole pipeline on generated synthetic chest CT (no data needed)"

log = logging.getLogger("lungcad.demo")

#: The demo's tumours: one solid tumour of 15-35 mm per tumour case, so that a model trained
#: for a few minutes on two CPU cores can learn them; real data's small, faint nodules need
#: real training (docs/results.md).
DEMO_TUMOUR_SIZE_MM = (15.0, 35.0)
DEMO_SEG_EPOCHS = 12
DEMO_CLS_EPOCHS = 6
#: Stage 1 learns tumour-aware 64x64 patches at 2 mm per pixel (lungcad.data.patches). A
#: third of the patches centred on tumour, as nnU-Net samples foreground: with 70% the model
#: found every tumour but also ~10 vessels per study (measured on the demo's studies).
DEMO_SEG_OVERRIDES = (
    "model.image_size=64",
    "data.batch_size=16",
    "data.patch_pixel_mm=2.0",
    "data.patch_tumour_prob=0.33",
    "data.patches_per_slice=6",
    "optim.warmup_epochs=1",
)
#: Stage 2 sees whole slices at stage 1's 2 mm per pixel (a 192-px canvas spans 384 mm), so
#: its decoder, and the mask summary the classifier reads, work at the scale they learnt, and
#: one forward pass gives both the mask and the cancer logit. The stage-1 network stays
#: frozen (the encoder too: training it moved the masks the summary reads) and the head's
#: direct mask term starts from the largest tumour probability (model.cls_mask_prior).
#: Measured on the demo's studies, from the same stage-1 run: whole-slice letterbox with the
#: encoder trained, study AUC 0.50 internal / 0.13 external; this recipe 1.00 / 0.94
#: (docs/results.md).
DEMO_CLS_OVERRIDES = (
    "model.image_size=192",
    "data.slice_pixel_mm=2.0",
    "optim.freeze_encoder_epochs=-1",
    "model.cls_mask_prior=1.0",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    parser.add_argument("--cases", type=int, default=20, help="internal cohort size")
    parser.add_argument("--external-cases", type=int, default=8, help="external cohort size")
    parser.add_argument(
        "--seg-epochs", type=int, default=DEMO_SEG_EPOCHS, help="epochs of stage 1 (segmentation)"
    )
    parser.add_argument(
        "--epochs", type=int, default=DEMO_CLS_EPOCHS, help="epochs of stage 2 (classifier)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-only",
        action="store_true",
        help="stop after the cohorts, previews and summary (no training)",
    )


def _step(name: str) -> float:
    log.info("== %s", name)
    return time.perf_counter()


def make_cohorts(out: Path, cases: int, external_cases: int, seed: int) -> dict[str, Path]:
    """Write the internal and the shifted external synthetic cohorts; returns their folders."""
    from lungcad.data.synthetic.cohort import write_cohort

    folders = {"internal": out / "cohort_internal", "external": out / "cohort_external"}
    write_cohort(
        folders["internal"],
        cases,
        site="internal",
        seed=seed,
        tumour_fraction=0.5,
        formats=("dicom", "msd"),
        tumour_size_mm=DEMO_TUMOUR_SIZE_MM,
        tumour_density="solid",
    )
    write_cohort(
        folders["external"],
        external_cases,
        site="external",
        seed=seed,
        tumour_fraction=0.5,
        formats=("dicom", "msd"),
        tumour_size_mm=DEMO_TUMOUR_SIZE_MM,
        tumour_density="solid",
    )
    return folders


def summarise_cohort(name: str, cohort_dir: Path, preview_dir: Path) -> dict[str, Any]:
    """Read every DICOM study of a cohort back, mask the lungs and write one preview per study.

    Returns:
        Per-study rows: shape (z, y, x), spacing (mm), lung volume (mL, classical lung mask on
        the DICOM series) and tumour volume (mL, from the MSD label read back as NIfTI).
    """
    import numpy as np

    from lungcad.data.lung_mask import lung_mask
    from lungcad.data.preprocessing import to_unit_range
    from lungcad.io import read_image
    from lungcad.reports.figures import overlay_montage

    cohort = json.loads((cohort_dir / "cohort.json").read_text())
    rows = []
    for case in cohort["cases"]:
        case_id = case["case_id"]
        study = read_image(cohort_dir / "dicom" / case_id)
        label = read_image(cohort_dir / case["files"]["msd_label"])
        lungs = lung_mask(study)
        tumour = label.array > 0.5
        window = to_unit_range(study)
        z_slices = [int(round(z)) for z in np.linspace(0.2, 0.8, 4) * (study.shape[0] - 1)]
        if tumour.any():
            z_slices[-1] = int(np.argmax(tumour.sum(axis=(1, 2))))
        overlay_montage(
            [window[z] for z in z_slices],
            preview_dir / f"{name}_{case_id}.png",
            masks=[lungs[z] for z in z_slices],
            titles=[f"{case_id} z={z}" + (" tumour" if tumour[z].any() else "") for z in z_slices],
            mask_colour="lime",
        )
        if tumour.any():  # tumour outline in red on top of the lung outline, last tile
            overlay_montage(
                [window[z_slices[-1]]],
                preview_dir / f"{name}_{case_id}_tumour.png",
                masks=[tumour[z_slices[-1]]],
                titles=[f"{case_id} tumour"],
            )
        rows.append(
            {
                "cohort": name,
                "case_id": case_id,
                "shape_zyx": list(study.shape),
                "spacing_zyx_mm": [round(s, 3) for s in study.spacing],
                "lung_volume_ml": round(float(lungs.sum()) * study.voxel_volume_ml, 1),
                "tumour_volume_ml": round(float(tumour.sum()) * label.voxel_volume_ml, 2),
                "has_tumour": bool(tumour.any()),
                "warnings": study.meta.get("warnings", []),
            }
        )
    return {"cohort": name, "site": cohort["site"], "cases": rows}


def prepare_cohorts(folders: dict[str, Path], out: Path, seed: int) -> dict[str, Path]:
    """Prepare each cohort's MSD layout into a slice manifest (internal: patient-level splits)."""
    from lungcad.data.layouts.prepare import prepare_dataset
    from lungcad.data.layouts.settings import PrepareSettings

    prepared = {}
    for name, fractions in (("internal", (0.2, 0.2)), ("external", (0.0, 0.0))):
        settings = PrepareSettings(
            layout="msd", seed=seed, val_fraction=fractions[0], test_fraction=fractions[1]
        )
        prepared[name] = prepare_dataset(
            folders[name] / "msd", out / "prepared" / name, settings
        ).out
    return prepared


def validate(prepared: dict[str, Path], out: Path, seg_epochs: int, epochs: int, seed: int):
    """Train seg then cls on the internal site, evaluate internally and externally, run the
    traditional-ML baselines on the same splits and write the generalisation-gap table."""
    from lungcad.training.config import load_config
    from lungcad.validation.protocol import SYNTHETIC_OVERRIDES, run_validation

    common = [*SYNTHETIC_OVERRIDES, f"train.seed={seed}"]
    seg = load_config(None, [*common, *DEMO_SEG_OVERRIDES, f"optim.epochs={seg_epochs}"])
    cls = load_config(None, [*common, *DEMO_CLS_OVERRIDES, f"optim.epochs={epochs}"])
    return run_validation(
        prepared["internal"],
        {"external": prepared["external"]},
        seg,
        out / "validation",
        cls_config=cls,
        baselines=("logreg", "rf", "knn"),
        n_boot=200,
        seed=seed,
    )


def study_level(cls_run: Path, folders: dict[str, Path], out: Path) -> str:
    """Whole-study results of the two-stage model: the study threshold chosen on the internal
    validation patients' studies, then per-study decisions and 3D Dice on the internal test
    patients and the whole external site. Returns the Markdown table."""
    from lungcad.inference.study_evaluation import choose_run_study_threshold, evaluate_studies

    chosen = choose_run_study_threshold(cls_run, folders["internal"] / "msd", split="val")
    log.info(
        "study threshold %.3f chosen on the internal validation studies",
        chosen.threshold.threshold,
    )
    keys = ("auc", "sensitivity", "specificity", "dice", "hd95_mm", "lesion_sensitivity")
    lines = [
        "| studies | n | " + " | ".join(keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for name, split in (("internal", "test"), ("external", None)):
        result = evaluate_studies(
            cls_run,
            folders[name] / "msd",
            out / f"studies_{name}",
            split=split,
            n_boot=200,
            device="cpu",
        )
        m = result.metrics
        cells = [f"{m.get(k, float('nan')):.3f}" for k in keys]
        lines.append(f"| {name} | {len(result.rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def predict_one(cls_run: Path, study: Path, out: Path) -> dict[str, Path]:
    """Whole-study inference on one DICOM series: mask, SEG, SR, findings, Grad-CAM, report."""
    from lungcad.inference.outputs import write_study_outputs
    from lungcad.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(cls_run, device="cpu")
    volume, result = predictor.predict_path(study)
    files = write_study_outputs(volume, result, out)
    finding = result.finding
    if finding.probability is None or finding.threshold is None:
        log.info("study %s: %s (%s)", study.name, finding.status, finding.reason)
    else:
        log.info(
            "study %s: probability %.3f (%s at threshold %.3f), %d lesion(s)",
            study.name,
            finding.probability,
            finding.status,
            finding.threshold,
            len(result.lesions),
        )
    return files


#: Written first into the demo's folder: an earlier demo output (only that) is replaced.
DEMO_MARKER = "lungcad_demo.json"


def demo_output_folder(out: Path) -> Path:
    """``out`` made ready for the demo: created, or emptied when it holds an earlier demo's
    output (:data:`DEMO_MARKER`), and marked as the demo's.

    Raises:
        InputError: ``out`` is a file or a non-empty folder that is not a demo output;
            raised before any work, not minutes into it.
    """
    import shutil

    from lungcad.io.atomic import write_text_atomic
    from lungcad.io.folders import check_output_dir

    out = check_output_dir(out, DEMO_MARKER, what="an earlier demo output")
    if out.is_dir() and any(out.iterdir()):  # a second `make demo` replaces the first's
        log.info("replacing the earlier demo output in %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / DEMO_MARKER, json.dumps({"command": "lungcad demo"}) + "\n")
    return out


def run(args: argparse.Namespace) -> int:
    from lungcad.io.atomic import write_text_atomic

    out = demo_output_folder(args.out)
    started = time.perf_counter()

    t = _step("1/6 synthetic cohorts (internal site + shifted external site)")
    folders = make_cohorts(out, args.cases, args.external_cases, args.seed)
    log.info("cohorts written in %.1f s", time.perf_counter() - t)

    t = _step("2/6 read back through the readers, lung masks, previews, summary")
    summary = {
        name: summarise_cohort(name, folder, out / "previews") for name, folder in folders.items()
    }
    write_text_atomic(out / "dataset_summary.json", json.dumps(summary, indent=2))
    lines = [
        "| cohort | case | shape z,y,x | spacing mm | lungs mL | tumour mL |",
        "|---|---|---|---|---|---|",
    ]
    for cohort in summary.values():
        for r in cohort["cases"]:
            lines.append(
                f"| {r['cohort']} | {r['case_id']} | {r['shape_zyx']} | "
                f"{r['spacing_zyx_mm']} | {r['lung_volume_ml']} | "
                f"{r['tumour_volume_ml']} |"
            )
    write_text_atomic(out / "dataset_summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    log.info("summary and previews in %.1f s", time.perf_counter() - t)
    if args.data_only:
        print(f"\ndemo (data only) finished in {time.perf_counter() - started:.0f} s")
        return 0

    t = _step("3/6 prepare slice manifests (internal: patient-level train/val/test)")
    prepared = prepare_cohorts(folders, out, args.seed)
    log.info("prepared in %.1f s", time.perf_counter() - t)

    t = _step("4/6 train seg + cls, evaluate internal/external, baselines, generalisation gap")
    result = validate(prepared, out, args.seg_epochs, args.epochs, args.seed)
    log.info("validation in %.1f s", time.perf_counter() - t)
    print("\n" + result.gap.to_markdown())
    table = study_level(result.runs["cls"], folders, out)
    write_text_atomic(out / "study_results.md", table + "\n")
    print(
        "\nWhole studies (two-stage model; study threshold chosen on internal validation "
        "patients; internal = held-out test patients, external = the shifted site):\n" + table
    )

    t = _step("5/6 predict one external DICOM study: mask, SEG, SR, Grad-CAM, report")
    external = json.loads((folders["external"] / "cohort.json").read_text())
    case = next((c for c in external["cases"] if c.get("has_tumour")), external["cases"][0])
    files = predict_one(
        result.runs["cls"],
        folders["external"] / case["files"]["dicom"],
        out / "prediction" / case["case_id"],
    )
    log.info("prediction outputs: %s", ", ".join(sorted(p.name for p in files.values())))
    log.info("predicted in %.1f s", time.perf_counter() - t)

    t = _step("6/6 HTML report of the validation")
    from lungcad.validation.report import write_report

    report = write_report(result.out_dir, out / "validation_report.html")
    log.info("report: %s (%.1f s)", report, time.perf_counter() - t)

    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs in {out}/")
    print("  previews/                 lung-mask previews of every synthetic study")
    print("  validation/gap.md         deep model vs baselines, train/internal/external")
    print("  validation_report.html    the validation report (tables, plots, provenance)")
    print(f"  prediction/{case['case_id']}/  mask.nii.gz, sr.dcm, ko.dcm (seg.dcm with lesions),")
    print("                            report.html, Grad-CAM")
    return 0
