"""Training: one loop for both stages, configured (never subclassed), resumable, DDP-ready.

``train(config)`` reads top to bottom like nanoGPT's ``train.py``: resolve the device and
processes, build data, model, optimiser and schedule, optionally restore ``last.pt``, then run
epochs of (train, validate, log, checkpoint, early-stop). Behaviour changes only through
:class:`lungcad.training.config.Config`:

* stage "seg": BCE + Dice on slices with a tumour mask (slices without one add nothing);
  validation Dice per epoch (:mod:`lungcad.training.validate`).
* stage "cls": BCE on labelled slices, positive-class weight ``n_neg / n_pos`` (1 with
  ``data.balanced_sampling``, which balances the classes by sampling instead); encoder frozen
  for ``optim.freeze_encoder_epochs`` then fine-tuned; decoder kept frozen
  (``optim.freeze_decoder``); weights from a stage-"seg" run (``train.init_from``).
  Validation accuracy, F1, MCC, AUC at probability 0.5. The decision threshold is then chosen
  on the validation predictions by maximising MCC (``train.threshold_method: mcc``, default)
  or Youden's J = sensitivity + specificity - 1 (``youden``), with
  :func:`lungcad.metrics.classification.choose_threshold`; the best epoch's threshold is saved in
  ``threshold.json`` and in ``best.pt`` ("cancer if probability >= threshold"). Model
  selection and early stopping use ``val_mcc`` at 0.5, so the threshold never flatters the
  choice of epoch.
* ``optim.ema_decay`` > 0: an exponential moving average of the weights
  (:class:`~lungcad.training.optim.WeightAverage`) is updated after every step; it is what
  is validated, selected and checkpointed, while the live weights keep training.

The parts live next door: the loaders in :mod:`~lungcad.training.data`, what trains and the
optimiser in :mod:`~lungcad.training.optim`, the validation pass in
:mod:`~lungcad.training.validate`, the run folder's files in
:mod:`~lungcad.training.run_folder`.

Reproducibility: every epoch reseeds Python, NumPy and torch from ``(seed, epoch, rank)`` and
the data order from ``(seed, epoch)``, so epoch ``e`` depends only on the weights, optimiser
state and ``e``. With ``last.pt`` (model, optimiser, scheduler, gradient scaler, RNG,
early-stopping state and, with a weight average, the live weights) a resumed run reproduces
the uninterrupted one exactly on the same hardware and thread count.

Scale-out: under ``torchrun`` each process trains on its shard (see
:mod:`lungcad.training.distributed`); BatchNorm statistics are averaged before validation,
validation predictions are gathered so every rank computes the same metrics and takes the
same early-stopping decision, and only rank 0 logs, shows progress and writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lungcad.errors import InputError
from lungcad.models.forward import autocast
from lungcad.models.unet import LungCADNet
from lungcad.training.checkpoint import (
    LAST,
    file_sha256,
    initial_weights,
    model_from_config,
    read_checkpoint,
    set_rng_state,
    software_versions,
)
from lungcad.training.config import Config, config_hash
from lungcad.training.data import build_data
from lungcad.training.distributed import (
    DistInfo,
    all_reduce_sum,
    average_batchnorm,
    epoch_seed,
    init_distributed,
)
from lungcad.training.losses import BCEDiceLoss, classification_loss
from lungcad.training.optim import Optimisation, Trainable, WeightAverage, set_trainable
from lungcad.training.run_folder import (
    check_run_dir,
    finish_run,
    read_run_info,
    save_epoch,
    start_run,
    tensorboard_writer,
)
from lungcad.training.validate import resolve_monitor, validate

log = logging.getLogger(__name__)

__all__ = ["EarlyStopping", "RunResult", "RunStatus", "train"]

#: How a run ended: all epochs, early stopping, or ``stop_after_epoch`` (resumable).
RunStatus = Literal["finished", "early_stopped", "stopped"]


@dataclass
class RunResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run folder.
        status: "finished" (all epochs), "early_stopped" or "stopped" (``stop_after_epoch``).
        epochs_completed: epochs run so far, including those before a resume.
        best_epoch: 1-based epoch of ``best.pt``.
        best_metric: its value of ``monitor``.
        monitor: the metric used for model selection.
        history: one dict of metrics per epoch (as in metrics.json).
        threshold: stage "cls": decision threshold of ``best.pt`` (None for "seg").
        model: the network after the last epoch (not the best one: load ``best.pt`` with
            :func:`lungcad.training.checkpoint.load_checkpoint` for that), unwrapped from DDP;
            with ``optim.ema_decay`` the weight average, as the checkpoints hold it.
    """

    run_dir: Path
    status: RunStatus
    epochs_completed: int
    best_epoch: int
    best_metric: float
    monitor: str
    history: list[dict[str, float]] = field(default_factory=list)
    threshold: float | None = None
    model: LungCADNet | None = None


@dataclass
class EarlyStopping:
    """Model selection and early stopping: the best epoch so far and the epochs since.

    ``last.pt`` stores it as the plain dict of :meth:`as_dict` (key ``"early_stopping"``), so
    a resumed run continues the count and checkpoints load with ``weights_only=True``.

    Attributes:
        best: the best value of the monitored metric (-inf before the first finite one).
        best_epoch: 1-based epoch of ``best`` (0 before the first epoch).
        bad_epochs: epochs since the best one.
        threshold: stage "cls": the best epoch's decision threshold.
    """

    best: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    threshold: float | None = None

    def update(
        self, value: float, epoch: int, threshold: float | None, *, latest: bool = False
    ) -> bool:
        """Record epoch ``epoch`` (1-based) with monitored ``value``; True if it is the best.

        The first epoch is always the best so far, even with a NaN metric (so ``best.pt``
        exists after one epoch); later a NaN never improves on anything. With ``latest``
        (``optim.select: last``) every epoch counts as the best, so ``best.pt`` is the
        latest epoch and early stopping never triggers.
        """
        improved = latest or self.best_epoch == 0 or (math.isfinite(value) and value > self.best)
        if improved:
            self.best = value if math.isfinite(value) else -math.inf
            self.best_epoch, self.bad_epochs, self.threshold = epoch, 0, threshold
        else:
            self.bad_epochs += 1
        return improved

    def should_stop(self, patience: int) -> bool:
        """True after ``patience`` epochs without improvement (never for patience 0)."""
        return patience > 0 and self.bad_epochs >= patience

    def as_dict(self) -> dict[str, Any]:
        """The state as ``last.pt`` stores it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> EarlyStopping:
        """The state :meth:`as_dict` returned."""
        return cls(**state)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    config: Config, *, resume: str | Path | None = None, stop_after_epoch: int | None = None
) -> RunResult:
    """Train one stage as ``config`` says and write the run folder.

    Args:
        config: resolved configuration (:func:`lungcad.training.config.load_config`).
        resume: a run folder to continue from its ``last.pt`` (model, optimiser, scheduler,
            scaler, epoch, RNG and early-stopping state). ``config`` must equal the run's
            own, except for :data:`lungcad.training.run_folder.RESUMABLE_KEYS`; the run
            folder is the resumed one.
        stop_after_epoch: stop once this (1-based) epoch has finished, as if interrupted;
            ``last.pt`` allows resuming later. None runs to ``optim.epochs`` or early stopping.

    Returns:
        :class:`RunResult` (on every rank under DDP; only rank 0 writes files).

    Raises:
        InputError / MissingInputError: bad configuration or data (before any training step).
    """
    ddp = init_distributed(config.train.device)
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    try:
        return _train(config, resume, stop_after_epoch, ddp)
    finally:  # leave the process's global torch flags as they were
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = flags[2]


def _setup_device(cfg: Config, ddp: DistInfo) -> tuple[torch.device, torch.memory_format]:
    """This rank's device and the model's memory layout; sets torch's determinism flags."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "CUDA was requested but torch sees no GPU; use --set train.device=cpu (or auto)",
            path="train.device",
        )
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", ddp.local_rank) if cuda else torch.device("cpu")
    memory_format = (
        torch.channels_last if cuda and cfg.train.channels_last else torch.contiguous_format
    )
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = cuda and not cfg.train.deterministic
    return device, memory_format


def _train(
    cfg: Config, resume: str | Path | None, stop_after_epoch: int | None, ddp: DistInfo
) -> RunResult:
    # -- setup: run folder, device, determinism, the monitored metric
    run_dir = check_run_dir(cfg, resume)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(run_dir)))
    device, memory_format = _setup_device(cfg, ddp)
    stage = cfg.train.stage
    monitor = resolve_monitor(cfg.optim.monitor, stage)
    _seed_all(cfg.train.seed)

    # -- data, model, optimiser, schedule, gradient scaler
    data = build_data(cfg, ddp)
    steps_per_epoch = len(data.train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    model = model_from_config(cfg)
    provenance = initial_weights(model, cfg) if resume is None else {}
    # torch accepts memory_format in Module.to, but its type stubs do not list it.
    model.to(device=device, memory_format=memory_format)  # type: ignore[call-overload]
    opt = Optimisation.build(model, cfg, steps_per_epoch, device)
    average = WeightAverage.build(model, cfg)  # None unless optim.ema_decay > 0
    seg_loss = BCEDiceLoss()

    # -- what --resume restores
    start_epoch, history, early = 0, [], EarlyStopping()
    if resume is not None:
        state = read_checkpoint(run_dir / LAST, map_location=device)
        # With a weight average, "model" holds the average and "train_model" the live network.
        model.load_state_dict(state.get("train_model", state["model"]))
        if average is not None:
            average.load(state["model"], state["ema_updates"])
        opt.load_state_dict(state)
        set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]
        early = EarlyStopping.from_dict(state["early_stopping"])
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    run_info = read_run_info(run_dir, resume is not None, provenance)
    run_info.update(
        {
            "stage": stage,
            "status": "running",
            "config_hash": config_hash(cfg),
            "versions": software_versions(),
            "world_size": ddp.world,
            "device": str(device),
            "manifests": [{"path": p, "sha256": file_sha256(p)} for p in data.manifests],
            "train_slices": len(data.train_records),
            "val_slices": len(data.val_records),
            "pos_weight": data.pos_weight,
            "monitor": monitor,
        }
    )
    own_domain = data.domain.to_dict()
    domains = {
        "input_domain": own_domain,
        # The decoder's scale: this run's for stage seg, the init_from run's for stage cls
        # (None without one: its decoder never learnt to segment).
        "seg_input_domain": own_domain
        if stage == "seg"
        else run_info.get("init_from_input_domain"),
    }
    run_info["input_domain"] = own_domain
    if ddp.main:
        start_run(run_dir, cfg, run_info)
        log.info(
            "stage %s: %d train / %d val slices, %d steps per epoch, %s, %d process(es)",
            stage,
            len(data.train_records),
            len(data.val_records),
            steps_per_epoch,
            device,
            ddp.world,
        )
    writer = tensorboard_writer(run_dir, cfg, ddp.main)

    # -- epochs
    status: RunStatus = "finished"
    wrapped: LungCADNet | DistributedDataParallel = model
    trainable_before: Trainable | None = None
    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.perf_counter()
        _seed_all(epoch_seed(cfg.train.seed, epoch, ddp.rank))
        data.sampler.set_epoch(epoch)
        data.generator.manual_seed(epoch_seed(cfg.train.seed, epoch, ddp.rank))
        trainable = set_trainable(model, cfg, epoch)
        if trainable != trainable_before:  # DDP must know which parameters get gradients
            wrapped = (
                model
                if ddp.world == 1
                else DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
            )
            trainable_before = trainable
        params = [p for p in model.parameters() if p.requires_grad]
        totals = torch.zeros(2, device=device)  # (sum of loss * slices, slices)
        bar = tqdm(
            data.train_loader,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}",
            leave=False,
            disable=not (cfg.train.progress and ddp.main and sys.stderr.isatty()),
        )
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
            with autocast(device, cfg.train.amp):
                out = wrapped(images)
            if stage == "seg":
                loss = seg_loss(
                    out["seg_logits"], batch["mask"].to(device), batch["has_mask"].to(device)
                )
            else:
                loss = classification_loss(
                    out["cls_logits"], batch["label"].to(device), data.pos_weight
                )
            opt.step(loss, params)
            if average is not None:
                average.update(model)
            totals[0] += loss.detach() * len(images)
            totals[1] += len(images)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        all_reduce_sum(totals, ddp)
        average_batchnorm(model, ddp)
        # What is validated, selected and checkpointed: the weight average when there is one.
        evaluated = model
        if average is not None:
            evaluated = average.module
            average_batchnorm(evaluated, ddp)

        metrics = validate(
            evaluated,
            data.val_loader,
            device,
            ddp,
            stage=stage,
            amp=cfg.train.amp,
            threshold_method=cfg.train.threshold_method,
            pos_weight=data.pos_weight,
        )
        value = metrics.get(monitor, float("nan"))
        opt.end_epoch(value)
        row = {
            "epoch": epoch + 1,
            "lr": opt.lr,
            "train_loss": float(totals[0] / totals[1].clamp(min=1)),
            **metrics,
            "time_s": round(time.perf_counter() - t0, 3),
        }
        history.append(row)
        improved = early.update(
            value, epoch + 1, metrics.get("val_threshold"), latest=cfg.optim.select == "last"
        )

        if ddp.main:
            resume_state = {**opt.state_dict(), "early_stopping": early.as_dict()}
            if average is not None:
                resume_state.update(train_model=model.state_dict(), ema_updates=average.updates)
            save_epoch(
                run_dir,
                cfg,
                evaluated,
                history,
                improved=improved,
                threshold=early.threshold,
                versions=run_info["versions"],
                resume_state=resume_state,
                manifests=run_info["manifests"],
                domains=domains,
            )
            _report_epoch(row, cfg.optim.epochs, monitor, early, writer)
        last = epoch + 1 == cfg.optim.epochs
        if early.should_stop(cfg.optim.patience) and not last:
            status = "early_stopped"
            if ddp.main:
                log.info(
                    "early stop: %s has not improved for %d epochs", monitor, cfg.optim.patience
                )
            break
        if stop_after_epoch is not None and stop_after_epoch <= epoch + 1 and not last:
            status = "stopped"
            break

    # -- wrap up
    if writer is not None:
        writer.close()
    epochs_done = history[-1]["epoch"] if history else start_epoch
    if ddp.main:
        finish_run(
            run_dir,
            run_info,
            status=status,
            epochs_completed=epochs_done,
            best_epoch=early.best_epoch,
            best_metric=early.best,
        )
    if ddp.world > 1:
        torch.distributed.barrier()  # the run folder is complete before any rank returns
    return RunResult(
        run_dir=run_dir,
        status=status,
        epochs_completed=epochs_done,
        best_epoch=early.best_epoch,
        best_metric=early.best,
        monitor=monitor,
        history=history,
        threshold=early.threshold,
        model=model if average is None else average.module,
    )


def _report_epoch(
    row: dict[str, Any], epochs: int, monitor: str, early: EarlyStopping, writer: Any
) -> None:
    """Log one epoch's metrics (and add them to TensorBoard when it is on)."""
    if writer is not None:
        for key, val in row.items():
            writer.add_scalar(key, val, row["epoch"])
    log.info(
        "epoch %d/%d %s (best %s=%.4f @%d)",
        row["epoch"],
        epochs,
        " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "epoch"),
        monitor,
        early.best,
        early.best_epoch,
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)
