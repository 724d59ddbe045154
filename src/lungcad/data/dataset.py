"""The model input and the torch Dataset built from a manifest, and the class-balanced sampler.

:func:`slice_to_model_input` is the one transform from a windowed slice to what the network
sees; training, evaluation, calibration and inference all use it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from lungcad.data.manifest import SliceRecord
from lungcad.data.patches import PatchSampling
from lungcad.data.preprocessing import Letterbox
from lungcad.errors import InputError
from lungcad.io.images import load_slice_array


def class_balanced_sampler(
    records: Sequence[SliceRecord],
    num_samples: int | None = None,
    seed: int | None = None,
) -> WeightedRandomSampler:
    """A sampler that draws labels 0 and 1 equally often (with replacement).

    Each labelled record is weighted ``known_share / (n_labels * count(label))``, so with a
    1:4 class imbalance an epoch still sees both labels about equally often; records of
    unknown label (-1) keep weight ``1 / n`` (their natural share of the epoch).

    Args:
        records: the training records, in the order of the Dataset built from them.
        num_samples: draws per epoch (default ``len(records)``).
        seed: seed of the sampler's own generator (None: torch's global RNG).
    """
    if not records:
        raise InputError("cannot build a sampler from no records", "records")
    counts = Counter(r.label for r in records if r.label in (0, 1))
    n = len(records)
    known_share = sum(counts.values()) / n
    # Labels 0 and 1 share the known records' part of the epoch equally; records of unknown
    # label (-1: e.g. slices whose tumour is too small to call) keep their natural share
    # rather than being over-drawn as a third "class".
    weights = torch.tensor(
        [
            known_share / (len(counts) * counts[r.label]) if r.label in counts else 1.0 / n
            for r in records
        ],
        dtype=torch.double,
    )
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(
        weights,  # type: ignore[arg-type]  # torch's own docs pass a tensor; the stub says Sequence
        num_samples=num_samples or len(records),
        replacement=True,
        generator=generator,
    )


def pixel_scale(spacing_yx: Sequence[float], pixel_mm: float) -> float:
    """The resampling factor of a slice with ``spacing_yx`` (mm) for a model trained at
    ``pixel_mm`` mm per pixel; square pixels are assumed, at the larger spacing."""
    return max(float(spacing_yx[0]), float(spacing_yx[1])) / float(pixel_mm)


def model_input_box(
    slice_shape: Sequence[int],
    image_size: int | tuple[int, int],
    scale: float | None = None,
) -> Letterbox:
    """Where a ``slice_shape`` slice sits in the model input: letterboxed (``scale`` None) or
    at one physical scale (``scale`` = slice spacing mm / model pixel mm, centred, padded or
    cropped). Map model outputs back with its ``invert``."""
    shape = (
        (int(image_size), int(image_size))
        if isinstance(image_size, int | np.integer)
        else (int(image_size[0]), int(image_size[1]))
    )
    if scale is None:
        return Letterbox.fit(slice_shape, shape)
    return Letterbox.at_scale(slice_shape, shape, scale)


def slice_to_model_input(
    unit_slice: np.ndarray,
    image_size: int | tuple[int, int] | None,
    scale: float | None = None,
) -> np.ndarray:
    """One windowed slice as the network sees it: the single model-input transform.

    Used by :class:`SliceDataset` (training, validation, evaluation, calibration) and by
    whole-study inference (``lungcad.inference.predictor``), so what the network is fed at
    prediction time is bit-identical to what it was trained on: the aspect ratio is kept
    (:class:`~lungcad.data.preprocessing.Letterbox`: one scale factor, bilinear with
    anti-aliasing when shrinking, zero padding to the target shape; never squashed, since a
    shape that differs by class is a shortcut), then values are clipped to [0, 1] (the resize
    and augmentations never leave the range; stored values outside it are clipped). With a
    ``scale`` the slice is resampled by that factor instead of fitted, so each model pixel is
    the same number of mm in every image (``data.slice_pixel_mm``). Map model outputs back
    with ``model_input_box(slice_shape, image_size, scale).invert(output)``.

    Args:
        unit_slice: ``(H, W)`` lung-windowed slice, nominally in [0, 1] (a prepared slice, or
            ``preprocessing.to_unit_range(volume)[z]``).
        image_size: side S of a square model input, ``(H', W')``, or None to keep the size.
        scale: slice pixel spacing (mm) / model pixel size (mm); None: letterbox.

    Returns:
        ``(S, S)`` (or ``(H', W')``, or ``(H, W)``) float32 in [0, 1].
    """
    image = np.asarray(unit_slice, dtype=np.float32)
    if image_size is not None:
        box = model_input_box(image.shape, image_size, scale)
        if scale is not None or image.shape != box.target_shape:
            image = box.apply(image)
    return np.clip(image, 0.0, 1.0)


class SliceDataset(Dataset):
    """2D slices of a manifest as tensors for training and evaluation.

    Args:
        records: manifest records (e.g. ``filter_records(read_manifest(p), "train")``).
        root: folder the manifest paths are relative to (the manifest's folder).
        image_size: output ``(H, W)`` in pixels; slices of another size are resized (image
            bilinear, mask area-weighted then thresholded). None keeps each slice's own size.
        augment: ``augment(image, mask) -> (image, mask)`` on float32 numpy ``(1, H, W)``
            arrays, applied before tensor conversion (training only).
        patches: cut tumour-aware patches at one physical scale instead of letterboxing
            whole slices (:class:`lungcad.data.patches.PatchSampling`, stage 1); every record
            needs a pixel spacing. ``image_size`` is then ``(size, size)``.
        fixed_patches: draw each record's patch from a generator seeded by its index, so a
            validation pass sees the same patches every epoch; otherwise from NumPy's global
            generator (seeded per epoch and worker by training).
        patches_per_slice: with ``patches``: each slice gives this many patches per pass
            (item ``i`` is a patch of record ``i // patches_per_slice``), so an epoch over a
            few dozen slices still makes enough optimisation steps.
        pixel_mm: whole slices are resampled to this many mm per pixel and centred in
            ``image_size`` (padded or cropped) instead of letterboxed, so the model sees one
            physical scale (``data.slice_pixel_mm``); every record needs a pixel spacing.

    Each item is a dict: ``"image"`` float32 ``(1, H, W)`` in [0, 1]; ``"mask"`` float32
    ``(1, H, W)`` 0/1 (zeros when the slice has no mask); ``"has_mask"`` bool ``()``;
    ``"label"`` float32 ``()`` (1 cancerous, 0 not, -1 unknown); ``"sample_id"`` and
    ``"group_id"`` strings.
    """

    def __init__(
        self,
        records: Sequence[SliceRecord],
        root: str | Path,
        image_size: tuple[int, int] | None = (256, 256),
        augment: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
        patches: PatchSampling | None = None,
        fixed_patches: bool = False,
        patches_per_slice: int = 1,
        pixel_mm: float | None = None,
    ) -> None:
        self.records = list(records)
        self.pixel_mm = None if pixel_mm is None else float(pixel_mm)
        if self.pixel_mm is not None and not (math.isfinite(self.pixel_mm) and self.pixel_mm > 0):
            raise InputError(
                f"slice pixel size must be > 0 mm; got {pixel_mm}", "data.slice_pixel_mm"
            )
        self.patches = patches
        self.fixed_patches = bool(fixed_patches)
        if patches_per_slice < 1:
            raise InputError(
                f"patches per slice must be >= 1; got {patches_per_slice}",
                "data.patches_per_slice",
            )
        self.per_record = int(patches_per_slice) if patches is not None else 1
        if patches is not None:
            image_size = (patches.size, patches.size)
        if patches is not None or self.pixel_mm is not None:
            unknown = [r.sample_id for r in self.records if not _spacing_known(r)]
            option = "data.patch_pixel_mm" if patches is not None else "data.slice_pixel_mm"
            if unknown:
                raise InputError(
                    f"a physical model scale needs each slice's pixel spacing; {len(unknown)} "
                    f"slices have none (e.g. {unknown[0]}). Prepare 2D sets with "
                    f"--pixel-spacing, or unset {option}",
                    str(root),
                )
        self.root = Path(root)
        if image_size is not None:
            image_size = (int(image_size[0]), int(image_size[1]))
            if min(image_size) < 1:
                raise InputError(
                    f"image_size must be positive (H, W); got {image_size}", "image_size"
                )
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records) * self.per_record

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image float32 ``(H, W)`` in [0, 1] and mask float32 ``(H, W)`` 0/1, resized."""
        record = self.records[index // self.per_record]
        image = load_slice_array(self.root / record.image_path, record.sample_id, "image")
        if record.has_mask:
            mask = load_slice_array(self.root / record.mask_path, record.sample_id, "mask")
            if mask.shape != image.shape:
                raise InputError(
                    f"mask shape {mask.shape} differs from its image's {image.shape}",
                    self.root / record.mask_path,
                )
            mask = (mask > 0).astype(np.float32)
        else:
            mask = np.zeros(image.shape, dtype=np.float32)
        if self.patches is not None:
            rng = np.random.default_rng(
                index if self.fixed_patches else int(np.random.randint(0, 2**31 - 1))
            )
            image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
            spacing = (float(record.spacing_y), float(record.spacing_x))
            return self.patches.sample(image, mask, spacing, rng)
        scale = self.scale(record)
        if self.image_size is not None and (scale is not None or mask.shape != self.image_size):
            mask = model_input_box(mask.shape, self.image_size, scale).apply(mask, mask=True)
        return slice_to_model_input(image, self.image_size, scale), mask

    def scale(self, record: SliceRecord) -> float | None:
        """Slice spacing over model pixel size for ``record`` (None: letterboxed)."""
        if self.pixel_mm is None:
            return None
        return pixel_scale((record.spacing_y, record.spacing_x), self.pixel_mm)

    def __getitem__(self, index: int) -> dict[str, object]:
        record = self.records[index // self.per_record]
        image, mask = self.load(index)
        image, mask = image[None], mask[None]
        if self.augment is not None:
            image, mask = self.augment(image, mask)
            # Augmentations may interpolate or shift intensities; keep the documented ranges.
            image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
            mask = (np.asarray(mask) > 0.5).astype(np.float32)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)),
            "has_mask": torch.tensor(record.has_mask),
            "label": torch.tensor(float(record.label), dtype=torch.float32),
            "sample_id": record.sample_id,
            "group_id": record.group_id,
        }

    @property
    def labels(self) -> np.ndarray:
        """Labels of all records, int ``(N,)``, without loading any image."""
        return np.array([r.label for r in self.records], dtype=np.int64)


def _spacing_known(record: SliceRecord) -> bool:
    return all(math.isfinite(v) and v > 0 for v in (record.spacing_y, record.spacing_x))
