"""The ``alltoall`` dispatcher's peer transport: the same trip of each token to its experts'
ranks and back, through symmetric memory (``moe_replay.parallel.peers``) instead of NCCL.

Shape legend as in ``moe_replay.parallel.alltoall``: W ranks, T this rank's tokens, S rows of its
send list (one per token and rank holding one of its experts), M rows it receives, H hidden,
K experts per token.

Data movement, on each rank (every step a backend stage, every arrow a barrier of the group)::

    origin    send_plan; all-gather of the counts (every rank learns the W x W matrix); host sync
              stage x_TH, meta_TM = [gate weights | ids] and the send list's tokens in this
              rank's symmetric rows                                                    ─► barrier
    receiver  pull_rows: token_M, each row's token from its origin's send list; then x_MH and
              meta_MM, read from the origins' staged rows over NVLink (the permutation and the
              transfer in one kernel each)
              experts + combine, the combine writing each row's partial sum into its origin's
              return rows, at the row's place in the origin's send list                ─► barrier
    origin    y_TH[t] = sum of t's <= W partials, float32, rank order (a local gather)

Backward::

    origin    stage dy_TH                                                              ─► barrier
    receiver  pull_rows: dy_MH (by token_M); the experts' backward; as soon as dx_MH and the
              gate weights' gradient are done (``on_input_grads``), push_rows writes them into
              their origins' return rows, on a side stream next to the weight-gradient GEMMs,
              which leave it the SMs it runs on                                        ─► barrier
    origin    each token's gradient rows summed (the send list's buckets): x's and the gate
              weights' gradients

Compared with NCCL's all-to-all: no permutation into send buffers (the receiver reads the
origin's rows where they are), no separate pass for the return (the combine writes remote rows),
no buffers at a capacity, and the loads and stores run on every SM, not NCCL's 32. The receiver's
rows (x_MH, which the experts' backward keeps) are its own tensors: only staged and returned rows
live in symmetric memory.

Why the barriers are enough. A rank's staged rows are written by it and read by the others
between two barriers; its return rows are written by the others and read by it after a barrier.
The next write to either comes after the next exchange's first barrier, which no rank passes
before every rank has done its reads of the last one (stream order on each rank). So one buffer
per group serves every layer, forward and backward, activation checkpointing included; it grows
(collectively, every rank agreeing from the count matrix) when a call needs more rows than it
has. The side stream's push ends with its own barrier on another channel, and the main stream
waits for it before the next exchange.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moe_replay.backends.base import ExpertBuckets, PeerArea, PeerExchange, PeerRows, SendPlan
from moe_replay.parallel.collectives import align_requires_grad, check_sent_early
from moe_replay.parallel.peers import PeerMemory, peer_memory, row_layout

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend, InputGradsHook
    from moe_replay.parallel.alltoall import Counts
    from moe_replay.parallel.partition import ExpertPartition

SIDE_CHANNEL = 1  # the barrier channel of the side stream's push (the main stream's is 0)


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
        item = torch.empty((), dtype=dtype).element_size()
        return [H * item, M2 * 4, 4, H * item, M2 * 4]

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
    to_ranks: ExpertBuckets
    """The send list as buckets over the ranks: ``slot_of_row_MR`` is ``[T, W]``, each token's
    place for each rank (-1: none)."""
    backend: Backend
    out_dtype: torch.dtype
    comm_sms: int
    token_M: torch.Tensor | None = None
    """Each received row's token on its origin (pulled once in the forward, used again for dy)."""
    early: tuple | None = None
    """``(dx_MH, dmeta_MM, done event or None)`` once ``push_early`` pushed them."""

    @property
    def me(self) -> int:
        return self.exchange.rank

    @property
    def device(self) -> torch.device:
        return self.areas.back_rows.views[self.me].device

    def sum_per_token(self, area: PeerArea, out_dtype: torch.dtype) -> torch.Tensor:
        """``out[t] = sum of area's rows at t's places`` (this rank's rows of ``area`` in its send
        list's order), float32 in rank order: each token's partials, or its gradient rows."""
        S, slot_of_row_TW = self.exchange.num_sent, self.to_ranks.slot_of_row_MR
        ones_TW = torch.ones(slot_of_row_TW.shape, dtype=torch.float32, device=self.device)
        return self.backend.combine(area.views[self.me][:S], self.to_ranks, ones_TW, out_dtype)

    def push(self, dx_MH: torch.Tensor | None, dmeta_MM: torch.Tensor | None, sms: int, channel: int) -> None:
        """Every received row's gradients to its origin's return rows, then a barrier."""
        M = self.exchange.num_received
        rows, meta = self.areas.back_rows, self.areas.back_meta
        H, M2 = rows.views[self.me].shape[1], meta.views[self.me].shape[1]
        device = self.device
        # Every rank pushes both, whether or not it has gradients for them (zeros then): its
        # origins sum whatever their rows hold.
        if dx_MH is None:
            dx_MH = torch.zeros(M, H, dtype=rows.views[self.me].dtype, device=device)
        if dmeta_MM is None:
            dmeta_MM = torch.zeros(M, M2, dtype=torch.float32, device=device)
        self.backend.push_rows(dx_MH.to(rows.views[self.me].dtype).contiguous(), rows, self.exchange, sms)
        self.backend.push_rows(dmeta_MM.float().contiguous(), meta, self.exchange, sms)
        self.memory.barrier(channel)

    def push_early(self, dx_MH: torch.Tensor | None, dmeta_MM: torch.Tensor | None) -> int:
        """The experts' ``on_input_grads``: push on a side stream (CUDA) while their weight
        gradients run; returns the SMs the push may hold."""
        if self.early is not None:
            raise RuntimeError("the peer transport's gradients were pushed twice in one backward")
        device = self.device
        if device.type != "cuda":
            self.push(dx_MH, dmeta_MM, 0, 0)
            self.early = (dx_MH, dmeta_MM, None)
            return 0
        main, side = torch.cuda.current_stream(device), _side_stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.push(dx_MH, dmeta_MM, self.comm_sms, SIDE_CHANNEL)
            done = torch.cuda.Event()
            done.record(side)
        self.early = (dx_MH, dmeta_MM, done)
        return self.comm_sms


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device, priority=-1)
    return _SIDE_STREAMS[device]


class _PullRows(torch.autograd.Function):
    """Origin's ``(x_TH, meta_TM)`` -> receiver's ``(x_MH, meta_MM)``; backward: the gradient rows
    pushed home (unless ``on_input_grads`` pushed them already) and summed per token."""

    @staticmethod
    def forward(ctx, call: _Call, x_TH, meta_TM):  # type: ignore[override]
        ctx.call = call
        ctx.set_materialize_grads(False)
        areas, me, T, S = call.areas, call.me, x_TH.shape[0], call.exchange.num_sent
        areas.stage_rows.views[me][:T].copy_(x_TH)
        areas.stage_meta.views[me][:T].copy_(meta_TM)
        areas.stage_tokens.views[me][:S].copy_(call.plan.token_of_slot_CL[0, :S])
        call.memory.barrier()
        pull, exchange = call.backend.pull_rows, call.exchange
        call.token_M = token_M = pull(areas.stage_tokens, exchange)  # each row's token on its origin
        return pull(areas.stage_rows, exchange, token_M), pull(areas.stage_meta, exchange, token_M)

    @staticmethod
    def backward(ctx, dx_MH, dmeta_MM):  # type: ignore[override]
        call = ctx.call
        if call.early is None:
            call.push(dx_MH, dmeta_MM, 0, 0)
        else:
            (sent_x, sent_meta, done), call.early = call.early, None
            check_sent_early((dx_MH, dmeta_MM), (sent_x, sent_meta), "the received rows", "the experts")
            if done is not None:
                torch.cuda.current_stream(call.device).wait_event(done)
        back = call.areas
        dx_TH = call.sum_per_token(back.back_rows, back.back_rows.views[call.me].dtype)
        return None, dx_TH, call.sum_per_token(back.back_meta, torch.float32)


class _SumPartials(torch.autograd.Function):
    """The receivers' partials, which their combine wrote into this origin's return rows, summed
    per token: ``y_TH``. Its input is the combine's placeholder (for autograd's graph and the
    gradient's shape). Backward: ``dy_TH`` staged and pulled by the receivers."""

    @staticmethod
    def forward(ctx, call: _Call, placeholder_MH):  # type: ignore[override]
        ctx.call = call
        call.memory.barrier()  # every receiver's partials are written
        return call.sum_per_token(call.areas.back_rows, call.out_dtype)

    @staticmethod
    def backward(ctx, dy_TH):  # type: ignore[override]
        call, me = ctx.call, ctx.call.me
        rows = call.areas.stage_rows
        rows.views[me][: dy_TH.shape[0]].copy_(dy_TH)
        call.memory.barrier()
        return None, call.backend.pull_rows(rows, call.exchange, call.token_M)


class PeerTransport:
    """The peer transport of one ``AllToAllDispatcher`` (module docstring): the areas of the
    group's symmetric memory it last used."""

    def __init__(self, group: ProcessGroup, partition: ExpertPartition) -> None:
        self.group = group
        self.partition = partition
        self.rank = dist.get_rank(group)
        self._areas: tuple[PeerMemory, int, int, torch.dtype, _Areas] | None = None

    def __call__(
        self,
        x_TH: torch.Tensor,
        meta_TM: torch.Tensor,
        plan: SendPlan,
        counts: Counts,
        counts_WW13: torch.Tensor,
        experts: nn.Module,
        backend: Backend,
        constant: Callable[[str, torch.device], torch.Tensor],
        push_early: bool,
        comm_sms: int,
    ) -> torch.Tensor:
        """``y_TH`` of the call whose send plan (one chunk), counts and their device copy
        (``[W, W, 1, 3]``, all-gathered) the dispatcher made; ``push_early``: whether the experts'
        backward pushes the rows' gradients before the weight gradients (only where
        ``_PullRows``' backward will run and wait for the push: some rank's input needs a
        gradient)."""
        part, device, me, rows = self.partition, x_TH.device, self.rank, counts.rows
        W, M2, H = part.world_size, meta_TM.shape[1], x_TH.shape[1]
        exchange = PeerExchange(rank=me, rows=rows, counts_WW3=counts_WW13.view(W, W, 3))

        # The rows an area needs, the most over ranks: every rank asks for the same memory.
        most = max(1, *(sum(r) for r in rows), *(sum(r[d] for r in rows) for d in range(W)))
        memory = peer_memory(self.group, device, row_layout(most, _Areas.row_bytes(H, M2, x_TH.dtype))[1])
        if self._areas is None or self._areas[:4] != (memory, H, M2, x_TH.dtype):
            self._areas = (memory, H, M2, x_TH.dtype, _Areas.carve(memory, H, M2, x_TH.dtype))
        areas = self._areas[4]
        _, to_ranks = plan.chunk(0, exchange.num_sent)
        call = _Call(memory, areas, exchange, plan, to_ranks, backend, x_TH.dtype, comm_sms)

        x_TH = align_requires_grad(x_TH, counts.any_needs_grad)  # a rank without gradients joins the backward
        x_MH, meta_MM = _PullRows.apply(call, x_TH, meta_TM)
        local_of_expert_E = constant("local_of_expert_E", device)
        buckets = backend.received_buckets(meta_MM, local_of_expert_E, part.num_local, counts.recv_pairs[0])
        early: InputGradsHook | None = call.push_early if push_early else None
        to_origins = PeerRows(areas.back_rows, exchange)  # the combine writes each row home
        placeholder = experts.forward_combined(x_MH, buckets, meta_MM, backend, x_TH.dtype, early, to_origins)
        return _SumPartials.apply(call, placeholder)
