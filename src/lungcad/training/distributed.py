"""Multi-process training helpers (torchrun / DistributedDataParallel) for the training loop.

``torchrun --nproc_per_node N ...`` starts N processes with RANK / WORLD_SIZE / LOCAL_RANK in
their environment; :func:`init_distributed` joins them into one process group (NCCL on CUDA,
Gloo on CPU). A single process (no WORLD_SIZE, or 1) needs no group and every helper here is
then a no-op, so the training loop has one code path.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "ShardedWeightedSampler",
    "all_gather_list",
    "all_reduce_sum",
    "average_batchnorm",
    "epoch_seed",
    "init_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world`` processes, GPU ``local_rank``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on rank 0, the only process that logs and writes files."""
        return self.rank == 0


def init_distributed(device_choice: str = "auto") -> DistInfo:
    """Join the torchrun process group, reuse one that exists, or report a single process.

    Args:
        device_choice: "cpu" forces the Gloo backend; otherwise NCCL when CUDA is available.

    Returns:
        This process's :class:`DistInfo`.
    """
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    # Kept for the life of the process: a second train() in the same script (stage cls after
    # seg) reuses it, because re-creating the default group after destroying it can deadlock
    # under torchrun (seen with Gloo). Destroyed at exit.
    atexit.register(_destroy)
    return DistInfo(rank, world, local)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed for (seed, epoch, rank), well mixed by NumPy's SeedSequence."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def all_gather_list(values: list[Any], info: DistInfo) -> list[Any]:
    """Concatenate every rank's list of picklable values (rank order); all ranks get it."""
    if info.world == 1:
        return values
    gathered: list[list[Any]] = [[] for _ in range(info.world)]
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (in place; returned for chaining)."""
    if info.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_batchnorm(model: nn.Module, info: DistInfo) -> None:
    """Average BatchNorm running statistics over ranks (timm's ``distribute_bn``).

    DDP keeps parameters in sync but each rank updates its own running statistics; averaging
    them before validation makes every rank validate and save the same model.
    """
    if info.world == 1:
        return
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")) and buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(info.world)


class ShardedWeightedSampler(Sampler[int]):
    """Weighted draws with replacement, the same on all ranks; rank r keeps every world-th.

    The DistributedSampler counterpart of ``WeightedRandomSampler`` (class-balanced sampling
    under DDP; with one process it is simply a seeded weighted sampler). Seeded by
    ``(seed, epoch)``: call :meth:`set_epoch` at the start of every epoch.

    Args:
        weights: ``(N,)`` non-negative sampling weight of each item.
        world: number of processes.
        rank: this process's rank.
        seed: base seed, the same on all ranks.
    """

    def __init__(self, weights: torch.Tensor, world: int = 1, rank: int = 0, seed: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.world, self.rank, self.seed = world, rank, seed
        self.num_samples = math.ceil(len(self.weights) / world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of this epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, self.num_samples * self.world, True, generator=g)
        return iter(draws[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.num_samples
