"""Inference speed benchmark: naive eager PyTorch vs lungcad's whole-study path.

Run (prints its figures; not a test)::

    .venv/bin/python benchmarks/inference.py                 # 300-slice 512x512 study, 2 threads
    .venv/bin/python benchmarks/inference.py --slices 60     # a smaller study

What is measured, for the full ResNet50 U-Net on 512x512 slices with ``--threads`` threads:

* naive: eager PyTorch fp32, batch 1, every full 512x512 slice fed at 512x512 (windowed);
  timed on ``--naive-slices`` evenly spaced slices and extrapolated to the study (running
  all of them would take many minutes);
* lungcad: ``Predictor`` as ``lungcad predict`` runs it: lung mask, slices without lung
  skipped, batches, the checkpoint's input size (``--image-size``, 256 by default), torch
  channels_last or ONNX Runtime (both timed on the same slices, the faster one used);
* whole study: ``predict_path`` on the study written as NIfTI plus ``write_study_outputs``
  (read, predict, Grad-CAM, lesions, mask/probability NIfTI, preview, findings, report), in a
  fresh process so its peak RSS is its own;
* agreement: Dice between the naive masks and lungcad's at the same input size (512; the
  engines must agree) and at the checkpoint's size (informative only: see below).

The network is randomly initialised (no pretrained or trained weights are available here), so
its masks and probabilities mean nothing; only the speed and the engines' agreement do. To
make the agreement check non-trivial, and the masks tumour-sized rather than whole-volume
(which would make the lesion step measure a 50-million-voxel "lesion"), the segmentation
head's bias is shifted so that about 0.5% of a lung slice's pixels score above 0.5. The study
is a synthetic phantom (``lungcad.data.synthetic.make_phantom``, 60 slices of 2.5 mm at 512x512)
resampled along z to ``--slices`` thinner slices (0.5 mm for 300), which is faster than
rendering 300 slices; nearly all of its slices show lung, as in a chest CT cropped to the
chest (real scans have some more slices without lung, which lungcad skips).

The whole-study step segments as ``lungcad predict`` does for a trained run: the run records
its decoder as trained on ``--seg-window`` px inputs at ``--seg-pixel-mm`` mm per pixel, so
each slice's lung box is resampled to that scale and segmented by sliding windows, while the
classifier sees the whole slice at ``--image-size``. With ``--cls-pixel-mm`` equal to
``--seg-pixel-mm`` (a classifier trained with ``data.slice_pixel_mm``, as the demo's) and an
``--image-size`` that holds the slice at that scale, one forward pass per slice gives both
the cancer logit and the mask (no sliding windows)::

    .venv/bin/python benchmarks/inference.py --cls-pixel-mm 2 --seg-pixel-mm 2 --image-size 192

Targets (issue 10): 300-slice study < 30 s on 2 cores, peak RSS < 3 GB, >= 4x the naive
slices/s, Dice between the engines' masks >= 0.99.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KB -> GB (Linux)


def _make_run(
    folder: Path,
    model_name: str,
    image_size: int,
    seed: int,
    seg_pixel_mm: float,
    window: int,
    cls_pixel_mm: float | None = None,
) -> Path:
    """A run folder with a randomly initialised network (head bias shifted, see docstring),
    whose decoder is recorded as trained on ``window``-px inputs at ``seg_pixel_mm`` mm per
    pixel, so that whole-study prediction segments by sliding windows at that scale; with
    ``cls_pixel_mm`` the classifier is recorded as trained on whole slices resampled to it
    (``data.slice_pixel_mm``), which at the decoder's pixel size is one pass per slice."""
    from lungcad.data.preprocessing import LUNG_WINDOW
    from lungcad.training.checkpoint import write_untrained_run
    from lungcad.training.config import load_config
    from lungcad.training.domain import HU, InputDomain

    # init_from marks the decoder as trained (inference skips the masks of a cls run that was
    # not started from a segmentation run), so the benchmark times the full two-stage path.
    config = load_config(
        None,
        [
            f"model.name={model_name}",
            f"model.image_size={image_size}",
            "train.stage=cls",
            f"train.init_from={folder}",
            *([f"data.slice_pixel_mm={cls_pixel_mm}"] if cls_pixel_mm else []),
        ],
    )
    cls_domain = InputDomain(
        HU, LUNG_WINDOW, cls_pixel_mm, image_size, resampled=cls_pixel_mm is not None
    )
    domains = {
        "input_domain": cls_domain.to_dict(),
        "seg_input_domain": InputDomain(HU, LUNG_WINDOW, seg_pixel_mm, window).to_dict(),
    }
    return write_untrained_run(folder, config, seed=seed, domains=domains)


def _shift_head_bias(run: Path, study, z: int) -> None:
    """Shift the seg head's bias so ~0.5% of the pixels of slice z are above 0.5 at 512."""
    import torch

    from lungcad.data.dataset import slice_to_model_input
    from lungcad.data.preprocessing import to_unit_range
    from lungcad.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from lungcad.volume import Volume

    model, _, _ = load_checkpoint(run)
    unit = to_unit_range(Volume(array=study.array[z : z + 1], intensity="hu"))[0]
    with torch.inference_mode():
        logits = model(torch.from_numpy(slice_to_model_input(unit, unit.shape[0]))[None, None])
    cut = float(np.quantile(logits["seg_logits"].numpy(), 0.995))
    payload = read_checkpoint(run)
    payload["model"]["segmentation_head.0.bias"] -= cut
    save_checkpoint(run / "best.pt", payload)


def _study(n_slices: int, matrix: int):
    """A synthetic chest CT of ``n_slices`` slices: a 60-slice phantom resampled along z."""
    from lungcad.data.preprocessing import resample
    from lungcad.data.synthetic.phantom import make_phantom

    base = make_phantom(0, matrix=matrix).volume
    extent = base.shape[0] * base.spacing[0]
    study = resample(base, (extent / n_slices, None, None), order=1)
    study.array = study.array[:n_slices]
    return study


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _naive(run: Path, study, slices: list[int], threads: int) -> dict:
    """Eager fp32, batch 1, whole 512x512 slices at 512x512; returns rate and masks."""
    import torch

    from lungcad.data.preprocessing import window_hu
    from lungcad.training.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model, _, _ = load_checkpoint(run)
    masks = {}
    with torch.inference_mode():
        model(torch.zeros(1, 1, *study.shape[1:]))  # warm-up (allocator, kernels)
        start = time.perf_counter()
        for z in slices:
            x = torch.from_numpy(window_hu(study.array[z]))[None, None]
            out = model(x)
            masks[z] = (torch.sigmoid(out["seg_logits"])[0, 0] >= 0.5).numpy()
        seconds = time.perf_counter() - start
    return {"slices_per_s": len(slices) / seconds, "masks": masks}


def _engine_rates(run: Path, study, slices: list[int], threads: int, batch: int) -> dict:
    """Slices/s of the lungcad engines on the same lung slices (model step only)."""
    import torch

    from lungcad.inference.predictor import Predictor

    torch.set_num_threads(threads)
    rates = {}
    for backend in ("torch", "onnx"):
        predictor = Predictor.from_checkpoint(run, backend=backend, batch_size=batch)
        inputs = predictor.preprocess(study, slices)
        predictor.run_model(inputs[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(slices), batch):
            predictor.run_model(inputs[i : i + batch])
        rates[backend] = len(slices) / (time.perf_counter() - start)
    return rates


def _same_size_masks(
    run: Path, study, slices: list[int], threads: int, backend: str, batch: int
) -> dict[int, np.ndarray]:
    """lungcad's engine at the study's own 512 input size (engine agreement check)."""
    import torch

    from lungcad.inference.predictor import Predictor
    from lungcad.training.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model, config, info = load_checkpoint(run)
    # The naive script's input: the whole slice at its own 512 px, never resampled to mm.
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, image_size=study.shape[1]),
        data=dataclasses.replace(config.data, slice_pixel_mm=None),
    )
    if info.get("input_domain"):
        domain = {**info["input_domain"], "resampled": False, "image_size": study.shape[1]}
        info = {**info, "input_domain": domain}
    onnx = None
    if backend == "onnx":
        from lungcad.inference.export import export_onnx

        onnx = Path(info["run_dir"]) / "model-512.onnx"
        export_onnx(model, onnx, study.shape[1])
    predictor = Predictor(model, config, info, backend=backend, onnx_path=onnx, batch_size=batch)
    seg, _ = predictor.run_model(predictor.preprocess(study, slices))
    return {z: s[0] >= 0.0 for z, s in zip(slices, seg, strict=True)}  # logit 0 = prob 0.5


def _whole_study(
    run: str, nifti: str, out: str, threads: int, backend: str, batch: int, sample: list[int], queue
) -> None:
    """In a fresh process: read + predict + write outputs; reports timings and peak RSS."""
    import torch

    from lungcad.inference.outputs import write_study_outputs
    from lungcad.inference.predictor import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor.from_checkpoint(run, backend=backend, batch_size=batch)
    start = time.perf_counter()
    volume, result = predictor.predict_path(nifti)
    predicted = time.perf_counter() - start
    write_study_outputs(volume, result, out)
    total = time.perf_counter() - start
    probs = result.probability.array
    queue.put(
        {
            "total_s": total,
            "predict_s": predicted,
            "timings": result.timings,
            "evaluated": len(result.lung_slices),
            "rss_gb": _rss_gb(),
            "masks": {z: probs[z] >= 0.5 for z in sample},
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices in the study (300)")
    parser.add_argument("--matrix", type=int, default=512, help="in-plane size (512)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    parser.add_argument("--model", default="resnet50", help="network (resnet50)")
    parser.add_argument(
        "--image-size", type=int, default=256, help="the checkpoint's model input size (256)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="lungcad batch size (8)")
    parser.add_argument(
        "--seg-pixel-mm",
        type=float,
        default=1.5,
        help="mm per pixel the decoder is recorded as trained at (1.5: the MSD patches' scale)",
    )
    parser.add_argument(
        "--seg-window", type=int, default=64, help="the decoder's training input size (64)"
    )
    parser.add_argument(
        "--cls-pixel-mm",
        type=float,
        default=None,
        help="mm per pixel the classifier is recorded as trained at (data.slice_pixel_mm); "
        "equal to --seg-pixel-mm with a large enough --image-size: one pass per slice "
        "(default: letterboxed whole slices and a separate sliding-window pass)",
    )
    parser.add_argument(
        "--naive-slices", type=int, default=6, help="slices the naive path is timed on (6)"
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from lungcad.io.writers import write_image

    print(
        f"lungcad inference benchmark: {args.model} (random init, no trained weights), "
        f"{args.slices} slices of {args.matrix}x{args.matrix}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
        "(other processes share the cores: figures are for this load)"
    )
    with tempfile.TemporaryDirectory(prefix="lungcad-bench-") as tmp:
        tmp = Path(tmp)
        clock = time.perf_counter()
        study = _study(args.slices, args.matrix)
        nifti = write_image(study, tmp / "study.nii.gz")
        print(f"study: phantom made and written as NIfTI in {time.perf_counter() - clock:.1f} s")
        run = _make_run(
            tmp / "run",
            args.model,
            args.image_size,
            0,
            args.seg_pixel_mm,
            args.seg_window,
            args.cls_pixel_mm,
        )
        from lungcad.inference.predictor import Predictor

        lung = Predictor.from_checkpoint(run).select_slices(study)[0]
        sample = [lung[int(i)] for i in np.linspace(0, len(lung) - 1, args.naive_slices)]
        _shift_head_bias(run, study, sample[len(sample) // 2])

        naive = _naive(run, study, sample, args.threads)
        rates = _engine_rates(run, study, sample, args.threads, args.batch_size)
        backend = max(rates, key=rates.get)
        print(
            f"naive (eager fp32, batch 1, {args.matrix}x{args.matrix}): "
            f"{naive['slices_per_s']:.3f} slices/s; whole study would take "
            f"{args.slices / naive['slices_per_s']:.0f} s"
        )
        for name, rate in rates.items():
            print(
                f"lungcad engine {name} (batch {args.batch_size}, {args.image_size}x"
                f"{args.image_size}): {rate:.3f} slices/s "
                f"({rate / naive['slices_per_s']:.1f}x naive)"
            )

        same = _same_size_masks(run, study, sample, args.threads, backend, args.batch_size)
        dice_same = [_dice(same[z], naive["masks"][z]) for z in sample]

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        worker = ctx.Process(
            target=_whole_study,
            args=(
                str(run),
                str(nifti),
                str(tmp / "out"),
                args.threads,
                backend,
                args.batch_size,
                sample,
                queue,
            ),
        )
        worker.start()
        whole = queue.get()
        worker.join()
        steps = whole["timings"]
        # The naive path only makes masks; compare it with the same work in lungcad's path
        # (lung mask, preprocessing, inference, resizing back), not with reading, lesions or
        # Grad-CAM, which the naive script does not do at all.
        mask_s = sum(
            steps[k] for k in ("lung_mask_s", "preprocess_s", "inference_s", "postprocess_s")
        )
        speedup = args.slices / mask_s / naive["slices_per_s"]
        print(
            f"whole study ({backend}): {whole['total_s']:.1f} s end to end "
            f"(read + predict {whole['predict_s']:.1f} s, then outputs); "
            f"{whole['evaluated']} of {args.slices} slices had lung; peak RSS "
            f"{whole['rss_gb']:.2f} GB"
        )
        print("  steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in whole["timings"].items()))
        print(
            f"  masks for the whole study (lung mask + preprocess + inference + resize back): "
            f"{mask_s:.1f} s = {args.slices / mask_s:.2f} slices/s = {speedup:.1f}x naive; "
            f"end to end (read, predict, lesions, Grad-CAM, outputs) "
            f"{args.slices / whole['total_s']:.2f} slices/s = "
            f"{args.slices / whole['total_s'] / naive['slices_per_s']:.1f}x naive masks alone"
        )
        print(
            f"Dice lungcad vs naive masks at {args.matrix}x{args.matrix} input, per slice: "
            + ", ".join(f"{d:.4f}" for d in dice_same)
        )
        dice_small = [_dice(whole["masks"][z], naive["masks"][z]) for z in sample]
        one_pass = args.cls_pixel_mm is not None and args.cls_pixel_mm == args.seg_pixel_mm
        path = "one pass" if one_pass else f"sliding {args.seg_window}-px windows"
        print(
            f"Dice lungcad ({path} at {args.seg_pixel_mm:g} mm) vs naive: "
            + ", ".join(f"{d:.3f}" for d in dice_small)
            + " (random weights: not indicative of a trained model)"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    minimum = min(dice_same)
    checks = {
        f"{args.slices}-slice study < 30 s": whole["total_s"] < 30,
        "peak RSS < 3 GB": whole["rss_gb"] < 3,
        ">= 4x naive slices/s (masks)": speedup >= 4,
        "engines agree (Dice >= 0.99)": minimum >= 0.99,
    }
    for name, ok in checks.items():
        print(f"target {name}: {'MET' if ok else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
