"""Whole-study inference: a CT (or a 2D slice image) in, tumour masks and a decision out.

``Predictor.from_checkpoint(run_dir)`` loads a run folder; ``predict_path(path)`` reads a
DICOM series, NIfTI, MetaImage or PNG/JPEG slice and returns a :class:`StudyResult`;
``write_study_outputs`` writes masks, DICOM SEG/SR, findings, pictures and a report.

Pipeline (per study, on the canonical LPS volume):

0. input checks (:mod:`lungcad.inference.input_checks`), before any model: malformed
   geometry or values raise ``InputError``; a study without lung is not assessed (finding
   "cannot assess", no mask, no probability). A segmentation-only run gives masks and the
   finding "no classifier"; a cls run without a trained decoder gives no masks;
1. lung mask (``preprocessing.lung_mask``; for CT computed on pixels of about 3 mm, the
   coarsest it is designed for: it only picks slices, and at full resolution it would cost
   ~10 s per 300-slice study). A single 2D image is always evaluated, without a lung mask;
2. slices without lung (beyond a ``lung_margin_mm`` margin) are skipped;
3. each slice is windowed to [0, 1] (``preprocessing.to_unit_range``) and resized to the
   model's ``image_size`` by ``lungcad.data.dataset.slice_to_model_input``, the very function
   training's ``SliceDataset`` applies to a prepared slice. Prepared slices are whole axial
   slices, not lung crops, so by default inference does not crop either
   (``crop_to_lungs=True`` crops to the lung box, for models trained on such crops);
4. batched forward passes (PyTorch under ``inference_mode`` in channels_last, or ONNX Runtime);
5. tumour probabilities come from the decoder at the scale it learnt: the lung box of each
   slice is resampled to the segmentation run's mm per model pixel (``seg_input_domain`` of
   the checkpoint, :mod:`lungcad.training.domain`) and segmented by sliding windows of its
   input size (:mod:`lungcad.models.sliding_window`), then resampled back onto the input's grid.
   Where that scale or the image's spacing is unknown, the whole-slice model input is
   segmented instead and a warning says so. The mask is ``probability >= 0.5`` inside the
   lung box (with its margin);
6. per-slice cancer probabilities from ``cls_logits`` (through ``calibration.json`` when the
   run has one), aggregated to a study probability (:func:`aggregate_study`), compared with
   the run's study threshold (``study_threshold.json``, chosen on validation studies by
   ``lungcad calibrate --studies``) for a 3D study, or with its slice threshold for a 2D image
   or a run without one; lesions are measured with ``lesions.find_lesions``.

Results stay on the input's canonical grid; writers put them back in the file's own
orientation, so ``mask.nii.gz`` lies exactly on the input image.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from lungcad import __version__
from lungcad.data.dataset import model_input_box, pixel_scale, slice_to_model_input
from lungcad.data.lung_mask import lung_mask
from lungcad.data.preprocessing import lung_bbox, to_unit_range
from lungcad.errors import InputError
from lungcad.evaluation.calibration import Calibration, decision_threshold, run_decision
from lungcad.evaluation.study_threshold import (
    STUDY_THRESHOLD_FILE,
    StudyThreshold,
    load_study_threshold,
    model_folder,
)
from lungcad.finding import CANNOT_ASSESS, NO_CLASSIFIER, StudyFinding
from lungcad.inference.aggregate import AGGREGATION_EXTENT_MM, aggregate_study
from lungcad.inference.input_checks import InputCheck, check_input
from lungcad.inference.lesions import find_lesions
from lungcad.lesion import Lesion
from lungcad.models.forward import forward_logits, probabilities
from lungcad.models.sliding_window import segment_at_scale
from lungcad.models.tta import mean_probability_logits
from lungcad.models.unet import LungCADNet
from lungcad.training.checkpoint import load_checkpoint
from lungcad.training.config import Config, config_hash
from lungcad.training.domain import DISPLAY, HU, InputDomain
from lungcad.training.ensemble import EnsembleNet, is_ensemble, load_ensemble
from lungcad.volume import Volume

if TYPE_CHECKING:  # Grad-CAM imports MONAI's CAM machinery; loaded on first use
    from lungcad.inference.explain import CamExplainer

log = logging.getLogger(__name__)

__all__ = [
    "INTENDED_USE",
    "MASK_THRESHOLD",
    "NO_CLASSIFIER_REASON",
    "Predictor",
    "StudyResult",
    "assumed_field_of_view",
]

INTENDED_USE = (
    "Research use only. lungcad is a computer-aided detection aid that marks possible lung "
    "tumours on chest CT for review by a qualified radiologist. It is not a medical device, "
    "has not been clinically validated, and must not be used for standalone diagnosis or "
    "treatment decisions."
)
#: A pixel is tumour when its probability is at least this.
MASK_THRESHOLD = 0.5
#: The lung mask only chooses slices (and the crop box); for HU volumes it is computed on
#: pixels subsampled to at most this size (mm). Windowed images keep their pixels: their
#: spacing is unknown, and the mask's mm-based settings fail on subsampled ones.
LUNG_MASK_PIXEL_MM = 3.0
#: The reason of a seg-only run's finding ("no classifier").
NO_CLASSIFIER_REASON = "segmentation-only run: no trained cancer classifier"
#: Field of view (mm) assumed for a 2D image without pixel spacing when it is segmented at the
#: model's physical scale and the checkpoint does not record its training slices' own
#: (``InputDomain.field_of_view_mm``): a typical adult chest CT reconstruction (512 px at
#: ~0.68 mm).
ASSUMED_FIELD_OF_VIEW_MM = 350.0


def assumed_field_of_view(domain: InputDomain, warnings: list[str], step: str) -> float:
    """The extent (mm of the longer side) taken for a 2D image without a pixel spacing: what
    the model's training slices spanned, or :data:`ASSUMED_FIELD_OF_VIEW_MM`; ``warnings``
    gets a line that says which (``step``: "classified" or "segmented")."""
    if domain.field_of_view_mm:
        fov, why = domain.field_of_view_mm, "the median extent of the model's training images"
    else:
        fov, why = ASSUMED_FIELD_OF_VIEW_MM, "a typical chest CT field of view"
    warnings.append(
        f"pixel spacing unknown (2D image): {step} as if the image spanned {fov:g} mm, {why}"
    )
    return fov


@dataclass
class StudyResult:
    """What a prediction found in one study (all volumes on the input's canonical grid).

    Attributes:
        mask: uint8 0/1 tumour mask ``(z, y, x)``.
        probability: float32 tumour probability ``(z, y, x)`` in [0, 1] (0 on skipped slices).
        slice_probabilities: ``(z,)`` cancer probability per slice (calibrated when the run
            has a calibration); NaN for slices without lung, which were not evaluated, and
            for every slice when there is no decision (no classifier, cannot assess).
        finding: the study finding (:class:`lungcad.finding.StudyFinding`): the decision with
            the study probability (:func:`aggregate_study`) and the threshold it was compared
            with, or "cannot assess" / "no classifier" with the reason and no probability.
        lesions: connected components of the mask, largest first.
        lung_slices: ``(n,)`` indices of the slices evaluated.
        cam: Grad-CAM heat maps ``(z, y, x)`` in [0, 1] on ``cam_slices`` (0 elsewhere), or None.
        cam_slices: slices with a heat map (the highest cancer probabilities).
        crop_box: ``(y, x)`` slices of the in-plane region fed to the model.
        aggregation: how the study probability was formed (method, k, extent_mm).
        model_info: :attr:`Predictor.info` of the predictor that made it.
        timings: seconds per step (``read_s``, ``lung_mask_s``, ``preprocess_s``,
            ``inference_s``, ``postprocess_s``, ``lesions_s``, ``cam_s``, ``total_s``).
        warnings: notes for the reader (e.g. "no lung found").
        input_check: what the input checks found (:mod:`lungcad.inference.input_checks`);
            None for results not made by :meth:`Predictor.predict_volume`.
    """

    mask: Volume
    probability: Volume
    slice_probabilities: np.ndarray
    finding: StudyFinding
    lesions: list[Lesion]
    lung_slices: np.ndarray
    cam: Volume | None = None
    cam_slices: list[int] = field(default_factory=list)
    crop_box: tuple[slice, slice] | None = None
    aggregation: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    input_check: InputCheck | None = None


class Predictor:
    """Runs a trained LungCADNet over whole studies.

    Build it with :meth:`from_checkpoint`. Arguments after ``info`` are keyword-only.

    Args:
        model: the network (eval mode).
        config: the run's configuration (``model.image_size`` is the input size).
        info: ``load_checkpoint``'s info (path, sha256, threshold, ...).
        backend: ``"torch"`` or ``"onnx"`` (ONNX Runtime, CPU; needs ``onnx_path``).
        onnx_path: exported model for the ONNX backend.
        batch_size: slices per forward pass.
        calibration: applied to the cancer logits when given.
        lung_margin_mm: slices within this distance (z) of the lung, and in-plane margin of the
            crop box, are kept.
        crop_to_lungs: crop each slice to the study's lung box before resizing. Off by
            default because training slices are whole slices; cropping changes the scale the
            model sees.
        aggregation_extent_mm: see :func:`aggregate_study`.
        study_threshold: the threshold for 3D studies, chosen on validation studies
            (:mod:`lungcad.evaluation.study_threshold`); None decides them with the slice
            threshold. :meth:`from_checkpoint` loads the run's ``study_threshold.json``.
        channels_last: NHWC memory layout for the torch backend (faster CPU convolutions).
        device: torch device for the torch backend.
        tta: flip test-time augmentation: every forward pass also runs on the left-right
            mirrored input and the probabilities are averaged (:mod:`lungcad.models.tta`),
            on either backend; twice the inference time. The run's thresholds were chosen
            without it (said in the result's warnings).
    """

    def __init__(
        self,
        model: LungCADNet | EnsembleNet,
        config: Config,
        info: dict[str, Any],
        *,
        backend: str = "torch",
        onnx_path: str | Path | None = None,
        batch_size: int = 8,
        calibration: Calibration | None = None,
        lung_margin_mm: float = 10.0,
        crop_to_lungs: bool = False,
        aggregation_extent_mm: float = AGGREGATION_EXTENT_MM,
        study_threshold: StudyThreshold | None = None,
        channels_last: bool = True,
        device: str | torch.device = "cpu",
        tta: bool = False,
    ) -> None:
        if backend not in ("torch", "onnx"):
            raise InputError(f"backend must be 'torch' or 'onnx'; got {backend!r}", "--backend")
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1; got {batch_size}", "--batch-size")
        self.model = model.eval()
        self.config = config
        self.checkpoint_info = dict(info)
        self.backend = backend
        self.batch_size = int(batch_size)
        self.calibration = calibration
        self.lung_margin_mm = float(lung_margin_mm)
        self.crop_to_lungs = bool(crop_to_lungs)
        self.aggregation_extent_mm = float(aggregation_extent_mm)
        self.channels_last = bool(channels_last)
        self.tta = bool(tta)
        self.device = torch.device(device)
        self.image_size = int(config.model.image_size)
        if config.train.stage not in ("seg", "cls"):
            raise InputError(
                f"unknown training stage {config.train.stage!r} in the run's config",
                info.get("run_dir", "--checkpoint"),
            )
        #: A segmentation run's cancer head never learnt: it gives masks and no decision (the
        #: finding says "no classifier").
        self.classifier_trained = config.train.stage == "cls"
        #: A segmentation run's decoder is trained; a cls run's only when it was started from a
        #: segmentation run (init_from).
        self.decoder_trained = config.train.stage == "seg" or bool(config.train.init_from)
        #: What the decoder and the classifier learnt from (lungcad.training.domain): the
        #: decoder's model-pixel size sets the scale of segmentation; None: not recorded.
        self.seg_domain = InputDomain.from_dict(info.get("seg_input_domain"))
        self.cls_domain = InputDomain.from_dict(info.get("input_domain"))
        self.onnx_path = None if onnx_path is None else Path(onnx_path)
        self._session = None
        self._explainer: CamExplainer | None = None
        if backend == "onnx":
            from lungcad.inference.export import onnx_session

            if self.onnx_path is None:
                raise InputError("the ONNX backend needs onnx_path", "onnx_path")
            self._session = onnx_session(self.onnx_path, torch.get_num_threads())
        else:
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            # Module.to accepts memory_format at run time; torch's stubs do not list it.
            self.model = self.model.to(self.device, memory_format=layout)  # type: ignore[call-overload]
        self.threshold, self.threshold_source = self._threshold()
        if study_threshold is not None and not math.isclose(
            study_threshold.extent_mm, self.aggregation_extent_mm
        ):
            raise InputError(
                f"the study threshold was chosen for an aggregation over "
                f"{study_threshold.extent_mm:g} mm, not {self.aggregation_extent_mm:g} mm",
                STUDY_THRESHOLD_FILE,
            )
        #: The threshold of 3D studies' decisions (None: the slice threshold decides them).
        self.study_threshold = study_threshold

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(
        cls,
        run_dir: str | Path,
        device: str = "cpu",
        backend: str = "torch",
        batch_size: int = 8,
        *,
        num_threads: int | None = None,
        onnx_path: str | Path | None = None,
        **options: Any,
    ) -> Predictor:
        """Load a run folder (``best.pt``, ``threshold.json``, ``calibration.json``).

        Args:
            run_dir: run folder written by ``lungcad train`` (or a ``.pt`` file in it), or a
                cross-validation folder holding ``ensemble.json`` (the fold ensemble).
            device: torch device (``"cpu"``, ``"cuda"``).
            backend: ``"torch"`` or ``"onnx"``. For ONNX the model is exported once to
                ``RUN/model-<sha12>.onnx`` (unless ``onnx_path`` names an existing export).
            batch_size: slices per forward pass.
            num_threads: ``torch.set_num_threads`` (also ONNX Runtime's intra-op threads);
                None keeps the current setting.
            onnx_path: an exported ONNX file to use (or where to export it).
            **options: further :class:`Predictor` keyword arguments.

        Raises:
            MissingInputError, InputError: see ``checkpoint.load_checkpoint``; also when
                ``calibration.json`` belongs to another checkpoint.
        """
        if num_threads is not None:
            if num_threads < 1:
                raise InputError(f"threads must be >= 1; got {num_threads}", "--threads")
            torch.set_num_threads(int(num_threads))
        if is_ensemble(run_dir):
            if backend != "torch":
                raise InputError(
                    "a fold ensemble runs on the torch backend only; export one fold's run "
                    "for ONNX",
                    run_dir,
                )
            ensemble, config, info = load_ensemble(run_dir, map_location=device)
            # The ensemble's threshold was chosen on its pooled out-of-fold probabilities;
            # per-member calibrations do not apply to the averaged probability.
            options = _with_study_threshold(options, run_dir, info, None)
            return cls(ensemble, config, info, batch_size=batch_size, device=device, **options)
        model, config, info = load_checkpoint(run_dir, map_location=device)
        calibration = run_decision(info).calibration  # the threshold: see __init__
        if backend == "onnx":
            from lungcad.inference.export import ensure_onnx_export

            onnx_path = ensure_onnx_export(info, onnx_path)
        options = _with_study_threshold(options, run_dir, info, calibration)
        return cls(
            model,
            config,
            info,
            backend=backend,
            onnx_path=onnx_path,
            batch_size=batch_size,
            calibration=calibration,
            device=device,
            **options,
        )

    def decision_threshold(self, n_slices: int) -> tuple[float, str]:
        """The threshold that decides a study of ``n_slices`` slices, and where it comes from.

        A 3D study is decided with the study threshold when the run has one; a 2D image
        (one slice), whose probability is that slice's, with the slice threshold.
        """
        if self.study_threshold is not None and n_slices > 1:
            return self.study_threshold.threshold, STUDY_THRESHOLD_FILE
        return self.threshold, self.threshold_source

    def _threshold(self) -> tuple[float, str]:
        # The rule of calibration.run_decision, for the calibration this predictor was given.
        return decision_threshold(
            self.calibration, float(self.checkpoint_info.get("threshold", 0.5))
        )

    @property
    def info(self) -> dict[str, Any]:
        """Model and decision-rule description for reports and findings.json."""
        cfg, ck = self.config, self.checkpoint_info
        return {
            "model_name": cfg.model.name,
            "image_size": self.image_size,
            "lungcad_version": __version__,
            "trained_with": ck.get("versions", {}).get("lungcad"),
            "config_hash": config_hash(cfg),
            "checkpoint_sha256": ck.get("sha256"),
            "checkpoint_path": ck.get("path"),
            "epoch": ck.get("epoch"),
            "stage": ck.get("stage"),
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            # 3D studies are decided with this threshold (2D images with the one above).
            "study_threshold": (
                {
                    "value": self.threshold,
                    "source": self.threshold_source,
                    "level": "slice (no study_threshold.json: not chosen for studies)",
                }
                if self.study_threshold is None
                else {
                    "value": self.study_threshold.threshold,
                    "source": STUDY_THRESHOLD_FILE,
                    "level": "study",
                    "method": self.study_threshold.method,
                    "chosen_on": self.study_threshold.chosen_on.get("input"),
                    "n_studies": self.study_threshold.chosen_on.get("n_studies"),
                }
            ),
            "calibration": None
            if self.calibration is None
            else {
                "method": self.calibration.method,
                "temperature": self.calibration.temperature,
                "fitted_on": self.calibration.info.get("split"),
            },
            "backend": self.backend,
            "tta": "flip" if self.tta else None,
            "onnx_path": None if self.onnx_path is None else str(self.onnx_path),
            "preprocessing": (
                "HU: lung window (level -600, width 1500) to [0, 1]; 2D images: grey values "
                "as they are; whole axial slice"
                + (" cropped to the lungs" if self.crop_to_lungs else "")
                + f" fitted into {self.image_size}x{self.image_size} (aspect kept, zero-padded)"
            ),
            "aggregation": (
                f"mean of the top-k slice probabilities, k covering "
                f"{self.aggregation_extent_mm:g} mm along z"
            ),
            "intended_use": INTENDED_USE,
        }

    # ------------------------------------------------------------------ prediction

    def predict_path(
        self,
        path: str | Path,
        *,
        series_uid: str | None = None,
        progress: bool = False,
        cam: bool = True,
        cam_slices: int = 3,
    ) -> tuple[Volume, StudyResult]:
        """Read an image (``lungcad.io.read_image``) and predict on it.

        Args:
            path: DICOM series folder, NIfTI, MetaImage or 2D image file.
            series_uid: DICOM only: the series to read when the folder holds several.
            progress, cam, cam_slices: as for :meth:`predict_volume`.

        Returns:
            ``(volume, result)``: the canonical input Volume and its :class:`StudyResult`.
        """
        from lungcad.io import read_image

        start = time.perf_counter()
        volume = read_image(path, series_uid=series_uid)
        read_s = time.perf_counter() - start
        result = self.predict_volume(volume, progress=progress, cam=cam, cam_slices=cam_slices)
        result.timings["read_s"] = read_s
        result.timings["total_s"] += read_s
        return volume, result

    def predict_volume(
        self, volume: Volume, progress: bool = False, cam: bool = True, cam_slices: int = 3
    ) -> StudyResult:
        """Segment and classify every lung slice of a study.

        The input checks (:func:`lungcad.inference.input_checks.check_input`) run first: a
        study without lung is not shown to the model (finding "cannot assess"). A
        segmentation-only run gives masks and the finding "no classifier".

        Args:
            volume: a canonical Volume (HU, or windowed [0, 1] for 2D images).
            progress: show a tqdm bar over batches.
            cam: compute Grad-CAM heat maps for the ``cam_slices`` most suspicious slices.
            cam_slices: how many slices get a heat map.

        Returns:
            The :class:`StudyResult` on the volume's grid.

        Raises:
            InputError: malformed geometry or values (one line naming the file).
        """
        timings = dict.fromkeys(
            ("lung_mask_s", "preprocess_s", "inference_s", "postprocess_s", "lesions_s", "cam_s"),
            0.0,
        )
        start = clock = time.perf_counter()
        warnings = list(volume.meta.get("warnings", []))
        # Before any model: malformed input raises InputError; no lung gives "cannot assess".
        check = check_input(volume)
        timings["input_check_s"] = time.perf_counter() - clock
        warnings += check.warnings
        if not check.assessable:
            return self._not_assessed(volume, check, warnings, timings, start)
        clock = time.perf_counter()
        if not self.classifier_trained:
            warnings.append(NO_CLASSIFIER_REASON + ": tumour masks only, no cancer decision")
        if self.tta:
            warnings.append(
                "flip test-time augmentation: probabilities averaged with the mirrored "
                "slices; the decision thresholds were chosen without it"
            )
        if not self.decoder_trained:
            warnings.append(
                "this classification run was not started from a segmentation run, so its "
                "decoder is untrained: no tumour masks are given"
            )
        if not volume.meta.get("spacing_known", True):
            warnings.append(
                "pixel spacing unknown (2D image): 1 mm is assumed, so lesion "
                "sizes and volumes are in pixel units, not mm"
            )
        slices, box, lung_field = self.select_slices(volume, warnings, check)
        timings["lung_mask_s"] = time.perf_counter() - clock
        warnings += self.domain_warnings(volume)
        seg_spacing = self.segmentation_spacing(volume, warnings)
        scale = self.input_scale(volume, warnings)
        # At scale, the decoder sees the lung box (with its margin) in windows; else the
        # whole model input it classifies.
        seg_box = lung_field or (slice(0, volume.shape[1]), slice(0, volume.shape[2]))

        z_count = volume.shape[0]
        probability = np.zeros(volume.shape, dtype=np.float32)  # untouched pages cost no RAM
        logits = np.full(z_count, np.nan)
        crop_shape = (box[0].stop - box[0].start, box[1].stop - box[1].start)
        if seg_spacing is not None and self.input_at_decoder_scale(crop_shape, scale):
            # The classifier's input already shows the whole slice at the decoder's pixel
            # size: its decoder output is the at-scale segmentation, without a second pass.
            seg_spacing = None
        batches = [slices[i : i + self.batch_size] for i in range(0, len(slices), self.batch_size)]
        for batch in tqdm(batches, desc="slices", unit="batch", disable=not progress, leave=False):
            clock = time.perf_counter()
            inputs = self._inputs(volume, batch, box, scale)
            timings["preprocess_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            seg_logits, cls_logits = self.run_model(inputs)
            timings["inference_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            if self.decoder_trained and seg_spacing is not None:
                clock = time.perf_counter()
                seg = self._segment_at_scale(volume, batch, seg_box, seg_spacing)
                for z, prob in zip(batch, seg, strict=True):
                    probability[z, seg_box[0], seg_box[1]] = prob
                timings["inference_s"] += time.perf_counter() - clock
                clock = time.perf_counter()
            seg = probabilities(seg_logits[:, 0])
            for z, prob in zip(batch, seg, strict=True):
                if not self.decoder_trained or seg_spacing is not None:
                    # An untrained decoder's masks are noise: none are reported. At scale,
                    # the masks came from the sliding windows above.
                    break
                if prob.shape != crop_shape or scale is not None:  # undo the model input's fit
                    fit = model_input_box(crop_shape, prob.shape, scale)
                    prob = np.clip(fit.invert(prob), 0.0, 1.0)
                probability[z, box[0], box[1]] = prob
            logits[batch] = cls_logits
            timings["postprocess_s"] += time.perf_counter() - clock

        clock = time.perf_counter()
        slice_probs = np.full(z_count, np.nan)
        done = np.isfinite(logits)
        calibrate = self.calibration.apply if self.calibration else None
        slice_probs[done] = probabilities(logits[done], calibrate)
        finding, k, threshold_source = self._decide(slice_probs, volume)
        if not self.classifier_trained:
            slice_probs[:] = np.nan  # an untrained head's per-slice scores mean nothing
        tumour = probability >= MASK_THRESHOLD
        if lung_field is not None:
            # A lung tumour lies in the lung field: predictions outside the lung box (with
            # its margin) -- table, outside air, shoulders -- are not reported as lesions.
            # The probability map is left as the model gave it.
            outside = np.ones(tumour.shape[1:], dtype=bool)
            outside[lung_field] = False
            tumour[:, outside] = False
            region = self.lung_region(check, volume)
            if region is not None:
                # ... and within the box, in the lungs or within lung_margin_mm of them
                # (juxtapleural and hilar tumours); mediastinum, heart and chest wall not.
                tumour &= region
        mask = volume.with_array(tumour.astype(np.uint8), intensity="windowed")
        prob_volume = _share_geometry(volume, probability)
        timings["postprocess_s"] += time.perf_counter() - clock
        clock = time.perf_counter()
        lesions = find_lesions(
            mask, hu=volume if volume.intensity == "hu" else None, probability=prob_volume
        )
        timings["lesions_s"] = time.perf_counter() - clock

        cam_volume, top = None, []
        if cam and len(slices) and self.classifier_trained:  # where an untrained head looked: noise
            clock = time.perf_counter()
            order = np.argsort(-np.nan_to_num(slice_probs, nan=-1.0), kind="stable")
            top = sorted(int(z) for z in order[: min(cam_slices, len(slices))])
            cam_volume = self._cam(volume, top, box, scale)
            timings["cam_s"] = time.perf_counter() - clock
        timings["total_s"] = time.perf_counter() - start
        return StudyResult(
            mask=mask,
            probability=prob_volume,
            slice_probabilities=slice_probs,
            finding=finding,
            lesions=lesions,
            lung_slices=np.asarray(slices, dtype=np.int64),
            cam=cam_volume,
            cam_slices=top,
            crop_box=box,
            aggregation={
                "method": "mean of top-k slice probabilities",
                "k": k,
                "extent_mm": self.aggregation_extent_mm,
                "threshold_source": threshold_source,
            },
            model_info=self.info,
            timings=timings,
            warnings=warnings,
            input_check=check,
        )

    def _decide(
        self, slice_probs: np.ndarray, volume: Volume
    ) -> tuple[StudyFinding, int, str | None]:
        """The finding from the slice probabilities ``(z,)``: ``(finding, k, threshold
        source)``; no decision without a trained classifier."""
        if not self.classifier_trained:
            return StudyFinding.not_assessed(NO_CLASSIFIER, NO_CLASSIFIER_REASON), 0, None
        study_probability, k = aggregate_study(
            slice_probs, volume.spacing[0], self.aggregation_extent_mm
        )
        threshold, threshold_source = self.decision_threshold(volume.shape[0])
        return StudyFinding.decide(study_probability, threshold), k, threshold_source

    def _not_assessed(
        self,
        volume: Volume,
        check: InputCheck,
        warnings: list[str],
        timings: dict[str, float],
        start: float,
    ) -> StudyResult:
        """The result of a study the input checks refused to assess: no mask, no probability."""
        assert check.reason is not None
        empty = np.zeros(volume.shape, dtype=np.float32)
        timings["total_s"] = time.perf_counter() - start
        return StudyResult(
            mask=volume.with_array(empty.astype(np.uint8), intensity="windowed"),
            probability=_share_geometry(volume, empty),
            slice_probabilities=np.full(volume.shape[0], np.nan),
            finding=StudyFinding.not_assessed(CANNOT_ASSESS, check.reason),
            lesions=[],
            lung_slices=np.zeros(0, dtype=np.int64),
            aggregation={"method": "none: the study was not assessed", "k": 0},
            model_info=self.info,
            timings=timings,
            warnings=warnings,
            input_check=check,
        )

    def preprocess(
        self, volume: Volume, slices: list[int] | np.ndarray, box: tuple[slice, slice] | None = None
    ) -> np.ndarray:
        """Model inputs ``(N, 1, S, S)`` float32 for the given slices of a volume.

        Args:
            volume: canonical Volume (HU or windowed).
            slices: z indices.
            box: in-plane ``(y, x)`` crop; None for the whole slice.
        """
        if box is None:
            box = (slice(0, volume.shape[1]), slice(0, volume.shape[2]))
        return self._inputs(volume, list(slices), box, self.input_scale(volume, []))

    def input_at_decoder_scale(self, crop_shape: tuple[int, int], scale: float | None) -> bool:
        """Whether the classifier input (``scale``, see :meth:`input_scale`) of a
        ``crop_shape`` slice is at the decoder's pixel size (within 1%) and holds all of the
        slice, so that one forward pass gives both the cancer logit and the mask."""
        if scale is None or self.cls_domain is None or self.seg_domain is None:
            return False
        seg_pixel, cls_pixel = self.seg_domain.model_pixel_mm, self.cls_domain.model_pixel_mm
        if seg_pixel is None or cls_pixel is None or abs(seg_pixel / cls_pixel - 1.0) > 0.01:
            return False
        box = model_input_box(crop_shape, self.image_size, scale)
        return box.offset[0] >= 0 and box.offset[1] >= 0

    def input_scale(self, volume: Volume, warnings: list[str]) -> float | None:
        """Slice spacing over the classifier input's pixel size when the run was trained on
        slices resampled to one pixel size (``data.slice_pixel_mm``); None: letterboxed.
        A 2D image without a spacing is taken to span :func:`assumed_field_of_view`."""
        domain = self.cls_domain
        if domain is None or not domain.resampled or domain.model_pixel_mm is None:
            return None
        if not volume.meta.get("spacing_known", True):
            fov = assumed_field_of_view(domain, warnings, "classified")
            return fov / float(max(volume.shape[1:])) / domain.model_pixel_mm
        return pixel_scale(volume.spacing[1:], domain.model_pixel_mm)

    def _inputs(
        self,
        volume: Volume,
        batch: list[int],
        box: tuple[slice, slice],
        scale: float | None = None,
    ) -> np.ndarray:
        slab = Volume(
            array=volume.array[batch][:, box[0], box[1]],
            spacing=volume.spacing,
            intensity=volume.intensity,
        )
        unit = to_unit_range(slab)
        return np.stack([slice_to_model_input(u, self.image_size, scale) for u in unit])[:, None]

    def run_model(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass on the configured backend (two with ``tta``, averaged).

        Args:
            inputs: ``(B, 1, S, S)`` float32 model inputs (see :meth:`preprocess`).

        Returns:
            ``(seg_logits (B, 1, S, S), cls_logits (B,))`` as float32 numpy arrays.
        """
        seg, cls = self._forward(inputs)
        if not self.tta:
            return seg, cls
        seg_m, cls_m = self._forward(np.ascontiguousarray(inputs[..., ::-1]))
        views = [
            {"seg_logits": torch.from_numpy(seg), "cls_logits": torch.from_numpy(cls)},
            {
                "seg_logits": torch.from_numpy(np.ascontiguousarray(seg_m[..., ::-1])),
                "cls_logits": torch.from_numpy(cls_m),
            },
        ]
        mean = mean_probability_logits(views)
        return mean["seg_logits"].numpy(), mean["cls_logits"].numpy()

    def _forward(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass on the configured backend, without test-time augmentation."""
        if self._session is not None:
            from lungcad.inference.export import run_onnx

            return run_onnx(self._session, inputs)
        layout = torch.channels_last if self.channels_last else None
        x = torch.from_numpy(np.ascontiguousarray(inputs))
        logits = forward_logits(self.model, x, self.device, memory_format=layout)
        return logits.seg.cpu().numpy(), logits.cls.cpu().numpy()

    def select_slices(
        self,
        volume: Volume,
        warnings: list[str] | None = None,
        check: InputCheck | None = None,
    ) -> tuple[list[int], tuple[slice, slice], tuple[slice, slice] | None]:
        """The slices to evaluate, the in-plane box fed to the model, and the lung field.

        Args:
            volume: canonical Volume.
            warnings: a list to append a note to when no lung is found.
            check: the input checks' result for ``volume``: its coarse lung mask is reused
                when it was made at the same subsampling (saves a second lung mask).

        Returns:
            ``(slices, (y, x), field)``: z indices with lung (within ``lung_margin_mm``; all
            slices when the lung mask is empty; slice 0 of a one-slice image without a mask);
            the whole slice, or the lung box with its margin when ``crop_to_lungs``; and the
            in-plane lung box with its margin (None when no lung mask was made or found).
        """
        warnings = [] if warnings is None else warnings
        z_count, height, width = volume.shape
        full = (slice(0, height), slice(0, width))
        if z_count == 1 and not self.crop_to_lungs:
            return [0], full, None  # one slice: nothing to skip
        factor = 1
        if volume.intensity == "hu":
            factor = max(1, int(LUNG_MASK_PIXEL_MM / min(volume.spacing[1:])))
        small = Volume(
            array=volume.array[:, ::factor, ::factor],
            spacing=(volume.spacing[0], volume.spacing[1] * factor, volume.spacing[2] * factor),
            intensity=volume.intensity,
        )
        given = None if check is None else check.lungs
        reusable = (
            given is not None
            and check is not None
            and check.lung_mask_step == factor
            and given.shape == small.shape
        )
        lungs = given if reusable and given is not None else lung_mask(small)
        if not lungs.any():
            warnings.append("no lung found by the lung mask; every slice was evaluated")
            return list(range(z_count)), full, None
        has_lung = lungs.any(axis=(1, 2))
        margin = int(math.ceil(self.lung_margin_mm / volume.spacing[0] - 1e-9))
        if margin > 0:
            has_lung = ndi.binary_dilation(has_lung, iterations=margin)
        slices = np.flatnonzero(has_lung).tolist()
        box = lung_bbox(lungs, small.spacing, self.lung_margin_mm)
        lung_field = (
            slice(box[1].start * factor, min(box[1].stop * factor, height)),
            slice(box[2].start * factor, min(box[2].stop * factor, width)),
        )
        return slices, (lung_field if self.crop_to_lungs else full), lung_field

    def lung_region(self, check: InputCheck, volume: Volume) -> np.ndarray | None:
        """Where a reported tumour may lie: ``(z, y, x)`` bool, the input checks' coarse lung
        mask with its holes filled (tumours inside the lung), dilated in plane by
        ``lung_margin_mm`` and brought to the volume's grid; None without a usable mask."""
        lungs = check.lungs
        step = check.lung_mask_step
        z_count, height, width = volume.shape
        expected = (z_count, -(-height // step), -(-width // step))
        if lungs is None or lungs.shape != expected or not lungs.any():
            return None
        pixel_mm = min(volume.spacing[1:]) * step
        radius = int(math.ceil(self.lung_margin_mm / pixel_mm - 1e-9))
        disc = ndi.generate_binary_structure(2, 1)
        region = np.zeros(lungs.shape, dtype=bool)
        for z in range(z_count):
            if lungs[z].any():
                filled = ndi.binary_fill_holes(lungs[z])
                region[z] = ndi.binary_dilation(filled, disc, iterations=max(radius, 1))
        # Nearest-neighbour upsampling back to the full in-plane grid.
        full = np.repeat(np.repeat(region, step, axis=1), step, axis=2)
        return full[:, :height, :width]

    def domain_warnings(self, volume: Volume) -> list[str]:
        """What the reader should know about mapping this input into the trained domain.

        HU are mapped through the lung window the run recorded (or the lung window for runs
        trained on display images, whose own window is unknown: an assumption, said so); a
        pre-windowed image given to a model trained on HU is taken as lung-window grey values.
        One line per mismatch, naming the parts (classifier, segmentation) it concerns.
        """
        display, hu = [], []
        for part, domain in (("classifier", self.cls_domain), ("segmentation", self.seg_domain)):
            if domain is None or (part == "segmentation" and not self.decoder_trained):
                continue
            if volume.intensity == "hu" and domain.intensity == DISPLAY:
                display.append(part)
            elif volume.intensity != "hu" and domain.intensity == HU:
                hu.append(part)
        notes = []
        if display:
            notes.append(
                f"{' and '.join(display)} trained on display-windowed images: HU mapped "
                "through the lung window (-600/1500), which may not be theirs"
            )
        if hu:
            notes.append(
                f"{' and '.join(hu)} trained on CT in HU: this windowed image's grey values "
                "were taken as lung-window values"
            )
        return notes

    def segmentation_spacing(
        self, volume: Volume, warnings: list[str]
    ) -> tuple[float, float] | None:
        """The in-plane spacing (mm) at which to resample ``volume`` for the decoder, or None
        to segment the whole model input as it is (the decoder's scale or the image's spacing
        is unknown; a warning says so)."""
        if not self.decoder_trained:
            return None
        pixel = None if self.seg_domain is None else self.seg_domain.model_pixel_mm
        if pixel is None:
            warnings.append(
                "the segmentation model's pixel size was not recorded (trained on images "
                "without a pixel spacing): slices were segmented whole, at the model input "
                "size, which may not be the scale it learnt"
            )
            return None
        if not volume.meta.get("spacing_known", True):
            assert self.seg_domain is not None  # pixel is not None
            fov = assumed_field_of_view(self.seg_domain, warnings, "segmented")
            return (fov / float(max(volume.shape[1:])),) * 2
        return (float(volume.spacing[1]), float(volume.spacing[2]))

    def _segment_at_scale(
        self,
        volume: Volume,
        batch: list[int],
        box: tuple[slice, slice],
        spacing_yx: tuple[float, float],
    ) -> np.ndarray:
        """Tumour probabilities ``(B, h, w)`` of ``box`` on the slices ``batch``."""
        assert self.seg_domain is not None and self.seg_domain.model_pixel_mm is not None
        slab = Volume(
            array=volume.array[batch][:, box[0], box[1]],
            spacing=volume.spacing,
            intensity=volume.intensity,
        )

        def predict(windows: torch.Tensor) -> torch.Tensor:
            seg_logits, _ = self.run_model(windows.numpy())
            return torch.from_numpy(probabilities(seg_logits))

        window = self.seg_domain.image_size or self.image_size
        return segment_at_scale(
            to_unit_range(slab).astype(np.float32),
            spacing_yx,
            self.seg_domain.model_pixel_mm,
            window,
            predict,
            windows_per_batch=max(self.batch_size, 16),
        )

    def _cam(
        self,
        volume: Volume,
        slices: list[int],
        box: tuple[slice, slice],
        scale: float | None = None,
    ) -> Volume:
        from lungcad.inference.explain import CamExplainer

        if self._explainer is None:
            # A CAM of an averaged output is not defined: an ensemble explains its first fold.
            net = self.model.first if isinstance(self.model, EnsembleNet) else self.model
            self._explainer = CamExplainer(net)
        heat = self._explainer(self._inputs(volume, slices, box, scale))
        crop_shape = (box[0].stop - box[0].start, box[1].stop - box[1].start)
        cam = np.zeros(volume.shape, dtype=np.float32)
        for z, h in zip(slices, heat, strict=True):
            if h.shape != crop_shape or scale is not None:
                h = np.clip(model_input_box(crop_shape, h.shape, scale).invert(h), 0.0, 1.0)
            cam[z, box[0], box[1]] = h
        return _share_geometry(volume, cam)


def _share_geometry(volume: Volume, array: np.ndarray) -> Volume:
    """A float Volume with ``volume``'s geometry and metadata, marked windowed ([0, 1])."""
    return Volume(
        array=array,
        spacing=volume.spacing,
        origin=volume.origin,
        direction=volume.direction.copy(),
        intensity="windowed",
        meta=copy.deepcopy(volume.meta),
    )


def _with_study_threshold(
    options: dict[str, Any],
    checkpoint: str | Path,
    info: dict[str, Any],
    calibration: Calibration | None,
) -> dict[str, Any]:
    """``options`` with the model folder's checked ``study_threshold.json`` (unless given)."""
    if "study_threshold" in options:  # given by the caller (None: decide with slices)
        return options
    extent = float(options.get("aggregation_extent_mm", AGGREGATION_EXTENT_MM))
    found = load_study_threshold(model_folder(checkpoint), info, calibration, extent)
    return {**options, "study_threshold": found}
