"""The expert-parallel peer transport's kernels: rows read from, and written to, other ranks'
symmetric memory (:mod:`.memory`) with plain loads and stores (NVLink on a GPU
node; under ``TRITON_INTERPRET=1``, shared memory mapped into every process).

Shape legend: W ranks, M rows this rank receives, X a row's width.

Every kernel finds its peers' rows from ``PeerArea.bases_W`` (each rank's address of the area,
int64, cast to a pointer in the kernel) and the count matrix ``PeerExchange.counts_WW3`` (the rows
rank s sends rank d at ``[s, d, 0]``), both on the device, so the launches need no host ints but
the row counts that size their grids. Receiver row m comes from origin s, place p of its send
list, and rows are taken origin by origin starting from each receiver's own (``row_in_turn``).

* ``pull_rows``: ``out[m] = src_s[token[m]]``, or ``src_s[p]`` without tokens (how a receiver
  reads its rows' tokens from the origins' send lists, once per call: the row pulls then wait on
  one remote load, not two). The rows it pulls are counted on the device, so that it can run
  before the host has the counts, over a grid of a capacity's rows.

* ``combine_to_peers``: the experts' combine (``PeerRows.write``), each received row's weighted sum
  of its routed rows stored at its origin's place: the local combine's gather-sum with a remote
  store.

``push_rows`` (the backward's, next to the GEMMs) has no kernel: each origin's rows are one block,
which ``rows.push_rows`` copies with a copy engine, holding no SMs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from moe_replay.parallel.peers.rows import PeerArea, PeerExchange, PeerRows


@triton.jit
def _rows_sent(counts_ptr, s, d, W: tl.constexpr):
    """Rows rank s sends rank d (``counts_WW3[s, d, 0]``; s may be a block)."""
    return tl.load(counts_ptr + (s * W + d) * 3)


@triton.jit
def row_in_turn(counts_ptr, q, rank, W: tl.constexpr):
    """``(m, s, p)`` for positions ``q`` (a block) of this receiver's rows taken origin by origin
    from its own: ranks ``rank, rank + 1, ...`` (mod W). Row ``m``, its origin ``s``, and its place
    ``p`` in s's send list.

    The turn order is what keeps NVLink busy: programs run roughly in ``q`` order, so in step k
    every receiver d works with origin ``d + k``, one reader (or writer) per rank. In row order
    every receiver would read rank 0's rows first, then rank 1's: three ranks sharing one rank's
    links while the others idle (1.1 ms instead of 0.66 for the Qwen3 rows on 4 H100s).
    """
    s = tl.zeros_like(q)
    first = tl.zeros_like(q)
    start = 0
    for k in tl.static_range(W):
        origin = (rank + k) % W
        n = _rows_sent(counts_ptr, origin, rank, W)
        here = (q >= start) & (q < start + n)
        s = tl.where(here, origin, s)
        first = tl.where(here, start, first)
        start += n
    recv_start = tl.zeros_like(q)  # this receiver's rows from origins before s
    send_start = tl.zeros_like(q)  # origin s's rows for the ranks before this one
    for r in tl.static_range(W):
        recv_start += tl.where(r < s, _rows_sent(counts_ptr, r, rank, W), 0)
        send_start += tl.where(r < rank, _rows_sent(counts_ptr, s, r, W), 0)
    i = q - first
    return recv_start + i, s, send_start + i


@triton.jit
def peer_rows(bases_ptr, r, like_ptr):
    """Pointer(s) to rank ``r``'s first row of an area, typed like ``like_ptr``."""
    return tl.load(bases_ptr + r).to(like_ptr.dtype)


@triton.jit
def _pull_rows_kernel(
    src_bases_ptr, src_like_ptr, token_ptr, counts_ptr, out_ptr, rank, M, X, SRC_ROWS, fill,
    BY_TOKEN: tl.constexpr, FILL: tl.constexpr, W: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_X: tl.constexpr,
):  # fmt: skip
    turn = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    received = tl.zeros_like(turn)  # this receiver's rows, from the device's counts
    for r in tl.static_range(W):
        received += _rows_sent(counts_ptr, r, rank, W)
    rows, s, place = row_in_turn(counts_ptr, turn, rank, W)
    row_ok = (turn < received) & (rows < M)  # M: out's rows (the counts' own, or a capacity)
    rows64 = rows.to(tl.int64)
    s = tl.where(row_ok, s, rank)  # masked rows read nothing, but their pointers stay local
    if BY_TOKEN:
        place = tl.load(token_ptr + rows64, mask=row_ok, other=0)
    row_ok &= (place >= 0) & (place < SRC_ROWS)  # a capacity's pull reads nothing outside src
    cols = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    ok = row_ok[:, None] & (cols < X)[None, :]
    src = peer_rows(src_bases_ptr, s, src_like_ptr)
    v = tl.load(src[:, None] + place.to(tl.int64)[:, None] * X + cols[None, :], mask=ok)
    tl.store(out_ptr + rows64[:, None] * X + cols[None, :], v, mask=ok)
    if FILL:  # rows past the received ones (turn q >= received is row q) up to the capacity
        pad = (turn >= received) & (turn < M)
        at = out_ptr + turn.to(tl.int64)[:, None] * X + cols[None, :]
        tl.store(
            at,
            (tl.zeros([BLOCK_M, BLOCK_X], tl.float32) + fill).to(out_ptr.dtype.element_ty),
            mask=pad[:, None] & (cols < X)[None, :],
        )


PULL = {"BLOCK_M": 4, "BLOCK_X": 2048, "num_warps": 8}
"""``pull_rows``' tiles: rows and columns per program. On 4 H100s (NVLink) the widest rows pull
fastest: 0.66 ms for 14.9k rows of 2048 bf16 from each rank (278 GB/s to the others, NCCL's
all-to-all 246) against 0.96 ms at 4 x 1024 with 4 warps (``benchmarks/probe_peer_rows.py``)."""


def pull_rows(
    src: PeerArea,
    exchange: PeerExchange,
    token_M: torch.Tensor | None,
    capacity: int | None = None,
    fill: float | None = None,
) -> torch.Tensor:
    me = exchange.rank
    own = src.views[me]
    M = exchange.num_received if capacity is None else capacity
    out = torch.empty((M, *own.shape[1:]), dtype=own.dtype, device=own.device)
    X = out[0].numel() if M else 0
    if M and X:
        block_m, block_x = PULL["BLOCK_M"], min(triton.next_power_of_2(X), PULL["BLOCK_X"])
        token = token_M if token_M is not None else out
        _pull_rows_kernel[(triton.cdiv(M, block_m), triton.cdiv(X, block_x))](
            src.bases_W, own, token, exchange.counts_WW3, out, me, M, X, own.shape[0], 0.0 if fill is None else fill,
            BY_TOKEN=token_M is not None, FILL=fill is not None and capacity is not None, W=exchange.world_size,
            BLOCK_M=block_m, BLOCK_X=block_x,
            num_warps=PULL["num_warps"],
        )  # fmt: skip
    return out


@triton.jit
def _combine_to_peers_kernel(
    src_ptr, slot_ptr, weights_ptr, out_like_ptr, peer_bases_ptr, counts_ptr, rank, M, H,
    R: tl.constexpr, HAS_WEIGHTS: tl.constexpr, W: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The local combine's gather-sum (``backends/triton/combine.py``), rows taken origin by
    origin (``row_in_turn``) and each stored at its origin's place."""
    q = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = q < M
    rows, s, place = row_in_turn(counts_ptr, q, rank, W)
    dst = peer_rows(peer_bases_ptr, tl.where(row_ok, s, rank), out_like_ptr)
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = row_ok[:, None] & (cols < H)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    for r in range(R):
        slot = tl.load(slot_ptr + rows64 * R + r, mask=row_ok, other=-1).to(tl.int64)
        has = slot >= 0  # -1: no routed row, adds nothing
        v = tl.load(src_ptr + slot[:, None] * H + cols[None, :], mask=ok & has[:, None], other=0.0).to(
            tl.float32
        )
        if HAS_WEIGHTS:
            v = v * tl.load(weights_ptr + rows64 * R + r, mask=has, other=0.0)[:, None]
        acc += v
    at = dst[:, None] + place.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(at, acc.to(out_like_ptr.dtype.element_ty), mask=ok)


TO_PEERS = {"BLOCK_M": 4, "BLOCK_H": 2048, "num_warps": 8}
"""``combine_to_peers``' tiles: rows and columns per program, as ``PULL`` reads them
(``benchmarks/probe_peer_rows.py`` sweeps both)."""


def combine_to_peers(
    src_NH: torch.Tensor, slot_of_row_MR: torch.Tensor, weights_MR: torch.Tensor | None, out: PeerRows
) -> None:
    """``PeerRows.write`` for the triton backend (checked there)."""
    M, R = slot_of_row_MR.shape
    H = src_NH.shape[1]
    if not (M and H):
        return
    own = out.area.views[out.exchange.rank]
    block_h = min(triton.next_power_of_2(H), TO_PEERS["BLOCK_H"])
    grid = (triton.cdiv(M, TO_PEERS["BLOCK_M"]), triton.cdiv(H, block_h))
    src = src_NH.contiguous()
    _combine_to_peers_kernel[grid](
        src, slot_of_row_MR, weights_MR if weights_MR is not None else src, own, out.area.bases_W,
        out.exchange.counts_WW3, out.exchange.rank, M, H, R=R, HAS_WEIGHTS=weights_MR is not None,
        W=out.exchange.world_size, BLOCK_M=TO_PEERS["BLOCK_M"], BLOCK_H=block_h,
        num_warps=TO_PEERS["num_warps"],
    )  # fmt: skip
