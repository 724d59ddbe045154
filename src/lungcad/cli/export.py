"""``lungcad export``: a run's best.pt, or a fold ensemble, as ONNX (ONNX Runtime) or TorchScript.

Examples::

    lungcad export --checkpoint runs/cls --format onnx --out model.onnx
    lungcad export --checkpoint runs/cls --format torchscript --out model.ts.pt
    lungcad export --checkpoint validation/iq_cv --format onnx --out ensemble.onnx

The exported model takes ``image`` (batch, 1, S, S) float32 lung-windowed slices at the run's
``model.image_size`` and returns ``seg_logits`` and ``cls_logits``. After an ONNX export the
file is run once with ONNX Runtime and compared with PyTorch; the largest difference is printed.
"""

from __future__ import annotations

import argparse

from lungcad.cli._options import add_checkpoint_option

NAME = "export"
HELP = "export a trained run to ONNX or TorchScript"

#: Largest acceptable |ONNX - PyTorch| on logits after export (float32 rounding is ~1e-6).
TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lungcad export``."""
    add_checkpoint_option(parser)
    parser.add_argument(
        "--format",
        required=True,
        choices=("onnx", "torchscript"),
        help="onnx (ONNX Runtime, dynamic batch) or torchscript (torch.jit)",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")


def run(args: argparse.Namespace) -> int:
    """Export, check the ONNX file against PyTorch, print where it went; 1 if they differ."""
    import numpy as np
    import torch

    from lungcad.inference.export import export_checkpoint, onnx_session, run_onnx
    from lungcad.training.ensemble import load_model

    path = export_checkpoint(args.checkpoint, args.format, args.out, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.format})")
    if args.format != "onnx":
        return 0
    model, config, _ = load_model(args.checkpoint)
    size = config.model.image_size
    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(x)
    seg, cls = run_onnx(onnx_session(path), x.numpy())
    diff = max(
        float(np.abs(seg - ref["seg_logits"].numpy()).max()),
        float(np.abs(cls - ref["cls_logits"].numpy()).max()),
    )
    print(
        f"ONNX Runtime vs PyTorch on 3 random {size}x{size} slices: max |difference| of "
        f"logits {diff:.2e} (tolerance {TOLERANCE:g})"
    )
    return 0 if diff <= TOLERANCE else 1
