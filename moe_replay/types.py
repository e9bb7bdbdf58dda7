"""The value types the stages pass each other: a leaf module (it imports torch only), so that
routing, the backends and expert parallelism all use them without importing one another.

Shape legend: T tokens, K experts per token, M rows of the input to the experts (M = T for a
local layer), R reads of each row (R = K for a local layer), N routed rows, E experts, H hidden,
W ranks, C chunks.

* :class:`Routing`: what ``route()`` decides (ids and gate weights), the input of every stage.
* :class:`ExpertBuckets`: routed rows grouped by expert, what ``dispatch`` makes.
* :class:`SendPlan`: where an expert-parallel rank's tokens go (``moe_replay.parallel``).
* :class:`RowSink`: where a fused combine writes its rows when not into a local tensor.
* :class:`ExpertsModule`: what a dispatcher calls to run a layer's experts.
* :data:`InputGradsHook`: the backward's early hand-over of the input gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from moe_replay.backends.base import Backend

InputGradsHook = Callable[[torch.Tensor | None, torch.Tensor | None], int]
"""``on_input_grads`` of ``Backend.expert_mlp_combine``: ``(dx_MH, dweights_MR) -> SMs busy``."""


@dataclass(frozen=True)
class Routing:
    """The experts each token is sent to, and with what weight.

    ``expert_ids`` is int32 ``[..., K]`` with K distinct ids per row; ``weights`` is float32
    ``[..., K]`` and differentiable with respect to the router logits. The leading shape is the
    token shape of whatever was routed (``[T]`` for :func:`route`, ``x.shape[:-1]`` for a layer).
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor

    def reshape(self, *lead: int) -> Routing:
        """The same routing with leading (token) shape ``lead``."""
        k = self.expert_ids.shape[-1]
        return Routing(self.expert_ids.reshape(*lead, k), self.weights.reshape(*lead, k))

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.numel() // max(self.expert_ids.shape[-1], 1)


@dataclass(frozen=True)
class ExpertBuckets:
    """Routed rows grouped by expert: the result of ``dispatch``.

    Every one of the M input rows is read up to R times (once per routed slot). Sorted position
    ``n`` (``0 <= n < N``) reads input row ``row_of_slot_N[n]``; the r-th read of row ``m`` sits at
    sorted position ``slot_of_row_MR[m, r]``, or nowhere when that entry is ``-1``. Expert ``e``
    owns sorted positions ``offsets_E1[e]:offsets_E1[e + 1]``.

    ``-1`` slots: a (row, read) with slot ``-1`` has no routed row; it contributes nothing
    (``combine`` adds nothing for it and gives its weight a zero gradient, ``permute_rows``'
    backward skips it). ``dispatch`` never makes them (every read has a slot, N = M * R); expert
    parallelism composes buckets that have them (a token's experts on other ranks, a token not
    sent to a rank: ``moe_replay.parallel.alltoall``). Either way the entries ``>= 0`` are a
    permutation of ``0..N-1``: every slot is read by exactly one (row, read).

    Contract: within one expert's bucket rows are in ascending (row, read) order, in every
    backend, so results are deterministic and backends agree bit-for-bit on the metadata.
    All three tensors are int32 on the device of the routed ids.
    """

    row_of_slot_N: torch.Tensor
    slot_of_row_MR: torch.Tensor
    offsets_E1: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.offsets_E1.numel() - 1

    @property
    def num_rows(self) -> int:
        return self.slot_of_row_MR.shape[0]

    @property
    def num_slots(self) -> int:
        return self.row_of_slot_N.numel()

    def tokens_per_expert(self) -> torch.Tensor:
        """``[E]`` int32: rows routed to each expert."""
        return self.offsets_E1[1:] - self.offsets_E1[:-1]

    def per_read(self, values_N: torch.Tensor) -> torch.Tensor:
        """``values_N[slot_of_row_MR[m, r]]`` for every (row, read), ``[M, R, *]``; zero where the
        slot is ``-1`` (index -1 reads a zero appended to ``values_N``). Differentiable in
        ``values_N``."""
        padded = torch.cat([values_N, values_N.new_zeros(1, *values_N.shape[1:])])
        return padded[self.slot_of_row_MR.long()]


@dataclass(frozen=True)
class SendPlan:
    """Where an expert-parallel rank's tokens go (``send_plan``), chunk by chunk.

    Shape legend: T tokens, W ranks, C chunks, T_c = ceil(T / C) tokens per chunk, L = T_c * reach
    + 1 places per chunk (``reach`` = min(W, K): a token goes to a rank at most once, to at most K
    ranks; the last place is a spare).

    Chunk c holds tokens ``c * T_c:(c + 1) * T_c`` (the last one fewer, or none). Within a chunk
    the send list is ordered by (rank, token): ``slot_of_row_TW[t, r]`` is token t's place in its
    chunk's list for rank r, ``-1`` if t sends no row to r (no expert of t there);
    ``token_of_slot_CL[c]`` holds the chunk-local token at each place: the first S_c entries are
    the list, the rest up to ``T_c_actual * reach`` read the chunk's first token (in bounds, never
    sent). ``offsets_CW1[c]``: where each rank's rows start in the chunk's list.
    """

    chunk_tokens: int
    slot_of_row_TW: torch.Tensor
    token_of_slot_CL: torch.Tensor
    offsets_CW1: torch.Tensor

    @staticmethod
    def places(num_tokens: int, top_k: int, world_size: int, chunks: int) -> tuple[int, int]:
        """``(T_c, L)``: tokens per chunk and places per chunk (the shape legend's)."""
        chunk_tokens = -(-num_tokens // chunks)
        return chunk_tokens, chunk_tokens * min(world_size, top_k) + 1

    def rows(self, c: int) -> slice:
        """Chunk c's token rows."""
        T = self.slot_of_row_TW.shape[0]
        return slice(min(c * self.chunk_tokens, T), min((c + 1) * self.chunk_tokens, T))

    def chunk(self, c: int, capacity: int) -> tuple[slice, ExpertBuckets]:
        """Chunk c's token rows, and its send list as buckets over the ranks (``capacity``
        places: S_c for the list itself, more for a buffer filled before S_c is known)."""
        rows = self.rows(c)
        buckets = ExpertBuckets(
            row_of_slot_N=self.token_of_slot_CL[c, :capacity],
            slot_of_row_MR=self.slot_of_row_TW[rows],
            offsets_E1=self.offsets_CW1[c],
        )
        return rows, buckets


class RowSink(Protocol):
    """Where a fused combine writes its ``M`` output rows instead of a local ``[M, H]`` tensor
    (``Backend.expert_mlp_combine``'s ``out_MH``). The backend hands the sink what it would have
    summed itself; the sink sums and stores the rows where it keeps them, and returns a ``[M, H]``
    tensor that stands for them in autograd (its gradient is the rows' gradient). The combine
    knows nothing of where the rows go."""

    def write(
        self,
        src_NH: torch.Tensor,
        slot_of_row_MR: torch.Tensor | None,
        weights_MR: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Store ``row_m = sum_r weights_MR[m, r] * src_NH[slot_of_row_MR[m, r]]`` (float32 sums,
        ``out_dtype`` stored; a ``-1`` slot adds nothing; no weights: 1; no slots: ``row_m =
        src_NH[m]``) and return the ``[M, H]`` stand-in. Not differentiable itself."""
        ...


class ExpertsModule(Protocol):
    """A layer's experts as the dispatchers call them (``moe_replay.layers``' ``Experts`` and
    ``QuantExperts``)."""

    @property
    def num_experts(self) -> int:
        """Experts held here (this rank's, under expert parallelism)."""
        ...

    def __call__(self, x_MH: torch.Tensor, buckets: ExpertBuckets, backend: Backend) -> torch.Tensor:
        """The routed rows ``y_NH`` in bucket order."""
        ...

    def forward_combined(
        self,
        x_MH: torch.Tensor,
        buckets: ExpertBuckets,
        weights_MR: torch.Tensor,
        backend: Backend,
        out_dtype: torch.dtype,
        on_input_grads: InputGradsHook | None = None,
        out_MH: torch.Tensor | RowSink | None = None,
    ) -> torch.Tensor:
        """The rows combined per token, ``y_MH`` (``Backend.expert_mlp_combine``)."""
        ...
