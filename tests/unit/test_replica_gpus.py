"""A replica's ranks under Ray see all of its GPUs in rank order, and only when Ray gave each
rank the GPU the replica listed for it."""

from __future__ import annotations

import os

import pytest

from workers.actor import gpu_ids_here, share_replica_gpus


@pytest.fixture
def visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "untouched")
    return lambda: os.environ["CUDA_VISIBLE_DEVICES"]


def test_each_rank_sees_the_replica_gpus_in_rank_order(visible):
    assert share_replica_gpus(["5", "2"], 1, ["2"])
    assert visible() == "5,2"  # rank 1 is cuda:1, GPU 2


@pytest.mark.parametrize(
    "replica_gpus,rank,mine",
    [
        (None, 0, ["3"]),  # one-rank replica or no GPUs: nothing to share
        (["3"], 0, ["3"]),
        (["3", "4"], 0, ["4"]),  # Ray gave this rank another GPU than the one listed
        (["3", "4"], 1, ["4", "5"]),  # more than one GPU per rank
        (["3", "4"], 1, []),  # outside Ray
    ],
)
def test_nothing_changes_unless_the_rank_holds_its_listed_gpu(visible, replica_gpus, rank, mine):
    assert not share_replica_gpus(replica_gpus, rank, mine)
    assert visible() == "untouched"


def test_outside_ray_no_gpus_are_found_and_no_ray_starts():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is already up in this process")
    assert gpu_ids_here() == []
    assert not ray.is_initialized()
