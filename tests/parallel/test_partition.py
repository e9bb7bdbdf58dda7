"""The expert split of expert parallelism (parallel/partition.py); no processes needed.

Shape legend: E experts, W ranks.
"""

from __future__ import annotations

import itertools

import pytest

from moe_replay.parallel.partition import ExpertPartition, expert_offsets


@pytest.mark.parametrize(
    ("E", "W", "offsets"),
    [
        (8, 2, (0, 4, 8)),  # even split
        (7, 3, (0, 3, 5, 7)),  # E % W == 1: the first rank holds one more
        (128, 3, (0, 43, 86, 128)),  # E % W == 2: the first two ranks hold one more
        (5, 5, (0, 1, 2, 3, 4, 5)),  # one expert per rank
        (6, 1, (0, 6)),  # a world of one holds everything
    ],
)
def test_expert_offsets(E: int, W: int, offsets: tuple[int, ...]) -> None:
    assert expert_offsets(E, W) == offsets


@pytest.mark.parametrize(("E", "W"), [(E, W) for E in (1, 2, 7, 64, 129) for W in (1, 2, 3, 4, 8) if E >= W])
def test_partition_is_balanced_contiguous_and_complete(E: int, W: int) -> None:
    parts = [ExpertPartition(num_experts=E, world_size=W, rank=r) for r in range(W)]
    assert parts[0].first == 0 and parts[-1].end == E
    for left, right in itertools.pairwise(parts):
        assert left.end == right.first  # contiguous, no gap, no overlap
    sizes = [p.num_local for p in parts]
    assert sum(sizes) == E
    assert max(sizes) - min(sizes) <= (1 if E % W else 0)
    assert sizes == sorted(sizes, reverse=True)  # the larger shares come first
    assert all(p.counts == tuple(sizes) for p in parts)


def test_fewer_experts_than_ranks() -> None:
    with pytest.raises(ValueError, match=r"num_experts=2, world_size=3"):
        expert_offsets(2, 3)
    with pytest.raises(ValueError, match="num_experts=3, world_size=4"):
        ExpertPartition(num_experts=3, world_size=4, rank=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_experts": 4, "world_size": 2, "rank": 2}, ValueError, "rank must be < world_size=2, got 2"),
        ({"num_experts": 4, "world_size": 2, "rank": -1}, ValueError, "rank must be >= 0, got -1"),
        ({"num_experts": 4, "world_size": 0, "rank": 0}, ValueError, "world_size must be >= 1, got 0"),
        (
            {"num_experts": 4.0, "world_size": 2, "rank": 0},
            TypeError,
            "num_experts must be an int, got float",
        ),
        ({"num_experts": 4, "world_size": True, "rank": 0}, TypeError, "world_size must be an int, got bool"),
    ],
)
def test_bad_partition_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ExpertPartition(**kwargs)
