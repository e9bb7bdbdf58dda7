"""The ``alltoall`` expert-parallel dispatcher: each token goes once to each rank holding its experts.

Shape legend: W ranks, T this rank's tokens, K experts per token, S token rows this rank sends (one
per token and destination rank), C = W * T + 1 (the send list's capacity: every (token, rank) pair,
and a spare), M token rows received from all ranks, P (row, k) pairs of the received rows whose
expert is on this rank, E experts of the layer, E_loc this rank's experts, H hidden.

Data movement, on each rank::

    origin    hit_WTK: token t's k-th expert is on rank r (the partition); sent_WT: any over k
              all-to-all of [token rows, (token, expert) pairs, grad flag] per rank     (launched)
              queued meanwhile, at capacity C: the send list ordered by (rank, token) (to_ranks:
              buckets over the W ranks, slot_of_row_TW = -1 where t has no expert on r);
              meta_TM = [gate weights_K | global expert ids_K], float32
              ── the one host sync: the counts; the send list is sliced to its S rows ──
              x_SH, meta_SM = permute_rows(x_TH, to_ranks), permute_rows(meta_TM, to_ranks)
         ─►   all-to-all of x_SH, meta_SM ─► x_MH, meta_MM
    receiver  local ids: this rank's experts 0..E_loc-1, other ranks' experts the sink E_loc;
              dispatch over E_loc + 1 (stable: the sink's pairs last, cut off) ─► buckets that
              read each row 2K times, once per meta column (slot -1: elsewhere, or an id)
              y_MH = experts + combine(weights = meta_MM)   one partial sum per received row
         ─►   all-to-all back ─► y_SH                        (in ``to_ranks`` order again)
    origin    y_TH[t] = sum of t's <= W partials               float32, rank order

These are the single-process layer's stages (``parallel.local``: dispatch, experts + combine)
with the tokens' trip to their experts' ranks and back around them. A token crosses to a rank once,
however many of its K experts live there, and one partial row comes back: S is the number of
distinct (token, rank) pairs, about 45% of T * K at E = 128, K = 8 on 4 ranks (uniform routing),
67% on 8 ranks. A token's gate weights and ids travel whole to each of its ranks (2K floats next
to its H values); the receiver keeps its experts' pairs, and the other reads add nothing and get
a zero gradient (``ExpertBuckets``' -1 slots). Backward runs the adjoints in reverse: the origin's
sum (each partial's gradient is its token's: ``permute_rows`` of dy_TH), the all-to-all back, the
experts' fused backward on the receiver (token rows, meta: the weights' gradient and zeros for the
ids, expert weights), the all-to-all forth, ``permute_rows``' backward (sums each token's <= W
gradient rows of x and of meta, skipping -1 slots: a weight's gradient comes from the one rank
holding its expert, the others add exact zeros). Expert gradients land on their owner; the
router's gradient on the origin.

What a call costs, and why it is laid out so: at the sizes where expert parallelism is used the
dispatcher is host-bound (each torch op or Triton launch costs the host 20-100 µs on an H100
node, and the count exchange's host sync drains the GPU, so every op launched after it is
exposed). So the forward has one host sync; all that does not need the counts (the whole send
order, at capacity C, sliced afterwards for free) is queued before it, in int32 0/1 masks (no
casts); reused buffers and constants replace per-call allocations. ``benchmarks/count_ep_ops.py``
counts the ops outside the experts, Triton backend, per call: forward 21 kernels and 4
all-to-alls (24 kernels when the receiver's dispatch takes its multi-block path), backward 3 and
3 (the single-process layer's dispatch: 2 kernels). x and meta take two all-to-alls, not one
packed row: the experts read x_MH contiguous, so packing would cost a copy of the [S, H] rows on
each side, more than the call it saves at large T (240 MB at Qwen3-30B-A3B, T = 16384, 4 ranks).
Reading meta whole (2K reads a row, K of them without a slot) spares the weights' slice a copy
forward and a zero-fill and copy backward; the Triton kernels mask the reads without a slot (no
memory traffic), the torch reference gathers a zero row for each.

Uneven splits need no padding: ``all_to_all_single`` takes per-rank row counts, which every rank
learns from the one count exchange. Deterministic: the send list is ordered by (rank, token), the
received pairs by (source rank, token, k) and grouped by a stable dispatch, and every sum (a
token's partials, its gradient rows) is a gather in a fixed order, not atomics.

Precision notes: the partial sums travel back in x's dtype (bf16 halves the return traffic) and
the origin adds them in float32. The single-process layer sums a token's K weighted expert outputs
in float32 and rounds once; here each rank's partial is rounded to x's dtype first: in bf16 the
results differ by one rounding per partial (at most W), in float32 they match to ~1e-6. Gate
weights travel in float32, as the router made them; expert ids as float32 values, exact (ids are
below 2**24).
"""

from __future__ import annotations

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

    @staticmethod
    def read(exchange_2W3: torch.Tensor) -> _Counts:
        """The counts from the exchange buffer (``[0]``: what this rank sent, ``[1]``: what it
        received, per rank: rows, pairs, grad flag). The host waits for the device here."""
        sent, received = exchange_2W3.tolist()
        return _Counts(
            send_rows=[rows for rows, _, _ in sent],
            recv_rows=[rows for rows, _, _ in received],
            recv_pairs=sum(pairs for _, pairs, _ in received),
            any_needs_grad=any(flag for _, _, flag in received),
        )


def _send_order(
    sent_WT: torch.Tensor, token_T1: torch.Tensor, minus_one: torch.Tensor, zero_1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(slot_of_row_TW, token_of_slot_C, offsets_W1)`` of the send list ordered by (rank,
    token), without the counts (no host sync): each (token, rank) pair's place in it (``-1`` if
    the token is not sent there); the token at each place, at capacity C (the first S entries are
    the list, the rest is scratch); where each rank's rows start (int32, like ``ExpertBuckets``).

    A cumsum over the mask in (rank, token) order numbers the sent pairs; each pair's token is
    scattered to its place, the unsent pairs' into the spare last entry (index -1). Four ops.
    """
    W, T = sent_WT.shape
    sent_upto_WT = torch.cumsum(sent_WT.view(-1), dim=0, dtype=torch.int32).view(W, T)  # inclusive
    slot_of_row_TW = torch.empty(T, W, dtype=torch.int32, device=sent_WT.device)
    torch.addcmul(minus_one, sent_upto_WT.T, sent_WT.T, out=slot_of_row_TW)  # count - 1, or -1
    token_of_slot_C = torch.empty(W * T + 1, dtype=torch.int32, device=sent_WT.device)
    token_of_slot_C[slot_of_row_TW] = token_T1  # distinct places, and the spare: plain stores
    ends_W = sent_upto_WT[:, -1] if T else zero_1.expand(W)
    return slot_of_row_TW, token_of_slot_C, torch.cat([zero_1, ends_W])


def _pair_buckets(
    meta_MM: torch.Tensor,
    local_of_expert_E: torch.Tensor,
    read_bounds_21: torch.Tensor,
    num_pairs: int,
    num_local: int,
    backend: Backend,
) -> ExpertBuckets:
    """Buckets of the received rows' (row, k) pairs over this rank's E_loc experts, reading each
    row R = 2K times, once per column of ``meta_MM`` (``[weights_K | global ids_K]``), so that
    ``meta_MM`` itself is the combine's weights: read k < K is pair (row, k), slot -1 where its
    expert is elsewhere; read K + k (an id) has slot -1 always, adding nothing and getting a zero
    gradient. (Passing the ``[:, :K]`` slice instead costs a copy forward, a zero-fill and a copy
    backward.)

    Other ranks' experts map to the sink bucket E_loc, which the stable dispatch sorts last: this
    rank's P pairs are the first P places, in ascending (row, k) order within each expert (the
    ``ExpertBuckets`` contract), and the sink is cut off. ``read_bounds_21`` is ``[[E_loc], [0]]``:
    a read has a slot where its pair's local id is below its half's bound (never, in the id half).
    """
    M, K = meta_MM.shape[0], meta_MM.shape[1] // 2
    local_ids_MK = local_of_expert_E[meta_MM[:, K:].long()]  # ids are exact float32 values
    pairs = backend.dispatch(local_ids_MK, num_local + 1)
    has_slot_M2K = local_ids_MK.unsqueeze(1) < read_bounds_21
    slot_of_row_M2K = torch.where(has_slot_M2K, pairs.slot_of_row_MR.unsqueeze(1), -1).view(M, 2 * K)
    return ExpertBuckets(
        row_of_slot_N=pairs.row_of_slot_N[:num_pairs],
        slot_of_row_MR=slot_of_row_M2K,
        offsets_E1=pairs.offsets_E1[: num_local + 1],
    )


class _AddPartials(torch.autograd.Function):
    """``y_TH[t] = sum_r y_SH[slot_of_row_TW[t, r]]`` (float32, rank order, ``out_dtype``); the
    backward gives each partial its token's gradient (``permute_rows``: one gather, where
    ``combine``'s backward would also compute the unit weights' gradients)."""

    @staticmethod
    def forward(ctx, y_SH, to_ranks, ones_TW, backend, out_dtype):  # type: ignore[override]
        ctx.to_ranks, ctx.backend = to_ranks, backend
        return backend.combine(y_SH, to_ranks, ones_TW, out_dtype)

    @staticmethod
    def backward(ctx, dy_TH):  # type: ignore[override]
        return ctx.backend.permute_rows(dy_TH, ctx.to_ranks), None, None, None, None


class AllToAllDispatcher:
    """``dispatch(x_TH, routing, experts, backend) -> y_TH`` over ``group`` (module docstring).

    ``experts`` holds this rank's experts (``partition.first:partition.end``); ``routing`` holds
    global expert ids. A collective: every rank of ``group`` calls it, also with T = 0.
    """

    def __init__(self, group: ProcessGroup, partition: ExpertPartition) -> None:
        self.group = group
        self.partition = partition
        W, E, E_loc = partition.world_size, partition.num_experts, partition.num_local
        local_of_expert = [
            e - partition.first if partition.first <= e < partition.end else E_loc for e in range(E)
        ]
        self._host_constants: dict[str, tuple[list[int], tuple[int, ...], torch.dtype]] = {
            "rank_bounds_W": (list(partition.offsets[1:W]), (W - 1,), torch.int32),
            "ranks_W11": (list(range(W)), (W, 1, 1), torch.int32),
            "local_of_expert_E": (local_of_expert, (E,), torch.int32),
            "read_bounds_21": ([E_loc, 0], (2, 1), torch.int32),
            "minus_one": ([-1], (), torch.int32),
            "zero_1": ([0], (1,), torch.int32),
        }
        self._device_constants: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._exchange_buffers: dict[tuple[bool, torch.device], tuple[torch.Tensor, ...]] = {}
        self._last_send_rows: tuple[int, ...] = ()

    @property
    def last_send_rows(self) -> tuple[int, ...]:
        """Token rows the last call sent to each rank: one per token and rank holding at least one
        of its experts (diagnostics; empty before the first call)."""
        return self._last_send_rows

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """A constant on ``device``, copied there once (not on every call)."""
        key = (name, device)
        if key not in self._device_constants:
            values, shape, dtype = self._host_constants[name]
            self._device_constants[key] = torch.tensor(values, dtype=dtype, device=device).view(shape)
        return self._device_constants[key]

    def _rows(
        self, name: str, rows: int, device: torch.device, fill: float | None, *shape: int
    ) -> torch.Tensor:
        """The first ``rows`` rows of a constant ``[capacity, *shape]`` that grows with the token
        count: ``fill`` everywhere (float32), or each row's index (int32, ``fill=None``). Made once
        per doubling of the capacity."""
        key = (name, device)
        cached = self._device_constants.get(key)
        if cached is None or cached.shape[0] < rows:
            capacity = max(rows, 2 * cached.shape[0] if cached is not None else 64)
            if fill is None:
                column = torch.arange(capacity, dtype=torch.int32, device=device).view(capacity, 1)
                cached = column.expand(capacity, *shape).contiguous()
            else:
                cached = torch.full((capacity, *shape), fill, dtype=torch.float32, device=device)
            self._device_constants[key] = cached
        return cached[:rows]

    def _start_count_exchange(
        self, sent_WT: torch.Tensor, hit_WTK: torch.Tensor, needs_grad: bool
    ) -> torch.Tensor:
        """Launch the count exchange: each rank tells each rank how many token rows and (token,
        expert) pairs it sends there, and whether its input needs a gradient (one all-to-all of 3
        ints per rank). Returns the ``[2, W, 3]`` buffer that :meth:`_Counts.read` reads.

        The buffer is reused from call to call, its flag column written once (two ops: the sums
        land in their columns): the host reads it before the call returns, and nothing else
        keeps it (autograd saves none of it)."""
        key = (needs_grad, sent_WT.device)
        if key not in self._exchange_buffers:
            W = self.partition.world_size
            buffer_2W3 = torch.full((2, W, 3), int(needs_grad), dtype=torch.int32, device=sent_WT.device)
            # The views too: indexing costs the host more than the ops it feeds, at these sizes.
            sent_W3, received_W3 = buffer_2W3.unbind(0)
            self._exchange_buffers[key] = (buffer_2W3, sent_W3, received_W3, sent_W3[:, 0], sent_W3[:, 1])
        exchange_2W3, sent_W3, received_W3, rows_W, pairs_W = self._exchange_buffers[key]
        torch.sum(sent_WT, dim=1, out=rows_W)
        torch.sum(hit_WTK, dim=(1, 2), out=pairs_W)
        all_to_all_ints(sent_W3, self.group, out=received_W3)
        return exchange_2W3

    def __call__(
        self, x_TH: torch.Tensor, routing: Routing, experts: nn.Module, backend: Backend
    ) -> torch.Tensor:
        check_device(self.group, x_TH.device, "x")
        part, device = self.partition, x_TH.device
        T, K = routing.expert_ids.shape
        ids_TK = routing.expert_ids.to(device, torch.int32)  # no-op: int32 is Routing's contract
        weights_TK = routing.weights.to(device)  # float32

        # The phases are named in profiles (torch.profiler) by these ranges.
        with record_function("moe_replay.alltoall.counts"):  # origin: where each token goes
            # int32 0/1 masks, not bool: the sums, the cumsum and addcmul below then need no casts.
            rank_TK = torch.bucketize(
                ids_TK, self._constant("rank_bounds_W", device), right=True, out_int32=True
            )
            hit_WTK = torch.empty(part.world_size, T, K, dtype=torch.int32, device=device)
            torch.eq(rank_TK, self._constant("ranks_W11", device), out=hit_WTK)  # t's k-th expert on r
            sent_WT = hit_WTK.amax(dim=2)  # t sends a row to r
            needs_grad = input_needs_grad(x_TH) or input_needs_grad(weights_TK)
            exchange_2W3 = self._start_count_exchange(sent_WT, hit_WTK, needs_grad)
            # Queued before the host waits for the counts: all that does not need them.
            slot_of_row_TW, token_of_slot_C, offsets_W1 = _send_order(
                sent_WT,
                self._rows("token_T1", T, device, None, 1),
                self._constant("minus_one", device),
                self._constant("zero_1", device),
            )
            meta_TM = torch.cat([weights_TK, ids_TK], dim=1)  # [T, 2K] float32 (ids promoted)
            ones_TW = self._rows("ones_TW", T, device, 1.0, part.world_size)
            counts = _Counts.read(exchange_2W3)  # the one host sync
            self._last_send_rows = tuple(counts.send_rows)
            x_TH = align_requires_grad(x_TH, counts.any_needs_grad)

        with record_function("moe_replay.alltoall.send"):
            to_ranks = ExpertBuckets(
                row_of_slot_N=token_of_slot_C[: sum(counts.send_rows)],
                slot_of_row_MR=slot_of_row_TW,
                offsets_E1=offsets_W1,
            )
            x_SH = backend.permute_rows(x_TH, to_ranks)
            meta_SM = backend.permute_rows(meta_TM, to_ranks)
            x_MH, meta_MM = all_to_all_rows([x_SH, meta_SM], counts.send_rows, counts.recv_rows, self.group)

        # Receiver: one weighted partial sum per received row over this rank's experts, one stage
        # (experts.forward_combined -> expert_mlp_combine, fused where the backend has it).
        with record_function("moe_replay.alltoall.experts"):
            local_of_expert_E = self._constant("local_of_expert_E", device)
            read_bounds_21 = self._constant("read_bounds_21", device)
            buckets = _pair_buckets(
                meta_MM, local_of_expert_E, read_bounds_21, counts.recv_pairs, part.num_local, backend
            )
            y_MH = experts.forward_combined(x_MH, buckets, meta_MM, backend, x_TH.dtype)

        with record_function("moe_replay.alltoall.return"):  # origin: each token's partials, float32
            (y_SH,) = all_to_all_rows([y_MH], counts.recv_rows, counts.send_rows, self.group)
            return _AddPartials.apply(y_SH, to_ranks, ones_TW, backend, x_TH.dtype)
