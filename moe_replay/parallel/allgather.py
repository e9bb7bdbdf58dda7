"""The ``allgather`` expert-parallel dispatcher: every rank sees every token.

Shape legend: W ranks, T this rank's tokens, S tokens of all ranks (``S = sum(counts)``),
K experts per token, N = S * K routed slots, n of them to this rank's experts, E_loc this rank's
experts, H hidden.

Data movement, on each rank::

    counts, grad flags     all-gather of [T, needs_grad]                  (one host sync)
    x_SH, weights_SK, ids_SK = all-gather of x_TH, weights_TK, ids_TK     (uneven counts: padded)
    dispatch(ids_SK -> local ids, other ranks' slots to a sink bucket E_loc)
    x_nH = permute_rows(x_SH)[:n]  ─► dispatch([n, 1]) ─► experts ─► y_nH
    partial_SH = combine([y_nH; zeros for the sink slots], weights_SK)   float32 partial sums
    y_TH = reduce-scatter(partial_SH)                                  this rank's tokens, summed over ranks

The result equals the single-process layer on the concatenated tokens: each token's K slots are
computed on their experts' owners and summed there with their weights; the reduce-scatter adds
the W partial sums. Backward runs the adjoints in reverse: an all-gather of ``grad y``, the local
expert and combine backward, and one reduce-scatter each for ``grad x`` and ``grad weights``.

Cost: every rank reads all S tokens and builds all N slots (the sink slots' rows are copied and
zero-filled, never run through an expert), W times the rows the ``alltoall`` dispatcher holds.
That is why ``alltoall`` is the scheme that scales; ``allgather`` is the simple one.

Precision notes: partial sums are float32 and reduced in float32 (W roundings fewer than summing
in x's dtype); the output is cast to x's dtype once, as in the single-process layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moe_replay.parallel.collectives import (
    align_requires_grad,
    all_gather_ints,
    all_gather_rows,
    check_device,
    input_needs_grad,
    reduce_scatter_rows,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend
    from moe_replay.parallel.partition import ExpertPartition
    from moe_replay.types import ExpertsModule, Routing


class AllGatherDispatcher:
    """``dispatch(x_TH, routing, experts, backend) -> y_TH`` over ``group`` (module docstring).

    ``experts`` holds this rank's experts (``partition.first:partition.end``); ``routing`` holds
    global expert ids. A collective: every rank of ``group`` calls it, also with T = 0.
    """

    def __init__(self, group: ProcessGroup, partition: ExpertPartition) -> None:
        self.group = group
        self.partition = partition

    def __call__(
        self, x_TH: torch.Tensor, routing: Routing, experts: ExpertsModule, backend: Backend
    ) -> torch.Tensor:
        check_device(self.group, x_TH.device, "x")
        part = self.partition
        E_loc, H = part.num_local, x_TH.shape[1]
        info = all_gather_ints([x_TH.shape[0], int(input_needs_grad(x_TH))], self.group, x_TH.device)
        counts = [count for count, _ in info]
        x_TH = align_requires_grad(x_TH, any(flag for _, flag in info))
        ids_TK = routing.expert_ids.to(x_TH.device)
        weights_TK = routing.weights.to(x_TH.device)
        x_SH, weights_SK, ids_SK = all_gather_rows([x_TH, weights_TK, ids_TK], counts, self.group)

        # Local experts keep ids 0..E_loc-1; other ranks' slots go to the sink bucket E_loc, which
        # dispatch sorts last: this rank's slots are the first n sorted positions.
        is_local_SK = (ids_SK >= part.first) & (ids_SK < part.end)
        local_ids_SK = torch.where(is_local_SK, ids_SK - part.first, E_loc).to(torch.int32)
        buckets = backend.dispatch(local_ids_SK, E_loc + 1)
        rows_per_expert = buckets.tokens_per_expert()[:E_loc].long()
        n = int(buckets.offsets_E1[E_loc])  # host sync: the slice below needs it
        x_nH = backend.permute_rows(x_SH, buckets)[:n]
        # The n rows are already grouped by local expert; this dispatch gives the experts their buckets.
        expert_of_row = torch.arange(E_loc, dtype=torch.int32, device=x_TH.device)
        ids_n1 = torch.repeat_interleave(expert_of_row, rows_per_expert, output_size=n).view(n, 1)
        y_nH = experts(x_nH, backend.dispatch(ids_n1, E_loc), backend)
        y_NH = torch.cat([y_nH, y_nH.new_zeros(buckets.num_slots - n, H)])
        partial_SH = backend.combine(y_NH, buckets, weights_SK, torch.float32)
        return reduce_scatter_rows(partial_SH, counts, self.group).to(x_TH.dtype)
