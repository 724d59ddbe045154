"""What trains and how fast: trainable parts per epoch, AdamW groups, the schedule.

* :func:`set_trainable`: which of the encoder, decoder and classifier head get gradients in
  an epoch (stage "seg" trains encoder + decoder; stage "cls" the head, the encoder after
  ``optim.freeze_encoder_epochs``, the decoder only without ``optim.freeze_decoder``).
* :func:`param_groups`: one AdamW group with and one without weight decay per part, the
  encoder's learning rate scaled by ``optim.encoder_lr_scale``.
* :func:`build_scheduler`: per-step linear warmup + cosine decay, or per-epoch
  reduce-on-plateau.
* :class:`Optimisation`: AdamW, that schedule and the mixed-precision gradient scaler, as one
  object with the optimisation step and the state ``last.pt`` keeps for resuming.
* :class:`WeightAverage`: the exponential moving average of the weights (``optim.ema_decay``),
  torch's :class:`~torch.optim.swa_utils.AveragedModel`, BatchNorm statistics included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar, cast

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lungcad.models.unet import LungCADNet
from lungcad.training.config import Config

__all__ = [
    "Optimisation",
    "ParamGroup",
    "Trainable",
    "WeightAverage",
    "build_scheduler",
    "param_groups",
    "set_trainable",
]


class Trainable(NamedTuple):
    """Which parts of the network train in an epoch."""

    encoder: bool
    decoder: bool  # the U-Net decoder and its segmentation head
    head: bool  # the cancer classifier


def set_trainable(model: LungCADNet, cfg: Config, epoch: int) -> Trainable:
    """Freeze and unfreeze the parts for this (0-based) epoch and set their train/eval mode.

    A frozen part keeps its BatchNorm statistics too (eval mode), so a frozen encoder or
    decoder is exactly the one the run started from.

    Returns:
        What trains now; when it differs from the previous epoch, DDP must be rebuilt (it
        only reduces the gradients of parameters that required them when it was wrapped).
    """
    opt = cfg.optim
    trainable = Trainable(
        encoder=not (opt.freeze_encoder_epochs == -1 or epoch < opt.freeze_encoder_epochs),
        decoder=cfg.train.stage == "seg" or not opt.freeze_decoder,
        head=cfg.train.stage == "cls",  # the seg loss never reaches the head
    )
    model.freeze_encoder(not trainable.encoder)
    for p in model.decoder_parameters():
        p.requires_grad_(trainable.decoder)
    for p in model.head_parameters():
        p.requires_grad_(trainable.head)
    if not model.classifier.mask_term:
        # The direct mask term is not part of this network's output: no gradient reaches it
        # (DDP refuses parameters that require one and get none).
        model.classifier.mask_evidence.requires_grad_(False)
    model.train()  # LungCADNet.train keeps a frozen encoder (and its BatchNorm) in eval mode
    if not trainable.decoder:
        model.decoder.eval()
        model.segmentation_head.eval()
    return trainable


class ParamGroup(NamedTuple):
    """One AdamW parameter group (torch takes it as a dict: :meth:`as_dict`)."""

    name: str  # "encoder", "decoder", "head", each also with "_no_decay"
    lr: float
    weight_decay: float
    params: list[nn.Parameter]

    def as_dict(self) -> dict[str, Any]:
        """The group as the dict ``torch.optim.AdamW`` expects (same keys, same order)."""
        return self._asdict()


def param_groups(model: LungCADNet, cfg: Config) -> list[ParamGroup]:
    """AdamW groups per part; weight decay only on weight matrices/kernels (not norms, biases).

    Every parameter is in a group, frozen ones too: unfreezing a part later needs no new
    optimiser (and resuming restores one whose groups never change).
    """
    groups = []
    parts = (
        ("encoder", model.encoder_parameters(), cfg.optim.encoder_lr_scale),
        ("decoder", model.decoder_parameters(), 1.0),
        ("head", model.head_parameters(), 1.0),
    )
    for name, part, scale in parts:
        params = list(part)
        lr = cfg.optim.lr * scale
        decayed = [p for p in params if p.ndim > 1]
        groups.append(ParamGroup(name, lr, cfg.optim.weight_decay, decayed))
        groups.append(ParamGroup(f"{name}_no_decay", lr, 0.0, [p for p in params if p.ndim <= 1]))
    return groups


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
) -> LambdaLR | ReduceLROnPlateau:
    """The learning-rate schedule of ``optim.schedule``.

    "cosine" is stepped after every optimisation step (linear warmup over
    ``optim.warmup_epochs``, then cosine decay to ``optim.min_lr`` at the last step);
    "plateau" once per epoch with the monitored metric (divide by 10 after
    ``patience // 2`` epochs without improvement).
    """
    opt = cfg.optim
    if opt.schedule == "plateau":
        return ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=0.1,
            patience=max(1, opt.patience // 2),
            min_lr=opt.min_lr,
        )
    total = max(1, opt.epochs * steps_per_epoch)
    warmup = min(total - 1, round(opt.warmup_epochs * steps_per_epoch))
    floor = min(1.0, opt.min_lr / opt.lr)

    def factor(step: int) -> float:  # a multiple of the peak rate at this step
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


@dataclass
class Optimisation:
    """AdamW, its learning-rate schedule and the gradient scaler of one run.

    Attributes:
        optimizer: AdamW over :func:`param_groups`.
        scheduler: :func:`build_scheduler`'s schedule.
        scaler: float16 gradient scaling (enabled with ``train.amp`` on CUDA only).
        grad_clip: ``optim.grad_clip`` (0: no clipping).
    """

    optimizer: torch.optim.AdamW
    scheduler: LambdaLR | ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    grad_clip: float

    @classmethod
    def build(
        cls, model: LungCADNet, cfg: Config, steps_per_epoch: int, device: torch.device
    ) -> Optimisation:
        """The optimiser, schedule and scaler for ``model`` (already on ``device``)."""
        cuda = device.type == "cuda"
        optimizer = torch.optim.AdamW(
            [g.as_dict() for g in param_groups(model, cfg)],
            lr=cfg.optim.lr,
            fused=True if cuda else None,
        )
        return cls(
            optimizer,
            build_scheduler(optimizer, cfg, steps_per_epoch),
            torch.amp.GradScaler(device.type, enabled=cfg.train.amp and cuda),
            cfg.optim.grad_clip,
        )

    def step(self, loss: torch.Tensor, params: list[nn.Parameter]) -> None:
        """Backpropagate ``loss`` and update ``params`` (the trainable ones), one step.

        Steps the "cosine" schedule too; the "plateau" one waits for :meth:`end_epoch`.
        """
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.scheduler, LambdaLR):
            self.scheduler.step()

    def end_epoch(self, monitored: float) -> None:
        """Step the "plateau" schedule with the epoch's monitored metric (NaN: no progress)."""
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(monitored if math.isfinite(monitored) else -math.inf)

    @property
    def lr(self) -> float:
        """The highest learning rate of the groups now (the metrics' ``lr`` column)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer", "scheduler", "scaler"}`` state dicts, as ``last.pt`` stores them."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a ``last.pt``'s keys)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


#: The averaged network's type (LungCADNet in training).
Net = TypeVar("Net", bound=nn.Module)


class WeightAverage(Generic[Net]):
    """Exponential moving average of a network's weights and buffers (``optim.ema_decay``).

    After every optimiser step ``avg = decay * avg + (1 - decay) * live`` for every parameter
    and buffer (BatchNorm running statistics too, so the averaged network needs no BatchNorm
    re-estimation; ``use_buffers=True``). The first update copies the live network.

    Attributes:
        module: the averaged network (same class and device as the live one): what a run
            with the average on validates and checkpoints.
    """

    def __init__(self, model: Net, decay: float) -> None:
        self._averaged = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )
        self._averaged.requires_grad_(False)

    @classmethod
    def build(cls, model: Net, cfg: Config) -> WeightAverage[Net] | None:
        """The average of ``model`` (already on its device), or None with ``ema_decay`` 0."""
        return cls(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

    @property
    def module(self) -> Net:
        return cast(Net, self._averaged.module)

    def update(self, model: Net) -> None:
        """Fold the live network's current weights into the average (after a step)."""
        self._averaged.update_parameters(model)

    @property
    def updates(self) -> int:
        """How many steps the average has taken in (``last.pt`` key ``ema_updates``)."""
        return int(self._averaged.n_averaged.item())

    def load(self, module_state: dict[str, Any], updates: int) -> None:
        """Restore the averaged weights and the update count (resuming a run)."""
        self._averaged.module.load_state_dict(module_state)
        self._averaged.n_averaged.fill_(updates)
