"""Combine and row permutation: gathers, never atomics, so results are deterministic.

Shape legend: M rows, R reads per row, N routed rows (bucket order; ``M * R`` without ``-1``
slots), H hidden.

* ``gather_sum``: ``out_MH[m] = sum_r w[m, r] * src_NH[slot_of_row[m, r]]`` (w = 1 when absent),
  float32 sums in read order. It is combine's forward, and the backward of anything that read
  row m up to R times.
* ``_combine_bwd_kernel``: for each (m, r): ``dsrc[slot] = w[m, r] * dout[m]`` (the slots are a
  permutation, so these are plain stores) and ``dw[m, r] = <dout[m], src[slot]>``.
* ``_gather_rows_kernel``: ``out_NH[n] = x_MH[row_of_slot[n]]`` (permute_rows' forward).

A ``-1`` slot (``ExpertBuckets``: that read has no routed row) is masked out: ``gather_sum``
neither loads its row nor its weight, ``_combine_bwd_kernel`` stores no row gradient for it and a
zero weight gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_replay.types import ExpertBuckets

BLOCK_ROWS = 4


def _block_h(H: int) -> int:
    return min(triton.next_power_of_2(max(H, 16)), 1024)


@triton.jit
def _gather_sum_kernel(
    src_ptr,
    slot_ptr,
    weights_ptr,
    out_ptr,
    M,
    H,
    R: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = row_ok[:, None] & (cols < H)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    for r in range(R):
        slot = tl.load(slot_ptr + rows64 * R + r, mask=row_ok, other=-1).to(tl.int64)
        has = slot >= 0  # -1: no routed row, adds nothing
        src_ptrs = src_ptr + slot[:, None] * H + cols[None, :]
        v = tl.load(src_ptrs, mask=ok & has[:, None], other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            v = v * tl.load(weights_ptr + rows64 * R + r, mask=has, other=0.0)[:, None]
        acc += v
    tl.store(out_ptr + rows64[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _combine_bwd_kernel(
    dout_ptr,
    src_ptr,
    slot_ptr,
    weights_ptr,
    dsrc_ptr,
    dw_ptr,
    M,
    H,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    for r in range(R):
        slot = tl.load(slot_ptr + rows64 * R + r, mask=row_ok, other=-1).to(tl.int64)
        has = slot >= 0  # -1: no routed row; nothing stored, dw = 0
        w = tl.load(weights_ptr + rows64 * R + r, mask=has, other=0.0)
        dot = tl.zeros([BLOCK_M], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            ok = row_ok[:, None] & (cols < H)[None, :]
            slot_ok = ok & has[:, None]
            at_row = rows64[:, None] * H + cols[None, :]
            at_slot = slot[:, None] * H + cols[None, :]
            dout = tl.load(dout_ptr + at_row, mask=slot_ok, other=0.0).to(tl.float32)
            src = tl.load(src_ptr + at_slot, mask=slot_ok, other=0.0).to(tl.float32)
            dot += tl.sum(dout * src, 1)
            tl.store(dsrc_ptr + at_slot, (dout * w[:, None]).to(dsrc_ptr.dtype.element_ty), mask=slot_ok)
        tl.store(dw_ptr + rows64 * R + r, dot, mask=row_ok)


@triton.jit
def _gather_rows_kernel(x_ptr, row_of_slot_ptr, out_ptr, N, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ok = slots < N
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = slot_ok[:, None] & (cols < H)[None, :]
    src = tl.load(row_of_slot_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
    v = tl.load(x_ptr + src[:, None] * H + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + slots.to(tl.int64)[:, None] * H + cols[None, :], v, mask=ok)


def gather_sum(
    src_NH: torch.Tensor,
    slot_of_row_MR: torch.Tensor,
    weights_MR: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out_MH``; with ``out`` (``[M, H]``, ``out_dtype``, contiguous), written there."""
    M, R = slot_of_row_MR.shape
    H = src_NH.shape[1]
    if out is None:
        out = torch.empty(M, H, dtype=out_dtype, device=src_NH.device)
    elif out.shape != (M, H) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous [{M}, {H}] {out_dtype} tensor, got {list(out.shape)} {out.dtype}"
        )
    if M and H:
        block_h = _block_h(H)
        _gather_sum_kernel[(triton.cdiv(M, BLOCK_ROWS), triton.cdiv(H, block_h))](
            src_NH.contiguous(), slot_of_row_MR, weights_MR if weights_MR is not None else src_NH, out, M, H,
            R=R, HAS_WEIGHTS=weights_MR is not None, BLOCK_M=BLOCK_ROWS, BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip
    else:
        out.zero_()
    return out


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_NH, weights_MR, slot_of_row_MR, out_dtype):  # type: ignore[override]
        y_NH = y_NH.contiguous()
        ctx.weights_dtype = weights_MR.dtype
        weights_MR = weights_MR.float().contiguous()
        ctx.save_for_backward(y_NH, weights_MR, slot_of_row_MR)
        return gather_sum(y_NH, slot_of_row_MR, weights_MR, out_dtype)

    @staticmethod
    def backward(ctx, dout_MH):  # type: ignore[override]
        y_NH, weights_MR, slot_of_row_MR = ctx.saved_tensors
        M, R = slot_of_row_MR.shape
        H = y_NH.shape[1]
        dy_NH = torch.empty_like(y_NH)
        dw_MR = torch.empty_like(weights_MR)
        if M and H:
            block_h = _block_h(H)
            _combine_bwd_kernel[(triton.cdiv(M, BLOCK_ROWS),)](
                dout_MH.contiguous(), y_NH, slot_of_row_MR, weights_MR, dy_NH, dw_MR, M, H,
                R=R, BLOCK_M=BLOCK_ROWS, BLOCK_H=block_h, num_warps=4,
            )  # fmt: skip
        else:
            dw_MR.zero_()
        return dy_NH, dw_MR.to(ctx.weights_dtype), None, None


def combine(
    y_NH: torch.Tensor, buckets: ExpertBuckets, weights_MR: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    return _Combine.apply(y_NH, weights_MR, buckets.slot_of_row_MR, out_dtype)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MH, row_of_slot_N, slot_of_row_MR):  # type: ignore[override]
        x_MH = x_MH.contiguous()
        N, H = row_of_slot_N.numel(), x_MH.shape[1]
        out = torch.empty(N, H, dtype=x_MH.dtype, device=x_MH.device)
        if N and H:
            block_h = _block_h(H)
            _gather_rows_kernel[(triton.cdiv(N, BLOCK_ROWS), triton.cdiv(H, block_h))](
                x_MH, row_of_slot_N, out, N, H, BLOCK_M=BLOCK_ROWS, BLOCK_H=block_h, num_warps=4
            )
        ctx.save_for_backward(slot_of_row_MR)
        ctx.x_dtype = x_MH.dtype
        return out

    @staticmethod
    def backward(ctx, dout_NH):  # type: ignore[override]
        (slot_of_row_MR,) = ctx.saved_tensors
        return gather_sum(dout_NH, slot_of_row_MR, None, ctx.x_dtype), None, None


def permute_rows(x_MH: torch.Tensor, buckets: ExpertBuckets) -> torch.Tensor:
    return _PermuteRows.apply(x_MH, buckets.row_of_slot_N, buckets.slot_of_row_MR)
