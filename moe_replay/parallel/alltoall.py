"""The ``alltoall`` expert-parallel dispatcher: each token goes once to each rank holding its experts.

Shape legend: W ranks, T this rank's tokens, K experts per token, C token chunks (``chunks``,
default 1), S token rows this rank sends (one per token and destination rank), M token rows
received from all ranks, P (row, k) pairs of the received rows whose expert is on this rank,
E_loc this rank's experts, H hidden.

Two transports carry the rows (:data:`TRANSPORT`): NCCL's all-to-all (``"collectives"``, this
module, CPU gloo groups too), and symmetric memory (``"peers"``,
``moe_replay.parallel.alltoall_peers``: receivers read their rows from the origins', each
receiver's combine writes its partial sums home; one chunk). Both start from the same send plan
and count exchange. With collectives, data movement on each rank::

    origin    backend.send_plan: per chunk, the send list ordered by (rank, token) (slot -1 where a
              token has no expert on a rank) and its counts per rank      (no host sync; 2 Triton launches)
              all-gather of [rows, (token, expert) pairs, grad flag] per rank and chunk (every rank
              learns every rank's counts: ``collectives.CountExchange``); its result copied to
              pinned host memory, an event recorded
              queued meanwhile: x_TH and meta_TM = [gate weights_K | global ids_K] (float32)
              permuted into the send rows at capacity (T_c * min(W, K) per chunk: an upper bound)
              ── the one host sync: the event; the device goes on permuting meanwhile ──
         ─►   per chunk, started at once: all-to-all of the first S_c rows of x and meta
    receiver  per chunk: backend.received_buckets(meta) ─► buckets over the E_loc experts that
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

The backward overlaps both of its all-to-alls with the receiver's work (``overlap_backward``;
``MOE_REPLAY_EP_BACKWARD_OVERLAP=0`` turns it off, for A/B measurements):

* while the partials' gradients arrive, the receiver queues what its experts' backward needs no
  gradient for (``Backend.prepare_backward``; the Triton backend gathers the x rows that the
  gate_up weight gradient reads);
* the experts' backward computes the rows' gradients first and starts the all-to-all forth itself
  (``on_input_grads``, ``RowsInFlight.send_grads_now``; where the backend supports it: the Triton
  one), then computes the expert weights' gradients, about half its GEMM work, while the rows
  travel. The first of those GEMMs leaves the SMs NCCL's kernel may hold to it
  (``collectives.collective_sms``, or ``MOE_REPLAY_EP_COMM_SMS``): the CUTLASS grouped GEMMs are
  persistent, and a block waiting for an SM that the all-to-all holds would hold the whole GEMM
  back until the transfer ends.

What a call costs, and why it is laid out so. On an H100 node each torch op or Triton launch
costs the host 20-100 µs, and the sizes where expert parallelism is used are host-bound unless
the device has queued work whenever the host waits. So: the sender's metadata is one backend
stage (``send_plan``: two Triton launches, where the torch reference takes about twenty ops) and
the receiver's another (``received_buckets``: the dispatch's launches reading ids from the meta
rows); the host waits for the counts on an event, not on the stream, while the device permutes
the send rows into buffers sized by the bound (at most K ranks per token: about 10% over S at
E = 128, K = 8 on 4 ranks; rows past S are never sent); reused buffers and constants replace
per-call allocations. The all-to-alls are asynchronous (``collectives.start_all_to_all_rows``):
with C > 1 chunk c + 1's rows travel while chunk c's experts run, and chunk c's partials travel
back while chunk c + 1's run; in the backward, autograd's order (latest node first) gives the
mirror image. On 4 H100s at T = 16384 per rank the extra host work of a second chunk cost more
than the overlap gained (benchmarks/RESULTS.md), hence one chunk by default;
``MOE_REPLAY_EP_CHUNKS`` or the ``chunks`` attribute (the same on every rank) changes it.
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

import os
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.profiler import record_function

from moe_replay.parallel.alltoall_peers import PeerTransport
from moe_replay.parallel.collectives import (
    CountExchange,
    RowsInFlight,
    align_requires_grad,
    check_device,
    collective_sms,
    input_needs_grad,
    start_all_to_all_rows,
)
from moe_replay.parallel.peers import unavailable_reason as peers_unavailable_reason

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend, InputGradsHook, SendPlan
    from moe_replay.parallel.partition import ExpertPartition
    from moe_replay.routing.route import Routing

CHUNKS = int(os.environ.get("MOE_REPLAY_EP_CHUNKS", "1"))
"""Token chunks per call by default (a tuning switch, like the Triton backend's): with more than
one, each chunk's all-to-alls overlap another chunk's experts, forward and backward, at the cost
of more host work per call (module docstring). Every rank of a group must use the same number
(it fixes the sequence of collectives)."""


BACKWARD_OVERLAP = os.environ.get("MOE_REPLAY_EP_BACKWARD_OVERLAP", "1") == "1"
"""Whether the backward overlaps its all-to-alls with the receiver's work (module docstring). A
switch for A/B measurements; results are the same either way."""


TRANSPORT = os.environ.get("MOE_REPLAY_EP_TRANSPORT", "auto")
"""How tokens travel: ``"collectives"`` (``all_to_all_single``, this module), ``"peers"``
(symmetric memory, ``moe_replay.parallel.alltoall_peers``), or ``"auto"``: peers where the group
has symmetric memory on a GPU and the call has one chunk, else collectives (the CPU: its
shared-memory peers are for tests and explicit use). The ``transport`` attribute overrides it per
layer (the same on every rank).

Why (4 H100s, Qwen3 shape, forward / forward+backward ms on one machine, benchmarks/RESULTS.md,
eighth session): peers 4.17 / 11.26 at T = 16384 per rank against 4.73 / 13.08 for collectives
(seventh session, at T = 4096: 2.20 / 4.56 against 3.05 / 5.76). The peer transport launches
fewer kernels, moves no rows through send buffers in the forward and pulls them before the host
has the counts; its backward copies blocks with copy engines, which leave the weight-gradient
GEMMs every SM."""

TRANSPORTS = ("auto", "peers", "collectives")

COMM_SMS = int(os.environ["MOE_REPLAY_EP_COMM_SMS"]) if "MOE_REPLAY_EP_COMM_SMS" in os.environ else None
"""How many SMs the experts' backward leaves to the all-to-all it overlaps (None: NCCL's cap,
``collectives.collective_sms``; 0: none). A switch for A/B measurements."""


def comm_sms(device: torch.device) -> int:
    """How many SMs the experts' backward leaves to the all-to-all it overlaps: :data:`COMM_SMS`,
    else NCCL's cap (``collectives.collective_sms``). The peer transport's copies need none."""
    return collective_sms(device) if COMM_SMS is None else COMM_SMS


@dataclass(frozen=True)
class Counts:
    """What the count exchange tells this rank (host ints)."""

    rows: tuple[tuple[int, ...], ...]
    """``[s][d]``: token rows rank s sends rank d, over all chunks."""
    send_rows: list[list[int]]
    """``[chunk][rank]``: token rows this rank sends to each rank."""
    recv_rows: list[list[int]]
    """``[chunk][rank]``: token rows this rank receives from each rank."""
    recv_pairs: list[int]
    """``[chunk]``: (row, k) pairs of the received rows whose expert is on this rank."""
    any_needs_grad: bool
    """Whether any rank's input (x or gate weights) needs a gradient."""
    staged_everywhere: bool
    """Whether every rank staged its rows before the count sync (the peer transport's
    ``PeerTransport.can_stage``)."""

    NEEDS_GRAD, STAGED = 1, 2
    """The bits of a rank's flags (the count exchange's third column)."""

    @staticmethod
    def read(matrix: list, rank: int) -> Counts:
        """The counts from the all-gathered matrix ``[s][d][chunk]`` of (rows, pairs, flags)."""
        sent, received = matrix[rank], [row[rank] for row in matrix]
        chunks = range(len(sent[0]))
        # Every entry of a rank's row carries its flags: the first chunk's to rank 0 says them.
        flags = [row[0][0][2] for row in matrix]
        return Counts(
            rows=tuple(tuple(sum(chunk[0] for chunk in to_d) for to_d in row) for row in matrix),
            send_rows=[[to_d[c][0] for to_d in sent] for c in chunks],
            recv_rows=[[from_s[c][0] for from_s in received] for c in chunks],
            recv_pairs=[sum(from_s[c][1] for from_s in received) for c in chunks],
            any_needs_grad=any(f & Counts.NEEDS_GRAD for f in flags),
            staged_everywhere=all(f & Counts.STAGED for f in flags),
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
    ``chunks``: token chunks per call (default :data:`CHUNKS`), the same on every rank.
    """

    def __init__(self, group: ProcessGroup, partition: ExpertPartition, chunks: int | None = None) -> None:
        chunks = CHUNKS if chunks is None else chunks
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
        self.group = group
        self.partition = partition
        self.chunks = chunks
        self.overlap_backward = BACKWARD_OVERLAP
        self.transport = TRANSPORT
        self._peers: PeerTransport | None = None
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
    def last_send_rows(self) -> tuple[int, ...]:
        """Token rows the last call sent to each rank, over all chunks: one per token and rank
        holding at least one of its experts (diagnostics; empty before the first call)."""
        return self._last_send_rows

    def transport_for(self, device: torch.device) -> str:
        """``"peers"`` or ``"collectives"``: the transport a call on ``device`` takes (see
        :data:`TRANSPORT`)."""
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.transport == "auto":
            usable = device.type == "cuda" and self.chunks == 1
            usable = usable and peers_unavailable_reason(self.group, device) is None
            return "peers" if usable else "collectives"
        if self.transport == "peers":
            if self.chunks != 1:
                raise ValueError(f"the peers transport runs one chunk per call, chunks is {self.chunks}")
            reason = peers_unavailable_reason(self.group, device)
            if reason is not None:
                raise ValueError(f"transport='peers' is unavailable: {reason}")
        return self.transport

    def _send_grads_early(self, flight: RowsInFlight, device: torch.device) -> InputGradsHook:
        """The experts' ``on_input_grads``: start the rows' gradients home, and say how many SMs
        the all-to-all may hold meanwhile (:func:`comm_sms`)."""
        busy = comm_sms(device)

        def send(dx_MH: torch.Tensor | None, dmeta_MM: torch.Tensor | None) -> int:
            flight.send_grads_now(dx_MH, dmeta_MM)
            return busy

        return send

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """A constant on ``device``, copied there once (not on every call)."""
        key = (name, device)
        if key not in self._device_constants:
            values, shape, dtype = self._host_constants[name]
            self._device_constants[key] = torch.tensor(values, dtype=dtype, device=device).view(shape)
        return self._device_constants[key]

    def _ones(self, rows: int, device: torch.device) -> torch.Tensor:
        """``[rows, W]`` float32 ones (the unit weights of the partials' sum), made once per
        doubling of the row count."""
        key = ("ones_TW", device)
        cached = self._device_constants.get(key)
        if cached is None or cached.shape[0] < rows:
            capacity = max(rows, 2 * cached.shape[0] if cached is not None else 64)
            cached = torch.ones(capacity, self.partition.world_size, dtype=torch.float32, device=device)
            self._device_constants[key] = cached
        return cached[:rows]

    def _count_exchange(self) -> CountExchange:
        """The count exchange for this call's chunk count: per rank and chunk, rows, (token,
        expert) pairs, and the grad flag every rank sends every rank."""
        shape = (self.partition.world_size, self.chunks, 3)
        if self._counts is None or self._counts.shape != shape:
            self._counts = CountExchange(self.group, shape)
        return self._counts

    def _capacity_sends(
        self, x_TH: torch.Tensor, meta_TM: torch.Tensor, plan: SendPlan, backend: Backend, reach: int
    ) -> list[tuple[torch.Tensor, ...]]:
        """Each chunk's send rows of x and meta at capacity (the first S_c of them are the list;
        the rest, copies of a chunk's first token, are not sent): queued before the host waits
        for the counts, so that the device has work meanwhile."""
        C, sends = self.chunks, []
        for c in range(C):
            rows = plan.rows(c)
            to_ranks_cap = plan.chunk(c, (rows.stop - rows.start) * reach)[1]
            # One chunk reads the whole tensors (a slice would cost its backward a zero-fill and a
            # copy of the gradient).
            x_c, meta_c = (x_TH, meta_TM) if C == 1 else (x_TH[rows], meta_TM[rows])
            sends.append(
                (backend.permute_rows(x_c, to_ranks_cap), backend.permute_rows(meta_c, to_ranks_cap))
            )
        return sends

    def _read_counts(self, exchange: CountExchange) -> Counts:
        """The counts (the host waits here: the one sync of a call); :attr:`last_send_rows` reads
        them."""
        counts = Counts.read(exchange.read(), self.rank)
        self._last_send_rows = counts.rows[self.rank]
        return counts

    def __call__(
        self, x_TH: torch.Tensor, routing: Routing, experts: nn.Module, backend: Backend
    ) -> torch.Tensor:
        check_device(self.group, x_TH.device, "x")
        part, device, C = self.partition, x_TH.device, self.chunks
        K = routing.expert_ids.shape[1]
        ids_TK = routing.expert_ids.to(device, torch.int32)  # no-op: int32 is Routing's contract
        weights_TK = routing.weights.to(device)  # float32
        peers = self.transport_for(device) == "peers"
        reach = min(part.world_size, K)  # ranks a token can reach: the send list's capacity per token

        # The phases are named in profiles (torch.profiler) by these ranges.
        with record_function("moe_replay.alltoall.counts"):  # origin: where each token goes
            needs_grad = input_needs_grad(x_TH) or input_needs_grad(weights_TK)
            flags = Counts.NEEDS_GRAD if needs_grad else 0
            if peers:
                if self._peers is None:
                    self._peers = PeerTransport(self.group, part)
                stage = self._peers.can_stage(x_TH, 2 * K)
                flags |= Counts.STAGED if stage else 0
            exchange = self._count_exchange()
            rank_offsets_W1 = self._constant("rank_offsets_W1", device)
            plan = backend.send_plan(ids_TK, rank_offsets_W1, C, exchange.mine(flags, device))
            gathered = exchange.launch()
            meta_TM = torch.cat([weights_TK, ids_TK], dim=1)  # [T, 2K] float32 (ids promoted)
            if peers:  # staged, exchanged and pulled while the host waits, where the last call's areas serve
                places = x_TH.shape[0] * reach
                self._peers.start(x_TH, meta_TM, plan, places, gathered, backend, self._constant, stage)
            sends = [] if peers else self._capacity_sends(x_TH, meta_TM, plan, backend, reach)
            counts = self._read_counts(exchange)

        if peers:
            push_early = self.overlap_backward and counts.any_needs_grad
            return self._peers(
                x_TH, meta_TM, plan, counts, gathered, experts, backend, self._constant, push_early
            )

        with record_function("moe_replay.alltoall.send"):
            flights: list[RowsInFlight] = []
            for c, (x_cap, meta_cap) in enumerate(sends):
                # A rank whose input needs no gradient still joins the backward's collectives.
                x_cap = align_requires_grad(x_cap, counts.any_needs_grad)
                send, recv = counts.send_rows[c], counts.recv_rows[c]
                flights.append(start_all_to_all_rows([x_cap, meta_cap], send, recv, self.group))

        # Receiver, chunk by chunk: one weighted partial sum per received row over this rank's
        # experts (experts.forward_combined), sent back at once: the next chunk's rows arrive,
        # and this one's partials leave, while the experts run.
        local_of_expert_E = self._constant("local_of_expert_E", device)
        returns: list[RowsInFlight] = []
        for c in range(C):
            with record_function("moe_replay.alltoall.experts"):
                x_MH, meta_MM = flights[c].finish()
                pairs = counts.recv_pairs[c]
                buckets = backend.received_buckets(meta_MM, local_of_expert_E, part.num_local, pairs)
                # x_MH and meta_MM have no other differentiable consumer, so the experts' backward
                # may send their gradients home before it computes the weight gradients.
                overlap = self.overlap_backward
                early = self._send_grads_early(flights[c], device) if overlap else None
                y_MH = experts.forward_combined(x_MH, buckets, meta_MM, backend, x_TH.dtype, early)
                # In the backward, the experts' prologue (what needs no gradient) runs while the
                # partials' gradients arrive.
                node = y_MH.grad_fn
                prologue = partial(backend.prepare_backward, node) if overlap and node is not None else None
                returns.append(
                    start_all_to_all_rows(
                        [y_MH], counts.recv_rows[c], counts.send_rows[c], self.group, prologue
                    )
                )

        with record_function("moe_replay.alltoall.return"):  # origin: each token's partials, float32
            outputs = []
            for c in range(C):
                (y_SH,) = returns[c].finish()
                rows, to_ranks = plan.chunk(c, sum(counts.send_rows[c]))
                ones_TW = self._ones(rows.stop - rows.start, device)
                outputs.append(_AddPartials.apply(y_SH, to_ranks, ones_TW, backend, x_TH.dtype))
            return outputs[0] if C == 1 else torch.cat(outputs)
