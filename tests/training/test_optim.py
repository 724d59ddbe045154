"""Trainable parts, AdamW groups, schedules and the optimisation step (lungcad.training.optim)."""

from __future__ import annotations

import math

import pytest
import torch

from lungcad.errors import InputError
from lungcad.models.unet import LungCADNet
from lungcad.training.checkpoint import model_from_config
from lungcad.training.config import Config, load_config
from lungcad.training.optim import (
    Optimisation,
    ParamGroup,
    Trainable,
    WeightAverage,
    build_scheduler,
    param_groups,
    set_trainable,
)

torch.set_num_threads(1)


def _config(*overrides: str) -> Config:
    return load_config(None, ["model.name=resnet18", "model.image_size=64", *overrides])


@pytest.fixture(scope="module")
def net() -> LungCADNet:
    torch.manual_seed(0)
    return model_from_config(_config())


def test_seg_trains_encoder_and_decoder_never_the_head(net: LungCADNet) -> None:
    trainable = set_trainable(net, _config("train.stage=seg"), epoch=0)
    assert trainable == Trainable(encoder=True, decoder=True, head=False)
    assert not any(p.requires_grad for p in net.head_parameters())
    assert net.training and net.encoder.training and net.decoder.training


def test_cls_unfreezes_the_encoder_after_its_epochs(net: LungCADNet) -> None:
    cfg = _config("train.stage=cls", "optim.freeze_encoder_epochs=2")
    assert set_trainable(net, cfg, epoch=1) == Trainable(encoder=False, decoder=False, head=True)
    assert not net.encoder.training and not net.decoder.training  # frozen BatchNorm statistics
    assert not net.segmentation_head.training and net.classifier.training
    assert not any(p.requires_grad for p in net.decoder_parameters())
    assert set_trainable(net, cfg, epoch=2).encoder and net.encoder.training
    always = _config("train.stage=cls", "optim.freeze_encoder_epochs=-1")
    assert not set_trainable(net, always, epoch=99).encoder
    open_decoder = _config("train.stage=cls", "optim.freeze_decoder=false")
    assert set_trainable(net, open_decoder, epoch=0).decoder and net.decoder.training


def test_param_groups_cover_every_parameter_once(net: LungCADNet) -> None:
    cfg = _config("optim.lr=0.01", "optim.encoder_lr_scale=0.1", "optim.weight_decay=0.5")
    groups = param_groups(net, cfg)
    assert [g.name for g in groups] == [
        "encoder",
        "encoder_no_decay",
        "decoder",
        "decoder_no_decay",
        "head",
        "head_no_decay",
    ]
    ids = [id(p) for g in groups for p in g.params]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    by_name = {g.name: g for g in groups}
    assert by_name["encoder"].lr == pytest.approx(0.001) and by_name["head"].lr == 0.01
    assert by_name["decoder"].weight_decay == 0.5 and by_name["decoder_no_decay"].weight_decay == 0
    assert all(p.ndim <= 1 for g in groups if g.name.endswith("_no_decay") for p in g.params)
    group = ParamGroup("x", 0.1, 0.0, [])
    assert list(group.as_dict()) == ["name", "lr", "weight_decay", "params"]  # torch's dict


def _rates(cfg: Config, steps_per_epoch: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.optim.lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    rates = []
    for _ in range(cfg.optim.epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_schedule_warms_up_then_decays_to_min_lr() -> None:
    cfg = _config("optim.lr=1.0", "optim.min_lr=0.1", "optim.epochs=3", "optim.warmup_epochs=1")
    rates = _rates(cfg, steps_per_epoch=4)
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup, per step
    assert all(a >= b for a, b in zip(rates[3:], rates[4:], strict=False))  # then decreasing
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8))
    assert rates[8] == pytest.approx(mid) and rates[-1] > 0.1


def test_plateau_schedule_divides_by_ten_when_the_metric_stalls(net: LungCADNet) -> None:
    cfg = _config("optim.schedule=plateau", "optim.patience=2", "optim.lr=1.0", "optim.min_lr=0")
    opt = Optimisation.build(net, cfg, steps_per_epoch=3, device=torch.device("cpu"))
    for value in (0.5, 0.4, float("nan")):  # patience // 2 = 1 epoch of tolerance
        opt.end_epoch(value)
    assert opt.lr == pytest.approx(0.1)


def test_optimisation_step_and_state_round_trip(net: LungCADNet) -> None:
    cfg = _config("train.stage=cls", "optim.grad_clip=0.5", "optim.epochs=2")
    set_trainable(net, cfg, epoch=0)
    opt = Optimisation.build(net, cfg, steps_per_epoch=2, device=torch.device("cpu"))
    assert not opt.scaler.is_enabled()  # gradient scaling is for CUDA only
    params = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss = net(torch.rand(2, 1, 64, 64))["cls_logits"].sum()
    opt.step(loss, params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert all(p.grad is None for p in params)  # zeroed (set to None) after the step
    assert opt.scheduler.last_epoch == 1  # the cosine schedule steps with the optimiser
    state = opt.state_dict()
    assert set(state) == {"optimizer", "scheduler", "scaler"}  # last.pt's keys
    again = Optimisation.build(net, cfg, steps_per_epoch=2, device=torch.device("cpu"))
    again.load_state_dict(state)
    assert again.scheduler.last_epoch == 1 and again.lr == opt.lr
    assert again.optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()


def test_weight_average_is_an_exponential_moving_average_of_weights_and_buffers() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    average = WeightAverage(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    average.update(net)  # the first update copies the live network
    assert torch.equal(average.module[0].weight, w0) and average.updates == 1
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(2.0)
    average.update(net)
    assert torch.allclose(average.module[0].weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert torch.allclose(average.module[1].running_mean, torch.tensor([0.1 * 2.0]))
    assert not any(p.requires_grad for p in average.module.parameters())
    restored = WeightAverage(net, decay=0.9)
    restored.load(average.module.state_dict(), average.updates)
    assert restored.updates == 2
    assert torch.equal(restored.module[0].weight, average.module[0].weight)


def test_weight_average_only_when_asked_for(net: LungCADNet) -> None:
    assert WeightAverage.build(net, load_config(None)) is None
    assert WeightAverage.build(net, load_config(None, ["optim.ema_decay=0.99"])) is not None
    for bad in ("1.0", "-0.1"):
        with pytest.raises(InputError, match="optim.ema_decay"):
            load_config(None, [f"optim.ema_decay={bad}"])
