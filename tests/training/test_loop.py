"""Training loop: tiny seg/cls runs, the run folder, exact resume (seg; cls after SIGKILL),
DDP on CPU (gloo)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lungcad.cli import main as cli_main
from lungcad.errors import InputError
from lungcad.training.checkpoint import load_checkpoint, read_checkpoint
from lungcad.training.config import Config, config_to_yaml
from lungcad.training.loop import EarlyStopping, train
from tests.inference_helpers import SIZE, make_manifest, tiny_set_options

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 16 slices, odd ones with a disc: patients 0-4 (slices 0-9) train, 5-7 (10-15) val.
    return make_manifest(tmp_path_factory.mktemp("data"), {"train": 5, "val": 3})


@pytest.fixture(scope="module")
def seg_run(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch seg run made through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "seg"
    argv = ["train", "seg", "--manifest", str(manifest), "--out", str(out)]
    argv += tiny_set_options("optim.epochs=2")
    assert cli_main(argv) == 0
    return out


def test_seg_run_writes_run_folder(seg_run: Path, capsys: pytest.CaptureFixture) -> None:
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.json",
        "best.pt",
        "best.pt.sha256",
        "last.pt",
        "last.pt.sha256",
        "run.json",
    ):
        assert (seg_run / name).is_file(), name
    rows = list(csv.DictReader((seg_run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= float(row["val_dice_global"]) <= 1.0
        assert float(row["val_slices_with_tumour"]) == 3  # val slices 11, 13, 15
        assert np.isfinite(float(row["train_loss"]))
    run = json.loads((seg_run / "run.json").read_text())
    assert run["status"] == "finished" and run["epochs_completed"] == 2
    assert run["config_hash"] and run["versions"]["torch"] == torch.__version__
    assert len(run["manifests"][0]["sha256"]) == 64
    model, config, info = load_checkpoint(seg_run)
    assert config.train.stage == "seg" and config.model.name == "resnet18"
    assert info["epoch"] == run["best_epoch"]
    out = model.predict(torch.rand(1, 1, SIZE, SIZE))
    assert out["seg_probs"].shape == (1, 1, SIZE, SIZE)


def test_cls_run_from_seg_run_with_frozen_encoder(
    seg_run: Path, manifest: Path, tmp_path: Path, tiny_config: Callable[..., Config]
) -> None:
    cfg = tiny_config(
        manifest,
        tmp_path / "cls",
        "train.stage=cls",
        f"train.init_from={seg_run}",
        "optim.freeze_encoder_epochs=-1",
        "data.balanced_sampling=true",
        "optim.epochs=2",
    )
    result = train(cfg)
    assert result.status == "finished" and result.monitor == "val_mcc"
    threshold = json.loads((tmp_path / "cls" / "threshold.json").read_text())
    assert 0.0 <= threshold["threshold"] <= 1.0 and threshold["method"] == "mcc"
    # Where it was chosen, for evaluation's provenance: the val split of the run's manifests.
    run_manifests = json.loads((tmp_path / "cls" / "run.json").read_text())["manifests"]
    assert threshold["split"] == "val" and threshold["manifests"] == run_manifests
    assert threshold["threshold"] == pytest.approx(result.threshold)
    for key in ("val_acc", "val_f1", "val_mcc", "val_auc", "val_threshold"):
        assert key in result.history[-1]
    seg = read_checkpoint(seg_run)["model"]
    cls = result.model.state_dict()
    # Frozen encoder (weights and BatchNorm statistics) and decoder: exactly stage 1's.
    for key, value in seg.items():
        if key.startswith(("encoder.", "decoder.", "segmentation_head.")):
            assert torch.equal(cls[key], value), key
    changed = [k for k in seg if k.startswith("classifier.") and not torch.equal(cls[k], seg[k])]
    assert changed, "the classifier head did not train"
    loaded = load_checkpoint(tmp_path / "cls")
    assert loaded.info["threshold"] == pytest.approx(result.threshold)


def _strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


def test_resume_equals_uninterrupted(
    manifest: Path, tmp_path: Path, tiny_config: Callable[..., Config]
) -> None:
    """3 epochs straight == 1 epoch, interrupted, then resumed through the CLI for 2 more."""
    cfg = tiny_config(
        manifest,
        tmp_path / "full",
        "optim.epochs=3",
        "optim.warmup_epochs=0.5",
        "model.dropout=0.2",
    )
    full = train(cfg)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(config_to_yaml(cfg))
    part = tmp_path / "part"
    assert (
        cli_main(
            [
                "train",
                "seg",
                "--config",
                str(config_file),
                "--out",
                str(part),
                "--stop-after-epoch",
                "1",
            ]
        )
        == 0
    )
    assert json.loads((part / "run.json").read_text())["status"] == "stopped"
    assert len(json.loads((part / "metrics.json").read_text())) == 1
    assert cli_main(["train", "seg", "--resume", str(part)]) == 0

    a, b = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(part / "last.pt")
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, b["model"][key]), key
    assert _strip_time(b["history"]) == _strip_time(full.history) == _strip_time(a["history"])
    assert a["early_stopping"] == b["early_stopping"]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    run = json.loads((part / "run.json").read_text())
    assert run["status"] == "finished" and len(run["resumed_at"]) == 1


def test_resume_cli_refuses_a_new_config_or_other_stage(seg_run: Path) -> None:
    assert cli_main(["train", "seg", "--resume", str(seg_run), "--config", "x.yaml"]) == 2
    assert cli_main(["train", "cls", "--resume", str(seg_run)]) == 2


def test_early_stopping_and_plateau_schedule(
    manifest: Path, tmp_path: Path, tiny_config: Callable[..., Config]
) -> None:
    # Frozen encoder and decoder and a learning rate too small to move the head: the
    # validation MCC cannot improve, so patience 1 stops the run after its second epoch.
    cfg = tiny_config(
        manifest,
        tmp_path / "r",
        "train.stage=cls",
        "optim.epochs=5",
        "optim.patience=1",
        "optim.lr=1e-12",
        "optim.min_lr=0",
        "optim.schedule=plateau",
        "optim.freeze_encoder_epochs=-1",
        "train.deterministic=true",
    )
    result = train(cfg)
    assert not torch.are_deterministic_algorithms_enabled()  # global flag restored
    assert result.status == "early_stopped" and result.epochs_completed == 2
    assert result.best_epoch == 1
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["status"] == "early_stopped" and run["pos_weight"] == pytest.approx(1.0)


def test_resume_refuses_changed_config(
    seg_run: Path, manifest: Path, tiny_config: Callable[..., Config]
) -> None:
    cfg = tiny_config(manifest, seg_run, "optim.lr=0.5")
    with pytest.raises(InputError, match="optim.lr"):
        train(cfg, resume=seg_run)


def test_refuses_to_overwrite_a_run(
    seg_run: Path, manifest: Path, tiny_config: Callable[..., Config]
) -> None:
    with pytest.raises(InputError, match="--resume"):
        train(tiny_config(manifest, seg_run))


def test_cls_needs_both_classes(
    tmp_path: Path, manifest: Path, tiny_config: Callable[..., Config]
) -> None:
    cfg = tiny_config(manifest, tmp_path / "r", "train.stage=cls", "data.sources=[nowhere]")
    with pytest.raises(InputError, match="no 'train' slices"):
        train(cfg)


DDP_SCRIPT = textwrap.dedent("""
    import faulthandler, os, sys, torch
    faulthandler.dump_traceback_later(180, exit=True)  # never hang the test run: stacks, exit
    torch.set_num_threads(1)
    from lungcad.training.loop import train
    from tests.inference_helpers import make_tiny_config
    out, manifest = sys.argv[1], sys.argv[2]
    # train() joins the torchrun group itself; the second run reuses the same group. Batches
    # of 2: each rank's shard of the 10 training slices has 5.
    common = ["data.batch_size=2", "optim.epochs=2"]
    seg = train(make_tiny_config(manifest, f"{out}/seg", *common))
    # Stage 2 unfreezes the encoder after epoch 1 (DDP is rebuilt) and samples class-balanced.
    cls = train(make_tiny_config(manifest, f"{out}/cls", *common, "train.stage=cls",
                                 f"train.init_from={out}/seg", "optim.freeze_encoder_epochs=1",
                                 "data.balanced_sampling=true"))
    rank = os.environ["RANK"]
    torch.save(seg.model.state_dict(), f"{out}/seg_rank{rank}.pt")
    torch.save(cls.model.state_dict(), f"{out}/cls_rank{rank}.pt")
""")


def test_ddp_two_processes_on_cpu() -> None:
    # Its own temporary folder: pytest's basetemp may be rotated away by concurrent pytest runs
    # during this longer test.
    with tempfile.TemporaryDirectory(prefix="lungcad-ddp-") as tmp:
        _run_ddp(Path(tmp))


def _run_ddp(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "data", {"train": 5, "val": 3})
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    # The script imports the tests' tiny-config builder: put the repository on its path.
    root = str(Path(__file__).resolve().parents[2])
    python_path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path),
            str(manifest),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun's agent stops its workers (they run in their own sessions)
        _, stderr = proc.communicate(timeout=60)
        pytest.fail(f"torchrun timed out; stderr:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    for stage in ("seg", "cls"):
        run = tmp_path / stage
        assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
        info = json.loads((run / "run.json").read_text())
        assert info["world_size"] == 2 and info["status"] == "finished"
        assert not list(run.glob("*.tmp*"))
        sd0 = torch.load(tmp_path / f"{stage}_rank0.pt", weights_only=True)
        sd1 = torch.load(tmp_path / f"{stage}_rank1.pt", weights_only=True)
        saved = read_checkpoint(run / "last.pt")["model"]
        for key in sd0:  # parameters and BatchNorm statistics agree on both ranks
            assert torch.equal(sd0[key], sd1[key]), key
            assert torch.equal(sd0[key], saved[key]), key
    assert (tmp_path / "cls" / "threshold.json").is_file()


def test_early_stopping_state() -> None:
    early = EarlyStopping()
    assert early.update(float("nan"), 1, None)  # the first epoch is always the best so far
    assert early.best == -math.inf and early.best_epoch == 1
    assert early.update(0.4, 2, 0.3) and (early.best, early.threshold) == (0.4, 0.3)
    assert not early.update(float("nan"), 3, 0.9)  # NaN never improves
    assert not early.update(0.4, 4, 0.9)  # ties do not either
    assert early.bad_epochs == 2 and early.threshold == 0.3 and early.best_epoch == 2
    assert early.should_stop(2) and not early.should_stop(3) and not early.should_stop(0)
    # last.pt keeps it as a plain dict with the keys earlier versions wrote.
    stored = early.as_dict()
    assert stored == {"best": 0.4, "best_epoch": 2, "bad_epochs": 2, "threshold": 0.3}
    assert EarlyStopping.from_dict(stored) == early
    # optim.select: last keeps the latest epoch whatever its value, and never stops early.
    latest = EarlyStopping()
    for epoch, value in enumerate((0.9, 0.1, float("nan"), 0.2), start=1):
        assert latest.update(value, epoch, None, latest=True)
    assert latest.best_epoch == 4 and latest.bad_epochs == 0 and not latest.should_stop(1)


# The interrupted run of test_cls_resume_after_sigkill_equals_uninterrupted: `lungcad train`
# in a child process whose optimiser step, at global step KILL_AT (mid-epoch), tells the parent
# and then waits to be killed with SIGKILL (no handler, no clean-up: as a crash or the OOM
# killer would end it).
KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from lungcad.cli import main
    from lungcad.training.optim import Optimisation

    config, out, marker, kill_at = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    step, steps = Optimisation.step, []

    def step_then_wait(self, loss, params):
        step(self, loss, params)
        steps.append(1)
        if len(steps) == kill_at:
            marker.write_text(str(len(steps)))
            time.sleep(600)

    Optimisation.step = step_then_wait
    sys.exit(main(["train", "cls", "--config", config, "--out", out]))
""")


def test_cls_resume_after_sigkill_equals_uninterrupted(
    seg_run: Path, manifest: Path, tmp_path: Path, tiny_config: Callable[..., Config]
) -> None:
    """Stage cls from a seg run, class-balanced sampling, encoder frozen for epoch 1 and
    fine-tuned after: killed with SIGKILL in the middle of epoch 2 (the first with the
    encoder unfrozen), then resumed, it ends equal to the run that was never interrupted
    (every weight and BatchNorm statistic, optimiser moments, metrics history, threshold)."""
    steps_per_epoch = 3
    cfg = tiny_config(
        manifest,
        tmp_path / "full",
        "train.stage=cls",
        f"train.init_from={seg_run}",
        "data.balanced_sampling=true",
        "data.batch_size=2",
        f"train.max_steps_per_epoch={steps_per_epoch}",
        "optim.freeze_encoder_epochs=1",
        "optim.epochs=3",
        "optim.warmup_epochs=0.5",
        "model.cls_dropout=0.3",
    )
    full = train(cfg)
    assert full.status == "finished"

    part, marker = tmp_path / "part", tmp_path / "killed_at"
    config_file = tmp_path / "cls.yaml"
    config_file.write_text(config_to_yaml(cfg))
    script = tmp_path / "kill_train.py"
    script.write_text(KILL_SCRIPT)
    kill_at = steps_per_epoch + 2  # epoch 2, step 2 of 3
    child = subprocess.Popen(
        [sys.executable, str(script), str(config_file), str(part), str(marker), str(kill_at)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the child never reached step {kill_at}: {child.poll()}"
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr[-2000:]
    # Killed mid-epoch: one finished epoch on disk, the run still marked as running.
    assert json.loads((part / "run.json").read_text())["status"] == "running"
    assert len(json.loads((part / "metrics.json").read_text())) == 1
    assert read_checkpoint(part / "last.pt")["epoch"] == 1

    assert cli_main(["train", "cls", "--resume", str(part)]) == 0

    a, b = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(part / "last.pt")
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, b["model"][key]), key
    best_a, best_b = (
        read_checkpoint(tmp_path / "full" / "best.pt"),
        read_checkpoint(part / "best.pt"),
    )
    for key, value in best_a["model"].items():
        assert torch.equal(value, best_b["model"][key]), key
    assert _strip_time(b["history"]) == _strip_time(full.history) == _strip_time(a["history"])
    assert len(b["history"]) == 3
    assert a["early_stopping"] == b["early_stopping"]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3 * steps_per_epoch
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(value[name], state_b[key][name]), (key, name)
    threshold = json.loads((part / "threshold.json").read_text())
    assert (
        threshold["threshold"]
        == json.loads((tmp_path / "full" / "threshold.json").read_text())["threshold"]
    )
    run = json.loads((part / "run.json").read_text())
    assert run["status"] == "finished" and len(run["resumed_at"]) == 1
    # The encoder did train after the unfreeze (else the test would not cross it).
    seg = read_checkpoint(seg_run)["model"]
    assert any(
        not torch.equal(value, seg[key])
        for key, value in b["model"].items()
        if key.startswith("encoder.")
    )


def test_weight_average_is_what_is_validated_checkpointed_and_resumed(
    manifest: Path, tmp_path: Path, tiny_config: Callable[..., Config]
) -> None:
    """optim.ema_decay: best.pt/last.pt hold the average, last.pt the live weights too, and a
    resumed run reproduces the uninterrupted one (average, live weights and metrics)."""
    options = ("optim.epochs=2", "optim.ema_decay=0.5", "optim.select=last")
    full = train(tiny_config(manifest, tmp_path / "full", *options))
    last = read_checkpoint(tmp_path / "full" / "last.pt")
    assert last["ema_updates"] > 0
    live = last["train_model"]
    differs = [k for k in last["model"] if not torch.equal(last["model"][k], live[k])]
    assert differs, "the average equals the live weights"
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, last["model"][key]), key
    # best.pt (the final epoch with select=last) holds the average: predict/evaluate get it.
    model, _, _ = load_checkpoint(tmp_path / "full")
    for key, value in model.state_dict().items():
        assert torch.equal(value, last["model"][key]), key
    assert any(not torch.equal(model.state_dict()[k], live[k]) for k in differs)

    part = tiny_config(manifest, tmp_path / "part", *options)
    assert train(part, stop_after_epoch=1).status == "stopped"
    train(part, resume=tmp_path / "part")
    resumed = read_checkpoint(tmp_path / "part" / "last.pt")
    assert resumed["ema_updates"] == last["ema_updates"]
    for name in ("model", "train_model"):
        for key, value in last[name].items():
            assert torch.equal(value, resumed[name][key]), (name, key)
    assert _strip_time(resumed["history"]) == _strip_time(full.history)
