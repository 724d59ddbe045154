"""Training configuration: dataclass defaults, YAML overrides, ``--set key=value`` overrides.

The defaults live here, in the dataclasses; a YAML file holds only the keys it changes, and
``--set section.key=value`` changes one more (nanoGPT's ``configurator.py``, timm's
``train.py``). Unknown keys and values of the wrong type fail with an :class:`InputError` that
names the key and lists the valid ones, so a typo never silently trains the wrong model: the
fixed value sets are the Literal types of :mod:`lungcad.training.choices`, model names the
registry's, and the conversion rules live in :mod:`lungcad.training.overrides`.

Example::

    cfg = load_config("configs/seg_cpu_small.yaml", ["optim.lr=1e-3", "train.seed=7"])
    cfg.optim.lr        # 0.001
    config_hash(cfg)    # sha256 of the canonical JSON, recorded in run.json

The resolved configuration is written into the run folder (``config.yaml``) and into every
checkpoint, so a run can be reproduced or reloaded from its folder alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lungcad.data.augmentation import AugmentationConfig, build_augmentation
from lungcad.errors import InputError, MissingInputError
from lungcad.models.registry import check_model_name
from lungcad.training.choices import Device, Schedule, Stage, ThresholdMethod
from lungcad.training.overrides import apply_updates, merge_updates, parse_override
from lungcad.training.validate import MONITORABLE_METRICS

log = logging.getLogger(__name__)

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "config_to_yaml",
    "diff_configs",
    "load_config",
]


@dataclass
class ModelConfig:
    """The network (see ``lungcad.models.registry.create_model``).

    Attributes:
        name: a key of ``lungcad.models.registry.MODELS`` ("resnet18", "resnet34",
            "resnet50"); any other name fails when the config is loaded.
        dropout: dropout probability in the segmentation decoder's blocks (0 disables it).
        cls_dropout: dropout probability in the classification MLP.
        pretrained: local file with ImageNet encoder weights in torchvision's layout, loaded
            before training (ignored when ``train.init_from`` is set). None: random init.
        image_size: side of the square input in pixels, a multiple of 32 (the encoder
            downsamples 32x); slices are resized to (image_size, image_size). Inference reads
            it from the run's config, so it lives with the model rather than the data.
        cls_mask_prior: stage "cls": turn on the classifier's direct term on the mask summary
            (``lungcad.models.classifier``), started as this weight times the logit of the
            slice's largest tumour probability (0: silent at the start). Set it (e.g. 1) when
            ``train.init_from`` is a segmentation run that already finds the tumours in this
            data. None (default): no direct term, the MLP alone.
    """

    name: str = "resnet50"
    dropout: float = 0.1
    cls_dropout: float = 0.3
    pretrained: str | None = None
    image_size: int = 256
    cls_mask_prior: float | None = None


@dataclass
class DataConfig:
    """Which manifest rows to train on and how to batch them.

    Attributes:
        manifest: one or more manifests written by ``lungcad prepare`` (the manifest.csv or
            its folder). Several are concatenated, e.g. a masked set plus a labelled set.
        train_split: value of the manifest's ``split`` column used for training.
        val_split: value used for validation (model selection, early stopping, threshold).
        sources: keep only rows whose ``source`` is listed; empty keeps all.
        require_mask: keep only rows with a mask. None means "auto": True for stage "seg"
            (rows without a mask give no segmentation signal), False for stage "cls".
        batch_size: slices per optimisation step (per process under DDP).
        num_workers: DataLoader worker processes (0 loads in the main process).
        balanced_sampling: draw training slices with probability inversely proportional to
            their class frequency (stage "cls"); the classifier's pos_weight is then 1.
        patch_pixel_mm: stage "seg": train on ``model.image_size`` patches cut at this many mm
            per pixel (slices resampled by their spacing; :mod:`lungcad.data.patches`)
            instead of whole slices letterboxed into the input; prediction then segments at
            the same scale with sliding windows. None: whole slices.
        patch_tumour_prob: with ``patch_pixel_mm``: probability that a slice with tumour
            gives a patch centred on it (nnU-Net oversamples foreground likewise).
        patches_per_slice: with ``patch_pixel_mm``: patches each training slice gives per
            epoch (validation: one), for enough steps per epoch on small sets.
        slice_pixel_mm: whole slices (stage "cls", or "seg" without patches) are resampled
            to this many mm per pixel and centred in ``model.image_size`` (padded, or cropped
            where the field of view is wider than ``image_size * slice_pixel_mm``) instead of
            letterboxed, so every image shows the same mm per pixel; prediction, evaluation
            and calibration do the same. Set it to the segmentation run's pixel size so that
            the classifier's decoder (and its mask summary) works at the scale it learnt.
            None: letterbox (the scale then follows each image's field of view).
    """

    manifest: list[str] = field(default_factory=list)
    train_split: str = "train"
    val_split: str = "val"
    sources: list[str] = field(default_factory=list)
    require_mask: bool | None = None
    batch_size: int = 16
    num_workers: int = 2
    balanced_sampling: bool = False
    patch_pixel_mm: float | None = None
    patch_tumour_prob: float = 0.5
    patches_per_slice: int = 1
    slice_pixel_mm: float | None = None


@dataclass
class OptimConfig:
    """Optimiser, schedule and stopping.

    Attributes:
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay; never applied to norm weights and biases.
        encoder_lr_scale: the encoder's learning rate is ``lr * encoder_lr_scale`` (fine-tune a
            pretrained encoder more gently than the freshly initialised decoder/head).
        schedule: "cosine" (linear warmup then cosine decay to ``min_lr``, per step) or
            "plateau" (divide the rate by 10 when the monitored metric stalls ``patience // 2``
            epochs; no warmup).
        warmup_epochs: linear warmup length for "cosine" (may be fractional).
        min_lr: floor of the cosine schedule.
        grad_clip: clip the global gradient norm to this value (0 disables clipping).
        epochs: maximum number of epochs.
        patience: stop after this many epochs without improvement of ``monitor`` (0 never
            stops early).
        monitor: metric for model selection and early stopping (higher is better), one of
            ``lungcad.training.validate.MONITORABLE_METRICS`` for the run's stage. "auto"
            means "val_dice" for stage "seg" and "val_mcc" for stage "cls".
        select: which epoch ``best.pt`` holds: "best" (the best ``monitor`` on the validation
            split, with early stopping after ``patience``) or "last" (the final epoch of the
            schedule, as nnU-Net keeps its final checkpoint; never stops early). "last" is
            for validation splits too small to select on: with 2 validation patients the
            best epoch of a stage-1 fold ranged from 9 to 83 of 100 (docs/results.md). The
            monitor is still computed and reported each epoch.
        freeze_encoder_epochs: keep the encoder frozen (weights and BatchNorm statistics) for
            this many epochs, then fine-tune it. -1 keeps it frozen for the whole run.
        freeze_decoder: in stage "cls", keep the segmentation decoder frozen so stage 2 does
            not degrade the masks learnt in stage 1.
        ema_decay: exponential moving average of the weights and BatchNorm statistics, updated
            after every optimiser step with this decay (0: off). When on, validation, model
            selection and both checkpoints use the averaged network, and ``last.pt`` also
            keeps the live one for resuming. 0.99 averages over about the last 100 steps;
            meant for small validation splits, whose epoch-to-epoch jumps the average smooths.
    """

    lr: float = 3e-4
    weight_decay: float = 1e-4
    encoder_lr_scale: float = 1.0
    schedule: Schedule = "cosine"
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    epochs: int = 30
    patience: int = 10
    monitor: str = "auto"
    select: str = "best"
    freeze_encoder_epochs: int = 0
    freeze_decoder: bool = True
    ema_decay: float = 0.0


@dataclass
class TrainConfig:
    """What to train and how to run it.

    Attributes:
        stage: "seg" (U-Net, BCE + Dice on slices with masks) or "cls" (classifier MLP, BCE on
            labelled slices).
        seed: seeds Python, NumPy, torch, the data order and the augmentation.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        amp: mixed precision (float16 autocast + gradient scaling); used on CUDA only.
        channels_last: NHWC memory layout (faster convolutions on GPUs); CUDA only.
        deterministic: ask torch for deterministic kernels (slower on GPUs).
        out_dir: the run folder to create.
        init_from: stage "cls": a stage-"seg" run folder (or .pt file) whose weights start
            the model. None: start from ``model.pretrained`` or random weights.
        threshold_method: how the classifier's decision threshold is chosen on validation:
            "mcc" (maximise the Matthews correlation) or "youden" (maximise TPR - FPR).
        tensorboard: also write TensorBoard logs to ``out_dir/tensorboard`` when the
            ``tensorboard`` package is installed.
        max_steps_per_epoch: cap on optimisation steps per epoch (0: no cap); for smoke tests.
        progress: show a tqdm progress bar (only when stderr is a terminal, on rank 0).
    """

    stage: Stage = "seg"
    seed: int = 42
    device: Device = "auto"
    amp: bool = True
    channels_last: bool = True
    deterministic: bool = False
    out_dir: str = "runs/run"
    init_from: str | None = None
    threshold_method: ThresholdMethod = "mcc"
    tensorboard: bool = False
    max_steps_per_epoch: int = 0
    progress: bool = True


@dataclass
class Config:
    """The whole training configuration; each attribute is one YAML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check_values(cfg: Config) -> None:
    """Reject values that have the right type but cannot work (ranges, names, metrics)."""
    positive = {
        "model.image_size": cfg.model.image_size,
        "data.batch_size": cfg.data.batch_size,
        "optim.lr": cfg.optim.lr,
        "optim.epochs": cfg.optim.epochs,
    }
    for key, value in positive.items():
        if value <= 0:
            raise InputError(f"must be > 0, got {value}", path=key)
    non_negative = {
        "data.num_workers": cfg.data.num_workers,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.encoder_lr_scale": cfg.optim.encoder_lr_scale,
        "optim.warmup_epochs": cfg.optim.warmup_epochs,
        "optim.min_lr": cfg.optim.min_lr,
        "optim.grad_clip": cfg.optim.grad_clip,
        "optim.patience": cfg.optim.patience,
        "train.max_steps_per_epoch": cfg.train.max_steps_per_epoch,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise InputError(f"must be >= 0, got {value}", path=key)
    pixel_sizes: dict[str, float | None] = {
        "data.slice_pixel_mm": cfg.data.slice_pixel_mm,
        "data.patch_pixel_mm": cfg.data.patch_pixel_mm,
    }
    for key, pixel_mm in pixel_sizes.items():
        if pixel_mm is not None and not (math.isfinite(pixel_mm) and pixel_mm > 0):
            raise InputError(f"must be a positive number of mm, got {pixel_mm}", path=key)
    if cfg.model.cls_mask_prior is not None and not math.isfinite(cfg.model.cls_mask_prior):
        raise InputError(
            f"must be a finite number, got {cfg.model.cls_mask_prior}", path="model.cls_mask_prior"
        )
    if cfg.model.image_size % 32:
        raise InputError(
            f"must be a multiple of 32 (the encoder downsamples 32x), got {cfg.model.image_size}",
            path="model.image_size",
        )
    if cfg.optim.freeze_encoder_epochs < -1:
        raise InputError(
            f"must be -1 (always frozen), 0 (never) or a number of epochs, got "
            f"{cfg.optim.freeze_encoder_epochs}",
            path="optim.freeze_encoder_epochs",
        )
    build_augmentation(cfg.augmentation)  # validates the augmentation section's ranges
    check_model_name(cfg.model.name, path="model.name")
    # Stage-independent here (the stage may still change after this check, e.g. the CLI's
    # positional stage); the loop checks that the run's own stage computes the metric.
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise InputError(
            f"must be in [0, 1) (0: no weight average), got {cfg.optim.ema_decay}",
            path="optim.ema_decay",
        )
    if cfg.optim.select not in ("best", "last"):
        raise InputError(f"must be 'best' or 'last', got {cfg.optim.select!r}", path="optim.select")
    valid_monitors = ("auto", *(m for names in MONITORABLE_METRICS.values() for m in names))
    if cfg.optim.monitor not in valid_monitors:
        raise InputError(
            f"unknown metric {cfg.optim.monitor!r}; valid: {', '.join(valid_monitors)}",
            path="optim.monitor",
        )


def load_config(
    yaml_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Build a :class:`Config` from the defaults, a YAML file and ``key=value`` overrides.

    Args:
        yaml_path: YAML file holding the keys to change, nested by section (``optim: {lr:
            0.001}``). None: defaults only. A run folder's resolved ``config.yaml`` works too.
        overrides: "section.key=value" strings applied after the file, in order; values are
            parsed as YAML ("1e-3", "true", "[a.csv, b.csv]", "null").

    Returns:
        The resolved configuration.

    Raises:
        MissingInputError: the YAML file does not exist.
        InputError: unreadable YAML, an unknown key (the message lists the valid keys at that
            level), a value of the wrong type or out of range.
    """
    updates: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise MissingInputError(
                "config file not found; pass an existing YAML file (see configs/)", path=path
            )
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise InputError(f"not valid YAML ({exc}); fix the syntax", path=path) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(
                f"expected a mapping of sections (model, data, ...), got {type(loaded).__name__}",
                path=path,
            )
        updates = loaded
    for item in overrides:
        updates = merge_updates(updates, parse_override(item))
    return config_from_dict(updates)


def config_from_dict(values: dict[str, Any], strict: bool = True) -> Config:
    """Apply a nested dict (complete or partial) to the defaults, with the same checks as
    :func:`load_config`.

    Args:
        values: nested sections, e.g. the ``"config"`` stored in a checkpoint.
        strict: unknown keys fail (True) or are skipped with a warning (False: for configs
            written by another lungcad version, where a key may have been added or removed).
    """
    cfg = apply_updates(Config(), values, strict=strict)
    _check_values(cfg)
    return cfg


def apply_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with a nested dict of values applied (same checks as
    :func:`load_config`); values are used as given, not parsed as YAML (e.g. file paths)."""
    cfg = apply_updates(cfg, values)
    _check_values(cfg)
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The configuration as nested plain dicts/lists (tuples become lists), JSON/YAML-safe."""
    return _plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The configuration as YAML text (the run folder's ``config.yaml``)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def config_hash(cfg: Config | dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the configuration (sorted keys, no spaces)."""
    values = config_to_dict(cfg) if isinstance(cfg, Config) else _plain(cfg)
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def diff_configs(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    """Keys ("section.key") whose values differ between two configurations, with both values."""
    da, db = config_to_dict(a), config_to_dict(b)
    out: dict[str, tuple[Any, Any]] = {}
    for section in da:
        for key in da[section]:
            if da[section][key] != db[section][key]:
                out[f"{section}.{key}"] = (da[section][key], db[section][key])
    return out
