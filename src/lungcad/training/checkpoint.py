"""Run folders and checkpoints: everything inference needs lives in one folder.

A training run writes (rank 0 only, every file atomically)::

    RUN_DIR/config.yaml        the resolved configuration (defaults + YAML + --set)
    RUN_DIR/metrics.csv        one row per epoch (epoch, lr, train_loss, val_* metrics, time_s)
    RUN_DIR/metrics.json       the same rows as a JSON list
    RUN_DIR/last.pt            full state after the latest epoch, for --resume
    RUN_DIR/best.pt            weights of the best epoch (by optim.monitor), for inference
    RUN_DIR/*.pt.sha256        SHA-256 of each .pt ("<hex>  <name>", sha256sum's format)
    RUN_DIR/threshold.json     stage "cls": the decision threshold chosen on validation
    RUN_DIR/run.json           versions, config hash, manifest hash, start/end times

``last.pt`` holds ``{"model", "optimizer", "scheduler", "scaler", "epoch", "rng",
"early_stopping", "history", "config", "metrics", "versions", "threshold"}``; ``best.pt``
holds the same without the optimizer/scheduler/scaler/RNG state (only resuming needs those,
and for a ResNet50 U-Net they triple the file). Every value is a tensor or a plain Python
type, so both load with ``torch.load(weights_only=True)``, which cannot execute code from a
tampered file (nnU-Net's ``initialize_from_trained_model_folder`` is the model for
"the folder is enough").
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import platform
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lungcad import __version__
from lungcad.errors import InputError, MissingInputError
from lungcad.io.atomic import atomic_path, write_json_atomic, write_text_atomic
from lungcad.models.pretrained import load_pretrained_encoder
from lungcad.models.registry import create_model
from lungcad.models.unet import LungCADNet
from lungcad.training.config import Config, config_from_dict, config_to_dict, config_to_yaml

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
BEST = "best.pt"
LAST = "last.pt"
THRESHOLD_FILE = "threshold.json"
RUN_FILE = "run.json"
SHA_SUFFIX = ".sha256"

__all__ = [
    "BEST",
    "CONFIG_FILE",
    "LAST",
    "METRICS_CSV",
    "METRICS_JSON",
    "RUN_FILE",
    "THRESHOLD_FILE",
    "LoadedCheckpoint",
    "file_sha256",
    "get_rng_state",
    "initial_weights",
    "load_checkpoint",
    "model_from_config",
    "read_checkpoint",
    "save_checkpoint",
    "set_rng_state",
    "software_versions",
    "write_metrics",
]


def software_versions() -> dict[str, str]:
    """Versions of the software a checkpoint was made with (lungcad, torch, monai, ...)."""
    import monai  # heavy; imported here so importing this module stays cheap for readers

    versions = {
        "lungcad": __version__,
        "torch": torch.__version__,  # a TorchVersion: str() so weights_only loading accepts it
        "monai": monai.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    return {key: str(value) for key, value in versions.items()}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_metrics(run_dir: str | Path, history: list[dict[str, Any]]) -> None:
    """Write the per-epoch metrics as ``metrics.csv`` and ``metrics.json`` (atomically).

    Args:
        run_dir: the run folder.
        history: one flat dict per epoch; the CSV's columns are the keys in first-seen order.
    """
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(Path(run_dir) / METRICS_CSV, text.getvalue())
    write_json_atomic(Path(run_dir) / METRICS_JSON, history)


# --------------------------------------------------------------------------- RNG state


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain types.

    NumPy's state array becomes an int64 tensor so ``torch.load(weights_only=True)`` accepts it.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`get_rng_state` (CUDA only where available)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].cpu().numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# --------------------------------------------------------------------------- save / read


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically, then its ``.sha256`` sidecar.

    Args:
        path: destination ``.pt`` file.
        payload: tensors and plain Python values only (so it loads with weights_only=True).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        digest = file_sha256(tmp)
    write_text_atomic(path.with_name(path.name + SHA_SUFFIX), f"{digest}  {path.name}\n")
    return path


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / BEST
        if not candidate.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise MissingInputError(
                f"run folder has no {BEST} (found: {found}); pass a folder written by "
                "`lungcad train`, whose first epoch has finished, or a .pt file",
                path,
            )
        return candidate
    if not path.is_file():
        raise MissingInputError(
            "checkpoint not found; pass a run folder written by `lungcad train` or its .pt file",
            path,
        )
    return path


def _verify(path: Path) -> str:
    """Compare ``path`` with its ``.sha256`` sidecar; return the digest."""
    sidecar = path.with_name(path.name + SHA_SUFFIX)
    if not sidecar.is_file():
        raise MissingInputError(
            f"checksum file {sidecar.name} not found next to the checkpoint; copy the whole "
            "run folder (or pass verify=False if you trust the file)",
            path,
        )
    expected = sidecar.read_text(encoding="utf-8").split()[0].strip().lower()
    actual = file_sha256(path)
    if actual != expected:
        raise InputError(
            f"SHA-256 mismatch: the file hashes to {actual[:16]}... but {sidecar.name} "
            f"records {expected[:16]}...; the checkpoint is corrupt or was modified. "
            "Copy the run folder again or retrain.",
            path,
        )
    return actual


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True
) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` after checking its SHA-256.

    Args:
        path: a ``.pt`` file, or a run folder (its ``best.pt``).
        map_location: where tensors go ("cpu", "cuda:0", ...).
        verify: compare the file with its ``.sha256`` sidecar first.

    Returns:
        The checkpoint dict; with ``verify``, its key ``"sha256"`` holds the file's digest.

    Raises:
        MissingInputError: the file (or, with ``verify``, its sidecar) is missing.
        InputError: the SHA-256 differs (the file is corrupt, truncated or was replaced), or
            the file is not a lungcad checkpoint.
    """
    path = _resolve(path)
    digest = _verify(path) if verify else None
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip errors: report them as bad input with the file
        raise InputError(
            f"cannot be loaded as a weights-only torch checkpoint ({exc})", path
        ) from exc
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise InputError(
            "not a lungcad checkpoint (expected a dict with 'model' and 'config'); pass a file "
            "written by `lungcad train`",
            path,
        )
    if digest is not None:
        payload["sha256"] = digest
    return payload


# --------------------------------------------------------------------------- models


#: Parameters added after lungcad 0.2.0 whose absence from an older checkpoint leaves the
#: network as it was: the classifier's direct mask term (zero: silent).
OPTIONAL_WEIGHTS = ("classifier.mask_evidence.weight", "classifier.mask_evidence.bias")


def load_weights(model: LungCADNet, state: Mapping[str, Any]) -> None:
    """``model.load_state_dict(state)``, strictly, except that :data:`OPTIONAL_WEIGHTS`
    missing from an older checkpoint are set to zero (the behaviour it was trained with).

    Raises:
        RuntimeError: any other missing or unexpected key, or a shape mismatch.
    """
    missing = [k for k in OPTIONAL_WEIGHTS if k not in state]
    if not missing:
        model.load_state_dict(state, strict=True)
        return
    result = model.load_state_dict(state, strict=False)
    other = [k for k in result.missing_keys if k not in missing]
    if other or result.unexpected_keys:
        raise RuntimeError(f"missing keys {other}, unexpected keys {list(result.unexpected_keys)}")
    model.classifier.reset_mask_evidence(0.0)


def model_from_config(config: Config) -> LungCADNet:
    """A freshly initialised network as ``config.model`` describes it (no weights loaded)."""
    return create_model(
        config.model.name,
        decoder_dropout=config.model.dropout,
        head_dropout=config.model.cls_dropout,
        mask_term=config.model.cls_mask_prior is not None,
    )


def initial_weights(model: LungCADNet, config: Config) -> dict[str, Any]:
    """Load the weights a new run starts from into ``model``; returns their provenance.

    ``train.init_from`` (a stage-"seg" run folder or ``.pt`` file, loaded strictly) wins over
    ``model.pretrained`` (ImageNet encoder weights); with neither the model keeps its random
    initialisation.

    Returns:
        ``{"init_from", "init_from_sha256"}``, ``{"pretrained", "pretrained_sha256"}`` or
        ``{}``, recorded in run.json.

    Raises:
        InputError: the ``init_from`` run used another model than ``config.model.name``.
    """
    if config.train.init_from:
        payload = read_checkpoint(config.train.init_from)
        source_model = payload["config"].get("model", {}).get("name")
        if source_model != config.model.name:
            raise InputError(
                f"the run was trained with model {source_model!r} but this config uses "
                f"{config.model.name!r}; set --set model.name={source_model}",
                path=config.train.init_from,
            )
        load_weights(model, payload["model"])
        log.info("initialised from %s (epoch %s)", config.train.init_from, payload.get("epoch"))
        source_stage = payload["config"].get("train", {}).get("stage")
        prior = config.model.cls_mask_prior
        if config.train.stage == "cls" and source_stage != "cls" and prior is not None:
            # A segmentation run never trained the head: its direct mask term starts anew.
            model.classifier.reset_mask_evidence(prior)
        return {
            "init_from": config.train.init_from,
            "init_from_sha256": payload["sha256"],
            # The decoder keeps segmenting at the scale the segmentation run learnt.
            "init_from_input_domain": payload.get("seg_input_domain")
            or payload.get("input_domain"),
        }
    if config.train.stage == "cls" and config.model.cls_mask_prior is not None:
        model.classifier.reset_mask_evidence(config.model.cls_mask_prior)
    if config.model.pretrained:
        load_pretrained_encoder(model, config.model.pretrained)
        return {
            "pretrained": config.model.pretrained,
            "pretrained_sha256": file_sha256(config.model.pretrained),
        }
    return {}


class LoadedCheckpoint(NamedTuple):
    """A network restored from a run folder; unpacks as ``model, config, info``.

    Attributes:
        model: the network with the checkpoint's weights, in eval mode.
        config: the run's resolved configuration.
        info: ``{"path", "run_dir", "sha256", "epoch", "stage", "metrics", "versions",
            "threshold"}``; ``threshold`` is the classifier's decision threshold on the
            cancer probability (stage "cls"; 0.5 when none was chosen).
    """

    model: LungCADNet
    config: Config
    info: dict[str, Any]


def load_checkpoint(
    run_dir_or_file: str | Path, map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Rebuild the trained network from a run folder (or one ``.pt`` file in it).

    Args:
        run_dir_or_file: a run folder (``best.pt`` is loaded) or a ``.pt`` file.
        map_location: device for the weights; the model is moved there too.

    Returns:
        :class:`LoadedCheckpoint` ``(model, config, info)``; unpacks as a tuple.

    Raises:
        MissingInputError, InputError: see :func:`read_checkpoint`; also when the stored
            configuration or weights do not fit this version of lungcad.
    """
    path = _resolve(run_dir_or_file)
    payload = read_checkpoint(path, map_location=map_location)
    # Lenient: a key added or removed by another lungcad version must not make the weights
    # unloadable; the network's own keys are still checked strictly below.
    config = config_from_dict(payload["config"], strict=False)
    model = model_from_config(config)
    try:
        load_weights(model, payload["model"])
    except RuntimeError as exc:
        raise InputError(
            f"weights do not fit a {config.model.name} LungCADNet ({exc}); was the checkpoint "
            "written by another lungcad version?",
            path,
        ) from exc
    model.to(map_location).eval()
    threshold = payload.get("threshold")
    threshold_file = path.parent / THRESHOLD_FILE
    if threshold is None and threshold_file.is_file():
        threshold = json.loads(threshold_file.read_text(encoding="utf-8")).get("threshold")
    info = {
        "path": str(path),
        "run_dir": str(path.parent),
        "sha256": payload["sha256"],
        "epoch": payload.get("epoch"),
        "stage": config.train.stage,
        "metrics": payload.get("metrics", {}),
        "versions": payload.get("versions", {}),
        "threshold": 0.5 if threshold is None else float(threshold),
        # Where the inputs came from (lungcad.training.domain); None in older checkpoints.
        "input_domain": payload.get("input_domain"),
        "seg_input_domain": payload.get("seg_input_domain"),
    }
    return LoadedCheckpoint(model=model, config=config, info=info)


def write_untrained_run(
    folder: str | Path,
    config: Config,
    *,
    threshold: float = 0.5,
    seed: int = 0,
    domains: dict[str, Any] | None = None,
) -> Path:
    """A run folder (``best.pt`` + sidecar, ``config.yaml``, ``threshold.json``) holding a
    randomly initialised network, for benchmarks and tests that need a model but no training.

    Args:
        folder: the run folder to write.
        config: the run's configuration (stage, model name, input size, ``init_from``).
        threshold: the decision threshold recorded.
        seed: torch seed of the random weights.
        domains: ``input_domain`` / ``seg_input_domain`` to record, as training does
            (:mod:`lungcad.training.domain`); None records none.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    model = model_from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / CONFIG_FILE, config_to_yaml(config))
    save_checkpoint(
        folder / "best.pt",
        {
            "model": model.state_dict(),
            "epoch": 0,
            "config": config_to_dict(config),
            "metrics": {},
            "versions": software_versions(),
            "threshold": threshold,
            "stage": config.train.stage,
            **(domains or {}),
        },
    )
    write_json_atomic(folder / THRESHOLD_FILE, {"threshold": threshold, "method": "mcc"})
    return folder
