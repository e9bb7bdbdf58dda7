"""The ``alltoall`` expert-parallel dispatcher: each token goes once to each rank holding its experts.

Shape legend: W ranks, T this rank's tokens, K experts per token, S token rows this rank sends (one
per token and destination rank), M token rows received from all ranks, P (row, k) pairs of the
received rows whose expert is on this rank, E experts of the layer, E_loc this rank's experts,
H hidden.

Data movement, on each rank::

    origin    rank_TK: the rank holding each token's k-th expert (the partition)
              all-to-all of [token rows, (token, expert) pairs, grad flag] per rank   (one host sync)
              to_ranks: buckets over the W ranks; slot_of_row_TW = -1 where t has no expert on r
              x_SH = permute_rows(x_TH, to_ranks)                rank by rank, tokens ascending
              local_ids_SK: the k-th expert's index on that rank, -1 where it is elsewhere;
              weights_SK: the gate weights there, 0 elsewhere
         ─►   all-to-all of x_SH, weights_SK, local_ids_SK ─► x_MH, weights_MK, local_ids_MK
    receiver  dispatch of the P pairs with local_ids >= 0 ─► buckets, slot -1 for the other pairs
              y_MH = experts + combine(weights_MK)          one partial sum per received row
         ─►   all-to-all back ─► y_SH                      (in ``to_ranks`` order again)
    origin    y_TH = combine(y_SH, to_ranks, weights 1)     <= W partials per token, float32, rank order

These are the single-process layer's stages (``parallel.local``: dispatch, experts + combine)
with the tokens' trip to their experts' ranks and back around them. A token crosses to a rank once,
however many of its K experts live there, and one partial row comes back: S is the number of
distinct (token, rank) pairs, about 45% of T * K at E = 128, K = 8 on 4 ranks (uniform routing),
67% on 8 ranks. Backward runs the adjoints in reverse: the origin's combine (each partial's
gradient is its token's), the all-to-all back, the experts' fused backward on the receiver (token
rows, gate weights, expert weights), the all-to-all forth (one autograd node for x and the
weights), ``permute_rows``' backward (sums each token's <= W gradient rows, and its weights',
skipping -1 slots). Expert gradients land on their owner; the router's gradient on the origin.

Uneven splits need no padding: ``all_to_all_single`` takes per-rank row counts, which every rank
learns from the one count exchange. The compactions (send list, received pairs) scatter into
buffers sized by those counts: no further host sync. Deterministic: the send list is ordered by
(rank, token), the received pairs by (source rank, token, k) and grouped by a stable dispatch,
and every sum (a token's partials, its gradient rows) is a gather in a fixed order, not atomics.

Precision notes: the partial sums travel back in x's dtype (bf16 halves the return traffic) and
the origin adds them in float32. The single-process layer sums a token's K weighted expert outputs
in float32 and rounds once; here each rank's partial is rounded to x's dtype first: in bf16 the
results differ by one rounding per partial (at most W), in float32 they match to ~1e-6.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from moe_replay.backends.base import ExpertBuckets
from moe_replay.parallel.collectives import (
    align_requires_grad,
    all_to_all_ints,
    all_to_all_rows,
    check_device,
    input_needs_grad,
)

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend
    from moe_replay.parallel.partition import ExpertPartition
    from moe_replay.routing.route import Routing


@dataclass(frozen=True)
class _Counts:
    """What the count exchange tells this rank (host ints)."""

    send_rows: list[int]
    """Token rows this rank sends to each rank."""
    recv_rows: list[int]
    """Token rows this rank receives from each rank."""
    recv_pairs: int
    """(row, k) pairs of the received rows whose expert is on this rank."""
    any_needs_grad: bool
    """Whether any rank's input (x or gate weights) needs a gradient."""


def _compact(mask_N: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index_C, position_N)``: the indices of ``mask_N``'s True entries, ascending (``[count]``,
    int64), and each entry's place in that list (``-1`` for False entries).

    No host sync: ``count``, the number of True entries, comes from the count exchange. Each True
    entry is scattered to its place (a cumsum); False entries land in a spare last element, cut off.
    """
    position_N = torch.where(mask_N, torch.cumsum(mask_N, dim=0) - 1, -1)
    index_C = torch.empty(count + 1, dtype=torch.int64, device=mask_N.device)
    index_C[torch.where(mask_N, position_N, count)] = torch.arange(mask_N.numel(), device=mask_N.device)
    return index_C[:count], position_N


def _rank_buckets(
    sent_TW: torch.Tensor, rows_to_rank_W: torch.Tensor, num_sent: int
) -> tuple[ExpertBuckets, torch.Tensor]:
    """``(to_ranks, rank_S)``: buckets whose "experts" are the W ranks, each token read once per
    rank it is sent to (``slot_of_row_TW`` is -1 where it is not), the S sent rows ordered by
    (rank, token); and the destination rank of each sent row."""
    T, W = sent_TW.shape
    index_S, position_WT = _compact(sent_TW.T.reshape(-1), num_sent)  # flat index rank * T + token
    token_S, rank_S = index_S % max(T, 1), index_S // max(T, 1)
    offsets_W1 = torch.cumsum(torch.cat([rows_to_rank_W.new_zeros(1), rows_to_rank_W]), dim=0)
    to_ranks = ExpertBuckets(
        row_of_slot_N=token_S.to(torch.int32),
        slot_of_row_MR=position_WT.view(W, T).T.contiguous().to(torch.int32),
        offsets_E1=offsets_W1.to(torch.int32),
    )
    return to_ranks, rank_S


def _pair_buckets(
    local_ids_MK: torch.Tensor, num_pairs: int, num_local: int, backend: Backend
) -> ExpertBuckets:
    """Buckets of the received rows' (row, k) pairs over this rank's experts; slot -1 for pairs
    whose expert is elsewhere. Pairs in ascending (row, k) order and a stable dispatch keep the
    ``ExpertBuckets`` contract (ascending (row, read) within each expert)."""
    M, K = local_ids_MK.shape
    flat_ids = local_ids_MK.reshape(-1)  # [M * K]
    pair_P, _ = _compact(flat_ids >= 0, num_pairs)  # flat index row * K + k of each pair
    pairs = backend.dispatch(flat_ids[pair_P].view(num_pairs, 1), num_local)
    slot_of_row = torch.full((M * K,), -1, dtype=torch.int32, device=flat_ids.device)
    slot_of_row[pair_P] = pairs.slot_of_row_MR.view(num_pairs)  # distinct indices: plain stores
    return ExpertBuckets(
        row_of_slot_N=(pair_P // K)[pairs.row_of_slot_N.long()].to(torch.int32),
        slot_of_row_MR=slot_of_row.view(M, K),
        offsets_E1=pairs.offsets_E1,
    )


class AllToAllDispatcher:
    """``dispatch(x_TH, routing, experts, backend) -> y_TH`` over ``group`` (module docstring).

    ``experts`` holds this rank's experts (``partition.first:partition.end``); ``routing`` holds
    global expert ids. A collective: every rank of ``group`` calls it, also with T = 0.
    """

    def __init__(self, group: ProcessGroup, partition: ExpertPartition) -> None:
        self.group = group
        self.partition = partition
        offsets = partition.offsets
        rank_of_expert = [
            rank for rank, (lo, hi) in enumerate(itertools.pairwise(offsets)) for _ in range(lo, hi)
        ]
        self._host_constants = {
            "rank_of_expert_E": rank_of_expert,
            "first_expert_W": list(offsets[:-1]),
            "ranks_W": list(range(partition.world_size)),
        }
        self._device_constants: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._last_send_rows: tuple[int, ...] = ()

    @property
    def last_send_rows(self) -> tuple[int, ...]:
        """Token rows the last call sent to each rank: one per token and rank holding at least one
        of its experts (diagnostics; empty before the first call)."""
        return self._last_send_rows

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """An int64 constant on ``device``, copied there once (not on every call)."""
        key = (name, device)
        if key not in self._device_constants:
            values = self._host_constants[name]
            self._device_constants[key] = torch.tensor(values, dtype=torch.int64, device=device)
        return self._device_constants[key]

    def _exchange_counts(
        self, rows_to_rank_W: torch.Tensor, pairs_to_rank_W: torch.Tensor, needs_grad: bool
    ) -> _Counts:
        """Each rank tells each rank how many token rows and (token, expert) pairs it sends there,
        and whether its input needs a gradient: one all-to-all of 3 ints per rank, one host sync."""
        W, device = self.partition.world_size, rows_to_rank_W.device
        flag_W = torch.full((W,), int(needs_grad), dtype=torch.int64, device=device)
        message_W3 = torch.stack([rows_to_rank_W, pairs_to_rank_W, flag_W], dim=1)
        received_W3 = all_to_all_ints(message_W3, [1] * W, [1] * W, self.group)
        host = torch.cat([rows_to_rank_W, received_W3.reshape(-1)]).tolist()  # the one host sync
        per_source = [host[W + 3 * r : W + 3 * (r + 1)] for r in range(W)]
        return _Counts(
            send_rows=host[:W],
            recv_rows=[rows for rows, _, _ in per_source],
            recv_pairs=sum(pairs for _, pairs, _ in per_source),
            any_needs_grad=any(flag for _, _, flag in per_source),
        )

    def __call__(
        self, x_TH: torch.Tensor, routing: Routing, experts: nn.Module, backend: Backend
    ) -> torch.Tensor:
        check_device(self.group, x_TH.device, "x")
        part, device = self.partition, x_TH.device
        ids_TK = routing.expert_ids.to(device).long()
        weights_TK = routing.weights.to(device)

        # The phases are named in profiles (torch.profiler) by these ranges.
        with record_function("moe_replay.alltoall.counts"):  # origin: where each token goes
            rank_TK = self._constant("rank_of_expert_E", device)[ids_TK]
            experts_on_rank_TW = (rank_TK.unsqueeze(-1) == self._constant("ranks_W", device)).sum(dim=1)
            sent_TW = experts_on_rank_TW > 0
            rows_to_rank_W = sent_TW.sum(dim=0)
            needs_grad = input_needs_grad(x_TH) or input_needs_grad(weights_TK)
            counts = self._exchange_counts(rows_to_rank_W, experts_on_rank_TW.sum(dim=0), needs_grad)
            self._last_send_rows = tuple(counts.send_rows)
            x_TH = align_requires_grad(x_TH, counts.any_needs_grad)

        with record_function("moe_replay.alltoall.send"):
            to_ranks, rank_S = _rank_buckets(sent_TW, rows_to_rank_W, sum(counts.send_rows))
            token_S = to_ranks.row_of_slot_N.long()
            here_SK = rank_TK[token_S] == rank_S.unsqueeze(1)  # the k-th expert is on the row's destination
            local_ids_TK = ids_TK - self._constant("first_expert_W", device)[rank_TK]
            local_ids_SK = torch.where(here_SK, local_ids_TK[token_S], -1).to(torch.int32)
            weights_SK = torch.where(here_SK, backend.permute_rows(weights_TK.float(), to_ranks), 0.0)
            x_SH = backend.permute_rows(x_TH, to_ranks)
            x_MH, weights_MK, local_ids_MK = all_to_all_rows(
                [x_SH, weights_SK, local_ids_SK], counts.send_rows, counts.recv_rows, self.group
            )

        # Receiver: one weighted partial sum per received row over this rank's experts, one stage
        # (experts.forward_combined -> expert_mlp_combine, fused where the backend has it).
        with record_function("moe_replay.alltoall.experts"):
            buckets = _pair_buckets(local_ids_MK, counts.recv_pairs, part.num_local, backend)
            y_MH = experts.forward_combined(x_MH, buckets, weights_MK, backend, x_TH.dtype)

        with record_function("moe_replay.alltoall.return"):  # origin: each token's partials, float32
            (y_SH,) = all_to_all_rows([y_MH], counts.recv_rows, counts.send_rows, self.group)
            ones_TW = torch.ones(sent_TW.shape, dtype=torch.float32, device=device)
            return backend.combine(y_SH, to_ranks, ones_TW, x_TH.dtype)
