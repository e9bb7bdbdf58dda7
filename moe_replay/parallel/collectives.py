"""Row collectives with uneven counts over ``torch.distributed``, differentiable where it matters.

Shape legend: W ranks of the group, M rows on this rank, S rows of all ranks together
(``S = sum(counts)``), X the trailing shape of a row (any; ``[H]`` for tokens, ``[K]`` for routing).

Every function here is a collective: each rank of ``group`` must call it, in the same order, with
the same ``counts`` lists (the dispatchers exchange counts first, so all ranks agree). Tensors must
live on a device the group's backend serves: CPU for gloo, the rank's CUDA device for NCCL
(:func:`collective_device`, :func:`check_device`).

Which primitives, and why (they must run on gloo, for CPU tests, and on NCCL):

* all-gather of uneven rows: every rank pads its rows to ``max(counts)`` and calls the list form of
  ``all_gather``, which both backends support for equal sizes; the padding is cut off after.
* reduce-scatter of uneven rows: gloo has no reduce-scatter for uneven sizes (and older gloo none
  at all), NCCL's needs equal sizes. ``all_to_all_single`` with uneven splits runs on both: each
  rank sends every other rank that rank's rows, then sums the W received copies in float32 in rank
  order. The traffic is that of a ring reduce-scatter; the sum is deterministic, and in float32
  even for bf16 rows (NCCL would sum in bf16).
* all-to-all of uneven rows: ``all_to_all_single`` with split sizes, on both backends.
* counts (:class:`CountExchange`): one all-gather of equal-sized int32 rows
  (``all_gather_into_tensor``, flat, as gloo wants it), so that every rank knows what every rank
  sends every rank.

Backward passes are the adjoint collectives: all-gather <-> reduce-scatter, and all-to-all with
the send and receive counts swapped. A rank whose rows are empty still takes part, forward and
backward.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def group_backend(group: ProcessGroup) -> str:
    """The group's backend name as ``torch.distributed`` reports it (``"gloo"``, ``"nccl"``, ...)."""
    return str(dist.get_backend(group))


def collective_device(group: ProcessGroup) -> torch.device:
    """Where this rank's tensors must be for ``group``'s collectives: CPU when the group has gloo,
    else (NCCL) the current CUDA device."""
    backend = group_backend(group)
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def check_device(group: ProcessGroup, device: torch.device, what: str) -> None:
    """``ValueError`` unless ``group``'s backend runs collectives on tensors on ``device``."""
    backend = group_backend(group)
    serves = {"gloo": "cpu", "nccl": "cuda"}
    if backend in serves and device.type != serves[backend]:
        raise ValueError(
            f"{what} is on {device}, but the expert-parallel group's backend {backend!r} runs "
            f"collectives on {serves[backend]} tensors; use a {serves[backend]} input or a group of "
            f"another backend"
        )


@functools.cache
def collective_sms(device: torch.device) -> int:
    """At most how many SMs of ``device`` an NCCL collective's kernel occupies while it runs (0 off
    CUDA): ``NCCL_MAX_CTAS`` if set, else NCCL's default cap, one block per SM: 32 blocks before
    compute capability 10 (the all-to-alls here run 32 on an H100), 16 from it (NCCL 2.28).
    Worked out once per device (the alltoall dispatcher asks on every call), as NCCL reads its
    environment once."""
    if device.type != "cuda":
        return 0
    if "NCCL_MAX_CTAS" in os.environ:
        return int(os.environ["NCCL_MAX_CTAS"])
    return 32 if torch.cuda.get_device_capability(device)[0] < 10 else 16


def all_gather_ints(values: Sequence[int], group: ProcessGroup, device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (the same length on every rank), in rank order. One host sync."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return torch.stack(gathered).tolist()


def _all_gather_rows(x_MX: torch.Tensor, counts: Sequence[int], group: ProcessGroup) -> torch.Tensor:
    rank = dist.get_rank(group)
    if x_MX.shape[0] != counts[rank]:
        raise ValueError(f"this rank holds {x_MX.shape[0]} rows, counts says {counts[rank]}: {list(counts)}")
    most = max(counts)
    if most == 0:  # every rank knows every count, so all skip the call together
        return x_MX.new_empty((0, *x_MX.shape[1:]))
    padded = x_MX.new_zeros((most, *x_MX.shape[1:]))
    padded[: x_MX.shape[0]] = x_MX
    chunks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([chunk[:count] for chunk, count in zip(chunks, counts)])


def _reduce_scatter_rows(x_SX: torch.Tensor, counts: Sequence[int], group: ProcessGroup) -> torch.Tensor:
    if x_SX.shape[0] != sum(counts):
        raise ValueError(
            f"reduce-scatter of {x_SX.shape[0]} rows, counts sum to {sum(counts)}: {list(counts)}"
        )
    rank, world = dist.get_rank(group), len(counts)
    mine = counts[rank]
    received = x_SX.new_empty((world * mine, *x_SX.shape[1:]))
    dist.all_to_all_single(received, x_SX.contiguous(), [mine] * world, list(counts), group=group)
    return received.view(world, mine, *x_SX.shape[1:]).float().sum(dim=0).to(x_SX.dtype)


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, counts, group, *tensors):  # type: ignore[override]
        ctx.counts, ctx.group = counts, group
        ctx.floating = [t.is_floating_point() for t in tensors]
        gathered = tuple(_all_gather_rows(t, counts, group) for t in tensors)
        ctx.mark_non_differentiable(*(g for g in gathered if not g.is_floating_point()))
        return gathered

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        # Every floating tensor's gradient is reduce-scattered, whether or not this rank needs it
        # (zeros arrive for an unused output): every rank must run the same collectives.
        scattered = (
            _reduce_scatter_rows(grad.contiguous(), ctx.counts, ctx.group) if floating else None
            for grad, floating in zip(grads, ctx.floating)
        )
        return None, None, *scattered


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SX, counts, group):  # type: ignore[override]
        ctx.counts, ctx.group = counts, group
        return _reduce_scatter_rows(x_SX, counts, group)

    @staticmethod
    def backward(ctx, grad_MX):  # type: ignore[override]
        return _all_gather_rows(grad_MX.contiguous(), ctx.counts, ctx.group), None, None


def all_gather_rows(
    tensors: Sequence[torch.Tensor], counts: Sequence[int], group: ProcessGroup
) -> tuple[torch.Tensor, ...]:
    """For each ``[M, *X]`` tensor, ``[S, *X]``: the rows of every rank, in rank order (rank r
    holds ``counts[r]`` rows).

    Differentiable with respect to the floating-point tensors (integer ones come back
    non-differentiable): the backward reduce-scatters each gradient, so each rank gets the sum
    over ranks of its rows' gradients. The tensors go through one autograd node, so every rank
    runs the backward's collectives in the same order.
    """
    return _AllGatherRows.apply(tuple(counts), group, *tensors)


def reduce_scatter_rows(x_SX: torch.Tensor, counts: Sequence[int], group: ProcessGroup) -> torch.Tensor:
    """``[counts[rank], *X]``: this rank's slice of the sum over ranks of ``x_SX`` (``S`` rows on
    every rank, rank r's slice being rows ``sum(counts[:r]):sum(counts[:r + 1])``).

    Sums in float32 in rank order, returns ``x_SX``'s dtype. Differentiable; the backward
    all-gathers the gradient.
    """
    return _ReduceScatterRows.apply(x_SX, tuple(counts), group)


class RowsInFlight:
    """An all-to-all of rows that :func:`start_all_to_all_rows` started and :meth:`finish` ends.

    Between the two, the device is free for other work: on NCCL the transfer runs on the
    process group's stream while the caller's stream runs what it queues in between (expert
    GEMMs of another chunk, say); on gloo :meth:`finish` waits on the host. Differentiable: the
    backward runs the same pattern in reverse, the gradients' all-to-all starting in the backward
    of :meth:`finish` and finishing in that of the start, so work that autograd schedules between
    them (the backward of what was queued between start and finish) overlaps it too. The
    consumer of the received rows may start it earlier, from inside its own backward
    (:meth:`send_grads_now`), so that it also overlaps the rest of that backward.

    The received tensors may be used only through :meth:`finish` (their values are in flight
    until then, and in the backward the gradient that reaches the start is a placeholder: the
    real one arrives through this object).
    """

    def __init__(self, send_counts: Sequence[int], recv_counts: Sequence[int], group: ProcessGroup) -> None:
        self.send_counts = tuple(send_counts)
        self.recv_counts = tuple(recv_counts)
        self.group = group
        self.works: list = []
        self.received: tuple[torch.Tensor, ...] = ()
        self.sent_rows: tuple[int, ...] = ()  # each input's rows (sent or not): its gradient's shape
        # Each received tensor's (shape, dtype, device) if floating, else None: zeros stand in for
        # a gradient that did not come.
        self.received_like: tuple[tuple[torch.Size, torch.dtype, torch.device] | None, ...] = ()
        self.grad_works: list = []
        self.grads: tuple[torch.Tensor | None, ...] = ()
        self.early: tuple[tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]] | None = None
        self.while_grads_travel: Callable[[], None] | None = None

    def finish(self) -> tuple[torch.Tensor, ...]:
        """The received rows (``[sum(recv_counts), *X]`` per tensor), once they have arrived."""
        received, self.received = self.received, ()
        return _FinishAllToAll.apply(self, *received)

    def send_grads_now(self, *grads: torch.Tensor | None) -> None:
        """Start the gradients' all-to-all now, from inside the backward of the one autograd node
        that consumed :meth:`finish`'s tensors: ``grads`` are their complete gradients, in order
        (None for an integer tensor, or zeros), and that node must hand the same tensors to
        autograd. The backward of :meth:`finish` then checks that it got them and starts
        nothing. Used to overlap the transfer with the rest of the consumer's backward (the
        experts' weight gradients)."""
        if self.early is not None:
            raise RuntimeError("RowsInFlight.send_grads_now called twice in one backward")
        if len(grads) != len(self.received_like):
            raise ValueError(f"send_grads_now takes {len(self.received_like)} gradients, got {len(grads)}")
        self.early = (grads, self._start_grads(grads))

    def _start_grads(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
        """Launch the gradients' all-to-all (counts swapped) into buffers shaped like the start's
        inputs (rows that were not sent get zeros); returns the placeholders for autograd."""
        # Every floating tensor's gradient travels back, whether or not this rank needs it (zeros
        # for an unused output): every rank must run the same collectives.
        sent = sum(self.send_counts)
        placeholders: list[torch.Tensor | None] = []
        results: list[torch.Tensor | None] = []
        works = []
        for grad, like, rows in zip(grads, self.received_like, self.sent_rows):
            if like is None:  # not floating
                placeholders.append(None)
                results.append(None)
                continue
            if grad is None:
                shape, dtype, device = like
                grad = torch.zeros(shape, dtype=dtype, device=device)
            grad = grad.contiguous()
            result = grad.new_empty((rows, *grad.shape[1:]))
            if rows > sent:
                result[sent:].zero_()
            works.append(
                dist.all_to_all_single(
                    result[:sent], grad, list(self.send_counts), list(self.recv_counts),
                    group=self.group, async_op=True,
                )
            )  # fmt: skip
            placeholders.append(grad)  # kept alive (the all-to-all reads it) and shaped right
            results.append(result)
        self.grad_works, self.grads = works, tuple(results)
        return tuple(placeholders)


def _start_rows(
    tensors: Sequence[torch.Tensor],
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group: ProcessGroup,
) -> tuple[list[torch.Tensor], list]:
    """Launch one asynchronous all-to-all per tensor, sending its first ``sum(send_counts)`` rows."""
    sent = sum(send_counts)
    outs, works = [], []
    for t in tensors:
        if t.shape[0] < sent:
            raise ValueError(f"all-to-all of {sent} rows from a tensor of {t.shape[0]} rows")
        out = t.new_empty((sum(recv_counts), *t.shape[1:]))
        works.append(
            dist.all_to_all_single(
                out, t[:sent].contiguous(), list(recv_counts), list(send_counts), group=group, async_op=True
            )
        )
        outs.append(out)
    return outs, works


class _StartAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flight, *tensors):  # type: ignore[override]
        ctx.flight = flight
        outs, flight.works = _start_rows(tensors, flight.send_counts, flight.recv_counts, flight.group)
        flight.sent_rows = tuple(t.shape[0] for t in tensors)
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *placeholders):  # type: ignore[override]
        # The gradients travel in the all-to-all that _FinishAllToAll.backward started.
        flight = ctx.flight
        if flight.while_grads_travel is not None:
            flight.while_grads_travel()  # queued ahead of the wait: it runs during the transfer
        for work in flight.grad_works:
            work.wait()
        grads, flight.grads, flight.grad_works = flight.grads, (), []
        return None, *grads


class _FinishAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flight, *received):  # type: ignore[override]
        for work in flight.works:
            work.wait()
        flight.works = []
        ctx.flight = flight
        ctx.set_materialize_grads(False)  # a None gradient tells an unused output from a zero one
        flight.received_like = tuple(
            (r.shape, r.dtype, r.device) if r.is_floating_point() else None for r in received
        )
        outs = tuple(r.view_as(r) for r in received)
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return outs

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        flight = ctx.flight
        if flight.early is None:
            return None, *flight._start_grads(grads)
        (sent, placeholders), flight.early = flight.early, None
        check_sent_early(grads, sent, "an all-to-all's rows", "the node that sent their gradients")
        return None, *placeholders


def check_sent_early(
    got: Sequence[torch.Tensor | None], sent: Sequence[torch.Tensor | None], rows: str, sender: str
) -> None:
    """``RuntimeError`` unless the gradients autograd hands a transfer's backward are the tensors
    their consumer sent early (from inside its own backward): a gradient that changed since has
    another consumer's share, which the early transfer missed."""
    for g, s in zip(got, sent):
        if g is not None and (s is None or g.data_ptr() != s.data_ptr()):
            raise RuntimeError(
                f"the gradient of {rows} changed after it was sent early: the rows have another "
                f"consumer besides {sender}"
            )


def start_all_to_all_rows(
    tensors: Sequence[torch.Tensor],
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group: ProcessGroup,
    while_grads_travel: Callable[[], None] | None = None,
) -> RowsInFlight:
    """Start, for each ``[N, *X]`` tensor, sending rows ``sum(send_counts[:r]):sum(send_counts[:r + 1])``
    to rank r and receiving ``recv_counts[r]`` rows from rank r; returns at once, and
    :meth:`RowsInFlight.finish` gives the received rows, concatenated in rank order
    (``[sum(recv_counts), *X]``).

    ``recv_counts[r]`` must equal rank r's ``send_counts[this rank]``. Each tensor may hold more
    rows than ``sum(send_counts)``: the rest are not sent (and get a zero gradient), so a buffer
    sized by an upper bound can be filled before the counts are known. Differentiable with
    respect to the floating-point tensors (integer ones come back non-differentiable): the
    backward sends their gradients back the same way, counts swapped; the tensors go through one
    autograd node, so every rank runs the backward's collectives in the same order.

    ``while_grads_travel``: called in the backward once the gradients' all-to-all has started,
    before the device waits for it; the work it queues needs no gradient (the receiver's
    backward prologue, say) and overlaps the transfer."""
    flight = RowsInFlight(send_counts, recv_counts, group)
    flight.while_grads_travel = while_grads_travel
    flight.received = _StartAllToAll.apply(flight, *tensors)
    return flight


# all_gather_single is all_gather_into_tensor's new name (torch 2.13 deprecates the old one).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CountExchange:
    """Every rank's ``[W, *X]`` int32 counts (row d: what it sends rank d), all-gathered: after
    :meth:`read` every rank knows the whole ``[W, W, *X]`` matrix (``[s][d]``: what s sends d).
    Not differentiable.

    The buffers are reused from call to call (the host reads them before the next call fills
    them). On CUDA the host waits for an event behind a copy to pinned memory, not for the
    stream: the device goes on with the work queued after :meth:`launch`."""

    def __init__(self, group: ProcessGroup, shape: tuple[int, ...]) -> None:
        self.group = group
        self.shape = tuple(shape)  # [W, *X]
        self._buffers: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._ready: torch.cuda.Event | None = None
        self._key: tuple[int, torch.device] | None = None  # the buffers mine() handed out last

    def mine(self, fill: int, device: torch.device) -> torch.Tensor:
        """This rank's ``[W, *X]`` counts to fill before :meth:`launch`; entries not written keep
        ``fill`` (a flag written once per buffer)."""
        key = (fill, device)
        if key not in self._buffers:
            sent = torch.full(self.shape, fill, dtype=torch.int32, device=device)
            gathered = torch.empty((self.shape[0], *self.shape), dtype=torch.int32, device=device)
            host = torch.empty_like(gathered, device="cpu", pin_memory=device.type == "cuda")
            self._buffers[key] = (sent, gathered, host)
        self._key = key
        return self._buffers[key][0]

    def launch(self) -> torch.Tensor:
        """Start the all-gather of what :meth:`mine` returned; returns the ``[W, W, *X]`` matrix on
        the device (its values land when the collective runs)."""
        assert self._key is not None, "mine() comes first"
        sent, gathered, host = self._buffers[self._key]
        _all_gather_single(gathered.view(-1), sent.view(-1), group=self.group)
        if gathered.is_cuda:
            host.copy_(gathered, non_blocking=True)
            if self._ready is None:
                self._ready = torch.cuda.Event()
            self._ready.record()
        return gathered

    def read(self) -> list:
        """The matrix as host ints ``[s][d][...]`` (the host waits here)."""
        assert self._key is not None, "mine() comes first"
        _, gathered, host = self._buffers[self._key]
        if not gathered.is_cuda:
            return gathered.tolist()
        assert self._ready is not None
        self._ready.synchronize()
        return host.tolist()


def input_needs_grad(x: torch.Tensor) -> bool:
    """Whether a backward pass will ask for ``x``'s gradient (grad mode on, ``x`` requires grad)."""
    return torch.is_grad_enabled() and x.requires_grad


def align_requires_grad(x: torch.Tensor, any_rank_needs_grad: bool) -> torch.Tensor:
    """``x``, made to require grad when another rank's input does.

    A collective's backward runs on a rank only if its forward output requires grad there; if one
    rank's input requires grad and another's does not (a rank with no tokens often passes a fresh
    empty tensor), the first would wait forever for the second in the backward. A detached leaf
    that requires grad keeps the ranks in step; its gradient is thrown away.
    """
    if any_rank_needs_grad and torch.is_grad_enabled() and not x.requires_grad:
        return x.detach().requires_grad_(True)
    return x
