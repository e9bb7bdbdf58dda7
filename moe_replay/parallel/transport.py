"""The seam between the ``alltoall`` dispatcher and what carries its rows: the :class:`Transport`
protocol, and the registry of transports.

Shape legend: W ranks, T this rank's tokens, K experts per token, C chunks, M rows a rank
receives (per chunk), H hidden.

The dispatcher (``moe_replay.parallel.alltoall``) computes, the transport communicates. One call::

    dispatcher   send_plan, count exchange launched, meta_TM = [gate weights | ids]
    transport    trip = start(outbound)        queue what needs no host counts (before the sync)
    dispatcher   counts = the count exchange read (the one host sync)
    transport    trip.send(counts)             rows on their way to their experts' ranks
                 per chunk c:
    transport      delivery = trip.to_experts(c)      rows, meta, buckets on the receiver
    dispatcher     y_MH = experts + combine (into delivery.out_MH where given)
    transport      trip.to_origins(c, y_MH)           partial sums on their way home
    transport    y_TH = trip.gather()          each token's partials summed on its origin

Implementations, each in its own module, loaded by name (:data:`TRANSPORTS`):

* ``"collectives"`` (:mod:`~moe_replay.parallel.transport_collectives`): ``torch.distributed``'s
  all-to-all (NCCL on GPUs, gloo on the CPU). The default.
* ``"peers"`` (:mod:`~moe_replay.parallel.peers`): symmetric memory; experimental, explicit
  opt-in. Deleting its package leaves everything else working (asking for it then raises).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from moe_replay.types import ExpertBuckets, InputGradsHook, RowSink, SendPlan

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend
    from moe_replay.parallel.config import EPConfig
    from moe_replay.parallel.partition import ExpertPartition

TRANSPORTS: dict[str, str] = {
    "collectives": "moe_replay.parallel.transport_collectives",
    "peers": "moe_replay.parallel.peers",
}
"""name -> the module whose ``TRANSPORT`` class implements it."""


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
    """Whether every rank staged its rows before the count sync (:meth:`Transport.can_stage`)."""

    NEEDS_GRAD, STAGED = 1, 2
    """The bits of a rank's flags (the count exchange's third column)."""

    @staticmethod
    def read(matrix: list[Any], rank: int) -> Counts:
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


@dataclass(frozen=True)
class Outbound:
    """What the dispatcher hands a transport before the count sync."""

    x_TH: torch.Tensor
    meta_TM: torch.Tensor
    """``[T, 2K]`` float32: each token's gate weights, then its global expert ids."""
    plan: SendPlan
    counts_WWC3: torch.Tensor
    """The all-gathered count matrix on the device (its values land when the collective runs)."""
    reach: int
    """Ranks a token can reach, ``min(W, K)``: the send list's capacity per token."""
    staged: bool
    """Whether :meth:`Transport.can_stage` said yes on this rank (its flag in the exchange)."""
    backend: Backend
    local_of_expert_E: torch.Tensor
    """int32: each global expert's local id here, ``num_local`` where another rank holds it."""
    num_local: int


@dataclass(frozen=True)
class Delivery:
    """One chunk's rows on the receiver, ready for the experts."""

    x_MH: torch.Tensor
    meta_MM: torch.Tensor
    """The combine's weights (``plan.received_buckets`` reads each row 2K times)."""
    buckets: ExpertBuckets
    on_input_grads: InputGradsHook | None
    """For the experts' backward: where the rows' gradients leave early (None: they do not)."""
    out_MH: RowSink | None
    """Where the combine writes its rows (None: a local tensor, which ``to_origins`` sends)."""


class Trip(Protocol):
    """One call's rows in transit (:meth:`Transport.start`)."""

    def send(self, counts: Counts) -> None:
        """Once the host has the counts: start every chunk's rows towards their experts."""

    def to_experts(self, c: int) -> Delivery:
        """Chunk c's received rows (the device waits for them here, not the host)."""

    def to_origins(self, c: int, y_MH: torch.Tensor) -> None:
        """Start chunk c's partial sums home (the experts' output, or its stand-in)."""

    def gather(self) -> torch.Tensor:
        """``y_TH``: each token's partials summed, float32 in rank order, x's dtype."""


class Transport(Protocol):
    """What carries an ``alltoall`` layer's rows between ranks (module docstring)."""

    name: str

    def can_stage(self, x_TH: torch.Tensor, meta_width: int) -> bool:
        """Whether this rank queues its rows before the count sync in this call (a flag every
        rank learns from the count exchange)."""

    def start(self, out: Outbound) -> Trip:
        """Queue what needs no host counts; the dispatcher then waits for them."""


def make_transport(name: str, group: ProcessGroup, partition: ExpertPartition, config: EPConfig) -> Transport:
    """The transport called ``name`` (:data:`TRANSPORTS`) for one layer."""
    if name not in TRANSPORTS:
        raise ValueError(f"transport must be one of {tuple(TRANSPORTS)}, got {name!r}")
    try:
        module = importlib.import_module(TRANSPORTS[name])
    except ImportError as error:
        raise ValueError(f"transport={name!r} is not installed: {error}") from error
    transport: Transport = module.TRANSPORT(group, partition, config)
    return transport
