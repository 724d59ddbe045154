"""Export to ONNX / TorchScript and the ONNX Runtime backend of the Predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lungcad.cli import main as cli_main
from lungcad.data.synthetic.phantom import make_phantom
from lungcad.errors import InputError
from lungcad.inference.export import export_checkpoint, onnx_metadata, onnx_session, run_onnx
from lungcad.inference.predictor import Predictor
from lungcad.training.checkpoint import load_checkpoint
from tests.inference_helpers import SIZE, make_run_folder

torch.set_num_threads(1)

#: ONNX Runtime and PyTorch run the same float32 graph; differences are rounding (~1e-6).
ATOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("export") / "run", threshold=0.4)


@pytest.fixture(scope="module")
def onnx_file(run: Path) -> Path:
    """Exported once through the CLI, which also checks ONNX Runtime against PyTorch."""
    out = run.parent / "model.onnx"
    assert (
        cli_main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out)]) == 0
    )
    return out


def test_onnx_matches_pytorch_with_dynamic_batch(run: Path, onnx_file: Path) -> None:
    model, _, info = load_checkpoint(run)
    session = onnx_session(onnx_file, num_threads=1)
    # Batch, height and width are dynamic: the predictor runs sliding windows of the
    # decoder's training size through the same graph as the classifier's whole slices.
    for batch, side in ((1, SIZE), (5, SIZE), (3, SIZE // 2)):
        x = torch.rand(batch, 1, side, side, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            ref = model(x)
        seg, cls = run_onnx(session, x.numpy())
        assert seg.shape == (batch, 1, side, side) and cls.shape == (batch,)
        assert np.allclose(seg, ref["seg_logits"].numpy(), atol=ATOL, rtol=0)
        assert np.allclose(cls, ref["cls_logits"].numpy(), atol=ATOL, rtol=0)
    meta = onnx_metadata(onnx_file)
    assert meta["checkpoint_sha256"] == info["sha256"] and meta["image_size"] == str(SIZE)
    assert [o.name for o in session.get_outputs()] == ["seg_logits", "cls_logits"]


def test_onnx_backend_predicts_like_torch(run: Path, onnx_file: Path) -> None:
    volume = make_phantom(5, shape_zyx=(6, SIZE, SIZE), matrix=SIZE).volume
    fast = Predictor.from_checkpoint(run, backend="onnx", onnx_path=onnx_file, batch_size=4)
    eager = Predictor.from_checkpoint(run, batch_size=1)
    a = fast.predict_volume(volume, cam=False)
    b = eager.predict_volume(volume, cam=False)
    assert fast.info["backend"] == "onnx" and a.finding.threshold == b.finding.threshold == 0.4
    assert np.array_equal(a.lung_slices, b.lung_slices)
    assert np.allclose(a.slice_probabilities, b.slice_probabilities, atol=ATOL, equal_nan=True)
    assert np.allclose(a.probability.array, b.probability.array, atol=ATOL)
    near_half = np.abs(b.probability.array - 0.5) < ATOL  # only there may masks differ
    assert np.array_equal(a.mask.array[~near_half], b.mask.array[~near_half])


def test_onnx_from_another_checkpoint_is_refused(onnx_file: Path, tmp_path: Path) -> None:
    other = make_run_folder(tmp_path / "other", seed=1)
    with pytest.raises(InputError, match="another checkpoint"):
        Predictor.from_checkpoint(other, backend="onnx", onnx_path=onnx_file)


def test_onnx_backend_exports_on_first_use(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run", seed=2)
    predictor = Predictor.from_checkpoint(run, backend="onnx")
    assert predictor.onnx_path.parent == run and predictor.onnx_path.is_file()
    assert Predictor.from_checkpoint(run, backend="onnx").onnx_path == predictor.onnx_path


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_matches(run: Path, tmp_path: Path) -> None:
    path = export_checkpoint(run, "torchscript", tmp_path / "model.ts.pt")
    traced = torch.jit.load(str(path))
    model, _, _ = load_checkpoint(run)
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        seg, cls = traced(x)
        ref = model(x)
    assert torch.allclose(seg, ref["seg_logits"], atol=1e-5)
    assert torch.allclose(cls, ref["cls_logits"], atol=1e-5)


def test_export_refuses_unknown_format(run: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="format"):
        export_checkpoint(run, "tflite", tmp_path / "m.tflite")


def test_a_fold_ensemble_exports_as_one_graph(tmp_path: Path, capsys) -> None:
    """`lungcad export` accepts a cross-validation folder: one ONNX graph that gives the
    logits of the members' mean probabilities, checked against PyTorch by the command."""
    import json

    from lungcad.training.ensemble import ENSEMBLE_FILE, load_ensemble

    members = []
    for fold in range(2):
        make_run_folder(tmp_path / "cv" / f"fold{fold}" / "run", seed=fold)
        members.append({"fold": fold, "run": f"fold{fold}/run"})
    spec = {"members": members, "threshold": 0.3, "threshold_source": "out-of-fold"}
    (tmp_path / "cv" / ENSEMBLE_FILE).write_text(json.dumps(spec))
    out = tmp_path / "ensemble.onnx"
    assert (
        cli_main(
            ["export", "--checkpoint", str(tmp_path / "cv"), "--format", "onnx", "--out", str(out)]
        )
        == 0
    )
    assert "max |difference|" in capsys.readouterr().out
    meta = onnx_metadata(out)
    assert meta["threshold"] == "0.3" and len(meta["ensemble_member_sha256"].split(",")) == 2
    model, _, _ = load_ensemble(tmp_path / "cv")
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(x)
    seg, cls = run_onnx(onnx_session(out), x.numpy())
    assert np.allclose(cls, ref["cls_logits"].numpy(), atol=1e-4)
    assert np.allclose(seg, ref["seg_logits"].numpy(), atol=1e-3)
