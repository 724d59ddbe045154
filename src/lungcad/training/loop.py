"""Training: one loop for both stages, configured (never subclassed), resumable, DDP-ready.

``train(config)`` reads top to bottom like nanoGPT's ``train.py``: resolve the device and
processes, build data, model, optimiser and schedule, optionally restore ``last.pt``, then run
epochs of (train, validate, log, checkpoint, early-stop). Behaviour changes only through
:class:`lungcad.training.config.Config`:

* stage "seg": BCE + Dice on slices with a tumour mask (slices without one add nothing);
  validation Dice per epoch: ``val_dice`` is the mean over validation slices that show tumour,
  ``val_dice_global`` the Dice of the pooled pixel counts of all validation slices.
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

Reproducibility: every epoch reseeds Python, NumPy and torch from ``(seed, epoch, rank)`` and
the data order from ``(seed, epoch)``, so epoch ``e`` depends only on the weights, optimiser
state and ``e``. With ``last.pt`` (model, optimiser, scheduler, gradient scaler, RNG and
early-stopping state) a resumed run reproduces the uninterrupted one exactly on the same
hardware and thread count.

Scale-out: under ``torchrun`` each process trains on its shard (see
:mod:`lungcad.training.distributed`); BatchNorm statistics are averaged before validation,
validation
predictions are gathered so every rank computes the same metrics and takes the same
early-stopping decision, and only rank 0 logs, shows progress and writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from lungcad.data.augmentation import build_augmentation
from lungcad.data.dataset import SliceDataset, class_balanced_sampler
from lungcad.data.manifest import SliceRecord, filter_records, manifest_csv, read_manifest
from lungcad.errors import InputError, MissingInputError
from lungcad.io.atomic import write_json_atomic, write_text_atomic
from lungcad.metrics.classification import choose_threshold, classification_metrics
from lungcad.metrics.segmentation import dice_from_counts
from lungcad.models.pretrained import load_pretrained_encoder
from lungcad.models.unet import LungCADNet
from lungcad.provenance import utc_timestamp
from lungcad.training.checkpoint import (
    BEST,
    CONFIG_FILE,
    LAST,
    RUN_FILE,
    THRESHOLD_FILE,
    file_sha256,
    get_rng_state,
    model_from_config,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
    software_versions,
    write_metrics,
)
from lungcad.training.config import (
    Config,
    config_hash,
    config_to_dict,
    config_to_yaml,
    diff_configs,
)
from lungcad.training.distributed import (
    DistInfo,
    ShardedWeightedSampler,
    all_gather_list,
    all_reduce_sum,
    average_batchnorm,
    epoch_seed,
    init_distributed,
)
from lungcad.training.losses import BCEDiceLoss, classification_loss

log = logging.getLogger(__name__)

__all__ = ["RESUMABLE_KEYS", "RunResult", "train"]

#: Config keys that may differ between a run and its resumption (they do not change results).
RESUMABLE_KEYS = frozenset(
    {"data.num_workers", "train.device", "train.tensorboard", "train.progress", "train.out_dir"}
)


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
            :func:`lungcad.training.checkpoint.load_checkpoint` for that), unwrapped from DDP.
    """

    run_dir: Path
    status: str
    epochs_completed: int
    best_epoch: int
    best_metric: float
    monitor: str
    history: list[dict[str, float]] = field(default_factory=list)
    threshold: float | None = None
    model: LungCADNet | None = None


# --------------------------------------------------------------------------- seeds


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive NumPy/Python from it so
    # augmentations differ between workers and repeat between identical runs.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------- data


@dataclass
class _Data:
    train_records: list[SliceRecord]
    val_records: list[SliceRecord]
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: Any  # DistributedSampler or ShardedWeightedSampler (both have set_epoch)
    generator: torch.Generator  # the train loader's, reseeded every epoch
    manifests: list[str]
    pos_weight: float | None  # classifier BCE positive-class weight (None: 1)


def _load_split(cfg: Config, split: str) -> tuple[list[SliceRecord], Dataset, list[str]]:
    """Filtered records of one split from all manifests, their Dataset, and manifest paths."""
    if not cfg.data.manifest:
        raise InputError(
            "no manifest given; pass --manifest DIR (a folder written by `lungcad prepare`) "
            "or set data.manifest in the config",
            path="data.manifest",
        )
    stage = cfg.train.stage
    require_mask = cfg.data.require_mask if cfg.data.require_mask is not None else stage == "seg"
    labels = (0, 1) if stage == "cls" else None
    size = (cfg.model.image_size, cfg.model.image_size)
    augment = build_augmentation(cfg.augmentation) if split == cfg.data.train_split else None
    records: list[SliceRecord] = []
    parts: list[Dataset] = []
    paths: list[str] = []
    for entry in cfg.data.manifest:
        path = Path(entry)
        csv_path = manifest_csv(path)
        kept = filter_records(
            read_manifest(csv_path),
            split,
            require_mask=require_mask,
            labels=labels,
            sources=cfg.data.sources or None,
        )
        paths.append(str(csv_path))
        if kept:
            records += kept
            parts.append(SliceDataset(kept, csv_path.parent, image_size=size, augment=augment))
    if not records:
        what = "with a tumour mask " if require_mask else "with a label 0/1 " if labels else ""
        raise InputError(
            f"no '{split}' slices {what}in {', '.join(paths)}; stage {stage!r} needs them. "
            "Check the manifest's split/mask_path/label columns, data.sources and the stage.",
            path="data.manifest",
        )
    return records, ConcatDataset(parts), paths


def _build_data(cfg: Config, ddp: DistInfo) -> _Data:
    train_records, train_set, manifests = _load_split(cfg, cfg.data.train_split)
    val_records, val_set, _ = _load_split(cfg, cfg.data.val_split)
    pos_weight = None
    if cfg.train.stage == "cls":
        for name, recs in (("train", train_records), ("val", val_records)):
            if len({r.label for r in recs}) < 2:
                raise InputError(
                    f"the {name} split has only label {recs[0].label}; stage 'cls' needs "
                    "cancerous (1) and non-cancerous (0) slices in both train and val",
                    path="data.manifest",
                )
        if not cfg.data.balanced_sampling:
            n_pos = sum(r.label == 1 for r in train_records)
            pos_weight = (len(train_records) - n_pos) / n_pos
    if cfg.data.balanced_sampling:
        weights = class_balanced_sampler(train_records).weights
        sampler: Any = ShardedWeightedSampler(weights, ddp.world, ddp.rank, cfg.train.seed)
    else:
        sampler = DistributedSampler(
            train_set, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=cfg.train.seed
        )
    generator = torch.Generator()
    val_indices = list(range(ddp.rank, len(val_set), ddp.world))  # a shard each, no padding
    return _Data(
        train_records,
        val_records,
        _loader(train_set, sampler, cfg, generator, train=True),
        _loader(val_set, val_indices, cfg, torch.Generator(), train=False),
        sampler,
        generator,
        manifests,
        pos_weight,
    )


def _loader(
    dataset: Dataset,
    sampler: Sampler | list[int],
    cfg: Config,
    generator: torch.Generator,
    train: bool,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu",
        drop_last=train and len(sampler) > cfg.data.batch_size,  # no 1-slice BatchNorm batches
        worker_init_fn=_worker_init,
        generator=generator,
        persistent_workers=False,  # fresh workers each epoch keep epochs independent (resume)
    )


# --------------------------------------------------------------------------- model, optimiser


def _set_trainable(model: LungCADNet, cfg: Config, epoch: int) -> tuple[bool, bool, bool]:
    """Freeze/unfreeze parts for this (0-based) epoch; returns (encoder, decoder, head) flags."""
    opt = cfg.optim
    encoder_on = not (opt.freeze_encoder_epochs == -1 or epoch < opt.freeze_encoder_epochs)
    decoder_on = cfg.train.stage == "seg" or not opt.freeze_decoder
    head_on = cfg.train.stage == "cls"  # the seg loss never reaches the head
    model.freeze_encoder(not encoder_on)
    for p in model.decoder_parameters():
        p.requires_grad_(decoder_on)
    for p in model.head_parameters():
        p.requires_grad_(head_on)
    return encoder_on, decoder_on, head_on


def _train_mode(model: LungCADNet, trainable: tuple[bool, bool, bool]) -> None:
    model.train()  # LungCADNet.train keeps a frozen encoder (and its BatchNorm) in eval mode
    if not trainable[1]:  # a frozen decoder keeps its BatchNorm statistics too
        model.decoder.eval()
        model.segmentation_head.eval()


def _param_groups(model: LungCADNet, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups per part; weight decay only on weight matrices/kernels (not norms, biases)."""
    groups = []
    parts = (
        ("encoder", model.encoder_parameters(), cfg.optim.encoder_lr_scale),
        ("decoder", model.decoder_parameters(), 1.0),
        ("head", model.head_parameters(), 1.0),
    )
    for name, params, scale in parts:
        params = list(params)
        lr = cfg.optim.lr * scale
        groups.append(
            {
                "name": name,
                "lr": lr,
                "weight_decay": cfg.optim.weight_decay,
                "params": [p for p in params if p.ndim > 1],
            }
        )
        groups.append(
            {
                "name": f"{name}_no_decay",
                "lr": lr,
                "weight_decay": 0.0,
                "params": [p for p in params if p.ndim <= 1],
            }
        )
    return groups


def _scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int) -> Any:
    opt = cfg.optim
    if opt.schedule == "plateau":  # stepped once per epoch with the monitored metric
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=0.1,
            patience=max(1, opt.patience // 2),
            min_lr=opt.min_lr,
        )
    total = max(1, opt.epochs * steps_per_epoch)
    warmup = min(total - 1, round(opt.warmup_epochs * steps_per_epoch))
    floor = min(1.0, opt.min_lr / opt.lr)

    def factor(step: int) -> float:  # linear warmup, then cosine decay to min_lr; per step
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _init_weights(model: LungCADNet, cfg: Config) -> dict[str, Any]:
    """Load ``train.init_from`` (a seg run) or ``model.pretrained``; returns provenance."""
    if cfg.train.init_from:
        payload = read_checkpoint(cfg.train.init_from)
        source_model = payload["config"].get("model", {}).get("name")
        if source_model != cfg.model.name:
            raise InputError(
                f"the run was trained with model {source_model!r} but this config uses "
                f"{cfg.model.name!r}; set --set model.name={source_model}",
                path=cfg.train.init_from,
            )
        model.load_state_dict(payload["model"], strict=True)
        log.info("initialised from %s (epoch %s)", cfg.train.init_from, payload.get("epoch"))
        return {"init_from": cfg.train.init_from, "init_from_sha256": payload["sha256"]}
    if cfg.model.pretrained:
        load_pretrained_encoder(model, cfg.model.pretrained)
        return {
            "pretrained": cfg.model.pretrained,
            "pretrained_sha256": file_sha256(cfg.model.pretrained),
        }
    return {}


def _autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.train.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def _validate(
    model: LungCADNet,
    loader: DataLoader,
    cfg: Config,
    device: torch.device,
    ddp: DistInfo,
    pos_weight: float | None,
) -> dict[str, float]:
    """Metrics of the whole validation split (predictions gathered from all ranks)."""
    model.eval()
    seg_loss = BCEDiceLoss()
    rows: list[tuple[Any, ...]] = []  # one per slice
    losses: list[tuple[float, int]] = []  # (mean loss, slices it covers) per batch
    for batch in loader:
        with _autocast(cfg, device):
            out = model(batch["image"].to(device, non_blocking=True))
        if cfg.train.stage == "seg":
            masks, has = batch["mask"].to(device), batch["has_mask"].to(device)
            pred, ref = out["seg_logits"].float() > 0, masks > 0.5
            counts = [
                (a & b).sum((1, 2, 3)).tolist()
                for a, b in ((pred, ref), (pred, ~ref), (~pred, ref))
            ]  # tp, fp, fn per slice
            losses.append((float(seg_loss(out["seg_logits"], masks, has)), int(has.sum())))
            rows += list(zip(*counts, strict=True))
        else:
            labels = batch["label"].to(device)
            probs = torch.sigmoid(out["cls_logits"].float()).tolist()
            losses.append(
                (float(classification_loss(out["cls_logits"], labels, pos_weight)), len(probs))
            )
            rows += list(zip(probs, labels.long().tolist(), strict=True))
    rows, losses = all_gather_list(rows, ddp), all_gather_list(losses, ddp)
    n_loss = sum(n for _, n in losses)
    val_loss = sum(v * n for v, n in losses) / n_loss if n_loss else float("nan")
    if cfg.train.stage == "seg":
        tp, fp, fn = (np.array(column, dtype=np.float64) for column in zip(*rows, strict=True))
        # dice_from_counts is NaN for a slice without tumour: those are left out of the mean.
        per_slice = [dice_from_counts(*c) for c in zip(tp, fp, fn, strict=True)]
        with_tumour = [d for d in per_slice if not math.isnan(d)]
        return {
            "val_loss": val_loss,
            "val_dice": float(np.mean(with_tumour)) if with_tumour else float("nan"),
            "val_dice_global": dice_from_counts(tp.sum(), fp.sum(), fn.sum()),
            "val_slices_with_tumour": float(len(with_tumour)),
        }
    y_prob = np.clip(np.array([r[0] for r in rows], dtype=np.float64), 0.0, 1.0)
    y_true = np.array([r[1] for r in rows], dtype=np.int64)
    at_half = classification_metrics(y_true, y_prob, 0.5)
    threshold = choose_threshold(y_true, y_prob, cfg.train.threshold_method)
    tuned = classification_metrics(y_true, y_prob, threshold)
    return {
        "val_loss": val_loss,
        "val_acc": at_half["accuracy"],
        "val_f1": at_half["f1"],
        "val_mcc": at_half["mcc"],
        "val_auc": at_half["auc"],
        "val_sensitivity": at_half["sensitivity"],
        "val_specificity": at_half["specificity"],
        "val_threshold": threshold,
        "val_mcc_at_threshold": tuned["mcc"],
        "val_acc_at_threshold": tuned["accuracy"],
    }


# --------------------------------------------------------------------------- run folder


def _check_run_dir(cfg: Config, resume: str | Path | None) -> Path:
    """The run folder; when resuming, check that ``cfg`` matches the run's stored config."""
    if resume is None:
        run_dir = Path(cfg.train.out_dir)
        if (run_dir / LAST).exists() or (run_dir / BEST).exists():
            raise InputError(
                "already holds a training run; continue it with --resume, or choose another "
                "--out folder",
                path=run_dir,
            )
        return run_dir
    from lungcad.training.config import load_config  # only resuming reads a stored config

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


def _save_epoch(
    run_dir: Path,
    cfg: Config,
    row: dict[str, float],
    history: list[dict],
    early: dict[str, Any],
    improved: bool,
    model: nn.Module,
    versions: dict,
    resumable: dict[str, Any],
) -> None:
    """Write metrics, best.pt (+ threshold.json) when improved, and last.pt (rank 0)."""
    write_metrics(run_dir, history)
    common = {
        "model": model.state_dict(),
        "epoch": row["epoch"],
        "config": config_to_dict(cfg),
        "metrics": row,
        "versions": versions,
        "threshold": early["threshold"],
        "stage": cfg.train.stage,
    }
    if improved:
        save_checkpoint(run_dir / BEST, common)
        if cfg.train.stage == "cls":
            write_json_atomic(
                run_dir / THRESHOLD_FILE,
                {
                    "threshold": early["threshold"],
                    "method": cfg.train.threshold_method,
                    "rule": "cancer if probability >= threshold",
                    "chosen_on": "validation split",
                    "epoch": row["epoch"],
                    "val_mcc_at_threshold": row["val_mcc_at_threshold"],
                    "val_mcc_at_0.5": row["val_mcc"],
                },
            )
    # last.pt is written last: a crash before it means the epoch is simply redone on resume.
    save_checkpoint(
        run_dir / LAST,
        {
            **common,
            **resumable,
            "rng": get_rng_state(),
            "early_stopping": dict(early),
            "history": history,
        },
    )


def _tensorboard(run_dir: Path, cfg: Config, ddp: DistInfo) -> Any:
    """A TensorBoard SummaryWriter when asked for and installed (rank 0 only), else None."""
    if not (cfg.train.tensorboard and ddp.main):
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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


# --------------------------------------------------------------------------- the loop


def train(
    config: Config, *, resume: str | Path | None = None, stop_after_epoch: int | None = None
) -> RunResult:
    """Train one stage as ``config`` says and write the run folder.

    Args:
        config: resolved configuration (:func:`lungcad.training.config.load_config`).
        resume: a run folder to continue from its ``last.pt`` (model, optimiser, scheduler,
            scaler, epoch, RNG and early-stopping state). ``config`` must equal the run's
            own, except for :data:`RESUMABLE_KEYS`; the run folder is the resumed one.
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


def _train(
    cfg: Config, resume: str | Path | None, stop_after_epoch: int | None, ddp: DistInfo
) -> RunResult:
    # -- setup: run folder, device, determinism
    run_dir = _check_run_dir(cfg, resume)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(run_dir)))
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
    stage = cfg.train.stage
    monitor = (
        cfg.optim.monitor
        if cfg.optim.monitor != "auto"
        else ("val_dice" if stage == "seg" else "val_mcc")
    )
    _seed_all(cfg.train.seed)

    # -- data, model, optimiser, schedule, gradient scaler
    data = _build_data(cfg, ddp)
    steps_per_epoch = len(data.train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    model = model_from_config(cfg)
    provenance = _init_weights(model, cfg) if resume is None else {}
    model.to(device=device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg), lr=cfg.optim.lr, fused=True if cuda else None
    )
    scheduler = _scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp and cuda)
    seg_loss = BCEDiceLoss()

    # -- what --resume restores
    start_epoch, history = 0, []
    early: dict[str, Any] = {"best": -math.inf, "best_epoch": 0, "bad_epochs": 0, "threshold": None}
    run_info: dict[str, Any] = {"started_at": utc_timestamp(), **provenance}
    if resume is not None:
        state = read_checkpoint(run_dir / LAST, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, history, early = state["epoch"], state["history"], state["early_stopping"]
        if (run_dir / RUN_FILE).is_file():
            run_info = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        run_info.setdefault("resumed_at", []).append(utc_timestamp())
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
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
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / CONFIG_FILE, config_to_yaml(cfg))
        write_json_atomic(run_dir / RUN_FILE, run_info)
    writer = _tensorboard(run_dir, cfg, ddp)
    if ddp.main:
        log.info(
            "stage %s: %d train / %d val slices, %d steps per epoch, %s, %d process(es)",
            stage,
            len(data.train_records),
            len(data.val_records),
            steps_per_epoch,
            device,
            ddp.world,
        )

    # -- epochs
    status, wrapped, trainable_before = "finished", model, None
    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.perf_counter()
        _seed_all(epoch_seed(cfg.train.seed, epoch, ddp.rank))
        data.sampler.set_epoch(epoch)
        data.generator.manual_seed(epoch_seed(cfg.train.seed, epoch, ddp.rank))
        trainable = _set_trainable(model, cfg, epoch)
        if trainable != trainable_before:  # DDP must know which parameters get gradients
            wrapped = (
                model
                if ddp.world == 1
                else DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
            )
            trainable_before = trainable
        params = [p for p in model.parameters() if p.requires_grad]
        _train_mode(model, trainable)
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
            with _autocast(cfg, device):
                out = wrapped(images)
            if stage == "seg":
                loss = seg_loss(
                    out["seg_logits"], batch["mask"].to(device), batch["has_mask"].to(device)
                )
            else:
                loss = classification_loss(
                    out["cls_logits"], batch["label"].to(device), data.pos_weight
                )
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if cfg.optim.schedule == "cosine":
                scheduler.step()
            totals[0] += loss.detach() * len(images)
            totals[1] += len(images)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        all_reduce_sum(totals, ddp)
        average_batchnorm(model, ddp)

        metrics = _validate(model, data.val_loader, cfg, device, ddp, data.pos_weight)
        value = metrics.get(monitor, float("nan"))
        if cfg.optim.schedule == "plateau":
            scheduler.step(value if math.isfinite(value) else -math.inf)
        row = {
            "epoch": epoch + 1,
            "lr": max(g["lr"] for g in optimizer.param_groups),
            "train_loss": float(totals[0] / totals[1].clamp(min=1)),
            **metrics,
            "time_s": round(time.perf_counter() - t0, 3),
        }
        history.append(row)
        improved = early["best_epoch"] == 0 or (math.isfinite(value) and value > early["best"])
        if improved:
            early.update(
                best=value if math.isfinite(value) else -math.inf,
                bad_epochs=0,
                best_epoch=epoch + 1,
                threshold=metrics.get("val_threshold"),
            )
        else:
            early["bad_epochs"] += 1

        if ddp.main:
            _save_epoch(
                run_dir,
                cfg,
                row,
                history,
                early,
                improved,
                model,
                run_info["versions"],
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                },
            )
            if writer is not None:
                for key, val in row.items():
                    writer.add_scalar(key, val, epoch + 1)
            log.info(
                "epoch %d/%d %s (best %s=%.4f @%d)",
                epoch + 1,
                cfg.optim.epochs,
                " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "epoch"),
                monitor,
                early["best"],
                early["best_epoch"],
            )
        last = epoch + 1 == cfg.optim.epochs
        if cfg.optim.patience and early["bad_epochs"] >= cfg.optim.patience and not last:
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
        run_info.update(
            {
                "status": status,
                "finished_at": utc_timestamp(),
                "epochs_completed": epochs_done,
                "best_epoch": early["best_epoch"],
                "best_metric": early["best"],
            }
        )
        write_json_atomic(run_dir / RUN_FILE, run_info)
    if ddp.world > 1:
        torch.distributed.barrier()  # the run folder is complete before any rank returns
    return RunResult(
        run_dir=run_dir,
        status=status,
        epochs_completed=epochs_done,
        best_epoch=early["best_epoch"],
        best_metric=early["best"],
        monitor=monitor,
        history=history,
        threshold=early["threshold"],
        model=model,
    )
