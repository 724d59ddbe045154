"""``lungcad synth``: write a cohort of synthetic chest CTs in the public dataset layouts."""

from __future__ import annotations

import argparse

NAME = "synth"
HELP = "generate synthetic chest-CT cases (DICOM, MSD, LUNA16, 2D sets) with known tumours"

_FORMATS = ("dicom", "msd", "luna16", "slices2d", "patches2d")


def _formats(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in _FORMATS]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown format(s) {unknown or '(none)'}; choose from {','.join(_FORMATS)}"
        )
    return items


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1; got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad synth``."""
    parser.add_argument(
        "--out",
        required=True,
        help="output cohort folder (replaced atomically if it holds an earlier cohort)",
    )
    parser.add_argument("--cases", type=int, default=20, help="number of patients (default 20)")
    parser.add_argument(
        "--site",
        default="internal",
        choices=("internal", "external"),
        help="scanner site: noise, blur, calibration, slice thickness, spacing",
    )
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument(
        "--tumour-fraction",
        type=_fraction,
        default=0.5,
        help="share of cases with tumours (default 0.5)",
    )
    parser.add_argument(
        "--formats",
        type=_formats,
        default=list(_FORMATS),
        help=f"comma-separated subset of {','.join(_FORMATS)} (default: all)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="in-plane matrix in pixels (default: the site's, 128)",
    )


def run(args: argparse.Namespace) -> int:
    """Generate the cohort and print a one-line summary."""
    from lungcad.data.synthetic.cohort import write_cohort

    cohort = write_cohort(
        args.out,
        args.cases,
        site=args.site,
        seed=args.seed,
        tumour_fraction=args.tumour_fraction,
        formats=args.formats,
        matrix=args.size,
    )
    cases = cohort["cases"]
    n_tumour = sum(c["has_tumour"] for c in cases)
    n_nodules = sum(len(c["nodules"]) for c in cases)
    site = cohort["site"]
    print(
        f"wrote {len(cases)} {site['name']} cases ({n_tumour} with tumour, {n_nodules} nodules; "
        f"{site['n_slices']}x{site['matrix']}x{site['matrix']} at {site['slice_thickness_mm']:g}"
        f"x{site['pixel_spacing_mm']:.3g}x{site['pixel_spacing_mm']:.3g} mm) to {args.out}: "
        f"{', '.join(cohort['formats'])}"
    )
    return 0
