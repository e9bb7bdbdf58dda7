"""Expert parallelism's sender metadata in two launches: ``Backend.send_plan`` for the triton backend.

Shape legend: T tokens, K experts per token, W ranks, C chunks, T_c tokens per chunk, L places per
chunk, B blocks of ``BLOCK_T`` tokens per chunk (at least one, so an empty chunk still reports its
zero counts).

The reference (``backends/torch/send_plan.py``) takes about twenty torch ops; at the sizes where
expert parallelism runs, each costs the host more than the device, and they sit on the path to the
dispatcher's one host sync. Here:

1. ``_count_kernel``: per block of a chunk's tokens, the rows it sends to each rank (tokens with at
   least one expert there) and their (token, expert) pairs -> ``counts_B2W``.
2. ``_place_kernel``: per block, each rank's first place comes from the chunk's block counts
   (read from ``counts_B2W``: the chunk's rows to lower ranks, plus the earlier blocks' rows to
   this rank; no scan launch); within the block a cumsum over the
   tokens gives each (token, rank) pair its place, stored both ways (``slot_of_row_TW``,
   ``token_of_slot_CL``). The chunk's last
   block also writes the chunk's totals (``counts_WC3``), its offsets and the filler places past
   the list (the chunk's first token, as in the reference).

Both grids are known from shapes: no host sync, capturable. Places are the reference's exactly
(ascending token order within each (chunk, rank)), so the plan is the same bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_replay.backends.triton._common import pow2
from moe_replay.types import SendPlan

BLOCK_T = 64  # tokens per block
SCAN = 256  # earlier blocks summed per step of the place kernel


@triton.jit
def _hits(ids_ptr, offsets_ptr, tokens, t_ok, K, W, K_PAD: tl.constexpr, W_PAD: tl.constexpr):
    """``[BLOCK_T, W_PAD]`` int32: each token's experts on each rank."""
    ks = tl.arange(0, K_PAD)
    ranks = tl.arange(0, W_PAD)
    ids = tl.load(
        ids_ptr + tokens[:, None] * K + ks[None, :], mask=t_ok[:, None] & (ks < K)[None, :], other=-1
    )
    lo = tl.load(offsets_ptr + ranks, mask=ranks < W, other=0)
    hi = tl.load(offsets_ptr + ranks + 1, mask=ranks < W, other=0)
    on_rank = (ids[:, :, None] >= lo[None, None, :]) & (ids[:, :, None] < hi[None, None, :])
    return tl.sum(on_rank.to(tl.int32), 1)


@triton.jit
def _count_kernel(
    ids_ptr, offsets_ptr, counts_ptr, T, Tc, NB, K, W,
    BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, W_PAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    chunk = pid // NB
    local = (pid % NB) * BLOCK_T + tl.arange(0, BLOCK_T)
    tokens = chunk * Tc + local
    t_ok = (local < Tc) & (tokens < T)
    hits = _hits(ids_ptr, offsets_ptr, tokens, t_ok, K, W, K_PAD, W_PAD)
    ranks = tl.arange(0, W_PAD)
    tl.store(counts_ptr + pid * 2 * W_PAD + ranks, tl.sum((hits > 0).to(tl.int32), 0))
    tl.store(counts_ptr + pid * 2 * W_PAD + W_PAD + ranks, tl.sum(hits, 0))


@triton.jit
def _place_kernel(
    ids_ptr, offsets_ptr, counts_ptr, slot_ptr, token_ptr, chunk_offsets_ptr, totals_ptr, T, Tc, NB, C, K, W, L, REACH,
    BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, W_PAD: tl.constexpr, SCAN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    chunk = pid // NB
    block = pid % NB
    local = block * BLOCK_T + tl.arange(0, BLOCK_T)
    tokens = chunk * Tc + local
    t_ok = (local < Tc) & (tokens < T)
    ranks = tl.arange(0, W_PAD)
    r_ok = ranks < W

    hits = _hits(ids_ptr, offsets_ptr, tokens, t_ok, K, W, K_PAD, W_PAD)
    sent = (hits > 0).to(tl.int32)
    # The chunk's list is ordered by (rank, token): this block's first place for rank r is the
    # rows of the whole chunk to ranks below r plus the rows of the chunk's earlier blocks to r.
    before = tl.zeros([W_PAD], tl.int32)
    rows_W = tl.zeros([W_PAD], tl.int32)
    pairs_W = tl.zeros([W_PAD], tl.int32)
    first = chunk * NB
    for start in range(0, NB, SCAN):
        blocks = start + tl.arange(0, SCAN)
        counts = counts_ptr + (first + blocks)[:, None] * 2 * W_PAD + ranks[None, :]
        rows = tl.load(counts, mask=(blocks < NB)[:, None], other=0)
        before += tl.sum(tl.where((blocks < block)[:, None], rows, 0), 0)
        rows_W += tl.sum(rows, 0)
        pairs_W += tl.sum(tl.load(counts + W_PAD, mask=(blocks < NB)[:, None], other=0), 0)
    rank_start = tl.cumsum(rows_W, 0) - rows_W
    base = rank_start + before
    slot = base[None, :] + tl.cumsum(sent, 0) - sent
    stored = t_ok[:, None] & r_ok[None, :]
    tl.store(slot_ptr + tokens[:, None] * W + ranks[None, :], tl.where(sent > 0, slot, -1), mask=stored)
    token_of_place = token_ptr + chunk * L + slot
    tl.store(token_of_place, tl.broadcast_to(local[:, None], [BLOCK_T, W_PAD]), mask=stored & (sent > 0))

    if block == NB - 1:  # the chunk's totals, offsets and filler places
        total = totals_ptr + ranks * C * 3 + chunk * 3
        tl.store(total, rows_W, mask=r_ok)
        tl.store(total + 1, pairs_W, mask=r_ok)
        tl.store(chunk_offsets_ptr + chunk * (W + 1), 0)
        tl.store(chunk_offsets_ptr + chunk * (W + 1) + 1 + ranks, tl.cumsum(rows_W, 0), mask=r_ok)
        listed = tl.sum(tl.where(r_ok, rows_W, 0), 0)
        capacity = tl.minimum(Tc, T - chunk * Tc) * REACH
        for start in range(listed, capacity, BLOCK_T * W_PAD):
            places = start + tl.arange(0, BLOCK_T * W_PAD)
            tl.store(token_ptr + chunk * L + places, tl.zeros_like(places), mask=places < capacity)


def send_plan(
    expert_ids_TK: torch.Tensor,
    rank_offsets_W1: torch.Tensor,
    chunks: int,
    counts_WC3: torch.Tensor,
) -> SendPlan:
    """``Backend.send_plan`` in two launches (module docstring)."""
    T, K = expert_ids_TK.shape
    W = rank_offsets_W1.numel() - 1
    if counts_WC3.shape != (W, chunks, 3) or not counts_WC3.is_contiguous():
        raise ValueError(f"counts_WC3 must be a contiguous [{W}, {chunks}, 3] tensor, got {counts_WC3.shape}")
    Tc, L = SendPlan.places(T, K, W, chunks)
    device = expert_ids_TK.device
    NB = max(1, triton.cdiv(Tc, BLOCK_T))
    ids_TK = expert_ids_TK.to(torch.int32).contiguous()
    w_pad, k_pad = pow2(W, 2), pow2(K, 2)
    counts_B2W = torch.empty(chunks * NB, 2, w_pad, dtype=torch.int32, device=device)
    slot_TW = torch.empty(T, W, dtype=torch.int32, device=device)
    token_of_slot_CL = torch.empty(chunks, L, dtype=torch.int32, device=device)
    offsets_CW1 = torch.empty(chunks, W + 1, dtype=torch.int32, device=device)
    grid = (chunks * NB,)
    shape = {"BLOCK_T": BLOCK_T, "K_PAD": k_pad, "W_PAD": w_pad}
    _count_kernel[grid](ids_TK, rank_offsets_W1, counts_B2W, T, Tc, NB, K, W, **shape)
    _place_kernel[grid](
        ids_TK, rank_offsets_W1, counts_B2W, slot_TW, token_of_slot_CL, offsets_CW1, counts_WC3,
        T, Tc, NB, chunks, K, W, L, min(W, K), SCAN=SCAN, **shape,
    )  # fmt: skip
    return SendPlan(
        chunk_tokens=Tc,
        slot_of_row_TW=slot_TW,
        token_of_slot_CL=token_of_slot_CL,
        offsets_CW1=offsets_CW1,
    )
