"""DDP helpers (lungcad.training.distributed) in one process, and the sharded sampler.

Two real processes run in tests/training/test_loop.py::test_ddp_two_processes_on_cpu.
"""

from __future__ import annotations

import pytest
import torch

from lungcad.training.distributed import (
    DistInfo,
    ShardedWeightedSampler,
    all_gather_list,
    all_reduce_sum,
    average_batchnorm,
    epoch_seed,
    init_distributed,
)


def test_single_process_needs_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world=1, local_rank=0) and info.main
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("auto") == DistInfo()
    assert not DistInfo(rank=1, world=2).main


def test_helpers_are_no_ops_for_one_process() -> None:
    single = DistInfo()
    values = [(1, 0.5), (2, 0.25)]
    assert all_gather_list(values, single) is values
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t, single) is t and t.tolist() == [1.0, 2.0]
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(3.0)
    average_batchnorm(bn, single)
    assert bn.running_mean.tolist() == [3.0, 3.0]


def test_epoch_seed_is_32_bit_and_differs_per_epoch_and_rank() -> None:
    seeds = {epoch_seed(42, e, r) for e in range(5) for r in range(3)}
    assert len(seeds) == 15 and all(0 <= s < 2**32 for s in seeds)
    assert epoch_seed(42, 1) == epoch_seed(42, 1, 0)  # rank 0 by default, and repeatable
    assert epoch_seed(42, 1) != epoch_seed(43, 1)


def test_sharded_weighted_sampler() -> None:
    weights = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.0, 1.0])
    shards = [ShardedWeightedSampler(weights, world=2, rank=r, seed=3) for r in (0, 1)]
    for s in shards:
        s.set_epoch(4)
    draws = [list(s) for s in shards]
    assert [len(d) for d in draws] == [3, 3] == [len(s) for s in shards]
    assert all(i in (0, 1, 3, 5) for d in draws for i in d)  # zero weight is never drawn
    single = ShardedWeightedSampler(weights, world=1, rank=0, seed=3)
    single.set_epoch(4)
    merged = [i for pair in zip(*draws, strict=True) for i in pair]
    assert merged == list(single)  # the shards interleave into the single-process draws
    assert list(single) == list(single)  # the same epoch draws the same again
    single.set_epoch(5)
    assert list(single) != merged  # another epoch draws differently
