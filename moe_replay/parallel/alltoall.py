"""The ``alltoall`` expert-parallel dispatcher: each token goes once to each rank holding its experts.

Shape legend: W ranks, T this rank's tokens, K experts per token, C token chunks (``chunks``,
default 1), S token rows this rank sends (one per token and destination rank), M token rows
received from all ranks, P (row, k) pairs of the received rows whose expert is on this rank,
E_loc this rank's experts, H hidden.

A transport carries the rows (``EPConfig.transport``, :mod:`moe_replay.parallel.transport`):
``torch.distributed``'s all-to-all (``"collectives"``, the default: NCCL on GPUs, gloo on the
CPU), or, experimental, symmetric memory (``"peers"``, :mod:`moe_replay.parallel.peers`). This
module computes (the send plan, the count exchange, the experts); the transport communicates.
With collectives, data movement on each rank::

    origin    plan.send_plan: per chunk, the send list ordered by (rank, token) (slot -1 where a
              token has no expert on a rank) and its counts per rank      (no host sync; 2 Triton launches)
              all-gather of [rows, (token, expert) pairs, grad flag] per rank and chunk (every rank
              learns every rank's counts: ``collectives.CountExchange``); its result copied to
              pinned host memory, an event recorded
              queued meanwhile: x_TH and meta_TM = [gate weights_K | global ids_K] (float32)
              permuted into the send rows at capacity (T_c * min(W, K) per chunk: an upper bound)
              ── the one host sync: the event; the device goes on permuting meanwhile ──
         ─►   per chunk, started at once: all-to-all of the first S_c rows of x and meta
    receiver  per chunk: plan.received_buckets(meta) ─► buckets over the E_loc experts that
              read each row 2K times, once per meta column (slot -1: elsewhere, or an id)
              y_MH = experts + combine(weights = meta_MM)    one partial sum per received row
         ─►   all-to-all back, started at once ─► y_SH        (in the send list's order again)
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

The backward overlaps both of its all-to-alls with the receiver's work
(``EPConfig.overlap_backward``; :mod:`moe_replay.parallel.transport_collectives` says how).

What a call costs, and why it is laid out so. On an H100 node each torch op or Triton launch
costs the host 20-100 µs, and the sizes where expert parallelism is used are host-bound unless
the device has queued work whenever the host waits. So: the sender's metadata is one backend
stage (``plan.send_plan``: two Triton launches, where the torch reference takes about twenty ops) and
the receiver's another (``plan.received_buckets``: the dispatch's launches reading ids from the meta
rows); the host waits for the counts on an event, not on the stream, while the device permutes
the send rows into buffers sized by the bound (at most K ranks per token: about 10% over S at
E = 128, K = 8 on 4 ranks; rows past S are never sent); reused buffers and constants replace
per-call allocations. The all-to-alls are asynchronous: with C > 1 chunk
c + 1's rows travel while chunk c's experts run. On 4 H100s at T = 16384 per rank the extra host
work of a second chunk cost more than the overlap gained (``benchmarks/RESULTS.md``), hence one
chunk by default; ``EPConfig.chunks`` (the same on every rank) changes it.
``benchmarks/count_ep_ops.py`` counts the ops outside the experts per call. x and meta take two
all-to-alls, not one packed row: the experts read x_MH contiguous, so packing would cost a copy of
the [S, H] rows on each side. Reading meta whole (2K reads a row, K of them without a slot) spares
the weights' slice a copy forward and a zero-fill and copy backward.

Uneven splits need no padding: ``all_to_all_single`` takes per-rank row counts, which every rank
learns from the one count exchange. Deterministic: the send list is ordered by (rank, token), the
received pairs by (source rank, token, k) and grouped by a stable dispatch, and every sum (a
token's partials, its gradient rows) is a gather in a fixed order, not atomics. Results do not
depend on the chunk count, except the expert weights' gradients, which autograd accumulates over
the chunks (one rounding per chunk in their dtype).

Precision notes: the partial sums travel back in x's dtype (bf16 halves the return traffic) and
the origin adds them in float32. The single-process layer sums a token's K weighted expert outputs
in float32 and rounds once; here each rank's partial is rounded to x's dtype first: in bf16 the
results differ by one rounding per partial (at most W), in float32 they match to ~1e-6. Gate
weights travel in float32, as the router made them; expert ids as float32 values, exact (ids are
below 2**24).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.profiler import record_function

from moe_replay.parallel.collectives import CountExchange, check_device, input_needs_grad
from moe_replay.parallel.config import EPConfig
from moe_replay.parallel.plan import send_plan
from moe_replay.parallel.transport import Counts, Outbound, Transport, make_transport

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend
    from moe_replay.parallel.partition import ExpertPartition
    from moe_replay.types import ExpertsModule, Routing


class AllToAllDispatcher:
    """``dispatch(x_TH, routing, experts, backend) -> y_TH`` over ``group`` (module docstring).

    ``experts`` holds this rank's experts (``partition.first:partition.end``); ``routing`` holds
    global expert ids. A collective: every rank of ``group`` calls it, also with T = 0.
    ``config``: the transport, chunks and overlap switches, the same on every rank.
    """

    def __init__(
        self, group: ProcessGroup, partition: ExpertPartition, config: EPConfig | None = None
    ) -> None:
        config = EPConfig(mode="alltoall") if config is None else config
        if not isinstance(config, EPConfig):
            raise TypeError(f"config must be an EPConfig, got {type(config).__name__}")
        self.group = group
        self.partition = partition
        self.config = config
        self.transport: Transport = make_transport(config.transport, group, partition, config)
        W, E, E_loc = partition.world_size, partition.num_experts, partition.num_local
        local_of_expert = [
            e - partition.first if partition.first <= e < partition.end else E_loc for e in range(E)
        ]
        self._host_constants: dict[str, tuple[list[int], tuple[int, ...], torch.dtype]] = {
            "rank_offsets_W1": (list(partition.offsets), (W + 1,), torch.int32),
            "local_of_expert_E": (local_of_expert, (E,), torch.int32),
        }
        self._device_constants: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._counts: CountExchange | None = None
        self.rank = dist.get_rank(group)
        self._last_send_rows: tuple[int, ...] = ()

    @property
    def chunks(self) -> int:
        return self.config.chunks

    @property
    def last_send_rows(self) -> tuple[int, ...]:
        """Token rows the last call sent to each rank, over all chunks: one per token and rank
        holding at least one of its experts (diagnostics; empty before the first call)."""
        return self._last_send_rows

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """A constant on ``device``, copied there once (not on every call)."""
        key = (name, device)
        if key not in self._device_constants:
            values, shape, dtype = self._host_constants[name]
            self._device_constants[key] = torch.tensor(values, dtype=dtype, device=device).view(shape)
        return self._device_constants[key]

    def _count_exchange(self) -> CountExchange:
        """The count exchange for this call's chunk count: per rank and chunk, rows, (token,
        expert) pairs, and the flags every rank sends every rank."""
        shape = (self.partition.world_size, self.chunks, 3)
        if self._counts is None or self._counts.shape != shape:
            self._counts = CountExchange(self.group, shape)
        return self._counts

    def _read_counts(self, exchange: CountExchange) -> Counts:
        """The counts (the host waits here: the one sync of a call); :attr:`last_send_rows` reads
        them."""
        counts = Counts.read(exchange.read(), self.rank)
        self._last_send_rows = counts.rows[self.rank]
        return counts

    def __call__(
        self, x_TH: torch.Tensor, routing: Routing, experts: ExpertsModule, backend: Backend
    ) -> torch.Tensor:
        check_device(self.group, x_TH.device, "x")
        part, device, C = self.partition, x_TH.device, self.chunks
        K = routing.expert_ids.shape[1]
        ids_TK = routing.expert_ids.to(device, torch.int32)  # no-op: int32 is Routing's contract
        weights_TK = routing.weights.to(device)  # float32

        # The phases are named in profiles (torch.profiler) by these ranges.
        with record_function("moe_replay.alltoall.counts"):  # origin: where each token goes
            needs_grad = input_needs_grad(x_TH) or input_needs_grad(weights_TK)
            staged = self.transport.can_stage(x_TH, 2 * K)
            flags = (Counts.NEEDS_GRAD if needs_grad else 0) | (Counts.STAGED if staged else 0)
            exchange = self._count_exchange()
            rank_offsets_W1 = self._constant("rank_offsets_W1", device)
            plan = send_plan(backend, ids_TK, rank_offsets_W1, C, exchange.mine(flags, device))
            gathered = exchange.launch()
            meta_TM = torch.cat([weights_TK, ids_TK], dim=1)  # [T, 2K] float32 (ids promoted)
            outbound = Outbound(
                x_TH=x_TH,
                meta_TM=meta_TM,
                plan=plan,
                counts_WWC3=gathered,
                reach=min(part.world_size, K),
                staged=staged,
                backend=backend,
                local_of_expert_E=self._constant("local_of_expert_E", device),
                num_local=part.num_local,
            )
            trip = self.transport.start(outbound)  # the device works while the host waits
            counts = self._read_counts(exchange)

        with record_function("moe_replay.alltoall.send"):
            trip.send(counts)
        # Receiver, chunk by chunk: one weighted partial sum per received row over this rank's
        # experts (experts.forward_combined), sent back at once: the next chunk's rows arrive,
        # and this one's partials leave, while the experts run.
        for c in range(C):
            with record_function("moe_replay.alltoall.experts"):
                rows = trip.to_experts(c)
                y_MH = experts.forward_combined(
                    rows.x_MH,
                    rows.buckets,
                    rows.meta_MM,
                    backend,
                    x_TH.dtype,
                    rows.on_input_grads,
                    rows.out_MH,
                )
                trip.to_origins(c, y_MH)
        with record_function("moe_replay.alltoall.return"):  # origin: each token's partials, float32
            return trip.gather()
