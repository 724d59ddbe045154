"""Handcrafted and radiomic features of 2D CT slices, for the traditional-ML baselines.

Images are lung-windowed slices, float ``(H, W)`` in [0, 1] (as in a lungcad manifest); a
region of interest (ROI) restricts the features to the lungs (``preprocessing.lung_mask``), to
a tumour mask, or to the whole slice.

Two families:

* ``handcrafted`` (prefix ``hc_``): intensity statistics and percentiles, histogram entropy,
  the fraction of high-density pixels in the ROI, GLCM contrast / homogeneity / energy /
  correlation / dissimilarity (``skimage.feature.graycomatrix``, averaged over four angles)
  and a uniform LBP histogram (``skimage.feature.local_binary_pattern``).
* ``radiomics`` (prefix ``rad_``): pyradiomics, the field's reference implementation, with
  ``force2D``: first order, shape2D, GLCM, GLRLM, GLSZM, GLDM and NGTDM on the original image,
  grey levels binned with a fixed bin width of 1/32 of the window.

Do not use the tumour mask as ROI for a cancer/no-cancer classifier: whether a mask is empty is
the label itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from scipy import stats
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

from lungcad import __version__
from lungcad.data.lung_mask import lung_mask
from lungcad.data.preprocessing import LUNG_WINDOW
from lungcad.errors import InputError
from lungcad.io.images import load_slice_array
from lungcad.validation.baselines.choices import FEATURE_KINDS, ROI_KINDS
from lungcad.volume import Volume

log = logging.getLogger(__name__)

#: Smallest ROI (pixels) the texture features are computed on.
MIN_ROI_PIXELS = 16
#: Pixels denser than this (HU) count as "high density" in the lungs: above ground-glass
#: level, i.e. vessels, consolidation, nodules.
HIGH_DENSITY_HU = -400.0
HIST_BINS = 32
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 3)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation", "dissimilarity")
LBP_POINTS, LBP_RADIUS = 8, 1
PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
RADIOMICS_CLASSES = ("firstorder", "shape2D", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
RADIOMICS_BIN_WIDTH = 1.0 / 32.0
#: Bump when the features change, so cached tables are recomputed.
FEATURES_VERSION = 1


def _high_density_level() -> float:
    """HIGH_DENSITY_HU on the [0, 1] lung-window scale the images use."""
    level, width = LUNG_WINDOW
    return (HIGH_DENSITY_HU - (level - width / 2.0)) / width


def _check_inputs(image: np.ndarray, roi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image, dtype=np.float64)
    roi = np.asarray(roi)
    if image.ndim != 2:
        raise InputError(f"features need a 2D (H, W) slice; got shape {image.shape}")
    if roi.shape != image.shape:
        raise InputError(f"ROI mask shape {roi.shape} differs from the image's {image.shape}")
    if not np.all(np.isfinite(image)) or image.min() < -1e-6 or image.max() > 1 + 1e-6:
        raise InputError(
            "features expect a lung-windowed image in [0, 1]; got values outside it (HU data? "
            "window it first with lungcad.data.preprocessing.window_hu)"
        )
    roi = roi.astype(bool)
    if np.count_nonzero(roi) < MIN_ROI_PIXELS:
        raise InputError(
            f"ROI has {np.count_nonzero(roi)} pixels; features need at least {MIN_ROI_PIXELS}. "
            "Use a larger ROI (roi='whole' for the full slice)."
        )
    return np.clip(image, 0.0, 1.0), roi


def _crop_to_roi(image: np.ndarray, roi: np.ndarray, margin: int = 2):
    """Image and ROI cropped to the ROI's bounding box plus ``margin`` pixels (for speed)."""
    rows, cols = np.flatnonzero(roi.any(axis=1)), np.flatnonzero(roi.any(axis=0))
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, roi.shape[0])
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, roi.shape[1])
    return image[r0:r1, c0:c1], roi[r0:r1, c0:c1]


def _glcm_features(image: np.ndarray, roi: np.ndarray) -> dict[str, float]:
    # Grey levels 1..GLCM_LEVELS inside the ROI and 0 outside; dropping row/column 0 of the
    # co-occurrence matrix keeps only pairs with both pixels inside the ROI (graycomatrix has
    # no mask argument).
    levels = np.clip((image * GLCM_LEVELS).astype(np.int64), 0, GLCM_LEVELS - 1) + 1
    levels[~roi] = 0
    counts = graycomatrix(
        levels.astype(np.uint8),
        distances=list(GLCM_DISTANCES),
        angles=list(GLCM_ANGLES),
        levels=GLCM_LEVELS + 1,
        symmetric=True,
        normed=False,
    )[1:, 1:].astype(np.float64)
    out: dict[str, float] = {}
    for d_index, distance in enumerate(GLCM_DISTANCES):
        per_angle = counts[:, :, d_index : d_index + 1, :]
        usable = per_angle.sum(axis=(0, 1))[0] > 0
        for prop in GLCM_PROPS:
            if not usable.any():  # ROI too thin for pairs at this distance
                out[f"hc_glcm_{prop}_d{distance}"] = float("nan")
                continue
            values = graycoprops(per_angle[:, :, :, usable], prop)
            out[f"hc_glcm_{prop}_d{distance}"] = float(values.mean())
    return out


def _lbp_features(image: np.ndarray, roi: np.ndarray) -> dict[str, float]:
    # LBP compares neighbours' grey values; on 8-bit integers ties are well defined (skimage
    # warns on float input).
    codes = local_binary_pattern(
        np.round(image * 255).astype(np.uint8), P=LBP_POINTS, R=LBP_RADIUS, method="uniform"
    )
    n_codes = LBP_POINTS + 2  # uniform patterns 0..P plus one "non-uniform" bin
    hist = np.bincount(codes[roi].astype(np.int64), minlength=n_codes)[:n_codes]
    hist = hist / hist.sum()
    return {f"hc_lbp_{i:02d}": float(v) for i, v in enumerate(hist)}


def handcrafted_features(image: np.ndarray, roi: np.ndarray) -> dict[str, float]:
    """Intensity, histogram, GLCM and LBP features of the ROI.

    Args:
        image: ``(H, W)`` lung-windowed slice in [0, 1].
        roi: ``(H, W)`` bool/0-1 region of interest (at least :data:`MIN_ROI_PIXELS` pixels).

    Returns:
        ``{name: value}`` with names prefixed ``hc_``; the same names for every input.
    """
    image, roi = _check_inputs(image, roi)
    values = image[roi]
    std = float(values.std())
    hist = np.histogram(values, bins=HIST_BINS, range=(0.0, 1.0))[0]
    pct = np.percentile(values, PERCENTILES)
    flat = std < 1e-9  # skewness/kurtosis of a constant are 0/0; call them 0 (no tails)
    out = {
        "hc_mean": float(values.mean()),
        "hc_std": std,
        "hc_min": float(values.min()),
        "hc_max": float(values.max()),
        "hc_skewness": 0.0 if flat else float(stats.skew(values)),
        "hc_kurtosis": 0.0 if flat else float(stats.kurtosis(values)),
        **{f"hc_p{p:02d}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)},
        "hc_iqr": float(pct[PERCENTILES.index(75)] - pct[PERCENTILES.index(25)]),
        "hc_entropy": float(stats.entropy(hist / hist.sum(), base=2)),
        "hc_high_density_fraction": float(np.mean(values >= _high_density_level())),
        "hc_roi_fraction": float(roi.mean()),
    }
    cropped, cropped_roi = _crop_to_roi(image, roi)
    out.update(_glcm_features(cropped, cropped_roi))
    out.update(_lbp_features(cropped, cropped_roi))
    return out


@functools.lru_cache(maxsize=1)
def _radiomics_extractor() -> Any:
    try:
        from radiomics import featureextractor, getFeatureClasses
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError(
            "radiomics features need pyradiomics: pip install versioneer && pip install "
            "--no-build-isolation pyradiomics (or use --features handcrafted)"
        ) from exc
    extractor = featureextractor.RadiomicsFeatureExtractor(
        force2D=True,
        force2Ddimension=0,
        binWidth=RADIOMICS_BIN_WIDTH,
        label=1,
        additionalInfo=False,
    )
    extractor.disableAllFeatures()
    classes = getFeatureClasses()
    for name in RADIOMICS_CLASSES:
        # Deprecated features are skipped, and GLCM SumAverage too: with a symmetric GLCM it
        # is exactly 2 * JointAverage, and pyradiomics logs a warning for it on every slice.
        names = [
            feature
            for feature, deprecated in classes[name].getFeatureNames().items()
            if not deprecated and not (name == "glcm" and feature == "SumAverage")
        ]
        extractor.enableFeaturesByName(**{name: names})
    return extractor


def radiomics_features(
    image: np.ndarray, roi: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)
) -> dict[str, float]:
    """pyradiomics features (2D) of the ROI.

    Args:
        image: ``(H, W)`` lung-windowed slice in [0, 1].
        roi: ``(H, W)`` region of interest (at least :data:`MIN_ROI_PIXELS` pixels).
        spacing: ``(row, column)`` pixel size in mm; shape features are in mm (pixels when
            the spacing is 1).

    Returns:
        ``{name: value}`` with names like ``rad_glcm_Contrast`` (the ``original_`` image-type
        prefix dropped).
    """
    import SimpleITK as sitk

    image, roi = _check_inputs(image, roi)
    spacing_y, spacing_x = (float(s) for s in spacing)
    cropped, cropped_roi = _crop_to_roi(image, roi)
    # pyradiomics rejects a mask without background ("no labels found"), e.g. roi="whole";
    # a 1-pixel background border fixes that and changes no feature (all are ROI-only).
    cropped = np.pad(cropped, 1, mode="edge")
    cropped_roi = np.pad(cropped_roi, 1, mode="constant", constant_values=False)
    sitk_image = sitk.GetImageFromArray(cropped[None].astype(np.float32))
    sitk_mask = sitk.GetImageFromArray(cropped_roi[None].astype(np.uint8))
    for item in (sitk_image, sitk_mask):
        item.SetSpacing((spacing_x, spacing_y, 1.0))
    result = _radiomics_extractor().execute(sitk_image, sitk_mask)
    return {
        "rad_" + key.removeprefix("original_"): float(value)
        for key, value in result.items()
        if not key.startswith("diagnostics_")
    }


def extract_features(
    image2d: np.ndarray,
    roi_mask2d: np.ndarray,
    kind: str = "handcrafted",
    spacing: Sequence[float] = (1.0, 1.0),
) -> dict[str, float]:
    """Features of one slice inside a ROI.

    Args:
        image2d: ``(H, W)`` lung-windowed slice in [0, 1].
        roi_mask2d: ``(H, W)`` bool/0-1 ROI.
        kind: ``"handcrafted"``, ``"radiomics"`` or ``"both"``.
        spacing: ``(row, column)`` pixel size in mm (used by radiomics shape features).

    Returns:
        ``{name: value}``; deterministic, same names for every slice of a kind. Values may be
        NaN where a feature is undefined (e.g. a ROI too thin for a texture distance).
    """
    if kind not in FEATURE_KINDS:
        raise InputError(f"feature kind must be one of {FEATURE_KINDS}; got {kind!r}")
    out: dict[str, float] = {}
    if kind in ("handcrafted", "both"):
        out.update(handcrafted_features(image2d, roi_mask2d))
    if kind in ("radiomics", "both"):
        out.update(radiomics_features(image2d, roi_mask2d, spacing))
    return out


def slice_roi(
    image2d: np.ndarray,
    roi: str,
    mask2d: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0),
) -> tuple[np.ndarray, bool]:
    """The ROI of one slice.

    Args:
        image2d: ``(H, W)`` lung-windowed slice in [0, 1].
        roi: ``"lung"`` (``preprocessing.lung_mask``), ``"mask"`` (the given tumour mask) or
            ``"whole"`` (every pixel).
        mask2d: ``(H, W)`` tumour mask, needed for ``roi="mask"``.
        spacing: ``(row, column)`` pixel size in mm.

    Returns:
        ``(roi (H, W) bool, fell_back)``; ``fell_back`` is True when the lung mask had fewer
        than :data:`MIN_ROI_PIXELS` pixels (e.g. a small patch inside the lung, where the
        lung segmentation finds no lung boundary) and the whole slice was used instead.
    """
    if roi not in ROI_KINDS:
        raise InputError(f"roi must be one of {ROI_KINDS}; got {roi!r}")
    if roi == "whole":
        return np.ones(image2d.shape, dtype=bool), False
    if roi == "mask":
        if mask2d is None:
            raise InputError(
                "roi='mask' needs a tumour mask for every slice; this slice has "
                "none (use roi='lung' or roi='whole')"
            )
        return np.asarray(mask2d) > 0, False
    row_mm, column_mm = spacing
    volume = Volume(
        array=np.asarray(image2d, dtype=np.float32)[None],
        spacing=(1.0, float(row_mm), float(column_mm)),
        intensity="windowed",
    )
    lungs = np.asarray(lung_mask(volume))[0].astype(bool)
    if np.count_nonzero(lungs) < MIN_ROI_PIXELS:
        return np.ones(image2d.shape, dtype=bool), True
    return lungs, False


def _record_features(
    image: np.ndarray,
    mask: np.ndarray | None,
    kind: str,
    roi: str,
    spacing: tuple[float, float],
    version: str,
) -> tuple[dict[str, float], bool]:
    """Features of one slice (ROI included); cached by joblib on all arguments' contents."""
    del version  # only part of the cache key
    roi_mask, fell_back = slice_roi(image, roi, mask, spacing)
    return extract_features(image, roi_mask, kind, spacing), fell_back


def feature_table(
    records: Sequence[Any],
    root: str | Path,
    kind: str = "handcrafted",
    roi: str = "lung",
    cache_dir: str | Path | None = None,
    n_jobs: int = 1,
) -> tuple[np.ndarray, list[str]]:
    """The feature matrix of manifest records.

    Args:
        records: :class:`lungcad.data.manifest.SliceRecord` rows (or objects with the same
            attributes: ``sample_id, image_path, mask_path, spacing_y, spacing_x``).
        root: folder the records' paths are relative to (the manifest's folder).
        kind: ``"handcrafted"``, ``"radiomics"`` or ``"both"``.
        roi: ``"lung"``, ``"mask"`` or ``"whole"`` (see :func:`slice_roi`).
        cache_dir: folder for joblib's on-disk cache; each slice's features are keyed by a
            hash of its image and mask contents, spacing, settings, code and lungcad version,
            so repeated runs do not recompute them. None disables caching.
        n_jobs: parallel worker processes (joblib).

    Returns:
        ``(X, names)``: ``X`` float64 ``(N, F)`` in record order (NaN where a feature is
        undefined), ``names`` the ``F`` feature names. Unknown spacing (NaN) is taken as
        1 mm, i.e. shape features in pixels.
    """
    if kind not in FEATURE_KINDS:
        raise InputError(f"feature kind must be one of {FEATURE_KINDS}; got {kind!r}")
    if roi not in ROI_KINDS:
        raise InputError(f"roi must be one of {ROI_KINDS}; got {roi!r}")
    if not records:
        raise InputError("no slices to compute features for (empty record list)")
    root = Path(root)
    compute = _record_features
    if cache_dir is not None:
        compute = joblib.Memory(Path(cache_dir), verbose=0).cache(_record_features)

    def job(record: Any) -> tuple[dict[str, float], bool]:
        if roi == "mask" and not record.mask_path:
            raise InputError(
                f"sample {record.sample_id!r} has no tumour mask but roi='mask' "
                "was asked for; use roi='lung' or 'whole'",
                root,
            )
        image = load_slice_array(root / record.image_path, record.sample_id, "image")
        mask = (
            load_slice_array(root / record.mask_path, record.sample_id, "mask")
            if roi == "mask" and record.mask_path
            else None
        )
        # Unknown spacings (2D sets) count as 1 mm, so features stay in pixel units there.
        row_mm, column_mm = (
            float(s) if np.isfinite(s) and s > 0 else 1.0
            for s in (record.spacing_y, record.spacing_x)
        )
        version = f"{__version__}/{FEATURES_VERSION}"
        return compute(image.astype(np.float32), mask, kind, roi, (row_mm, column_mm), version)

    results = joblib.Parallel(n_jobs=n_jobs)(joblib.delayed(job)(r) for r in records)
    names = list(results[0][0])
    rows = []
    for record, (features, _) in zip(records, results, strict=True):
        if list(features) != names:
            raise InputError(
                f"sample {record.sample_id!r} gave different feature names than "
                "the first slice; this is a bug, please report it"
            )
        rows.append([features[name] for name in names])
    fallbacks = sum(fell_back for _, fell_back in results)
    if fallbacks:
        log.warning(
            "%d of %d slices had no usable lung mask; their features use the whole slice",
            fallbacks,
            len(records),
        )
    return np.asarray(rows, dtype=np.float64), names
