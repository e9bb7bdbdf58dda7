"""The ``collectives`` transport of the ``alltoall`` dispatcher: ``torch.distributed``'s
all-to-all (NCCL on GPUs, gloo on the CPU). The default.

Shape legend: W ranks, T this rank's tokens, C chunks, S_c rows chunk c sends (one per token and
rank holding one of its experts), M rows received, H hidden, K experts per token.

Data movement, on each rank::

    origin    before the count sync: x_TH and meta_TM permuted into each chunk's send rows at
              capacity (T_c * min(W, K) per chunk: an upper bound; the device works while the
              host waits for the counts)
         ─►   per chunk, started at once: all-to-all of the first S_c rows of x and meta
    receiver  per chunk: the rows' buckets (``plan.received_buckets``), the experts and combine
         ─►   all-to-all of the partial sums back, started at once ─► y_SH
    origin    y_TH[t] = sum of t's <= W partials               float32, rank order

The all-to-alls are asynchronous (``collectives.start_all_to_all_rows``): with C > 1 chunk
c + 1's rows travel while chunk c's experts run, and chunk c's partials travel back while chunk
c + 1's run; in the backward, autograd's order (latest node first) gives the mirror image.

The backward overlaps both of its all-to-alls with the receiver's work
(``EPConfig.overlap_backward``):

* while the partials' gradients arrive, the receiver queues what its experts' backward needs no
  gradient for (``Backend.prepare_backward``; the Triton backend gathers the x rows that the
  gate_up weight gradient reads);
* the experts' backward computes the rows' gradients first and starts the all-to-all forth itself
  (``on_input_grads``, ``RowsInFlight.send_grads_now``; where the backend supports it: the Triton
  one), then computes the expert weights' gradients while the rows travel. The first of those
  GEMMs leaves the SMs NCCL's kernel may hold to it (``EPConfig.comm_sms``, else
  ``collectives.collective_sms``): the CUTLASS grouped GEMMs are persistent, and a block waiting
  for an SM that the all-to-all holds would hold the whole GEMM back until the transfer ends.

x and meta take two all-to-alls, not one packed row: the experts read x_MH contiguous, so
packing would cost a copy of the [S, H] rows on each side.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from moe_replay.parallel.collectives import (
    RowsInFlight,
    align_requires_grad,
    collective_sms,
    start_all_to_all_rows,
)
from moe_replay.parallel.plan import received_buckets
from moe_replay.parallel.transport import Counts, Delivery, Outbound
from moe_replay.types import ExpertBuckets, InputGradsHook

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend
    from moe_replay.parallel.config import EPConfig
    from moe_replay.parallel.partition import ExpertPartition


class _AddPartials(torch.autograd.Function):
    """``y_TH[t] = sum_r y_SH[slot_of_row_TW[t, r]]`` (float32, rank order, ``out_dtype``); the
    backward gives each partial its token's gradient (``permute_rows``: one gather, where
    ``combine``'s backward would also compute the unit weights' gradients)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y_SH: torch.Tensor,
        to_ranks: ExpertBuckets,
        ones_TW: torch.Tensor,
        backend: Backend,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        ctx.to_ranks, ctx.backend = to_ranks, backend
        return backend.combine(y_SH, to_ranks, ones_TW, out_dtype)

    @staticmethod
    def backward(ctx: Any, dy_TH: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:  # type: ignore[override]
        return ctx.backend.permute_rows(dy_TH, ctx.to_ranks), None, None, None, None


class CollectivesTransport:
    """``Transport`` over ``all_to_all_single`` (module docstring)."""

    name = "collectives"

    def __init__(self, group: ProcessGroup, partition: ExpertPartition, config: EPConfig) -> None:
        self.group = group
        self.partition = partition
        self.config = config
        self._ones: dict[torch.device, torch.Tensor] = {}

    def can_stage(self, x_TH: torch.Tensor, meta_width: int) -> bool:
        return False

    def comm_sms(self, device: torch.device) -> int:
        """How many SMs the experts' backward leaves to the all-to-all it overlaps."""
        sms = self.config.comm_sms
        return collective_sms(device) if sms is None else sms

    def ones(self, rows: int, device: torch.device) -> torch.Tensor:
        """``[rows, W]`` float32 ones (the unit weights of the partials' sum), made once per
        doubling of the row count."""
        cached = self._ones.get(device)
        if cached is None or cached.shape[0] < rows:
            capacity = max(rows, 2 * cached.shape[0] if cached is not None else 64)
            cached = torch.ones(capacity, self.partition.world_size, dtype=torch.float32, device=device)
            self._ones[device] = cached
        return cached[:rows]

    def start(self, out: Outbound) -> _Trip:
        return _Trip(self, out)


class _Trip:
    def __init__(self, transport: CollectivesTransport, out: Outbound) -> None:
        self.transport, self.out = transport, out
        self.chunks = transport.config.chunks
        self.sends = self._capacity_sends()
        self.counts: Counts | None = None
        self.flights: list[RowsInFlight] = []
        self.returns: list[RowsInFlight] = []

    def _capacity_sends(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each chunk's send rows of x and meta at capacity (the first S_c of them are the list;
        the rest, copies of a chunk's first token, are not sent): queued before the host waits
        for the counts, so that the device has work meanwhile."""
        out, C, sends = self.out, self.chunks, []
        for c in range(C):
            rows = out.plan.rows(c)
            to_ranks_cap = out.plan.chunk(c, (rows.stop - rows.start) * out.reach)[1]
            # One chunk reads the whole tensors (a slice would cost its backward a zero-fill and a
            # copy of the gradient).
            x_c, meta_c = (out.x_TH, out.meta_TM) if C == 1 else (out.x_TH[rows], out.meta_TM[rows])
            permute = out.backend.permute_rows
            sends.append((permute(x_c, to_ranks_cap), permute(meta_c, to_ranks_cap)))
        return sends

    def send(self, counts: Counts) -> None:
        self.counts = counts
        group = self.transport.group
        for c, (x_cap, meta_cap) in enumerate(self.sends):
            # A rank whose input needs no gradient still joins the backward's collectives.
            x_cap = align_requires_grad(x_cap, counts.any_needs_grad)
            send, recv = counts.send_rows[c], counts.recv_rows[c]
            self.flights.append(start_all_to_all_rows([x_cap, meta_cap], send, recv, group))
        self.sends = []

    def _send_grads_early(self, flight: RowsInFlight, device: torch.device) -> InputGradsHook:
        """The experts' ``on_input_grads``: start the rows' gradients home, and say how many SMs
        the all-to-all may hold meanwhile."""
        busy = self.transport.comm_sms(device)

        def send(dx_MH: torch.Tensor | None, dmeta_MM: torch.Tensor | None) -> int:
            flight.send_grads_now(dx_MH, dmeta_MM)
            return busy

        return send

    def to_experts(self, c: int) -> Delivery:
        assert self.counts is not None, "send() comes first"
        out = self.out
        x_MH, meta_MM = self.flights[c].finish()
        pairs = self.counts.recv_pairs[c]
        buckets = received_buckets(out.backend, meta_MM, out.local_of_expert_E, out.num_local, pairs)
        # x_MH and meta_MM have no other differentiable consumer, so the experts' backward may
        # send their gradients home before it computes the weight gradients.
        overlap = self.transport.config.overlap_backward
        early = self._send_grads_early(self.flights[c], x_MH.device) if overlap else None
        return Delivery(x_MH, meta_MM, buckets, early, None)

    def to_origins(self, c: int, y_MH: torch.Tensor) -> None:
        assert self.counts is not None, "send() comes first"
        # In the backward, the experts' prologue (what needs no gradient) runs while the
        # partials' gradients arrive.
        node = y_MH.grad_fn
        overlap = self.transport.config.overlap_backward
        prologue = partial(self.out.backend.prepare_backward, node) if overlap and node is not None else None
        send, recv = self.counts.recv_rows[c], self.counts.send_rows[c]
        self.returns.append(start_all_to_all_rows([y_MH], send, recv, self.transport.group, prologue))

    def gather(self) -> torch.Tensor:
        assert self.counts is not None, "send() comes first"
        out, outputs = self.out, []
        for c, flight in enumerate(self.returns):
            (y_SH,) = flight.finish()
            rows, to_ranks = out.plan.chunk(c, sum(self.counts.send_rows[c]))
            ones_TW = self.transport.ones(rows.stop - rows.start, y_SH.device)
            outputs.append(_AddPartials.apply(y_SH, to_ranks, ones_TW, out.backend, out.x_TH.dtype))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


TRANSPORT = CollectivesTransport
