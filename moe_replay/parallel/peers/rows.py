"""The peer transport's rows and the two stages that move them: who sends whom how many rows
(:class:`PeerExchange`), where rows lie in every rank's symmetric memory (:class:`PeerArea`),
:func:`pull_rows` (receivers read their rows from the origins) and :func:`push_rows` (rows copied
home), and :class:`PeerRows`, the ``RowSink`` through which the experts' fused combine writes
each row into its origin's memory.

Shape legend: W ranks, T this rank's tokens, M rows it receives, X a row's width, N routed rows,
R reads per row, H hidden.

Each stage has a plain torch reference (:mod:`.torch_ops`) and Triton kernels
(:mod:`.triton_ops`), chosen by the backend the layer runs (``kernels``: the ``triton`` one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_replay.backends.base import Backend


def uses_kernels(backend: Backend) -> bool:
    """Whether the peer stages of a layer on ``backend`` run the Triton kernels (else the torch
    reference)."""
    return backend.name == "triton"


@dataclass(frozen=True)
class PeerArea:
    """Rows at the same place of every rank's symmetric buffer (:mod:`.memory`):
    rank r's rows are ``views[r]`` (mapped into this process, for torch ops) and start at address
    ``bases_W[r]`` (int64 on the device, for kernels). ``views[rank]`` is this rank's own."""

    views: tuple[torch.Tensor, ...]
    bases_W: torch.Tensor


@dataclass(frozen=True)
class PeerExchange:
    """Who sends whom how many rows, as every rank of an expert-parallel group knows after the
    count exchange (the peer transport's).

    Origin s's send list holds its rows for rank 0, then rank 1, ... (``SendPlan``); receiver d's
    rows are those of rank 0, then rank 1, ..., each source's in its list's order. So receiver
    d's row ``recv_start(d, s) + i`` is origin s's place ``send_start(s, d) + i``. ``counts_WW3``
    holds the same matrix on the device: ``[s, d, 0]`` the rows s sends d (int32, contiguous;
    the other columns are the dispatcher's)."""

    rank: int
    rows: tuple[tuple[int, ...], ...] | None
    """``rows[s][d]``: the rows rank s sends rank d (host ints); None before the host has read
    them (only ``counts_WW3`` is known then: :func:`pull_rows` with a capacity)."""
    counts_WW3: torch.Tensor

    @property
    def world_size(self) -> int:
        return self.counts_WW3.shape[0]

    def with_host_rows(self) -> PeerExchange:
        """This exchange with ``rows`` read from ``counts_WW3`` (a host sync on a GPU)."""
        if self.rows is not None:
            return self
        rows = tuple(tuple(r) for r in self.counts_WW3[:, :, 0].tolist())
        return PeerExchange(rank=self.rank, rows=rows, counts_WW3=self.counts_WW3)

    @property
    def host_rows(self) -> tuple[tuple[int, ...], ...]:
        """``rows``, which the host must have read by now (``ValueError`` if not)."""
        if self.rows is None:
            raise ValueError("PeerExchange.rows is None: the host has not read the counts (with_host_rows)")
        return self.rows

    def send_start(self, s: int, d: int) -> int:
        return sum(self.host_rows[s][:d])

    def recv_start(self, d: int, s: int) -> int:
        rows = self.host_rows
        return sum(rows[r][d] for r in range(s))

    @property
    def num_sent(self) -> int:
        return sum(self.host_rows[self.rank])

    @property
    def num_received(self) -> int:
        return self.recv_start(self.rank, self.world_size)

    def blocks(self) -> list[tuple[int, slice, slice]]:
        """Per origin s, this receiver's rows from s and their places in s's send list: one block
        on each side. Its own origin first, then the next ranks round the ring (at each step
        every receiver reads a different origin)."""
        me, W, out = self.rank, self.world_size, []
        for s in ((me + j) % W for j in range(W)):
            n, recv, send = self.host_rows[s][me], self.recv_start(me, s), self.send_start(s, me)
            out.append((s, slice(recv, recv + n), slice(send, send + n)))
        return out


def peer_placeholder(rows: int, like: torch.Tensor) -> torch.Tensor:
    """``[rows, H]`` of ``like``'s dtype and device without memory: what a stage returns for rows it
    wrote to other ranks (autograd needs an output, and its gradient's shape)."""
    return like.new_zeros(()).expand(rows, like.shape[1])


def pull_rows(
    src: PeerArea,
    exchange: PeerExchange,
    token_M: torch.Tensor | None = None,
    capacity: int | None = None,
    fill: float | None = None,
    *,
    kernels: bool = False,
) -> torch.Tensor:
    """The peer transport's dispatch, run by each receiver: its ``M = exchange.num_received``
    rows, row ``m = recv_start(rank, s) + i`` read from origin s: ``src[s][token_M[m]]``
    (``token_M``: int32, each row's token on its origin), or without ``token_M`` ``src[s][p]``, at
    s's place ``p = send_start(s, rank) + i`` (how a receiver reads its rows' tokens from their
    origins' send lists). Not differentiable (the transport's autograd node is).

    With ``capacity``, before the host knows the counts (``exchange.rows`` may be None):
    ``capacity`` rows, the first M of them pulled where ``M <= capacity`` and every place read
    lies within ``src``'s rows; all other rows are undefined, and no read leaves ``src``'s rows.
    The caller checks those conditions once it has the counts. With ``fill`` too, the rows past M
    hold ``fill`` where ``M <= capacity``. ``kernels``: the Triton kernel (else the torch
    reference)."""
    if kernels:
        from moe_replay.parallel.peers import triton_ops

        return triton_ops.pull_rows(src, exchange, token_M, capacity, fill)
    from moe_replay.parallel.peers import torch_ops

    return torch_ops.pull_rows(src, exchange, token_M, capacity, fill)


def push_rows(x_MX: torch.Tensor, dst: PeerArea, exchange: PeerExchange) -> None:
    """The way home for a receiver's rows: its received row ``recv_start(rank, s) + i`` goes to
    ``dst[s][send_start(s, rank) + i]`` (origin s's place). Each origin's rows are one block on
    both sides: one ``Tensor.copy_`` per origin, which on a GPU a copy engine runs over NVLink,
    holding no SMs (the backward runs it next to the experts' GEMMs). Not differentiable."""
    from moe_replay.parallel.peers import torch_ops

    torch_ops.push_rows(x_MX, dst, exchange)


@dataclass(frozen=True)
class PeerRows:
    """A ``RowSink`` (``moe_replay.types``): receiver row ``recv_start(rank, s) + i`` is written
    to origin s's place ``send_start(s, rank) + i`` of ``area`` (the peer transport's combine).
    ``kernels``: the Triton combine writes the rows itself; else the torch reference sums them
    here and :func:`push_rows` copies them."""

    area: PeerArea
    exchange: PeerExchange
    kernels: bool = False

    @torch.no_grad()
    def write(
        self,
        src_NH: torch.Tensor,
        slot_of_row_MR: torch.Tensor | None,
        weights_MR: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        own = self.area.views[self.exchange.rank]
        M = self.exchange.num_received if slot_of_row_MR is None else slot_of_row_MR.shape[0]
        H = src_NH.shape[1]
        if own.shape[1:] != (H,) or own.dtype != out_dtype or self.exchange.num_received != M:
            raise ValueError(f"PeerRows of {list(own.shape)} {own.dtype} for {M} rows of {H} {out_dtype}")
        if slot_of_row_MR is None:  # the rows as they are: one block copy per origin
            push_rows(src_NH.to(out_dtype), self.area, self.exchange)
        elif self.kernels:
            from moe_replay.parallel.peers import triton_ops

            triton_ops.combine_to_peers(src_NH, slot_of_row_MR, weights_MR, self)
        else:
            padded = torch.cat([src_NH, src_NH.new_zeros(1, H)])
            y_MRH = padded[slot_of_row_MR.long()].float()
            has = slot_of_row_MR >= 0
            w_MR = has.float() if weights_MR is None else torch.where(has, weights_MR.float(), 0.0)
            push_rows((w_MR.unsqueeze(-1) * y_MRH).sum(dim=1).to(out_dtype), self.area, self.exchange)
        return peer_placeholder(M, own)
