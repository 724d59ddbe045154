"""Evaluate a trained run on a prepared dataset: predictions, metrics with patient CIs, plots.

``evaluate_run(run_dir, data, out_dir)`` loads the run with
:func:`lungcad.training.checkpoint.load_checkpoint`, feeds the slices of a prepared dataset
through the network exactly as training's validation does
(:class:`lungcad.data.dataset.SliceDataset` without augmentation, eval mode, sigmoid of the
logits), scores the outputs (:mod:`lungcad.evaluation.scoring`), records provenance
(:mod:`lungcad.evaluation.info`) and writes an evaluation folder
(:mod:`lungcad.evaluation.folder`: metrics.json, predictions.csv, evaluation.json, plots and
example overlays).

Honesty rules built in:

* The decision threshold is the run's own (``threshold.json``, chosen on the validation
  split during training); it is never tuned on the evaluated data, and ``evaluation.json``
  says whether the rows it (or a calibration) was chosen on are the evaluated ones, computed
  from the manifests' SHA-256 and splits (:mod:`lungcad.evaluation.info`). A run calibrated with
  ``lungcad calibrate`` (``calibration.json``) is scored exactly as ``lungcad predict`` scores
  it: calibrated probabilities and the calibrated threshold
  (:func:`lungcad.evaluation.calibration.run_decision`); ``evaluation.json`` records which applied.
* Classification metrics only for slices with a label (0/1) and only for a classification
  ("cls") run, whose head was trained; segmentation metrics only for slices with a mask and
  only for a run whose decoder was trained (a "seg" run, or a "cls" run started from one).
* Confidence intervals resample patients (``group_id``), not slices.
* Segmentation is scored at each slice's own resolution with its own pixel spacing: the
  predicted probability map is resized back from the model's input size before thresholding,
  so Dice and HD95 (mm) refer to the data as stored, not to the network's grid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lungcad.data.dataset import SliceDataset, model_input_box
from lungcad.data.layouts.settings import PrepareSettings
from lungcad.data.manifest import SliceRecord
from lungcad.errors import InputError, MissingInputError
from lungcad.evaluation.calibration import Calibration, run_decision
from lungcad.evaluation.data import EvaluationData, open_dataset
from lungcad.evaluation.folder import (
    EVALUATION_FILE,
    EvaluationResult,
    Example,
    write_evaluation,
)
from lungcad.evaluation.info import evaluation_info, scored_tasks
from lungcad.evaluation.scoring import SliceOutput, SliceResult, score_outputs, select_examples
from lungcad.io.atomic import atomic_dir
from lungcad.io.folders import check_output_dir, read_json_or_empty
from lungcad.io.images import load_slice_array
from lungcad.models.forward import forward_logits, probabilities
from lungcad.models.sliding_window import segment_at_scale
from lungcad.models.tta import FlipTTA
from lungcad.training.checkpoint import RUN_FILE
from lungcad.training.choices import DEVICES
from lungcad.training.config import Config
from lungcad.training.data import slice_pixel_mm
from lungcad.training.domain import InputDomain
from lungcad.training.ensemble import load_model

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- prediction


def resolve_device(choice: str = "auto") -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` as a torch device."""
    if choice not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}; got {choice!r}", "--device")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but torch sees no GPU; use --device cpu", "--device")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def predict_slices(
    model: nn.Module,
    records: Sequence[SliceRecord],
    root: str | Path,
    image_size: int,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    amp: bool = False,
    num_workers: int = 0,
    calibration: Calibration | None = None,
    seg_scale: InputDomain | None = None,
    pixel_mm: float | None = None,
) -> Iterator[SliceOutput]:
    """Run the network over manifest slices, in record order, as training's validation does.

    Args:
        model: the trained network (put in eval mode here).
        records: the slices.
        root: folder the records' paths are relative to (the manifest's folder).
        image_size: the run's ``config.model.image_size``; slices are resized to it exactly
            as :class:`lungcad.data.dataset.SliceDataset` does in training.
        batch_size: slices per forward pass.
        device: where the model runs (the model must already be there).
        amp: float16 autocast on CUDA (as training with ``train.amp``).
        num_workers: DataLoader worker processes.
        calibration: maps the cancer logits to probabilities (as ``lungcad predict`` does for
            a calibrated run); None: the sigmoid.
        seg_scale: the decoder's domain (``seg_input_domain``): when it has a pixel size,
            slices with a known spacing and a mask are segmented at that scale by sliding
            windows, as ``lungcad predict`` does, and their tumour probability is on the
            slice's own grid; others as the model input (letterboxed).
        pixel_mm: the run's ``data.slice_pixel_mm`` (:func:`lungcad.training.data.
            slice_pixel_mm`): slices are resampled to it as in training, and tumour
            probabilities not segmented at the decoder's scale are mapped back to the slice's
            grid; None: letterboxed.

    Yields:
        One :class:`SliceOutput` per record, in order.
    """
    device = torch.device(device)
    dataset = SliceDataset(
        records, root, image_size=(image_size, image_size), augment=None, pixel_mm=pixel_mm
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    start = 0
    for batch in loader:
        # forward_logits leaves inference mode before returning: this generator never stays
        # suspended inside it (which would disable autograd in the caller's code).
        logits = forward_logits(model, batch["image"], device, amp=amp)
        cls = probabilities(logits.cls, calibration.apply if calibration is not None else None)
        seg = probabilities(logits.seg)[:, 0]
        for i in range(len(cls)):
            record = records[start + i]
            at_scale = _segment_at_scale(model, record, root, seg_scale, device, amp)
            if at_scale is None and pixel_mm is not None:
                # Resampled input: the probability map goes back to the slice's own grid.
                shape = np.load(Path(root) / record.image_path, mmap_mode="r").shape[-2:]
                box = model_input_box(shape, image_size, dataset.scale(record))
                at_scale = np.clip(box.invert(seg[i]), 0.0, 1.0)
            yield SliceOutput(record, float(cls[i]), seg[i] if at_scale is None else at_scale)
        start += len(cls)


def _segment_at_scale(
    model: nn.Module,
    record: SliceRecord,
    root: str | Path,
    domain: InputDomain | None,
    device: torch.device,
    amp: bool,
) -> np.ndarray | None:
    """The tumour probability ``(H, W)`` of a masked slice segmented at the decoder's scale,
    or None where that scale or the slice's spacing is unknown."""
    if domain is None or domain.model_pixel_mm is None or not record.has_mask:
        return None
    spacing = (record.spacing_y, record.spacing_x)
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        return None
    image = load_slice_array(Path(root) / record.image_path, record.sample_id, "image")

    def predict(windows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(forward_logits(model, windows, device, amp=amp).seg.float()).cpu()

    return segment_at_scale(
        np.clip(image, 0.0, 1.0)[None].astype(np.float32),
        (float(spacing[0]), float(spacing[1])),
        domain.model_pixel_mm,
        domain.image_size,
        predict,
    )[0]


# --------------------------------------------------------------------------- examples


def example_outputs(
    model: nn.Module,
    config: Config,
    data: EvaluationData,
    rows: Sequence[SliceResult],
    n_examples: int,
) -> list[Example]:
    """Pick up to ``n_examples`` rows per TP/FP/FN/TN category and re-run the model on them.

    Re-running a handful of slices is cheaper than keeping every probability map of the
    evaluation pass in memory.

    Args:
        model: the evaluated network (on its device).
        config: its configuration (for the input size).
        data: the evaluated slices.
        rows: the scored rows of ``data``.
        n_examples: examples per category (0: none).

    Returns:
        ``(category, row, output)`` per example, for
        :func:`lungcad.evaluation.folder.write_evaluation`.
    """
    examples = select_examples(rows, n_examples) if n_examples > 0 else []
    if not examples:
        return []
    by_id = {r.sample_id: r for r in data.records}
    outputs = predict_slices(
        model,
        [by_id[row.sample_id] for _, row in examples],
        data.root,
        config.model.image_size,
        batch_size=len(examples),
        device=next(model.parameters()).device,
        pixel_mm=slice_pixel_mm(config),
    )
    return [(category, row, out) for (category, row), out in zip(examples, outputs, strict=True)]


# --------------------------------------------------------------------------- the run


def _decoder_domain(config: Config, info: Mapping[str, Any]) -> InputDomain | None:
    """The scale the decoder learnt, when it learnt at all (a seg run, or a cls run trained
    from one); None otherwise."""
    if config.train.stage != "seg" and not config.train.init_from:
        return None
    return InputDomain.from_dict(info.get("seg_input_domain"))


def evaluate_loaded(
    model: nn.Module,
    config: Config,
    checkpoint_info: Mapping[str, Any],
    data: EvaluationData,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 32,
) -> EvaluationResult:
    """Score a loaded run on selected slices (nothing written; see :func:`evaluate_run`).

    Args:
        model: network from :func:`lungcad.training.checkpoint.load_checkpoint`.
        config: its configuration.
        checkpoint_info: its ``info`` dict (``threshold``, ``run_dir``, ``sha256``, ...).
        data: the slices (:func:`open_dataset` / :func:`select_records`).
        n_boot: patient-level bootstrap replicates (0: no CIs).
        seed: bootstrap seed.
        device: "auto", "cpu" or "cuda".
        batch_size: slices per forward pass.
    """
    if n_boot < 0:
        raise InputError(f"n_boot must be >= 0; got {n_boot}", "--n-boot")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1; got {batch_size}", "--batch-size")
    run_info = read_json_or_empty(Path(checkpoint_info["run_dir"]) / RUN_FILE)
    tasks = scored_tasks(config.train.stage, run_info, data)
    # The calibration and threshold `lungcad predict` would use (only a trained classifier
    # has a decision to calibrate).
    decision = run_decision(checkpoint_info) if tasks.classification else None
    threshold = decision.threshold if decision is not None else None
    torch_device = resolve_device(device)
    model.to(torch_device)
    outputs = predict_slices(
        model,
        data.records,
        data.root,
        config.model.image_size,
        batch_size=batch_size,
        device=torch_device,
        amp=config.train.amp,
        calibration=None if decision is None else decision.calibration,
        seg_scale=_decoder_domain(config, checkpoint_info),
        pixel_mm=slice_pixel_mm(config),
    )
    rows, metrics = score_outputs(
        outputs,
        data.root,
        threshold=threshold,
        segment=tasks.segmentation,
        n_boot=n_boot,
        seed=seed,
    )
    settings = {
        "n_boot": n_boot,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(torch_device),
    }
    info = evaluation_info(config, checkpoint_info, run_info, data, tasks, decision, settings)
    return EvaluationResult(metrics=metrics, rows=rows, info=info)


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    out_dir: str | Path | None = None,
    *,
    split: str | None = None,
    prepare_settings: PrepareSettings | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 32,
    n_examples: int = 2,
    tta: bool = False,
) -> EvaluationResult:
    """Evaluate a trained run on a dataset in any supported form and write the folder.

    Args:
        run_dir: a run folder written by ``lungcad train`` (or its ``.pt`` file).
        data: a prepared folder / manifest.csv, or a raw dataset folder (prepared on the fly).
        out_dir: the evaluation folder to write (new, empty, or an earlier evaluation, which
            is replaced atomically); None computes without writing.
        split: "train", "val", "test" or "all"; None: "test" for prepared data, "all" for
            raw data.
        prepare_settings: layout and class mapping for raw data.
        n_boot: patient-level bootstrap replicates for the CIs (0: none).
        seed: bootstrap seed.
        device: "auto", "cpu" or "cuda".
        batch_size: slices per forward pass.
        n_examples: overlays per TP/FP/FN/TN category.
        tta: average each slice with its left-right mirror (:class:`lungcad.models.tta.FlipTTA`).

    Returns:
        The :class:`EvaluationResult`.
    """
    out = (
        check_output_dir(out_dir, EVALUATION_FILE, "an earlier evaluation")
        if out_dir is not None
        else None
    )
    if not Path(data).exists():  # before the (slow) checkpoint load
        raise MissingInputError(
            "evaluation data not found; pass a folder written by `lungcad "
            "prepare` (or its manifest.csv) or a dataset folder",
            data,
        )
    loaded, config, info = load_model(run_dir)  # a run or a fold ensemble
    model: nn.Module = loaded
    if tta:
        model = FlipTTA(loaded)
        info = {**info, "tta": "flip"}
    with open_dataset(data, split, prepare_settings) as selected:
        log.info(
            "evaluating %s on %d %r slices of %s",
            info["path"],
            len(selected.records),
            selected.split,
            selected.manifest,
        )
        result = evaluate_loaded(
            model,
            config,
            info,
            selected,
            n_boot=n_boot,
            seed=seed,
            device=device,
            batch_size=batch_size,
        )
        if out is not None:
            examples = example_outputs(model, config, selected, result.rows, n_examples)
            with atomic_dir(out) as tmp:
                write_evaluation(result, tmp, selected.root, examples)
            result.out_dir = out
    return result
