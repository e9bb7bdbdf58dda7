"""What a backend implements: the stages of the MoE pipeline, routing included.

Shape legend: T tokens, M rows of the input to the experts (M = T for a local layer), R reads of
each row (R = K for a local layer: each token is routed to K experts), N = M * R routed rows,
E experts (local experts under expert parallelism), H hidden, I expert intermediate.

Every stage takes routing as data (ids, weights, buckets); nothing reads global state. The stages
a layer runs, in order::

    route(logits_TE, ...)                      -> Routing(expert_ids_TK, weights_TK)
    dispatch(expert_ids_MR, E)                 -> ExpertBuckets (metadata only, no data moved)
    expert_mlp(x_MH, buckets, w_gate_up, w_down) -> y_NH   (rows in bucket order)
    combine(y_NH, buckets, weights_MR, dtype)  -> y_MH

Expert parallelism runs the same stages with ``permute_rows`` and collectives in between
(``moe_replay.parallel``), its metadata from ``send_plan`` (sender) and ``received_buckets``
(receiver), which have torch reference implementations here; quantized experts replace
``expert_mlp`` with ``quant_expert_mlp``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_replay.config import MoEConfig
    from moe_replay.quantize import QuantizedWeight
    from moe_replay.routing.route import Routing


InputGradsHook = Callable[[torch.Tensor | None, torch.Tensor | None], int]
"""``on_input_grads`` of :meth:`Backend.expert_mlp_combine`: ``(dx_MH, dweights_MR) -> SMs busy``."""


@dataclass(frozen=True)
class ExpertBuckets:
    """Routed rows grouped by expert: the result of ``dispatch``.

    Every one of the M input rows is read up to R times (once per routed slot). Sorted position
    ``n`` (``0 <= n < N``) reads input row ``row_of_slot_N[n]``; the r-th read of row ``m`` sits at
    sorted position ``slot_of_row_MR[m, r]``, or nowhere when that entry is ``-1``. Expert ``e``
    owns sorted positions ``offsets_E1[e]:offsets_E1[e + 1]``.

    ``-1`` slots: a (row, read) with slot ``-1`` has no routed row; it contributes nothing
    (``combine`` adds nothing for it and gives its weight a zero gradient, ``permute_rows``'
    backward skips it). ``dispatch`` never makes them (every read has a slot, N = M * R); expert
    parallelism composes buckets that have them (a token's experts on other ranks, a token not
    sent to a rank: ``moe_replay.parallel.alltoall``). Either way the entries ``>= 0`` are a
    permutation of ``0..N-1``: every slot is read by exactly one (row, read).

    Contract: within one expert's bucket rows are in ascending (row, read) order, in every
    backend, so results are deterministic and backends agree bit-for-bit on the metadata.
    All three tensors are int32 on the device of the routed ids.
    """

    row_of_slot_N: torch.Tensor
    slot_of_row_MR: torch.Tensor
    offsets_E1: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.offsets_E1.numel() - 1

    @property
    def num_rows(self) -> int:
        return self.slot_of_row_MR.shape[0]

    @property
    def num_slots(self) -> int:
        return self.row_of_slot_N.numel()

    def tokens_per_expert(self) -> torch.Tensor:
        """``[E]`` int32: rows routed to each expert."""
        return self.offsets_E1[1:] - self.offsets_E1[:-1]

    def per_read(self, values_N: torch.Tensor) -> torch.Tensor:
        """``values_N[slot_of_row_MR[m, r]]`` for every (row, read), ``[M, R, *]``; zero where the
        slot is ``-1`` (index -1 reads a zero appended to ``values_N``). Differentiable in
        ``values_N``."""
        padded = torch.cat([values_N, values_N.new_zeros(1, *values_N.shape[1:])])
        return padded[self.slot_of_row_MR.long()]


@dataclass(frozen=True)
class SendPlan:
    """Where an expert-parallel rank's tokens go (``send_plan``), chunk by chunk.

    Shape legend: T tokens, W ranks, C chunks, T_c = ceil(T / C) tokens per chunk, L = T_c * reach
    + 1 places per chunk (``reach`` = min(W, K): a token goes to a rank at most once, to at most K
    ranks; the last place is a spare).

    Chunk c holds tokens ``c * T_c:(c + 1) * T_c`` (the last one fewer, or none). Within a chunk
    the send list is ordered by (rank, token): ``slot_of_row_TW[t, r]`` is token t's place in its
    chunk's list for rank r, ``-1`` if t sends no row to r (no expert of t there);
    ``token_of_slot_CL[c]`` holds the chunk-local token at each place: the first S_c entries are
    the list, the rest up to ``T_c_actual * reach`` read the chunk's first token (in bounds, never
    sent). ``offsets_CW1[c]``: where each rank's rows start in the chunk's list.
    """

    chunk_tokens: int
    slot_of_row_TW: torch.Tensor
    token_of_slot_CL: torch.Tensor
    offsets_CW1: torch.Tensor

    @staticmethod
    def places(num_tokens: int, top_k: int, world_size: int, chunks: int) -> tuple[int, int]:
        """``(T_c, L)``: tokens per chunk and places per chunk (the shape legend's)."""
        chunk_tokens = -(-num_tokens // chunks)
        return chunk_tokens, chunk_tokens * min(world_size, top_k) + 1

    def rows(self, c: int) -> slice:
        """Chunk c's token rows."""
        T = self.slot_of_row_TW.shape[0]
        return slice(min(c * self.chunk_tokens, T), min((c + 1) * self.chunk_tokens, T))

    def chunk(self, c: int, capacity: int) -> tuple[slice, ExpertBuckets]:
        """Chunk c's token rows, and its send list as buckets over the ranks (``capacity``
        places: S_c for the list itself, more for a buffer filled before S_c is known)."""
        rows = self.rows(c)
        buckets = ExpertBuckets(
            row_of_slot_N=self.token_of_slot_CL[c, :capacity],
            slot_of_row_MR=self.slot_of_row_TW[rows],
            offsets_E1=self.offsets_CW1[c],
        )
        return rows, buckets


@dataclass(frozen=True)
class PeerArea:
    """Rows at the same place of every rank's symmetric buffer (``moe_replay.parallel.peers``):
    rank r's rows are ``views[r]`` (mapped into this process, for torch ops) and start at address
    ``bases_W[r]`` (int64 on the device, for kernels). ``views[rank]`` is this rank's own."""

    views: tuple[torch.Tensor, ...]
    bases_W: torch.Tensor


@dataclass(frozen=True)
class PeerExchange:
    """Who sends whom how many rows, as every rank of an expert-parallel group knows after the
    count exchange (``moe_replay.parallel.alltoall``'s peer transport).

    Origin s's send list holds its rows for rank 0, then rank 1, ... (``SendPlan``); receiver d's
    rows are those of rank 0, then rank 1, ..., each source's in its list's order. So receiver
    d's row ``recv_start(d, s) + i`` is origin s's place ``send_start(s, d) + i``. ``counts_WW3``
    holds the same matrix on the device: ``[s, d, 0]`` the rows s sends d (int32, contiguous;
    the other columns are the dispatcher's)."""

    rank: int
    rows: tuple[tuple[int, ...], ...] | None
    """``rows[s][d]``: the rows rank s sends rank d (host ints); None before the host has read
    them (only ``counts_WW3`` is known then: ``Backend.pull_rows`` with a capacity)."""
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

    def send_start(self, s: int, d: int) -> int:
        return sum(self.rows[s][:d])

    def recv_start(self, d: int, s: int) -> int:
        return sum(self.rows[r][d] for r in range(s))

    @property
    def num_sent(self) -> int:
        return sum(self.rows[self.rank])

    @property
    def num_received(self) -> int:
        return self.recv_start(self.rank, self.world_size)

    def blocks(self) -> list[tuple[int, slice, slice]]:
        """Per origin s, this receiver's rows from s and their places in s's send list: one block
        on each side. Its own origin first, then the next ranks round the ring (at each step
        every receiver reads a different origin)."""
        me, W, out = self.rank, self.world_size, []
        for s in ((me + j) % W for j in range(W)):
            n, recv, send = self.rows[s][me], self.recv_start(me, s), self.send_start(s, me)
            out.append((s, slice(recv, recv + n), slice(send, send + n)))
        return out


@dataclass(frozen=True)
class PeerRows:
    """Rows to be written to their origins (the peer transport's combine): receiver row
    ``recv_start(rank, s) + i`` to origin s's place ``send_start(s, rank) + i`` of ``area``."""

    area: PeerArea
    exchange: PeerExchange


class Backend(ABC):
    """One implementation of every pipeline stage. Register instances with ``registry.register``."""

    name: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device``, or None if it can."""
        return None

    @abstractmethod
    def route(
        self,
        logits_TE: torch.Tensor,
        cfg: MoEConfig,
        forced_TK: torch.Tensor | None,
        bias_E: torch.Tensor | None,
        bad_row_flag: torch.Tensor | None = None,
    ) -> Routing:
        """Routing of ``logits_TE``; inputs are already checked by ``moe_replay.route``, except
        with ``bad_row_flag`` (int32 ``[1]``, zero): then the backend checks ``forced_TK`` on the
        device as ``moe_replay.routing.route.bad_forced_rows`` does, gives bad rows NaN weights
        and raises the flag to ``T - r`` for the first bad row ``r`` (no host synchronisation)."""

    @abstractmethod
    def dispatch(self, expert_ids_MR: torch.Tensor, num_experts: int) -> ExpertBuckets:
        """Group the M*R routed slots by expert (stable: ascending flat slot index per expert)."""

    @abstractmethod
    def expert_mlp(
        self,
        x_MH: torch.Tensor,
        buckets: ExpertBuckets,
        w_gate_up_E2IH: torch.Tensor,
        w_down_EHI: torch.Tensor,
    ) -> torch.Tensor:
        """``y_NH[n] = down_e(silu(gate_e x) * up_e x)`` for ``x = x_MH[row_of_slot[n]]``, e = n's expert.

        Differentiable with respect to ``x_MH`` and both weights; accumulates in float32. The
        output dtype is float32 or x's dtype (the backend's choice); ``combine`` takes either.
        """

    @abstractmethod
    def combine(
        self,
        y_NH: torch.Tensor,
        buckets: ExpertBuckets,
        weights_MR: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``y_MH[m] = sum_r weights_MR[m, r] * y_NH[slot_of_row[m, r]]``, float32 sums, ``out_dtype`` out.

        Each output row gathers its own R rows (no atomics): deterministic. Reads
        whose slot is ``-1`` add nothing, whatever their weight, and their weights get a zero
        gradient. Differentiable with respect to ``y_NH`` and ``weights_MR``.
        """

    def expert_mlp_combine(
        self,
        x_MH: torch.Tensor,
        buckets: ExpertBuckets,
        w_gate_up_E2IH: torch.Tensor,
        w_down_EHI: torch.Tensor,
        weights_MR: torch.Tensor,
        out_dtype: torch.dtype,
        on_input_grads: InputGradsHook | None = None,
        out_MH: torch.Tensor | PeerRows | None = None,
    ) -> torch.Tensor:
        """``combine(expert_mlp(x_MH, ...), ...)``: the local layer's path, which a backend may fuse
        (the triton backend's backward then never materialises the routed rows' gradient). ``-1``
        slots as in ``combine``: the expert-parallel receiver runs it on such buckets.

        ``on_input_grads(dx_MH, dweights_MR) -> busy_sms``: a backend whose backward can finish
        the gradients of ``x_MH`` and ``weights_MR`` before the experts' weight gradients calls it
        once with them (None for one that needs none), from inside the backward, and returns the
        same tensors to autograd. The expert-parallel dispatcher starts their all-to-all there, so
        that it travels while the weight-gradient GEMMs run, and returns how many SMs its kernel
        may occupy meanwhile (0 for none), which the backend's next GEMM leaves free. Here (plain
        autograd ops) there is no such point, and it is not called.

        ``out_MH``: where to write the result: a ``[M, H]`` ``out_dtype`` tensor, returned; or
        :class:`PeerRows` (the expert-parallel peer transport), each row to its origin's rows, and
        an ``[M, H]`` placeholder (no values; its gradient is the rows' gradient) returned."""
        y_NH = self.expert_mlp(x_MH, buckets, w_gate_up_E2IH, w_down_EHI)
        y_MH = self.combine(y_NH, buckets, weights_MR, out_dtype)
        return write_into(y_MH, out_MH, self)

    def prepare_backward(self, grad_fn: object) -> None:
        """Queue the work of the backward of ``grad_fn`` (the autograd node of an
        ``expert_mlp_combine`` output) that needs no output gradient, for that backward to use.
        The expert-parallel dispatcher calls it in the backward while the output gradient is in
        flight, so that the work overlaps the transfer. Here, and for nodes a backend does not
        know: nothing."""
        return None

    @abstractmethod
    def permute_rows(self, x_MH: torch.Tensor, buckets: ExpertBuckets) -> torch.Tensor:
        """``x_NH[n] = x_MH[row_of_slot[n]]``, differentiable: the backward sums each row's reads
        that have a slot (``-1`` entries of ``slot_of_row`` are skipped), in float32, deterministically."""

    def send_plan(
        self,
        expert_ids_TK: torch.Tensor,
        rank_offsets_W1: torch.Tensor,
        chunks: int,
        counts_WC3: torch.Tensor,
    ) -> SendPlan:
        """Expert parallelism's sender metadata (``moe_replay.parallel.alltoall``), on the device,
        without host syncs: the :class:`SendPlan` of tokens routed to ``expert_ids_TK`` (global
        ids; rank r holds experts ``rank_offsets_W1[r]:rank_offsets_W1[r + 1]``, int32), and in
        ``counts_WC3[r, c, 0]`` / ``[r, c, 1]`` (int32, column 2 untouched) the rows chunk c sends
        to rank r and their (token, expert) pairs. The plain torch ops here are the reference."""
        from moe_replay.backends.torch.send_plan import send_plan

        return send_plan(expert_ids_TK, rank_offsets_W1, chunks, counts_WC3)

    def received_buckets(
        self, meta_MM: torch.Tensor, local_of_expert_E: torch.Tensor, num_local: int, num_pairs: int
    ) -> ExpertBuckets:
        """Expert parallelism's receiver metadata (``moe_replay.parallel.alltoall``): buckets of
        received token rows over this rank's ``num_local`` experts, from their ``meta_MM``
        (``[gate weights_K | global expert ids_K]``, float32).

        Each row is read R = 2K times, once per column of ``meta_MM``, so that ``meta_MM`` itself
        is the combine's weights: read k < K is pair (row, k), slot -1 where its expert is on
        another rank (``local_of_expert_E[id] == num_local``); read K + k (an id) has slot -1
        always, adding nothing and getting a zero gradient. A negative id is no expert's (the
        padding rows of a capacity: ``pull_rows``' ``fill``). The ``num_pairs`` pairs on this
        rank are the slots, in ascending (row, k) order within each expert (the ``ExpertBuckets``
        contract). The plain torch ops here are the reference: a dispatch over the local experts
        and a sink bucket (other ranks' experts), which the stable sort puts last and which is
        cut off.
        """
        K = meta_MM.shape[1] // 2
        ids_MK = meta_MM[:, K:].long()  # ids are exact float32 values
        local_ids_MK = torch.where(ids_MK >= 0, local_of_expert_E[ids_MK.clamp_min(0)], num_local)
        pairs = self.dispatch(local_ids_MK, num_local + 1)
        slot_of_row_MK = torch.where(local_ids_MK < num_local, pairs.slot_of_row_MR, -1)
        return ExpertBuckets(
            row_of_slot_N=pairs.row_of_slot_N[:num_pairs],
            slot_of_row_MR=torch.cat([slot_of_row_MK, torch.full_like(slot_of_row_MK, -1)], dim=1),
            offsets_E1=pairs.offsets_E1[: num_local + 1],
        )

    def pull_rows(
        self,
        src: PeerArea,
        exchange: PeerExchange,
        token_M: torch.Tensor | None = None,
        capacity: int | None = None,
        fill: float | None = None,
    ) -> torch.Tensor:
        """The expert-parallel peer transport's dispatch, run by each receiver: its
        ``M = exchange.num_received`` rows, row ``m = recv_start(rank, s) + i`` read from origin s:
        ``src[s][token_M[m]]`` (``token_M``: int32, each row's token on its origin), or without
        ``token_M`` ``src[s][p]``, at s's place ``p = send_start(s, rank) + i`` (how a receiver
        reads its rows' tokens from their origins' send lists). Not differentiable (the
        dispatcher's autograd node is). The plain torch ops here, on the peers' mapped views,
        are the reference.

        With ``capacity``, before the host knows the counts (``exchange.rows`` may be None):
        ``capacity`` rows, the first M of them pulled where ``M <= capacity`` and every place
        read lies within ``src``'s rows; all other rows are undefined, and no read leaves
        ``src``'s rows. The caller checks those conditions once it has the counts. With ``fill``
        too, the rows past M hold ``fill`` where ``M <= capacity``."""
        from moe_replay.backends.torch.peers import pull_rows

        return pull_rows(src, exchange, token_M, capacity, fill)

    def push_rows(self, x_MX: torch.Tensor, dst: PeerArea, exchange: PeerExchange) -> None:
        """The peer transport's way home for a receiver's rows: its received row
        ``recv_start(rank, s) + i`` goes to ``dst[s][send_start(s, rank) + i]`` (origin s's
        place). Each origin's rows are one block on both sides: one ``Tensor.copy_`` per origin,
        which on a GPU a copy engine runs over NVLink, holding no SMs (the backward runs it next
        to the experts' GEMMs). Not differentiable."""
        from moe_replay.backends.torch.peers import push_rows

        push_rows(x_MX, dst, exchange)

    def quant_expert_mlp(
        self, x_MH: torch.Tensor, buckets: ExpertBuckets, gate_up: QuantizedWeight, down: QuantizedWeight
    ) -> torch.Tensor:
        """``expert_mlp`` with quantized weights (``moe_replay.quantize``); inference only."""
        raise ValueError(f"backend {self.name!r} has no quantized experts; use backend='torch' for QuantMoE")


def write_into(y: torch.Tensor, out: torch.Tensor | PeerRows | None, backend: Backend) -> torch.Tensor:
    """``y`` where ``Backend.expert_mlp_combine``'s ``out_MH`` says: ``y`` itself (None), ``out``
    holding its values, or pushed to the peers (``backend.push_rows``) and a placeholder.
    Differentiable as ``y``."""
    if out is None:
        return y
    if isinstance(out, PeerRows):
        return _PushInto.apply(y, out, backend)
    return _WriteInto.apply(y, out)


def peer_placeholder(rows: int, like: torch.Tensor) -> torch.Tensor:
    """``[rows, H]`` of ``like``'s dtype and device without memory: what a stage returns for rows it
    wrote to other ranks (autograd needs an output, and its gradient's shape)."""
    return like.new_zeros(()).expand(rows, like.shape[1])


class _PushInto(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, out, backend):  # type: ignore[override]
        backend.push_rows(y, out.area, out.exchange)
        return peer_placeholder(y.shape[0], y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None


class _WriteInto(torch.autograd.Function):
    """``out`` with ``y``'s values (copied), differentiable as ``y``."""

    @staticmethod
    def forward(ctx, y, out):  # type: ignore[override]
        return out.copy_(y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None
