"""Dispatch: a stable counting sort of routed slots by expert, on the device, without host syncs.

Shape legend: M rows, R reads per row, N = M * R slots, E experts, B blocks of ``BLOCK`` slots.

Three launches (plus a memset), all with grids known from shapes, so the whole thing can be
captured in a CUDA graph:

1. ``_count_kernel``: per block of slots, a histogram over experts -> ``counts_BE``; the column
   totals are summed with integer atomics (order-free, so the result is deterministic).
2. ``_scan_kernel``: one program per expert: the expert's first sorted position (the sum of the
   totals of lower experts) plus the exclusive prefix of its column -> ``base_BE``, where block b's
   first slot of expert e goes. Program 0 also writes ``offsets_E1``.
3. ``_scatter_kernel``: each slot's rank among the earlier slots of its block with the same expert
   (a BLOCK x BLOCK comparison), added to ``base_BE``: its sorted position.

Up to ``FUSED_SCAN_BLOCKS`` blocks (T <= 2048 at top-8) steps 2 and 3 are one launch,
``_scan_scatter_kernel``, and step 1 skips the totals: each block sums the whole ``counts_BE``
itself (at most 64 KB, read from L2), which costs less than a launch and a memset from the host.

Ranks follow slot order inside a block and blocks are laid out in order, so buckets hold their
slots in ascending order: the same permutation as a stable argsort (the reference), bit for bit.

Up to ``SMALL_N`` slots (decode: T <= 64 at top-8) one program does all three steps in one launch,
walking the blocks in order with a running count per expert: at these sizes launches, not work,
are the cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_replay.backends.triton._common import pow2
from moe_replay.types import ExpertBuckets

BLOCK = 128  # slots per block: the rank step compares BLOCK x BLOCK ids in registers
SCAN = 1024  # blocks per step of the per-expert scan
SMALL_N = 1024  # up to this many slots, the single-launch kernel
FUSED_SCAN_BLOCKS = 128  # up to this many blocks, the two-launch path (count, then scan + scatter)
SCAN_STEP = 32  # blocks of counts summed per step of the fused scan


@triton.jit
def _load_ids(ids_ptr, lut_ptr, slots, N, E, R, FROM_META: tl.constexpr):
    """The expert id of each slot and whether it is in ``[0, E)``. ``FROM_META``: slot ``m * R + r``
    reads global id ``ids_ptr[m, R + r]`` of a ``[M, 2R]`` float32 meta tensor and maps it through
    ``lut_ptr`` (ids of other ranks' experts map to E, which no bucket holds; so do negative ids,
    the padding rows of a capacity)."""
    in_range = slots < N
    if FROM_META:
        g = tl.load(ids_ptr + (slots // R) * (2 * R) + R + slots % R, mask=in_range, other=-1.0)
        ids = tl.load(lut_ptr + g.to(tl.int32), mask=in_range & (g >= 0), other=E)
    else:
        ids = tl.load(ids_ptr + slots, mask=in_range, other=-1)
    return ids, in_range & (ids >= 0) & (ids < E)


@triton.jit
def _count_kernel(
    ids_ptr, lut_ptr, counts_ptr, totals_ptr, N, E, R,
    FROM_META: tl.constexpr, TOTALS: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    slots = block * BLOCK + tl.arange(0, BLOCK)
    ids, valid = _load_ids(ids_ptr, lut_ptr, slots, N, E, R, FROM_META)
    hist = tl.histogram(ids, E_PAD, mask=valid)
    experts = tl.arange(0, E_PAD)
    tl.store(counts_ptr + block * E_PAD + experts, hist)
    if TOTALS:
        tl.atomic_add(totals_ptr + experts, hist, mask=experts < E)


@triton.jit
def _scan_kernel(
    counts_ptr, totals_ptr, base_ptr, offsets_ptr, num_blocks, E, E_PAD: tl.constexpr, SCAN: tl.constexpr
):
    expert = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    totals = tl.load(totals_ptr + experts, mask=experts < E, other=0)
    if expert == 0:
        tl.store(offsets_ptr, 0)
        tl.store(offsets_ptr + 1 + experts, tl.cumsum(totals, 0), mask=experts < E)
    carry = tl.sum(tl.where(experts < expert, totals, 0), 0)
    for start in range(0, num_blocks, SCAN):
        blocks = start + tl.arange(0, SCAN)
        ok = blocks < num_blocks
        column = tl.load(counts_ptr + blocks * E_PAD + expert, mask=ok, other=0)
        tl.store(base_ptr + blocks * E_PAD + expert, carry + tl.cumsum(column, 0) - column, mask=ok)
        carry += tl.sum(column, 0)


@triton.jit
def _store_slots(slot_of_row_ptr, row_of_slot_ptr, slots, sorted_pos, ok, N, R, FROM_META: tl.constexpr):
    """Each slot's sorted position, both ways. ``FROM_META``: into ``[M, 2R]`` rows, ``-1`` for
    slots without a bucket and for every read of the id half."""
    if FROM_META:
        out = slot_of_row_ptr + (slots // R) * (2 * R) + slots % R
        tl.store(out, tl.where(ok, sorted_pos, -1), mask=slots < N)
        tl.store(out + R, tl.full(slots.shape, -1, tl.int32), mask=slots < N)
    else:
        tl.store(slot_of_row_ptr + slots, sorted_pos, mask=ok)
    tl.store(row_of_slot_ptr + sorted_pos, slots // R, mask=ok)


@triton.jit
def _rank_in_block(ids, local):
    """Each slot's count of earlier slots of its block with the same expert (a BLOCK x BLOCK
    comparison): its offset within the block's run of that expert."""
    earlier_same = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])
    return tl.sum(earlier_same.to(tl.int32), 1)


@triton.jit
def _at_expert(values_E, ids, experts):
    """``values_E[ids]`` for a per-expert vector held in registers (a one-hot sum)."""
    return tl.sum(tl.where(ids[:, None] == experts[None, :], values_E[None, :], 0), 1)


@triton.jit
def _scatter_kernel(
    ids_ptr, lut_ptr, base_ptr, row_of_slot_ptr, slot_of_row_ptr, N, R, E,
    FROM_META: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    slots = block * BLOCK + local
    ids, ok = _load_ids(ids_ptr, lut_ptr, slots, N, E, R, FROM_META)
    sorted_pos = tl.load(base_ptr + block * E_PAD + ids, mask=ok, other=0) + _rank_in_block(ids, local)
    _store_slots(slot_of_row_ptr, row_of_slot_ptr, slots, sorted_pos, ok, N, R, FROM_META)


@triton.jit
def _scan_scatter_kernel(
    ids_ptr, lut_ptr, counts_ptr, row_of_slot_ptr, slot_of_row_ptr, offsets_ptr, N, R, E, num_blocks,
    FROM_META: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr, STEP: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    totals = tl.zeros([E_PAD], tl.int32)
    before = tl.zeros([E_PAD], tl.int32)  # this expert's slots in earlier blocks
    for start in range(0, num_blocks, STEP):
        blocks = start + tl.arange(0, STEP)
        column = tl.load(
            counts_ptr + blocks[:, None] * E_PAD + experts[None, :],
            mask=(blocks < num_blocks)[:, None],
            other=0,
        )
        totals += tl.sum(column, 0)
        before += tl.sum(tl.where((blocks < block)[:, None], column, 0), 0)
    ends = tl.cumsum(totals, 0)
    if block == 0:
        tl.store(offsets_ptr, 0)
        tl.store(offsets_ptr + 1 + experts, ends, mask=experts < E)
    base = ends - totals + before
    local = tl.arange(0, BLOCK)
    slots = block * BLOCK + local
    ids, ok = _load_ids(ids_ptr, lut_ptr, slots, N, E, R, FROM_META)
    sorted_pos = _at_expert(base, ids, experts) + _rank_in_block(ids, local)
    _store_slots(slot_of_row_ptr, row_of_slot_ptr, slots, sorted_pos, ok, N, R, FROM_META)


@triton.jit
def _dispatch_small_kernel(
    ids_ptr, lut_ptr, row_of_slot_ptr, slot_of_row_ptr, offsets_ptr, N, R, E,
    FROM_META: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr,
):  # fmt: skip
    experts = tl.arange(0, E_PAD)
    local = tl.arange(0, BLOCK)
    totals = tl.zeros([E_PAD], tl.int32)
    for start in range(0, N, BLOCK):
        ids, ok = _load_ids(ids_ptr, lut_ptr, start + local, N, E, R, FROM_META)
        totals += tl.histogram(ids, E_PAD, mask=ok)
    ends = tl.cumsum(totals, 0)
    tl.store(offsets_ptr, 0)
    tl.store(offsets_ptr + 1 + experts, ends, mask=experts < E)
    next_slot = ends - totals  # per expert: where its next slot goes
    for start in range(0, N, BLOCK):
        slots = start + local
        ids, ok = _load_ids(ids_ptr, lut_ptr, slots, N, E, R, FROM_META)
        sorted_pos = _at_expert(next_slot, ids, experts) + _rank_in_block(ids, local)
        _store_slots(slot_of_row_ptr, row_of_slot_ptr, slots, sorted_pos, ok, N, R, FROM_META)
        next_slot += tl.histogram(ids, E_PAD, mask=ok)


def dispatch(expert_ids_MR: torch.Tensor, num_experts: int) -> ExpertBuckets:
    """Stable grouping of ``expert_ids_MR`` (ids in ``[0, E)``) by expert; see the module docstring."""
    M, R = expert_ids_MR.shape
    ids_N = expert_ids_MR.reshape(-1).to(torch.int32).contiguous()
    return _dispatch(ids_N, None, M, R, num_experts)


def received_buckets(
    meta_MM: torch.Tensor, local_of_expert_E: torch.Tensor, num_local: int, num_pairs: int
) -> ExpertBuckets:
    """``Backend.received_buckets``: the same kernels reading the ids straight from the meta rows
    through the local-id table, and writing ``[M, 2K]`` slots (``-1`` off this rank, and for the
    id half), so the metadata takes the dispatch's launches and nothing else."""
    M, K = meta_MM.shape[0], meta_MM.shape[1] // 2
    buckets = _dispatch(meta_MM.contiguous(), local_of_expert_E, M, K, num_local)
    return ExpertBuckets(
        row_of_slot_N=buckets.row_of_slot_N[:num_pairs],
        slot_of_row_MR=buckets.slot_of_row_MR,
        offsets_E1=buckets.offsets_E1,
    )


def _dispatch(
    ids: torch.Tensor, lut_E: torch.Tensor | None, M: int, R: int, num_experts: int
) -> ExpertBuckets:
    """The launches behind ``dispatch`` (``lut_E`` None: ``ids`` is ``[M * R]`` int32 ids) and
    ``received_buckets`` (``ids`` is ``[M, 2R]`` float32 meta, slots ``[M, 2R]``)."""
    N, device = M * R, ids.device
    from_meta = lut_E is not None
    e_pad = pow2(num_experts, 16)
    num_blocks = triton.cdiv(N, BLOCK)
    row_of_slot_N = torch.empty(N, dtype=torch.int32, device=device)
    slot_of_row = torch.empty(M, 2 * R if from_meta else R, dtype=torch.int32, device=device)
    # Every launch path writes all of offsets_E1; with no slots nothing runs and it must be zeros.
    offsets_E1 = (torch.empty if N else torch.zeros)(num_experts + 1, dtype=torch.int32, device=device)
    lut = lut_E if from_meta else ids
    flags = {"FROM_META": from_meta, "BLOCK": BLOCK, "E_PAD": e_pad}
    if 0 < N <= SMALL_N:
        _dispatch_small_kernel[(1,)](
            ids, lut, row_of_slot_N, slot_of_row, offsets_E1, N, R, num_experts, **flags
        )
    elif 0 < num_blocks <= FUSED_SCAN_BLOCKS:
        counts_BE = torch.empty(num_blocks, e_pad, dtype=torch.int32, device=device)
        _count_kernel[(num_blocks,)](ids, lut, counts_BE, counts_BE, N, num_experts, R, TOTALS=False, **flags)
        _scan_scatter_kernel[(num_blocks,)](
            ids, lut, counts_BE, row_of_slot_N, slot_of_row, offsets_E1, N, R, num_experts, num_blocks,
            STEP=SCAN_STEP, **flags,
        )  # fmt: skip
    elif N:
        counts_BE = torch.empty(num_blocks, e_pad, dtype=torch.int32, device=device)
        base_BE = torch.empty_like(counts_BE)
        totals_E = torch.zeros(e_pad, dtype=torch.int32, device=device)
        _count_kernel[(num_blocks,)](ids, lut, counts_BE, totals_E, N, num_experts, R, TOTALS=True, **flags)
        _scan_kernel[(num_experts,)](
            counts_BE, totals_E, base_BE, offsets_E1, num_blocks, num_experts, E_PAD=e_pad, SCAN=SCAN
        )
        _scatter_kernel[(num_blocks,)](
            ids, lut, base_BE, row_of_slot_N, slot_of_row, N, R, num_experts, **flags
        )
    return ExpertBuckets(row_of_slot_N=row_of_slot_N, slot_of_row_MR=slot_of_row, offsets_E1=offsets_E1)
