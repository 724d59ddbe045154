"""``lungcad train seg|cls``: train one stage of the model and write a run folder.

Examples::

    lungcad train seg --config configs/seg_cpu_small.yaml --manifest prepared/msd \\
        --out runs/seg --set optim.epochs=5
    lungcad train cls --config configs/cls_cpu_small.yaml --manifest prepared/iqothnccd \\
        --out runs/cls --init-from runs/seg
    lungcad train seg --resume runs/seg            # continue from runs/seg/last.pt
    torchrun --nproc_per_node 4 $(which lungcad) train seg ...   # one process per GPU

Settings come from the dataclass defaults, then ``--config`` (a YAML file of overrides), then
``--set section.key=value``, then the dedicated options (``--manifest``, ``--out``,
``--pretrained``, ``--init-from``). Per-epoch metrics are logged; the run folder holds
config.yaml, metrics.csv/json, best.pt, last.pt, threshold.json (cls) and run.json.
"""

from __future__ import annotations

import argparse
import logging
import os

from lungcad.training.choices import STAGES  # light: Literal types only, no torch

NAME = "train"
HELP = "train the segmentation (seg) or classification (cls) stage"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad train``."""
    parser.add_argument(
        "stage",
        choices=STAGES,
        help="seg: U-Net on slices with tumour masks; cls: cancer classifier",
    )
    parser.add_argument(
        "--config", metavar="YAML", help="YAML file of config overrides (see configs/)"
    )
    parser.add_argument(
        "--manifest",
        metavar="DIR_OR_CSV",
        action="append",
        help="prepared data (folder or manifest.csv); repeat to combine sets",
    )
    parser.add_argument("--out", metavar="RUN_DIR", help="run folder to create")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one setting, e.g. --set optim.lr=1e-3",
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt"
    )
    parser.add_argument(
        "--pretrained",
        metavar="PATH",
        help="local torchvision-layout ResNet weights for the encoder",
    )
    parser.add_argument(
        "--init-from", metavar="SEG_RUN", help="stage cls: start from this seg run's best.pt"
    )
    parser.add_argument(
        "--stop-after-epoch",
        type=int,
        metavar="N",
        help="stop after epoch N (resume later with --resume)",
    )


def run(args: argparse.Namespace) -> int:
    """Build the configuration, train, and print where the run folder is."""
    from pathlib import Path

    from lungcad.errors import InputError
    from lungcad.training.checkpoint import CONFIG_FILE
    from lungcad.training.config import apply_overrides, load_config
    from lungcad.training.loop import train

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        logging.getLogger("lungcad").setLevel(logging.WARNING)

    if args.resume:
        clashing = [
            flag
            for flag, value in (
                ("--config", args.config),
                ("--manifest", args.manifest),
                ("--out", args.out),
                ("--pretrained", args.pretrained),
                ("--init-from", args.init_from),
            )
            if value
        ]
        if clashing:
            raise InputError(
                f"{', '.join(clashing)} cannot be combined with --resume: a resumed run keeps "
                "its own config.yaml (use --set data.num_workers=... for what may change)",
                path=args.resume,
            )
        config = load_config(Path(args.resume) / CONFIG_FILE, args.overrides)
        if config.train.stage != args.stage:
            raise InputError(
                f"the run is a {config.train.stage!r} run; use `lungcad train "
                f"{config.train.stage} --resume {args.resume}`",
                path=args.resume,
            )
    else:
        config = load_config(args.config, args.overrides)
        updates: dict[str, dict[str, object]] = {"train": {"stage": args.stage}}
        if args.manifest:
            updates["data"] = {"manifest": list(args.manifest)}
        if args.out:
            updates["train"]["out_dir"] = args.out
        if args.init_from:
            updates["train"]["init_from"] = args.init_from
        if args.pretrained:
            updates["model"] = {"pretrained": args.pretrained}
        config = apply_overrides(config, updates)

    result = train(config, resume=args.resume, stop_after_epoch=args.stop_after_epoch)
    if int(os.environ.get("RANK", "0")) == 0:
        line = (
            f"{result.status}: {result.epochs_completed} epoch(s); best "
            f"{result.monitor}={result.best_metric:.4f} at epoch {result.best_epoch}"
        )
        if result.threshold is not None:
            line += f"; decision threshold {result.threshold:.3f}"
        print(line)
        print(f"run folder: {result.run_dir}")
    return 0
