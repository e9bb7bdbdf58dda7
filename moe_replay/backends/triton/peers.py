"""The expert-parallel peer transport's kernels: rows read from, and written to, other ranks'
symmetric memory (``moe_replay.parallel.peers``) with plain loads and stores (NVLink on a GPU
node; under ``TRITON_INTERPRET=1``, shared memory mapped into every process).

Shape legend: W ranks, M rows this rank receives, X a row's width.

Every kernel finds its peers' rows from ``PeerArea.bases_W`` (each rank's address of the area,
int64, cast to a pointer in the kernel) and the count matrix ``PeerExchange.counts_WW3`` (the rows
rank s sends rank d at ``[s, d, 0]``), both on the device, so the launches need no host ints but
the row counts that size their grids. Receiver row m comes from origin s, place p of its send
list (``source_of``).

* ``pull_rows``: ``out[m] = src_s[token[m]]``, or ``src_s[p]`` without tokens (how a receiver
  reads its rows' tokens from the origins' send lists, once per call: the row pulls then wait on
  one remote load, not two).
* ``push_rows``: ``dst_s[p] = x[m]``; persistent (at most ``sms`` programs, each with large tiles
  so that enough stores are in flight), as it runs next to the expert weights' GEMMs.

The combine's variant that writes each row to its origin is ``combine.gather_sum`` with
``PeerRows``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_replay.backends.base import PeerArea, PeerExchange

BLOCK_ROWS = 4


def _block_x(X: int) -> int:
    return min(triton.next_power_of_2(max(X, 16)), 1024)


@triton.jit
def _rows_sent(counts_ptr, s, d, W: tl.constexpr):
    """Rows rank s sends rank d (``counts_WW3[s, d, 0]``; s may be a block)."""
    return tl.load(counts_ptr + (s * W + d) * 3)


@triton.jit
def source_of(counts_ptr, m, rank, W: tl.constexpr):
    """``(s, p)`` for this receiver's rows ``m`` (a block): origin rank, and place in its send list."""
    s = tl.zeros_like(m)
    first = tl.zeros_like(m)
    start = 0
    for r in tl.static_range(W):
        n = _rows_sent(counts_ptr, r, rank, W)
        here = (m >= start) & (m < start + n)
        s = tl.where(here, r, s)
        first = tl.where(here, start, first)
        start += n
    before = tl.zeros_like(m)  # origin s's rows for the ranks before this one
    for d in tl.static_range(W):
        before += tl.where(d < rank, _rows_sent(counts_ptr, s, d, W), 0)
    return s, before + (m - first)


@triton.jit
def peer_rows(bases_ptr, r, like_ptr):
    """Pointer(s) to rank ``r``'s first row of an area, typed like ``like_ptr``."""
    return tl.load(bases_ptr + r).to(like_ptr.dtype)


@triton.jit
def _pull_rows_kernel(
    src_bases_ptr, src_like_ptr, token_ptr, counts_ptr, out_ptr, rank, M, X,
    BY_TOKEN: tl.constexpr, W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    s, place = source_of(counts_ptr, rows, rank, W)
    s = tl.where(row_ok, s, rank)  # masked rows read nothing, but their pointers stay local
    if BY_TOKEN:
        place = tl.load(token_ptr + rows64, mask=row_ok, other=0)
    cols = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    ok = row_ok[:, None] & (cols < X)[None, :]
    src = peer_rows(src_bases_ptr, s, src_like_ptr)
    v = tl.load(src[:, None] + place.to(tl.int64)[:, None] * X + cols[None, :], mask=ok)
    tl.store(out_ptr + rows64[:, None] * X + cols[None, :], v, mask=ok)


@triton.jit
def _push_rows_kernel(
    x_ptr, dst_bases_ptr, counts_ptr, rank, M, X,
    W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    tiles_x = tl.cdiv(X, BLOCK_X)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_x
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        rows = (tile // tiles_x) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        s, place = source_of(counts_ptr, rows, rank, W)
        s = tl.where(row_ok, s, rank)
        cols = (tile % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)
        ok = row_ok[:, None] & (cols < X)[None, :]
        v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * X + cols[None, :], mask=ok)
        dst = peer_rows(dst_bases_ptr, s, x_ptr)
        tl.store(dst[:, None] + place.to(tl.int64)[:, None] * X + cols[None, :], v, mask=ok)


PUSH_TILE = 16384
"""Elements a push program moves per step (32 KB of bf16): a program's stores in flight are what
hides the remote latency when only a few programs run."""


def pull_rows(src: PeerArea, exchange: PeerExchange, token_M: torch.Tensor | None) -> torch.Tensor:
    me = exchange.rank
    own = src.views[me]
    M = exchange.num_received
    out = torch.empty((M, *own.shape[1:]), dtype=own.dtype, device=own.device)
    X = out[0].numel() if M else 0
    if M and X:
        block_x = _block_x(X)
        _pull_rows_kernel[(triton.cdiv(M, BLOCK_ROWS), triton.cdiv(X, block_x))](
            src.bases_W, own, token_M if token_M is not None else out, exchange.counts_WW3, out, me, M, X,
            BY_TOKEN=token_M is not None, W=exchange.world_size, BLOCK_M=BLOCK_ROWS, BLOCK_X=block_x,
            num_warps=4,
        )  # fmt: skip
    return out


def push_rows(x_MX: torch.Tensor, dst: PeerArea, exchange: PeerExchange, sms: int) -> None:
    M = x_MX.shape[0]
    X = x_MX[0].numel() if M else 0
    if not (M and X):
        return
    if x_MX.dtype != dst.views[exchange.rank].dtype:
        raise ValueError(f"push_rows of {x_MX.dtype} rows into a {dst.views[exchange.rank].dtype} area")
    block_x = min(triton.next_power_of_2(X), PUSH_TILE)
    block_m = min(max(PUSH_TILE // block_x, 1), triton.next_power_of_2(M))
    tiles = triton.cdiv(M, block_m) * triton.cdiv(X, block_x)
    _push_rows_kernel[(min(tiles, sms) if sms > 0 else tiles,)](
        x_MX.contiguous(), dst.bases_W, exchange.counts_WW3, exchange.rank, M, X,
        W=exchange.world_size, BLOCK_M=block_m, BLOCK_X=block_x, num_warps=16,
    )  # fmt: skip
