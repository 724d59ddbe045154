"""The training run's folder: starting or resuming it, and what every epoch writes.

The files themselves (names, checkpoint format, SHA-256 sidecars) are described in
:mod:`lungcad.training.checkpoint`; this module decides when each is written:

* :func:`check_run_dir`: a new run never overwrites an old one; a resumed run must use the
  run's own configuration, except :data:`RESUMABLE_KEYS`;
* :func:`start_run`: ``config.yaml`` and ``run.json`` (status "running") before the first
  step;
* :func:`save_epoch`: after every epoch ``metrics.csv``/``metrics.json``, ``best.pt`` (and
  ``threshold.json``) when the epoch is the best so far, and ``last.pt`` last;
* :func:`finish_run`: ``run.json``'s final status.

Only rank 0 calls the writing functions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from lungcad.errors import InputError, MissingInputError
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.provenance import utc_timestamp
from lungcad.training.checkpoint import (
    BEST,
    CONFIG_FILE,
    LAST,
    RUN_FILE,
    THRESHOLD_FILE,
    get_rng_state,
    save_checkpoint,
    write_metrics,
)
from lungcad.training.config import (
    Config,
    config_to_dict,
    config_to_yaml,
    diff_configs,
    load_config,
)

log = logging.getLogger(__name__)

__all__ = [
    "RESUMABLE_KEYS",
    "check_run_dir",
    "finish_run",
    "read_run_info",
    "save_epoch",
    "start_run",
    "tensorboard_writer",
]

#: Config keys that may differ between a run and its resumption (they do not change results).
RESUMABLE_KEYS = frozenset(
    {"data.num_workers", "train.device", "train.tensorboard", "train.progress", "train.out_dir"}
)


def check_run_dir(cfg: Config, resume: str | Path | None) -> Path:
    """The run folder; when resuming, check that ``cfg`` matches the run's stored config.

    Args:
        cfg: the configuration to train with.
        resume: the run folder to resume, or None for a new run in ``train.out_dir``.

    Raises:
        InputError: a new run's folder already holds a run, or ``cfg`` differs from the
            resumed run's ``config.yaml`` in a key outside :data:`RESUMABLE_KEYS`.
        MissingInputError: the resumed folder has no ``last.pt``.
    """
    if resume is None:
        run_dir = Path(cfg.train.out_dir)
        if (run_dir / LAST).exists() or (run_dir / BEST).exists():
            raise InputError(
                "already holds a training run; continue it with --resume, or choose another "
                "--out folder",
                path=run_dir,
            )
        return run_dir
    run_dir = Path(resume)
    if not (run_dir / LAST).is_file():
        raise MissingInputError(
            f"no {LAST} to resume from; pass a run folder that has finished at least one epoch",
            path=run_dir,
        )
    stored = load_config(run_dir / CONFIG_FILE)
    changed = {k: v for k, v in diff_configs(stored, cfg).items() if k not in RESUMABLE_KEYS}
    if changed:
        listed = "; ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in changed.items())
        raise InputError(
            f"cannot resume with a different configuration ({listed}). Resume with the run's "
            f"own config.yaml (only {', '.join(sorted(RESUMABLE_KEYS))} may change) or start "
            "a new run with --init-from.",
            path=run_dir,
        )
    return run_dir


def read_run_info(run_dir: Path, resumed: bool, provenance: dict[str, Any]) -> dict[str, Any]:
    """``run.json``'s content so far: a new run's start, or the resumed run's own record.

    Args:
        run_dir: the run folder.
        resumed: True when resuming (the stored record gets a ``resumed_at`` time).
        provenance: where a new run's weights came from (``init_from``/``pretrained`` and
            their SHA-256).
    """
    info: dict[str, Any] = {"started_at": utc_timestamp(), **provenance}
    if resumed:
        if (run_dir / RUN_FILE).is_file():
            info = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        info.setdefault("resumed_at", []).append(utc_timestamp())
    return info


def start_run(run_dir: Path, cfg: Config, run_info: dict[str, Any]) -> None:
    """Create the run folder with its ``config.yaml`` and ``run.json`` (rank 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, config_to_yaml(cfg))
    write_json_atomic(run_dir / RUN_FILE, run_info)


def save_epoch(
    run_dir: Path,
    cfg: Config,
    model: nn.Module,
    history: list[dict[str, Any]],
    *,
    improved: bool,
    threshold: float | None,
    versions: dict[str, str],
    resume_state: dict[str, Any],
    manifests: list[dict[str, Any]] | None = None,
    domains: dict[str, Any] | None = None,
) -> None:
    """Write an epoch's files (rank 0).

    Args:
        run_dir: the run folder.
        cfg: the run's configuration (stored in both checkpoints).
        model: the network after this epoch (unwrapped from DDP).
        history: every epoch's metrics so far; the last row is this epoch's.
        improved: this epoch is the best so far: write ``best.pt`` (+ ``threshold.json``).
        threshold: the best epoch's decision threshold (stage "cls"; None for "seg").
        versions: software versions (``checkpoint.software_versions``).
        resume_state: what only resuming needs (optimiser, scheduler, scaler and
            early-stopping state), stored in ``last.pt`` only.
        manifests: the run's manifests (``{"path", "sha256"}``, as ``run.json`` has them):
            ``threshold.json`` records that the threshold was chosen on their val split, so
            an evaluation can tell whether it scores the rows the threshold was tuned on.
        domains: ``input_domain`` and ``seg_input_domain`` (:mod:`lungcad.training.domain`),
            stored in both checkpoints.
    """
    row = history[-1]
    write_metrics(run_dir, history)
    common = {
        "model": model.state_dict(),
        "epoch": row["epoch"],
        "config": config_to_dict(cfg),
        "metrics": row,
        "versions": versions,
        "threshold": threshold,
        "stage": cfg.train.stage,
        **(domains or {}),
    }
    if improved:
        save_checkpoint(run_dir / BEST, common)
        if cfg.train.stage == "cls":
            write_json_atomic(
                run_dir / THRESHOLD_FILE,
                {
                    "threshold": threshold,
                    "method": cfg.train.threshold_method,
                    "rule": "cancer if probability >= threshold",
                    "chosen_on": "validation split",
                    "split": "val",
                    "manifests": manifests or [],
                    "epoch": row["epoch"],
                    "val_mcc_at_threshold": row["val_mcc_at_threshold"],
                    "val_mcc_at_0.5": row["val_mcc"],
                },
            )
    # last.pt is written last: a crash before it means the epoch is simply redone on resume.
    save_checkpoint(
        run_dir / LAST, {**common, **resume_state, "rng": get_rng_state(), "history": history}
    )


def finish_run(
    run_dir: Path,
    run_info: dict[str, Any],
    *,
    status: str,
    epochs_completed: int,
    best_epoch: int,
    best_metric: float,
) -> None:
    """Record the run's end in ``run.json`` (rank 0); ``run_info`` is updated in place."""
    run_info.update(
        {
            "status": status,
            "finished_at": utc_timestamp(),
            "epochs_completed": epochs_completed,
            "best_epoch": best_epoch,
            "best_metric": best_metric,
        }
    )
    write_json_atomic(run_dir / RUN_FILE, run_info)


def tensorboard_writer(run_dir: Path, cfg: Config, main: bool) -> Any:
    """A TensorBoard SummaryWriter when asked for and installed (rank 0 only), else None."""
    if not (cfg.train.tensorboard and main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning(
            "train.tensorboard is set but the tensorboard package is not installed; "
            "metrics go to metrics.csv/json only (pip install tensorboard)"
        )
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
