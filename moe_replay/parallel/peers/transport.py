"""The ``alltoall`` dispatcher's peer transport (experimental, ``EPConfig(transport="peers")``):
the same trip of each token to its experts' ranks and back, through symmetric memory
(:mod:`.memory`) instead of NCCL.

Shape legend as in ``moe_replay.parallel.alltoall``: W ranks, T this rank's tokens, S rows of its
send list (one per token and rank holding one of its experts), M rows it receives, H hidden,
K experts per token.

Data movement, on each rank (every arrow a barrier of the group)::

    origin    send_plan; all-gather of the counts (every rank learns the W x W matrix); stage
              x_TH, meta_TM = [gate weights | ids] and the send list's tokens in this rank's
              symmetric rows                                                           ─► barrier
    receiver  pull_rows (:mod:`.rows`): token_M, each row's token from its origin's send list; then x_MH and
              meta_MM, read from the origins' staged rows over NVLink (the permutation and the
              transfer in one kernel each); their buckets over this rank's experts; host sync
              (the counts; on a layer's first call it comes before the barrier)
              experts + combine, the combine writing each row's partial sum into its origin's
              return rows, at the row's place in the origin's send list                ─► barrier
    origin    y_TH[t] = sum of t's <= W partials, float32, rank order (a local gather)

Backward::

    origin    stage dy_TH in the send list's order (each receiver's rows one block)     ─► barrier
    receiver  copy dy_MH's blocks in (copy engines, on the copy stream), while the experts'
              backward queues what needs no gradient (``Backend.prepare_backward``: the Triton
              one gathers the x rows its weight gradient reads); the experts' backward; as soon
              as dx_MH and the gate weights' gradient are done (``on_input_grads``) their blocks
              are copied into their origins' return rows on the copy stream, next to the
              weight-gradient GEMMs, which need leave no SMs free for copies         ─► barrier
    origin    each token's gradient rows summed (the send list's buckets): x's and the gate
              weights' gradients

Compared with NCCL's all-to-all: no permutation into send buffers in the forward (the receiver
reads the origin's rows where they are), no separate pass for the return (the combine writes
remote rows), and the forward's loads and stores run on every SM, not
NCCL's 32. The backward moves contiguous blocks (a receiver's rows from one origin are one
block of the origin's send list), which copy engines carry over NVLink as fast as NCCL's
all-to-all (benchmarks/probe_copy_engine.py), holding no SMs: the GEMMs next to them run on all
of them, losing only some memory bandwidth. The receiver's rows (x_MH, which the experts'
backward keeps) are its own tensors: only staged and returned rows live in symmetric memory.

From a layer's second call on, staging, the barrier, the pulls and the buckets are queued before
the host waits for the counts (``PeerTransport.start``): the pull kernels count their rows on the
device and run over a grid and into tensors of a capacity (the last call's most rows received by
a rank, and an eighth more), reading nothing outside the areas, and the capacity's extra rows get
expert id -1, in no bucket. So the device stages, pulls and buckets while the host waits for the
counts and then works out the call (on 4 H100s the device had
idled 0.4-0.6 ms there, profiled, at T = 16384). Once the host has the counts, every rank
checks the same things: every rank had room to stage (its flag in the count exchange), the areas
hold the call's rows, and the capacity its received rows. If not, all of them pass one more
barrier (every early pull is done) and stage and pull again as on a layer's first call. The
capacity's rows past M live as long as x_MH, which the experts' backward keeps.

Why the barriers are enough. A rank's staged rows are written by it and read by the others
between two barriers; its return rows are written by the others and read by it after a barrier.
The next write to either comes after the next exchange's first barrier, or, for staging, after
the last exchange's final barrier, which no rank passes before every rank has done its reads of
the last one (stream order on each rank: the copy stream's work joins the main stream before
its next barrier, and every barrier runs on the main stream). So one buffer per group serves
every layer, forward and backward, activation checkpointing included; it grows (collectively,
every rank agreeing from the count matrix) when a call needs more rows than it has.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moe_replay.parallel.collectives import align_requires_grad, check_sent_early
from moe_replay.parallel.peers.memory import PeerMemory, peer_memory, row_layout, unavailable_reason
from moe_replay.parallel.peers.rows import (
    PeerArea,
    PeerExchange,
    PeerRows,
    pull_rows,
    push_rows,
    uses_kernels,
)
from moe_replay.parallel.plan import received_buckets
from moe_replay.parallel.transport import Counts, Delivery, Outbound
from moe_replay.types import ExpertBuckets, SendPlan

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend
    from moe_replay.parallel.config import EPConfig
    from moe_replay.parallel.partition import ExpertPartition


@dataclass(frozen=True)
class _Areas:
    """The symmetric rows of one call: staged by each origin (``stage_*``, read by receivers),
    and returned (``back_*``: receivers' partials in the forward, origins' gradient rows in the
    backward)."""

    stage_rows: PeerArea
    stage_meta: PeerArea
    stage_tokens: PeerArea
    back_rows: PeerArea
    back_meta: PeerArea

    @staticmethod
    def row_bytes(H: int, M2: int, dtype: torch.dtype) -> list[int]:
        return [H * dtype.itemsize, M2 * 4, 4, H * dtype.itemsize, M2 * 4]

    @staticmethod
    def carve(memory: PeerMemory, H: int, M2: int, dtype: torch.dtype) -> _Areas:
        """As many rows of each as ``memory`` holds."""
        row_bytes = _Areas.row_bytes(H, M2, dtype)
        rows = 1
        while row_layout(2 * rows, row_bytes)[1] <= memory.nbytes:
            rows *= 2
        step = rows // 2
        while step:  # the largest row count that fits
            if row_layout(rows + step, row_bytes)[1] <= memory.nbytes:
                rows += step
            step //= 2
        offsets, _ = row_layout(rows, row_bytes)
        shapes = [(rows, H), (rows, M2), (rows,), (rows, H), (rows, M2)]
        dtypes = [dtype, torch.float32, torch.int32, dtype, torch.float32]
        return _Areas(*(memory.area(o, s, d) for o, s, d in zip(offsets, shapes, dtypes)))


@dataclass
class _Call:
    """What a forward call hands its backward (and the early push in between)."""

    memory: PeerMemory
    areas: _Areas
    exchange: PeerExchange
    plan: SendPlan
    backend: Backend
    out_dtype: torch.dtype
    pulled: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(x_MH, meta_MM)`` where the rows were pulled before the count sync (``PeerTransport.start``)."""
    early: tuple | None = None
    """``(dx_MH, dmeta_MM, done event or None)`` once ``push_early`` sent them."""

    @property
    def me(self) -> int:
        return self.exchange.rank

    @functools.cached_property  # first read after the experts' launch, off the host's busy stretch
    def to_ranks(self) -> ExpertBuckets:
        """The send list as buckets over the ranks: ``slot_of_row_MR`` is ``[T, W]``, each token's
        place for each rank (-1: none)."""
        return self.plan.chunk(0, self.exchange.num_sent)[1]

    @property
    def device(self) -> torch.device:
        return self.areas.back_rows.views[self.me].device

    def sum_per_token(self, area: PeerArea, out_dtype: torch.dtype) -> torch.Tensor:
        """``out[t] = sum of area's rows at t's places`` (this rank's rows of ``area`` in its send
        list's order), float32 in rank order: each token's partials, or its gradient rows."""
        S, slot_of_row_TW = self.exchange.num_sent, self.to_ranks.slot_of_row_MR
        ones_TW = torch.ones(slot_of_row_TW.shape, dtype=torch.float32, device=self.device)
        return self.backend.combine(area.views[self.me][:S], self.to_ranks, ones_TW, out_dtype)

    def push(self, dx_MH: torch.Tensor | None, dmeta_MM: torch.Tensor | None) -> None:
        """Every received row's gradients into its origin's return rows (``rows.push_rows``: a
        block per origin, copy engines on a GPU); the barrier after them is the caller's."""
        M = self.exchange.num_received
        for grads, area in ((dx_MH, self.areas.back_rows), (dmeta_MM, self.areas.back_meta)):
            own = area.views[self.me]
            # Every rank sends both, gradients or not (zeros): its origins sum what they hold.
            if grads is None:
                grads = torch.zeros(M, own.shape[1], dtype=own.dtype, device=own.device)
            push_rows(grads.to(own.dtype), area, self.exchange)

    def push_early(self, dx_MH: torch.Tensor | None, dmeta_MM: torch.Tensor | None) -> int:
        """The experts' ``on_input_grads``: the copies home on the copy stream, next to their
        weight-gradient GEMMs. Copy engines hold no SMs, so the GEMMs need leave none free:
        returns 0. (The barrier after the copies runs on the main stream, after those GEMMs: a
        kernel waiting on other ranks next to a persistent GEMM holds one of its SMs, and with
        it the GEMM.)"""
        if self.early is not None:
            raise RuntimeError("the peer transport's gradients were pushed twice in one backward")
        done = None
        with _on_copy_stream(self.device) as copies:
            self.push(dx_MH, dmeta_MM)
            if copies is not None:
                done = torch.cuda.Event()
                done.record(copies)
        self.early = (dx_MH, dmeta_MM, done)
        return 0


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


@contextlib.contextmanager
def _on_copy_stream(device: torch.device) -> Iterator[torch.cuda.Stream | None]:
    """Work queued inside runs on ``device``'s copy stream, after the current stream's work so far;
    yields that stream (None on the CPU, where copies run at once, in order)."""
    if device.type != "cuda":
        yield None
        return
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device=device, priority=-1)
    copies = _COPY_STREAMS[device]
    copies.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(copies):
        yield copies


def _pull(
    backend: Backend, areas: _Areas, exchange: PeerExchange, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_MH, meta_MM)``: this receiver's rows from the origins' staged ones (after a barrier)."""
    kernels = uses_kernels(backend)
    token_M = pull_rows(
        areas.stage_tokens, exchange, None, capacity, kernels=kernels
    )  # rows' tokens on origins
    x_MH = pull_rows(areas.stage_rows, exchange, token_M, capacity, kernels=kernels)
    # A capacity's rows past M get id -1: no expert's (plan.received_buckets).
    fill = None if capacity is None else -1.0
    return x_MH, pull_rows(areas.stage_meta, exchange, token_M, capacity, fill, kernels=kernels)


@dataclass(frozen=True)
class _Early:
    """Rows pulled before the count sync (``PeerTransport.start``): valid if the counts say so."""

    memory: PeerMemory
    areas: _Areas
    x_MH: torch.Tensor
    """``[capacity, H]``, the first M rows pulled."""
    meta_MM: torch.Tensor
    buckets: ExpertBuckets
    """The received rows' buckets over this rank's experts, the capacity's padding rows in none."""

    def rows(self, M: int, pairs: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ExpertBuckets]:
        """``((x_MH, meta_MM), buckets)`` of the call's M rows and ``pairs`` (row, expert) pairs."""
        b = self.buckets
        buckets = ExpertBuckets(b.row_of_slot_N[:pairs], b.slot_of_row_MR[:M], b.offsets_E1)
        return (self.x_MH[:M], self.meta_MM[:M]), buckets


@torch.no_grad()
def _stage(
    areas: _Areas, rank: int, x_TH: torch.Tensor, meta_TM: torch.Tensor, plan: SendPlan, places: int
) -> None:
    """This rank's staged rows: x and meta by token, and the send list's first ``places`` tokens."""
    T = x_TH.shape[0]
    areas.stage_rows.views[rank][:T].copy_(x_TH)
    areas.stage_meta.views[rank][:T].copy_(meta_TM)
    areas.stage_tokens.views[rank][:places].copy_(plan.token_of_slot_CL[0, :places])


class _PullRows(torch.autograd.Function):
    """Origin's ``(x_TH, meta_TM)`` -> receiver's ``(x_MH, meta_MM)``; backward: the gradient rows
    pushed home (unless ``on_input_grads`` pushed them already) and summed per token."""

    @staticmethod
    def forward(ctx, call: _Call, x_TH, meta_TM):  # type: ignore[override]
        ctx.call = call
        ctx.set_materialize_grads(False)
        if call.pulled is not None:  # handed over: the call keeps no reference to its outputs
            pulled, call.pulled = call.pulled, None
            return pulled
        _stage(call.areas, call.me, x_TH, meta_TM, call.plan, call.exchange.num_sent)
        call.memory.barrier()
        return _pull(call.backend, call.areas, call.exchange)

    @staticmethod
    def backward(ctx, dx_MH, dmeta_MM):  # type: ignore[override]
        call = ctx.call
        if call.early is None:
            call.push(dx_MH, dmeta_MM)
        else:
            (sent_x, sent_meta, done), call.early = call.early, None
            check_sent_early((dx_MH, dmeta_MM), (sent_x, sent_meta), "the received rows", "the experts")
            if done is not None:
                torch.cuda.current_stream(call.device).wait_event(done)
        call.memory.barrier()  # every receiver's rows are home
        back = call.areas
        dx_TH = call.sum_per_token(back.back_rows, back.back_rows.views[call.me].dtype)
        return None, dx_TH, call.sum_per_token(back.back_meta, torch.float32)


class _SumPartials(torch.autograd.Function):
    """The receivers' partials, which their combine wrote into this origin's return rows, summed
    per token: ``y_TH``. Its input is the combine's placeholder (for autograd's graph and the
    gradient's shape). Backward: ``dy_TH`` staged in send-list order, and each receiver's rows
    copied in as blocks."""

    @staticmethod
    def forward(ctx, call: _Call, placeholder_MH, experts_node):  # type: ignore[override]
        ctx.call, ctx.experts_node = call, experts_node  # (the backward queues its prologue)
        ctx.rows = placeholder_MH.shape
        call.memory.barrier()  # every receiver's partials are written
        return call.sum_per_token(call.areas.back_rows, call.out_dtype)

    @staticmethod
    def backward(ctx, dy_TH):  # type: ignore[override]
        call = ctx.call
        rows, S = call.areas.stage_rows, call.exchange.num_sent
        # In the send list's order, so that each receiver's rows are one block: copied in by the
        # copy engines, while the experts' backward queues what needs no gradient.
        torch.index_select(dy_TH, 0, call.plan.token_of_slot_CL[0, :S], out=rows.views[call.me][:S])
        call.memory.barrier()
        dy_MH = dy_TH.new_empty(ctx.rows)
        with torch.no_grad(), _on_copy_stream(call.device) as copies:
            for s, received, places in call.exchange.blocks():
                dy_MH[received].copy_(rows.views[s][places])
        node, ctx.experts_node = ctx.experts_node, None
        if node is not None:
            call.backend.prepare_backward(node)
        if copies is not None:
            torch.cuda.current_stream(call.device).wait_stream(copies)
        return None, dy_MH, None


class PeerTransport:
    """``Transport`` through the group's symmetric memory (module docstring): the areas of it that
    the layer last used."""

    name = "peers"

    def __init__(self, group: ProcessGroup, partition: ExpertPartition, config: EPConfig) -> None:
        if config.chunks != 1:
            raise ValueError(f"the peers transport runs one chunk per call, chunks is {config.chunks}")
        self.group = group
        self.partition = partition
        self.config = config
        self.rank = dist.get_rank(group)
        self._areas: tuple[PeerMemory, int, int, torch.dtype, _Areas] | None = None
        self._capacity = 0
        self._early: _Early | None = None
        self.pulled_early = False
        """Whether the last call used the rows pulled before its count sync (diagnostics)."""

    def can_stage(self, x_TH: torch.Tensor, meta_width: int) -> bool:
        """Whether :meth:`start` can stage ``x_TH`` (and meta rows of ``meta_width`` floats) in
        the last call's areas: this rank's flag in the count exchange."""
        reason = unavailable_reason(self.group, x_TH.device)
        if reason is not None:
            raise ValueError(f"transport='peers' is unavailable: {reason}")
        if self._areas is None:
            return False
        _, H, areas_M2, dtype, areas = self._areas
        fits = x_TH.shape[0] <= areas.stage_rows.views[self.rank].shape[0]
        return fits and (H, areas_M2, dtype) == (x_TH.shape[1], meta_width, x_TH.dtype)

    def start(self, out: Outbound) -> _Trip:
        """Before the count sync, from a layer's second call on: stage x, meta and the send list
        (its first ``T * reach`` places, an upper bound of its length, where ``out.staged``:
        :meth:`can_stage`), then the barrier, then pull this receiver's rows at a capacity (the
        last call's most rows received by a rank, and an eighth more), their counts read on the
        device, and bucket them over this rank's experts. So the device stages, exchanges, pulls
        and buckets while the host waits for the counts and then works out the call; the call
        uses these rows where every rank staged and the counts fit (:meth:`_Trip.send`). Every
        rank of the group runs the barrier here or none does (``_areas`` is set by every call on
        every rank). Staging runs after the last exchange's final barrier on this stream: no rank
        reads these rows now."""
        self._early = None
        if self._areas is not None:
            memory, areas = self._areas[0], self._areas[4]
            if out.staged:
                room = areas.stage_tokens.views[self.rank].shape[0]
                places = out.x_TH.shape[0] * out.reach
                _stage(areas, self.rank, out.x_TH, out.meta_TM, out.plan, min(places, room))
            memory.barrier()
            W = self.partition.world_size
            exchange = PeerExchange(rank=self.rank, rows=None, counts_WW3=out.counts_WWC3.view(W, W, 3))
            x_MH, meta_MM = _pull(out.backend, areas, exchange, self._capacity)
            slots = self._capacity * (meta_MM.shape[1] // 2)  # at most K pairs a row
            buckets = received_buckets(out.backend, meta_MM, out.local_of_expert_E, out.num_local, slots)
            self._early = _Early(memory, areas, x_MH, meta_MM, buckets)
        return _Trip(self, out)


class _Trip:
    """One call through the peers (``Trip``): one chunk."""

    def __init__(self, transport: PeerTransport, out: Outbound) -> None:
        self.transport, self.out = transport, out
        self.call: _Call | None = None
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buckets: ExpertBuckets | None = None
        self.placeholder: torch.Tensor | None = None

    def send(self, counts: Counts) -> None:
        """The areas for this call (grown where a rank needs more rows), the early rows where
        they serve, else staged and pulled now."""
        t, out = self.transport, self.out
        x_TH, meta_TM, backend = out.x_TH, out.meta_TM, out.backend
        part, device, me, rows = t.partition, x_TH.device, t.rank, counts.rows
        W, M2, H = part.world_size, meta_TM.shape[1], x_TH.shape[1]
        exchange = PeerExchange(rank=me, rows=rows, counts_WW3=out.counts_WWC3.view(W, W, 3))

        # The rows an area needs, the most over ranks: every rank asks for the same memory.
        most_received = max(sum(r[d] for r in rows) for d in range(W))
        most = max(1, most_received, *(sum(r) for r in rows))
        memory = peer_memory(t.group, device, row_layout(most, _Areas.row_bytes(H, M2, x_TH.dtype))[1])
        early, t._early = t._early, None
        if early is not None:  # the same on every rank: they read the same counts
            area_rows = early.areas.stage_tokens.views[me].shape[0]
            fits = counts.staged_everywhere and most <= area_rows and most_received <= t._capacity
            if not fits or memory is not early.memory:
                early.memory.barrier()  # every rank's early pulls are done: the rows may change
                early = None
        t._capacity = -(-most_received * 9 // 8 // 256) * 256  # the next call's pulls
        if t._areas is None or t._areas[:4] != (memory, H, M2, x_TH.dtype):
            t._areas = (memory, H, M2, x_TH.dtype, _Areas.carve(memory, H, M2, x_TH.dtype))
        areas = t._areas[4]
        M, pairs = exchange.num_received, counts.recv_pairs[0]
        pulled, buckets = (None, None) if early is None else early.rows(M, pairs)
        call = _Call(memory, areas, exchange, out.plan, backend, x_TH.dtype, pulled=pulled)
        t.pulled_early = early is not None

        x_TH = align_requires_grad(x_TH, counts.any_needs_grad)  # a rank without gradients joins the backward
        x_MH, meta_MM = _PullRows.apply(call, x_TH, meta_TM)
        if buckets is None:
            buckets = received_buckets(backend, meta_MM, out.local_of_expert_E, out.num_local, pairs)
        # The experts' backward pushes the rows' gradients before the weight gradients only where
        # _PullRows' backward will run and wait for the push: some rank's input needs a gradient.
        self.push_early = t.config.overlap_backward and counts.any_needs_grad
        self.call, self.rows, self.buckets = call, (x_MH, meta_MM), buckets

    def to_experts(self, c: int) -> Delivery:
        assert self.call is not None and self.rows is not None and self.buckets is not None, "send() first"
        (x_MH, meta_MM), call = self.rows, self.call
        self.rows = None  # the call keeps no reference to its rows
        to_origins = PeerRows(call.areas.back_rows, call.exchange, uses_kernels(call.backend))
        early = call.push_early if self.push_early else None
        return Delivery(x_MH, meta_MM, self.buckets, early, to_origins)

    def to_origins(self, c: int, y_MH: torch.Tensor) -> None:
        self.placeholder = y_MH  # the combine wrote the rows home: the stand-in for autograd

    def gather(self) -> torch.Tensor:
        assert self.call is not None and self.placeholder is not None, "to_origins() first"
        placeholder, self.placeholder = self.placeholder, None
        return _SumPartials.apply(self.call, placeholder, placeholder.grad_fn)  # type: ignore[no-any-return]
