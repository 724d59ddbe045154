"""Export a trained network to ONNX (for ONNX Runtime) or TorchScript, and run ONNX models.

Both formats take ``image`` ``(B, 1, S, S)`` float32 (lung-windowed [0, 1] slices at the run's
``model.image_size``; the batch size is free) and return ``seg_logits`` ``(B, 1, S, S)`` and
``cls_logits`` ``(B,)``, the same as :meth:`lungcad.models.unet.LungCADNet.forward`.

The ONNX file carries its provenance in ``metadata_props`` (lungcad version, model name,
image size, SHA-256 of the checkpoint it came from, threshold), so a deployed file can be
traced back to its run. ONNX export uses torch's TorchScript-based exporter
(``dynamo=False``): it needs no extra package, writes one self-contained file and supports
the ``dynamic_axes`` batch dimension directly.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungcad.errors import InputError, MissingInputError
from lungcad.io.atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "ensure_onnx_export",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "export_checkpoint",
    "export_onnx",
    "export_torchscript",
    "onnx_metadata",
    "onnx_session",
    "run_onnx",
]

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "image"
OUTPUT_NAMES = ("seg_logits", "cls_logits")
#: ONNX opset; 17 is supported by every ONNX Runtime from 1.13 on.
DEFAULT_OPSET = 17


class _TupleOutputs(torch.nn.Module):
    """The network with outputs as a (seg_logits, cls_logits) tuple (exporters want tuples)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(image)
        return out["seg_logits"], out["cls_logits"]


def _example(image_size: int, batch: int = 2) -> torch.Tensor:
    # A fixed, non-trivial example: tracing records shapes, not values.
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 1, image_size, image_size, generator=generator)


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    image_size: int,
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export a LungCADNet to an ONNX file with dynamic batch, height and width (atomic write).

    Args:
        model: the network (switched to eval mode; weights on CPU).
        path: destination ``.onnx`` file.
        image_size: side S of the square input in pixels (the run's ``model.image_size``).
        opset: ONNX opset version (>= 17).
        metadata: key -> value strings stored in the model's ``metadata_props``.

    Returns:
        ``path`` as a Path.
    """
    import onnx

    if opset < 17:
        raise InputError(f"ONNX opset must be >= 17; got {opset}", "--opset")
    model = model.cpu().eval()
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo exporter, which
        # needs the onnxscript package; the graphs are numerically the same for this network.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _TupleOutputs(model),
            (_example(image_size),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            # Height and width are dynamic too: the network is fully convolutional and the
            # predictor segments sliding windows of the decoder's own size, which may differ
            # from the classifier's input size.
            dynamic_axes={
                INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_NAMES[0]: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_NAMES[1]: {0: "batch"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        proto = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def export_torchscript(model: torch.nn.Module, path: str | Path, image_size: int) -> Path:
    """Trace a LungCADNet to TorchScript (``torch.jit.trace``; atomic write).

    The traced module returns the ``(seg_logits, cls_logits)`` tuple; any batch size works
    (the network has no batch-dependent control flow). Load it with ``torch.jit.load``.

    Args:
        model: the network (switched to eval mode; weights on CPU).
        path: destination ``.pt`` file.
        image_size: side S of the square input in pixels.
    """
    model = model.cpu().eval()
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(_TupleOutputs(model), _example(image_size), check_trace=False)
        traced.save(str(tmp))
    return path


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (empty when it has none)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}


def onnx_session(path: str | Path, num_threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for an exported model.

    Args:
        path: the ``.onnx`` file.
        num_threads: intra-op threads (default: ``torch.get_num_threads()``, so ``--threads``
            and ``torch.set_num_threads`` govern both backends alike).

    Raises:
        MissingInputError: the file does not exist.
        InputError: onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # an optional dependency
        raise InputError(
            "the ONNX backend needs onnxruntime; pip install onnxruntime "
            "(or use the torch backend)",
            "backend",
        ) from exc
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            "ONNX model not found; create it with `lungcad export --format onnx`", path
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(num_threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run an ONNX session on ``(B, 1, S, S)`` float32 images -> (seg_logits, cls_logits)."""
    seg, cls = session.run(
        list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)}
    )
    return seg, cls


def export_checkpoint(
    run_dir: str | Path, fmt: str, out: str | Path, *, opset: int = DEFAULT_OPSET
) -> Path:
    """Export the ``best.pt`` of a run folder, or a fold ensemble, to ONNX or TorchScript.

    A fold ensemble (a ``lungcad validate --folds`` folder) becomes one graph whose outputs
    are the logits of its members' mean probabilities, as :class:`EnsembleNet` computes them;
    its metadata names the members' checkpoint hashes and the ensemble's own threshold.

    Args:
        run_dir: a run folder written by ``lungcad train`` (or a ``.pt`` file in it), or a
            fold-ensemble folder.
        fmt: ``"onnx"`` or ``"torchscript"``.
        out: destination file.
        opset: ONNX opset (ONNX only).

    Returns:
        ``out`` as a Path.
    """
    from lungcad import __version__
    from lungcad.training.ensemble import load_model

    if fmt not in FORMATS:
        raise InputError(f"export format must be one of {FORMATS}; got {fmt!r}", "--format")
    model, config, info = load_model(run_dir)
    ensemble = info.get("ensemble")
    size = config.model.image_size
    if fmt == "torchscript":
        path = export_torchscript(model, out, size)
    else:
        path = export_onnx(
            model,
            out,
            size,
            opset=opset,
            metadata={
                "lungcad_version": __version__,
                "model_name": config.model.name,
                "image_size": size,
                "checkpoint_sha256": _export_identity(info),
                "threshold": info["threshold"],
                **(
                    {"ensemble_member_sha256": ",".join(ensemble["member_sha256"])}
                    if ensemble
                    else {}
                ),
                "input": f"{INPUT_NAME}: (batch, 1, H, W) float32 lung-windowed [0, 1]; "
                f"the classifier was trained at {size}x{size}",
                "spatial_axes": "dynamic",
                "outputs": "seg_logits: (batch, 1, H, W); cls_logits: (batch,)",
            },
        )
    log.info("exported %s (%s, %dx%d input) to %s", info["path"], fmt, size, size, path)
    return path


def _export_identity(info: dict[str, Any]) -> str:
    """The checkpoint hash an export records: a run's own, or for a fold ensemble the SHA-256
    of its members' hashes in order (so an export of other members never matches)."""
    ensemble = info.get("ensemble")
    if not ensemble:
        return str(info["sha256"])
    joined = ",".join(str(sha) for sha in ensemble["member_sha256"])
    return hashlib.sha256(joined.encode("ascii")).hexdigest()


def ensure_onnx_export(info: dict[str, Any], onnx_path: str | Path | None = None) -> Path:
    """An ONNX export of a loaded checkpoint, made once and reused.

    Args:
        info: ``load_checkpoint``'s info (``path``, ``run_dir``, ``sha256``).
        onnx_path: an existing export to use (checked against the checkpoint's SHA-256), or
            where to export; None: ``RUN/model-<sha256[:12]>.onnx`` (``/tmp`` when the run
            folder is read-only).

    Raises:
        InputError: ``onnx_path`` was exported from another checkpoint.
    """
    if onnx_path is not None and Path(onnx_path).is_file():
        sha = onnx_metadata(onnx_path).get("checkpoint_sha256")
        if sha and sha != info["sha256"]:
            raise InputError(
                f"this ONNX file was exported from another checkpoint "
                f"({sha[:12]}..., run has {info['sha256'][:12]}...); export it "
                "again with `lungcad export`",
                onnx_path,
            )
        return Path(onnx_path)
    path = (
        Path(onnx_path)
        if onnx_path
        else Path(info["run_dir"]) / (f"model-{info['sha256'][:12]}.onnx")
    )
    if path.is_file() and onnx_metadata(path).get("spatial_axes") == "dynamic":
        return path
    # Missing, or an export from before height and width were dynamic (sliding windows of
    # another size would fail in it): export again.
    log.info("exporting %s to ONNX (%s)", info["path"], path)
    try:
        return export_checkpoint(info["path"], "onnx", path)
    except PermissionError:
        # A read-only run folder (e.g. a shared model store): keep the export in /tmp.
        fallback = Path(tempfile.gettempdir()) / "lungcad-onnx" / path.name
        if not fallback.is_file():
            export_checkpoint(info["path"], "onnx", fallback)
        return fallback
