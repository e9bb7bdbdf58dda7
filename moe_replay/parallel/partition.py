"""How the experts of one layer are split over the ranks of an expert-parallel group.

Shape legend: E experts of the layer (global ids ``0..E-1``), W ranks of the group.

The split is contiguous and balanced: rank ``r`` holds the global experts
``offsets[r]:offsets[r + 1]``, and the first ``E % W`` ranks hold one expert more than the others
(``E = 7, W = 3`` gives ``[0:3], [3:5], [5:7]``). Contiguity is what the dispatchers rely on:
rows sorted by global expert are grouped by owning rank, so each rank's rows are one slice.
:func:`expert_offsets` is the one place this formula lives; everything else asks it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def expert_offsets(num_experts: int, world_size: int) -> tuple[int, ...]:
    """``W + 1`` offsets: rank ``r`` holds global experts ``offsets[r]:offsets[r + 1]``.

    The first ``num_experts % world_size`` ranks hold ``num_experts // world_size + 1`` experts,
    the others ``num_experts // world_size``. Every rank holds at least one expert, so
    ``num_experts >= world_size`` is required (``ValueError`` otherwise).
    """
    _check_int("num_experts", num_experts, 1)
    _check_int("world_size", world_size, 1)
    if num_experts < world_size:
        raise ValueError(
            f"expert parallelism needs num_experts >= the group's world size so that every rank holds "
            f"an expert, got num_experts={num_experts}, world_size={world_size}"
        )
    base, extra = divmod(num_experts, world_size)
    offsets = [0]
    for rank in range(world_size):
        offsets.append(offsets[-1] + base + (1 if rank < extra else 0))
    return tuple(offsets)


@dataclass(frozen=True, kw_only=True)
class ExpertPartition:
    """The experts one rank holds: global ids ``first:end`` of ``num_experts``."""

    num_experts: int
    """E: experts of the whole layer."""
    world_size: int
    """W: ranks of the expert-parallel group."""
    rank: int
    """This rank's index in the group, ``0 <= rank < world_size``."""

    def __post_init__(self) -> None:
        expert_offsets(self.num_experts, self.world_size)  # validates the other two fields
        _check_int("rank", self.rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={self.world_size}, got {self.rank}")

    @cached_property  # read on every call of a layer: computed once
    def offsets(self) -> tuple[int, ...]:
        """``W + 1`` offsets of every rank's experts (:func:`expert_offsets`)."""
        return expert_offsets(self.num_experts, self.world_size)

    @property
    def counts(self) -> tuple[int, ...]:
        """``W`` expert counts, one per rank."""
        offsets = self.offsets
        return tuple(hi - lo for lo, hi in itertools.pairwise(offsets))

    @property
    def first(self) -> int:
        """Global id of this rank's first expert."""
        return self.offsets[self.rank]

    @property
    def end(self) -> int:
        """One past the global id of this rank's last expert."""
        return self.offsets[self.rank + 1]

    @property
    def num_local(self) -> int:
        """Experts this rank holds."""
        return self.end - self.first
