"""The training run's data: manifest rows of both splits, their datasets and loaders.

:func:`build_data` reads every manifest of ``data.manifest``, keeps the rows the stage can
learn from (a tumour mask for "seg", a 0/1 label for "cls"), and returns the loaders:

* train: shuffled by a ``DistributedSampler`` (or, with ``data.balanced_sampling``, drawn
  class-balanced by a :class:`~lungcad.training.distributed.ShardedWeightedSampler`), each
  rank its own shard, augmented, the last incomplete batch dropped;
* val: in order, rank ``r`` taking every ``world``-th slice (no padding, so gathered
  predictions cover each slice once), never augmented.

Both are seeded from outside: the loop reseeds the train sampler and its generator every
epoch, so epoch ``e``'s order depends only on ``(seed, e)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from lungcad.data.augmentation import build_augmentation
from lungcad.data.dataset import SliceDataset, class_balanced_sampler
from lungcad.data.manifest import SliceRecord, filter_records, manifest_csv, read_manifest
from lungcad.data.patches import PatchSampling
from lungcad.errors import InputError
from lungcad.training.config import Config
from lungcad.training.distributed import DistInfo, ShardedWeightedSampler
from lungcad.training.domain import InputDomain, domain_of_records

__all__ = ["TrainingData", "build_data"]


@dataclass
class TrainingData:
    """What :func:`build_data` returns.

    Attributes:
        train_records: the training split's kept rows (all ranks).
        val_records: the validation split's kept rows (all ranks).
        train_loader: this rank's training batches.
        val_loader: this rank's validation batches.
        sampler: the train loader's sampler; ``set_epoch`` it every epoch.
        generator: the train loader's generator (worker seeds); reseed it every epoch.
        manifests: the manifest.csv paths read, for provenance.
        pos_weight: stage "cls": the BCE positive-class weight ``n_neg / n_pos`` of the
            training split; None means 1 (stage "seg", or ``data.balanced_sampling``).
        domain: intensity kind and model-pixel size of the training slices, recorded in the
            checkpoint (:mod:`lungcad.training.domain`).
    """

    train_records: list[SliceRecord]
    val_records: list[SliceRecord]
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: DistributedSampler | ShardedWeightedSampler
    generator: torch.Generator
    manifests: list[str]
    pos_weight: float | None
    domain: InputDomain


def build_data(cfg: Config, ddp: DistInfo) -> TrainingData:
    """Records, samplers and loaders of both splits for this rank.

    Raises:
        InputError: no manifest, no usable slices in a split, or (stage "cls") a split
            with only one class.
    """
    train_records, train_set, manifests, roots = _load_split(cfg, cfg.data.train_split)
    val_records, val_set, _, _ = _load_split(cfg, cfg.data.val_split)
    patches = patch_sampling(cfg)
    domain = domain_of_records(
        list(zip(train_records, roots, strict=True)),
        cfg.model.image_size,
        pixel_mm=slice_pixel_mm(cfg) if patches is None else patches.pixel_mm,
    )
    pos_weight = None
    if cfg.train.stage == "cls":
        for name, recs in (("train", train_records), ("val", val_records)):
            if len({r.label for r in recs}) < 2:
                raise InputError(
                    f"the {name} split has only label {recs[0].label}; stage 'cls' needs "
                    "cancerous (1) and non-cancerous (0) slices in both train and val",
                    path="data.manifest",
                )
        if not cfg.data.balanced_sampling:
            n_pos = sum(r.label == 1 for r in train_records)
            pos_weight = (len(train_records) - n_pos) / n_pos
    sampler: DistributedSampler | ShardedWeightedSampler
    if cfg.data.balanced_sampling:
        weights = class_balanced_sampler(train_records).weights
        sampler = ShardedWeightedSampler(weights, ddp.world, ddp.rank, cfg.train.seed)
    else:
        sampler = DistributedSampler(
            train_set, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=cfg.train.seed
        )
    generator = torch.Generator()
    val_indices = list(range(ddp.rank, len(val_set), ddp.world))  # a shard each, no padding
    return TrainingData(
        train_records,
        val_records,
        _loader(train_set, sampler, cfg, generator, train=True),
        _loader(val_set, val_indices, cfg, torch.Generator(), train=False),
        sampler,
        generator,
        manifests,
        pos_weight,
        domain,
    )


def patch_sampling(cfg: Config) -> PatchSampling | None:
    """Stage "seg" with ``data.patch_pixel_mm``: how training patches are cut; else None."""
    if cfg.train.stage != "seg" or cfg.data.patch_pixel_mm is None:
        return None
    return PatchSampling(cfg.data.patch_pixel_mm, cfg.model.image_size, cfg.data.patch_tumour_prob)


def slice_pixel_mm(cfg: Config) -> float | None:
    """The mm per pixel to which whole slices are resampled (``data.slice_pixel_mm``), or
    None where they are letterboxed or patches are cut instead."""
    return cfg.data.slice_pixel_mm if patch_sampling(cfg) is None else None


def _load_split(
    cfg: Config, split: str
) -> tuple[list[SliceRecord], ConcatDataset, list[str], list[Path]]:
    """Filtered records of one split from all manifests, their Dataset, the manifest paths,
    and each record's prepared folder."""
    if not cfg.data.manifest:
        raise InputError(
            "no manifest given; pass --manifest DIR (a folder written by `lungcad prepare`) "
            "or set data.manifest in the config",
            path="data.manifest",
        )
    stage = cfg.train.stage
    require_mask = cfg.data.require_mask if cfg.data.require_mask is not None else stage == "seg"
    labels = (0, 1) if stage == "cls" else None
    size = (cfg.model.image_size, cfg.model.image_size)
    augment = build_augmentation(cfg.augmentation) if split == cfg.data.train_split else None
    records: list[SliceRecord] = []
    parts: list[Dataset] = []
    paths: list[str] = []
    roots: list[Path] = []
    for entry in cfg.data.manifest:
        path = Path(entry)
        csv_path = manifest_csv(path)
        kept = filter_records(
            read_manifest(csv_path),
            split,
            require_mask=require_mask,
            labels=labels,
            sources=cfg.data.sources or None,
        )
        paths.append(str(csv_path))
        if kept:
            records += kept
            roots += [csv_path.parent] * len(kept)
            parts.append(
                SliceDataset(
                    kept,
                    csv_path.parent,
                    image_size=size,
                    augment=augment,
                    patches=patch_sampling(cfg),
                    fixed_patches=split != cfg.data.train_split,
                    patches_per_slice=cfg.data.patches_per_slice
                    if split == cfg.data.train_split
                    else 1,
                    pixel_mm=slice_pixel_mm(cfg),
                )
            )
    if not records:
        what = "with a tumour mask " if require_mask else "with a label 0/1 " if labels else ""
        raise InputError(
            f"no '{split}' slices {what}in {', '.join(paths)}; stage {stage!r} needs them. "
            "Check the manifest's split/mask_path/label columns, data.sources and the stage.",
            path="data.manifest",
        )
    return records, ConcatDataset(parts), paths, roots


def _loader(
    dataset: Dataset,
    sampler: DistributedSampler | ShardedWeightedSampler | list[int],
    cfg: Config,
    generator: torch.Generator,
    train: bool,
) -> DataLoader:
    """A DataLoader over the items of ``dataset`` that ``sampler`` picks."""
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu",
        drop_last=train and len(sampler) > cfg.data.batch_size,  # no 1-slice BatchNorm batches
        worker_init_fn=_worker_init,
        generator=generator,
        persistent_workers=False,  # fresh workers each epoch keep epochs independent (resume)
    )


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive NumPy/Python from it so
    # augmentations differ between workers and repeat between identical runs.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
