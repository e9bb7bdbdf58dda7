"""Grouped SwiGLU experts: forward and backward as grouped GEMMs over expert buckets.

Shape legend: M input rows, N routed rows in bucket order, E experts, H hidden, I intermediate.
``w_gate_up_E2IH``: rows ``0..I-1`` gate, ``I..2I-1`` up. ``w_down_EHI``.

Kernels (one launch each, grids known from shapes, no host synchronisation):

* ``_gate_up_kernel``: ``h_NI = silu(x @ Wg^T) * (x @ Wu^T)`` with the gather ``x = x_MH[row_of_slot]``
  in its loads and SwiGLU in its epilogue (two accumulators, gate and up, per tile). With
  gradients requested it also stores the pre-activations ``gu_N2I`` for the backward.
* ``_grouped_linear_kernel``: ``out = A @ W_e^T`` per bucket, A optionally gathered, W given by
  strides so the same kernel does the down projection and both data-gradient GEMMs; its
  ``SWIGLU_BWD`` epilogue turns ``dh`` into ``d(gate, up)`` using the saved pre-activations.
* ``_grouped_wgrad_kernel``: ``dW_e = A_e^T @ B_e`` summed over expert e's rows, A and B
  optionally gathered through ``row_of_slot`` (A then scaled per row). An expert with no rows
  gets a zero gradient.

The backward runs these kernels, or, where it measured faster (``GROUPED_MM_BACKWARD``: bf16 on
compute capability 9.0+), ``torch._grouped_mm`` for its four GEMMs on gathered rows with the
SwiGLU backward as one elementwise pass (``swiglu.py``); both give the same gradients.

``expert_mlp_combine`` (the local layer's path) puts the combine inside the autograd Function, so
its backward reads the token gradients directly (see ``_ExpertMLPCombine``; the ``_grouped_mm``
path gathers them into ``dy_NH`` for its GEMMs). ``expert_mlp`` returns the routed rows (expert
parallelism needs them).

Row tiles never straddle two experts (see ``expert_of_tile``). Accumulation is float32; ``h``,
``gu`` and the outputs are stored in the activations' dtype.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from moe_replay.backends.triton._common import (
    dot_flags,
    expert_of_tile,
    grouped_tile_order,
    interpreting,
    launch_fitting,
    max_row_tiles,
    mma,
    needs_autograd,
    pow2,
)
from moe_replay.backends.triton.combine import gather_sum
from moe_replay.backends.triton.swiglu import swiglu_bwd, swiglu_grad, swiglu_weigh
from moe_replay.types import ExpertBuckets, InputGradsHook, RowSink

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4: pointer loads only
    TensorDescriptor = None


# Whether kernels on compute capability 9.0+ load weights (and unpermuted activations) through
# TMA descriptors: "1" (yes) or "0". None: the MOE_REPLAY_TRITON_TMA environment variable, read at
# the first launch, default "1" (a tuning switch for benchmarks).
TMA_BY_DEFAULT: str | None = None

# Which GEMMs the backward runs: "auto" uses torch._grouped_mm (CUTLASS) for all four on compute
# capability 9.0+ in bfloat16, where it measured faster than these kernels on every shape of
# benchmarks/RESULTS.md; "1" wherever its alignment allows (CPU included: its fallback there is
# how CI covers that path), "0" never. None: the MOE_REPLAY_TRITON_GROUPED_MM environment
# variable, read at the first backward, default "auto". A tuning switch, like the one above.
GROUPED_MM_BACKWARD: str | None = None


@functools.cache
def _environment(name: str, default: str) -> str:
    """A tuning switch's environment variable, read once, at first use (not at import)."""
    return os.environ.get(name, default)


def _tma_setting() -> str:
    return TMA_BY_DEFAULT if TMA_BY_DEFAULT is not None else _environment("MOE_REPLAY_TRITON_TMA", "1")


def _grouped_mm_setting() -> str:
    if GROUPED_MM_BACKWARD is not None:
        return GROUPED_MM_BACKWARD
    return _environment("MOE_REPLAY_TRITON_GROUPED_MM", "auto")


# fmt: off
@triton.jit
def _gate_up_kernel(
    x_ptr, row_of_slot_ptr, offsets_ptr, w_ptr, h_ptr, gu_ptr,
    E, H, I, M_TILES, stride_xm, stride_we, stride_wn, stride_wk,
    SAVE_GU: tl.constexpr, EVEN_K: tl.constexpr, W_TMA: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_order(tl.program_id(0), M_TILES, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert, row_start, row_end, exists = expert_of_tile(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if exists:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        src = tl.load(row_of_slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < I
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :]
        if not W_TMA:
            g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
            u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_row = expert * (2 * I) + pid_n * BLOCK_N  # gate rows of this tile in the [E * 2I, H] view
        for k0 in range(0, H, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                k_ok = (k0 + ks) < H
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if W_TMA:  # rows past the gate (or up) block feed only masked-out columns
                g = tl.trans(w_ptr.load([w_row, k0]))
                u = tl.trans(w_ptr.load([w_row + I, k0]))
            elif EVEN_K:
                g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_g = mma(a, g, acc_g, DOT_FP32, IEEE)
            acc_u = mma(a, u, acc_u, DOT_FP32, IEEE)
            a_ptrs += BLOCK_K
            if not W_TMA:
                g_ptrs += BLOCK_K * stride_wk
                u_ptrs += BLOCK_K * stride_wk
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        out_ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        tl.store(h_ptr + rows64[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_ok)
        if SAVE_GU:
            gu = gu_ptr + rows64[:, None] * (2 * I) + cols[None, :]
            tl.store(gu, acc_g.to(gu_ptr.dtype.element_ty), mask=out_ok)
            tl.store(gu + I, acc_u.to(gu_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _grouped_linear_kernel(
    a_ptr, row_of_slot_ptr, offsets_ptr, w_ptr, out_ptr, gu_ptr, row_scale_ptr, dscale_ptr, hw_ptr,
    E, K_DIM, N_OUT, M_TILES, stride_am, stride_we, stride_wn, stride_wk,
    GATHER_A: tl.constexpr, SWIGLU_BWD: tl.constexpr, ROW_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    A_TMA: tl.constexpr, W_TMA: tl.constexpr, W_KMAJOR: tl.constexpr, W_ROWS: tl.constexpr,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    # A_TMA: A (not gathered) through a [N, K] descriptor; rows past the expert's bucket feed only
    # rows that are not stored. W_TMA: W through its [E * W_ROWS, cols] descriptor, K-major
    # (W_e^T's rows are the matrix's rows) or not; what a tile reads past one expert's matrix
    # meets zeros in A (K) or lands in columns that are not stored (N).
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m, pid_n = grouped_tile_order(tl.program_id(0), M_TILES, num_n, GROUP_M)
    expert, row_start, row_end, exists = expert_of_tile(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if exists:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        if GATHER_A:
            a_rows = tl.load(row_of_slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            a_rows = rows64
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N_OUT
        ks = tl.arange(0, BLOCK_K)
        if not A_TMA:
            a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
        if not W_TMA:
            w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_row = expert * W_ROWS
        for k0 in range(0, K_DIM, BLOCK_K):
            if A_TMA:
                a = a_ptr.load([row_start, k0])
            elif EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=row_ok[:, None] & ((k0 + ks) < K_DIM)[None, :], other=0.0)
            if W_TMA and W_KMAJOR:
                w = tl.trans(w_ptr.load([w_row + pid_n * BLOCK_N, k0]))
            elif W_TMA:
                w = w_ptr.load([w_row + k0, pid_n * BLOCK_N])
            elif EVEN_K:
                w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                w = tl.load(w_ptrs, mask=((k0 + ks) < K_DIM)[:, None] & col_ok[None, :], other=0.0)
            acc = mma(a, w, acc, DOT_FP32, IEEE)
            if not A_TMA:
                a_ptrs += BLOCK_K
            if not W_TMA:
                w_ptrs += BLOCK_K * stride_wk
        out_ok = row_ok[:, None] & col_ok[None, :]
        if SWIGLU_BWD:  # acc is dh [rows, I]; out is d(gate, up) [N, 2I]
            gu = gu_ptr + rows64[:, None] * (2 * N_OUT) + cols[None, :]
            g = tl.load(gu, mask=out_ok, other=0.0).to(tl.float32)
            u = tl.load(gu + N_OUT, mask=out_ok, other=0.0).to(tl.float32)
            if ROW_SCALE:
                # acc is dy @ W_down for the unweighted gradient of the row's token: its dot with
                # h is this tile's share of d(gate weight); then the row's gate weight scales it,
                # and h * weight is stored for d down_proj = sum over rows of dy^T (weight h).
                row_w = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
                partial, acc, hw = swiglu_weigh(acc, g, u, row_w)
                tl.store(dscale_ptr + rows64 * num_n + pid_n, partial, mask=row_ok)
                hw_out = hw_ptr + rows64[:, None] * N_OUT + cols[None, :]
                tl.store(hw_out, hw.to(hw_ptr.dtype.element_ty), mask=out_ok)
            dg, du = swiglu_grad(acc, g, u)
            dgu = out_ptr + rows64[:, None] * (2 * N_OUT) + cols[None, :]
            tl.store(dgu, dg.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.store(dgu + N_OUT, du.to(out_ptr.dtype.element_ty), mask=out_ok)
        else:
            tl.store(out_ptr + rows64[:, None] * N_OUT + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, b_ptr, row_of_slot_ptr, offsets_ptr, dw_ptr,
    P, Q, stride_am, stride_bm,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_p, pid_q = grouped_tile_order(tl.program_id(0), tl.cdiv(P, BLOCK_P), tl.cdiv(Q, BLOCK_Q), GROUP_M)
    expert = tl.program_id(1)
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < P
    q_ok = qs < Q
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + ks
        r_ok = rows < hi
        rows64 = rows.to(tl.int64)
        if GATHER_A or GATHER_B:
            src = tl.load(row_of_slot_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            src = rows64
        a_rows = src if GATHER_A else rows64
        b_rows = src if GATHER_B else rows64
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ps[None, :], mask=r_ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + qs[None, :], mask=r_ok[:, None] & q_ok[None, :], other=0.0)
        acc = mma(tl.trans(a), b, acc, DOT_FP32, IEEE)
    dw = dw_ptr + expert.to(tl.int64) * P * Q + ps[:, None] * Q + qs[None, :]
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])
# fmt: on


# Tile shapes measured on an H100 (benchmarks/profile_stages.py, Qwen3-30B-A3B shape, T=4096 and
# 16384; benchmarks/RESULTS.md): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel,
# chosen by the mean rows per expert. Three stages beat four at BLOCK_M=128 except where the
# SwiGLU-backward epilogue reads and writes two more tiles. With TMA (forward kernels, sm90)
# gate_up went 1.70 -> 1.53 ms and down 0.92 -> 0.86 ms at T=16384; the transposed-weight
# data-gradient kernels were no faster with it (1.39 vs 1.61 ms), so they keep pointer loads.
_LARGE_TILES = {
    "gate_up": (128, 128, 64, 8, 3),  # BLOCK_N per accumulator: the gate and up tiles side by side
    "linear": (128, 256, 64, 8, 3),
    "swiglu_bwd": (128, 128, 64, 8, 4),
}
_MEDIUM_TILES = {
    "gate_up": (64, 64, 64, 4, 4),
    "linear": (64, 128, 64, 4, 4),
    "swiglu_bwd": (64, 128, 64, 4, 4),
}
# Decode sizes: a few rows per expert, so the time is reading each active expert's weights once.
_DECODE_TILES = {
    "gate_up": (16, 64, 128, 4, 4),
    "linear": (16, 64, 128, 4, 4),
    "swiglu_bwd": (16, 64, 128, 4, 4),
}
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
GROUP_M = 8  # row tiles per group of the tile order (grouped_tile_order)


def _row_tiles(kind: str, num_rows: int, num_experts: int, dtype: torch.dtype) -> dict:
    """Tile shapes for the row-grouped kernels (``kind``: gate_up, linear, swiglu_bwd)."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    per_expert = num_rows / max(num_experts, 1)
    table = _LARGE_TILES if per_expert >= 96 else _MEDIUM_TILES if per_expert >= 24 else _DECODE_TILES
    return _for_dtype(dict(zip(_TILE_KEYS, table[kind])), dtype)


def _wgrad_tiles(dtype: torch.dtype) -> dict:
    if interpreting():
        return {"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    return _for_dtype({"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}, dtype)


def _for_dtype(cfg: dict, dtype: torch.dtype) -> dict:
    """The tables are for 2-byte types; 4-byte tiles keep the shared memory per stage by halving K."""
    if dtype.itemsize > 2:
        cfg = {**cfg, "BLOCK_K": max(16, cfg["BLOCK_K"] // 2), "num_stages": min(cfg["num_stages"], 3)}
    return cfg


def gate_up_fwd(
    x_MH: torch.Tensor,
    buckets: ExpertBuckets,
    w_gate_up_E2IH: torch.Tensor,
    save_gu: bool,
    tiles: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h_NI`` and, with ``save_gu``, the pre-activations ``gu_N2I`` (both in x's dtype)."""
    N, E = buckets.num_slots, buckets.num_experts
    H, I = x_MH.shape[1], w_gate_up_E2IH.shape[1] // 2
    h_NI = torch.empty(N, I, dtype=x_MH.dtype, device=x_MH.device)
    gu_N2I = torch.empty(N, 2 * I, dtype=x_MH.dtype, device=x_MH.device) if save_gu else None
    if N == 0:
        return h_NI, gu_N2I
    cfg = tiles or _row_tiles("gate_up", N, E, x_MH.dtype)

    def launch(cfg: dict) -> None:
        m_tiles = max_row_tiles(N, E, cfg["BLOCK_M"])
        w_desc = _descriptor(w_gate_up_E2IH, [cfg["BLOCK_N"], cfg["BLOCK_K"]], cfg)
        _gate_up_kernel[(triton.cdiv(I, cfg["BLOCK_N"]) * m_tiles,)](
            x_MH, buckets.row_of_slot_N, buckets.offsets_E1, w_desc or w_gate_up_E2IH, h_NI, gu_N2I if save_gu else h_NI,
            E, H, I, m_tiles, x_MH.stride(0), *w_gate_up_E2IH.stride(),
            SAVE_GU=save_gu, EVEN_K=H % cfg["BLOCK_K"] == 0, W_TMA=w_desc is not None, E_PAD=pow2(E, 16),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=GROUP_M,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot_flags(x_MH.dtype),
        )  # fmt: skip

    launch_fitting("gate_up", cfg, x_MH.device, launch)
    return h_NI, gu_N2I


def grouped_linear(
    a: torch.Tensor,
    buckets: ExpertBuckets,
    w_E: torch.Tensor,
    w_strides_enk: tuple[int, int, int],
    n_out: int,
    gu_N2I: torch.Tensor | None = None,
    gather_a: bool = False,
    row_scale_N: torch.Tensor | None = None,
    tiles: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``out[n] = a[src(n)] @ W_e^T`` where ``W_e[j, k] = w_E[e*s_e + j*s_n + k*s_k]`` is ``[n_out, K]``
    and ``src(n)`` is ``row_of_slot[n]`` with ``gather_a``, else ``n``.

    With ``gu_N2I`` the epilogue is the SwiGLU backward and ``out`` is ``d(gate, up) [N, 2 * n_out]``.
    With ``row_scale_N`` too (each slot's gate weight), the GEMM runs on the unweighted gradient,
    whose dot with ``h`` comes back as per-column-tile partials ``[N, tiles]`` of the gate
    weight's gradient, rows are scaled before the SwiGLU backward, and ``h * weight [N, n_out]``
    is stored too. Returns ``(out, partials, h * weight)``, the last two None without scaling.

    TMA (compute capability 9.0+) is used where it measured faster: K-major weights, which the
    forward GEMMs read, with the unpermuted A rows; ``tiles["TMA"]`` overrides.
    """
    N, E = buckets.num_slots, buckets.num_experts
    K_dim = a.shape[1]
    width = 2 * n_out if gu_N2I is not None else n_out
    out = torch.empty(N, width, dtype=a.dtype, device=a.device)
    cfg = tiles or _row_tiles("swiglu_bwd" if gu_N2I is not None else "linear", N, E, a.dtype)
    n_tiles = triton.cdiv(n_out, cfg["BLOCK_N"])
    scaled = row_scale_N is not None
    dscale = torch.empty(N, n_tiles, dtype=torch.float32, device=a.device) if scaled else None
    hw = torch.empty(N, n_out, dtype=a.dtype, device=a.device) if scaled else None
    if N == 0:
        return out, dscale, hw
    # W_e^T is either each [n_out, K] matrix of w_E as stored (K-major) or each [K, n_out] one.
    w_kmajor = w_strides_enk[2] == 1
    tma = {"TMA": cfg.get("TMA", w_kmajor and _tma_default(a))}
    natural = tuple(w_E.stride())

    def launch(cfg: dict) -> None:
        m_tiles = max_row_tiles(N, E, cfg["BLOCK_M"])
        w_block = [cfg["BLOCK_N"], cfg["BLOCK_K"]] if w_kmajor else [cfg["BLOCK_K"], cfg["BLOCK_N"]]
        w_desc = _descriptor(w_E, w_block, tma) if w_strides_enk in (natural, _transposed(w_E)) else None
        a_desc = None if gather_a else _descriptor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]], tma)
        _grouped_linear_kernel[(n_tiles * m_tiles,)](
            a_desc or a, buckets.row_of_slot_N, buckets.offsets_E1, w_desc or w_E, out, gu_N2I if gu_N2I is not None else out,
            row_scale_N if scaled else out, dscale if scaled else out, hw if scaled else out,
            E, K_dim, n_out, m_tiles, a.stride(0), *w_strides_enk,
            GATHER_A=gather_a, SWIGLU_BWD=gu_N2I is not None, ROW_SCALE=row_scale_N is not None,
            EVEN_K=K_dim % cfg["BLOCK_K"] == 0, A_TMA=a_desc is not None, W_TMA=w_desc is not None,
            W_KMAJOR=w_kmajor, W_ROWS=w_E.shape[1], E_PAD=pow2(E, 16),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=GROUP_M,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot_flags(a.dtype),
        )  # fmt: skip

    launch_fitting("swiglu_bwd" if gu_N2I is not None else "linear", cfg, a.device, launch)
    return out, dscale, hw


def grouped_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    buckets: ExpertBuckets,
    gather_a: bool,
    gather_b: bool,
    dtype: torch.dtype,
    tiles: dict | None = None,
) -> torch.Tensor:
    """``dW[e] = sum over e's rows n of a[src_a(n)]^T b[src_b(n)]``, ``[E, P, Q]``, where ``src`` is
    ``row_of_slot`` for a gathered operand, else the identity."""
    P, Q, E = a.shape[1], b.shape[1], buckets.num_experts
    dw = torch.empty(E, P, Q, dtype=dtype, device=a.device)
    if E == 0:
        return dw
    cfg = tiles or _wgrad_tiles(a.dtype)
    grid = (triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(Q, cfg["BLOCK_Q"]), E)

    def launch(cfg: dict) -> None:
        _grouped_wgrad_kernel[grid](
            a, b, buckets.row_of_slot_N, buckets.offsets_E1, dw, P, Q, a.stride(0), b.stride(0),
            GATHER_A=gather_a, GATHER_B=gather_b,
            BLOCK_P=cfg["BLOCK_P"], BLOCK_Q=cfg["BLOCK_Q"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=GROUP_M,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot_flags(a.dtype),
        )  # fmt: skip

    launch_fitting("wgrad", cfg, a.device, launch)
    return dw


def _descriptor(t: torch.Tensor, block: list[int], cfg: dict) -> TensorDescriptor | None:
    """A TMA descriptor over ``t`` viewed as 2-D ``[rows, last dim]``, when tiles use TMA.

    ``cfg["TMA"]`` (default: on for compute capability 9.0+) turns it on; tensors TMA cannot
    address (not contiguous, rows not 16-byte aligned) keep the pointer path.
    """
    if TensorDescriptor is None or not cfg.get("TMA", _tma_default(t)):
        return None
    if not t.is_contiguous() or t.numel() == 0 or (t.shape[-1] * t.element_size()) % 16:
        return None
    return TensorDescriptor.from_tensor(t.view(-1, t.shape[-1]), block)


def _tma_default(t: torch.Tensor) -> bool:
    return _tma_setting() == "1" and t.is_cuda and _capability(t.device.index)[0] >= 9


@functools.cache
def _capability(device_index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _check_dtypes(x_MH: torch.Tensor, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor) -> None:
    if not (x_MH.dtype == w_gate_up_E2IH.dtype == w_down_EHI.dtype):
        raise ValueError(
            "the triton backend needs x and the expert weights in one dtype, got "
            f"x {x_MH.dtype}, gate_up_proj {w_gate_up_E2IH.dtype}, down_proj {w_down_EHI.dtype}"
        )


def _transposed(w: torch.Tensor) -> tuple[int, int, int]:
    """Strides that view each ``[A, B]`` matrix of ``w [E, A, B]`` as ``[B, A]``."""
    s_e, s_a, s_b = w.stride()
    return s_e, s_b, s_a


def _forward(
    x_MH: torch.Tensor, buckets: ExpertBuckets, w_gate_up: torch.Tensor, w_down: torch.Tensor, save: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(y_NH, h_NI, gu_N2I)``: both GEMMs of the forward."""
    h_NI, gu_N2I = gate_up_fwd(x_MH, buckets, w_gate_up, save)
    s_e, s_n, s_k = w_down.stride()
    y_NH, _, _ = grouped_linear(h_NI, buckets, w_down, (s_e, s_n, s_k), w_down.shape[1])
    return y_NH, h_NI, gu_N2I


def _weight_of_slot(weights_MR: torch.Tensor, slot_of_row_MR: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Each slot's gate weight, ``[N]`` float32. The used slots are a permutation (no repeats);
    ``-1`` entries (no slot) land in a spare last element, which is cut off."""
    out = torch.empty(num_slots + 1, dtype=torch.float32, device=weights_MR.device)
    out[slot_of_row_MR.reshape(-1).long()] = weights_MR.reshape(-1).float()
    return out[:num_slots]


def _grouped_mm_ok(
    x_MH: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, buckets: ExpertBuckets
) -> bool:
    """Whether the backward GEMMs run as ``torch._grouped_mm`` (see ``GROUPED_MM_BACKWARD``)."""
    setting = _grouped_mm_setting()
    if setting == "0" or not hasattr(torch, "_grouped_mm"):
        return False
    # Its operands need 16-byte aligned rows; the weights are read as stored.
    aligned = all(n * x_MH.element_size() % 16 == 0 for n in (w_down.shape[1], w_down.shape[2]))
    if buckets.num_slots == 0 or not (aligned and w_gate_up.is_contiguous() and w_down.is_contiguous()):
        return False
    if setting == "1":
        return True
    return x_MH.is_cuda and x_MH.dtype == torch.bfloat16 and _capability(x_MH.device.index)[0] >= 9


@dataclass(frozen=True)
class _Saved:
    """What the experts' backward reads besides the gradient (saved by the forward).

    ``weight_of_slot_N`` (each slot's gate weight, float32) is given when the forward also
    combined the rows (``_ExpertMLPCombine``): the gradient then arrives per token ``[M, H]``, is
    read per routed row, and the gate weights get a gradient too. Without it the gradient arrives
    per routed row ``[N, H]`` and ``h_NI`` was saved for ``d down_proj``.
    """

    x_MH: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    buckets: ExpertBuckets
    gu_N2I: torch.Tensor
    h_NI: torch.Tensor | None = None
    weight_of_slot_N: torch.Tensor | None = None
    x_NH: torch.Tensor | None = None
    """``x_MH``'s rows in bucket order, if ``prepare_backward`` gathered them already."""


Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
InputGradsDone = Callable[[torch.Tensor | None, torch.Tensor | None], int]
"""Called by ``_backward`` with ``(dx, dweight_N)`` once both are computed, before the weight
gradients' GEMMs; returns how many SMs the work it started occupies meanwhile (0: none)."""


def _ignore(dx: torch.Tensor | None, dweight_N: torch.Tensor | None) -> int:
    return 0


@contextlib.contextmanager
def _sm_carveout(sms: int) -> Iterator[None]:
    """``torch._grouped_mm`` calls inside target ``sms`` fewer SMs (PyTorch's experimental SM
    carveout; nothing without it or with ``sms == 0``).

    Its CUTLASS kernels are persistent: one block per SM, each with a fixed share of the tiles. A
    block whose SM is held by a concurrent kernel (NCCL's all-to-all takes up to 32 on Hopper)
    starts when that kernel ends, and the GEMM ends that much later: overlapping the two gains
    nothing. Leaving those SMs out costs the GEMM their share instead, and lets it run alongside.
    The setting is process-wide while it lasts (the backward's thread is the one running GEMMs
    then); PyTorch warns once per process that it is experimental.
    """
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if not sms or setter is None:
        yield
        return
    previous = torch._C._get_sm_carveout_experimental()
    setter(sms)
    try:
        yield
    finally:
        setter(previous)


def _backward(
    dy: torch.Tensor, saved: _Saved, needs: tuple[bool, bool, bool], inputs_done: InputGradsDone = _ignore
) -> Grads:
    """``(dx, d gate_up_proj, d down_proj, dweight_N)`` of the experts (``dweight_N``: each slot's
    gate-weight gradient, None for unweighted rows); ``needs``: whether x, gate_up_proj and
    down_proj need gradients. ``torch._grouped_mm`` or our kernels (``GROUPED_MM_BACKWARD``).
    The gradients of the inputs come first and go to ``inputs_done``, the weights' after."""
    if _grouped_mm_ok(saved.x_MH, saved.w_gate_up, saved.w_down, saved.buckets):
        return _grouped_mm_grads(dy, saved, needs, inputs_done)
    return _kernel_grads(dy, saved, needs, inputs_done)


def _kernel_grads(
    dy: torch.Tensor, saved: _Saved, needs: tuple[bool, bool, bool], inputs_done: InputGradsDone
) -> Grads:
    """``_backward`` with our kernels: the SwiGLU backward in the epilogue of the dh GEMM."""
    needs_x, needs_gate_up, needs_down = needs
    x_MH, w_gate_up, w_down, buckets = saved.x_MH, saved.w_gate_up, saved.w_down, saved.buckets
    weighted = saved.weight_of_slot_N is not None
    dgu_N2I, dweight_parts_NT, weighted_h_NI = grouped_linear(
        dy, buckets, w_down, _transposed(w_down), w_down.shape[2],
        gu_N2I=saved.gu_N2I, gather_a=weighted, row_scale_N=saved.weight_of_slot_N,
    )  # fmt: skip
    dx = None
    if needs_x:
        dx_NH, _, _ = grouped_linear(dgu_N2I, buckets, w_gate_up, _transposed(w_gate_up), x_MH.shape[1])
        dx = gather_sum(dx_NH, buckets.slot_of_row_MR, None, x_MH.dtype)
    dweight_N = dweight_parts_NT.sum(1) if dweight_parts_NT is not None else None  # weighted
    inputs_done(dx, dweight_N)
    dw_gate_up = dw_down = None
    if needs_gate_up:
        dw_gate_up = grouped_wgrad(dgu_N2I, x_MH, buckets, False, True, w_gate_up.dtype)
    if needs_down:
        h_NI = weighted_h_NI if weighted else saved.h_NI
        assert h_NI is not None, "the forward saved h_NI where it did not combine"
        dw_down = grouped_wgrad(dy, h_NI, buckets, weighted, False, w_down.dtype)
    return dx, dw_gate_up, dw_down, dweight_N


def _grouped_mm_grads(
    dy: torch.Tensor, saved: _Saved, needs: tuple[bool, bool, bool], inputs_done: InputGradsDone
) -> Grads:
    """``_backward`` with the four GEMMs as ``torch._grouped_mm`` on gathered rows, the SwiGLU
    backward as one elementwise pass (``swiglu.swiglu_bwd``)."""
    needs_x, needs_gate_up, needs_down = needs
    buckets = saved.buckets
    offs = buckets.offsets_E1[1:]
    weighted = saved.weight_of_slot_N is not None
    dy_NH = dy.index_select(0, buckets.row_of_slot_N) if weighted else dy
    dh_NI = torch._grouped_mm(dy_NH, saved.w_down, offs=offs)
    dgu_N2I, dweight_N, weighted_h_NI = swiglu_bwd(dh_NI, saved.gu_N2I, saved.weight_of_slot_N)
    del dh_NI
    dx = dw_gate_up = dw_down = None
    if needs_x:
        dx_NH = torch._grouped_mm(dgu_N2I, saved.w_gate_up, offs=offs)
        dx = gather_sum(dx_NH, buckets.slot_of_row_MR, None, saved.x_MH.dtype)
        del dx_NH
    busy_sms = inputs_done(dx, dweight_N)
    if needs_down:
        h_NI = weighted_h_NI if weighted else saved.h_NI
        assert h_NI is not None, "the forward saved h_NI where it did not combine"
        with _sm_carveout(busy_sms):  # next to the transfer inputs_done may have started
            dw_down = torch._grouped_mm(dy_NH.t(), h_NI, offs=offs)
    del dy_NH, weighted_h_NI
    if needs_gate_up:
        x_NH = saved.x_MH.index_select(0, buckets.row_of_slot_N) if saved.x_NH is None else saved.x_NH
        dw_gate_up = torch._grouped_mm(dgu_N2I.t(), x_NH, offs=offs)
    return dx, dw_gate_up, dw_down, dweight_N


class _ExpertMLP(torch.autograd.Function):
    """``y_NH`` in bucket order (the expert-parallel dispatchers need the rows before combining)."""

    @staticmethod
    def forward(ctx, x_MH, w_gate_up_E2IH, w_down_EHI, row_of_slot_N, slot_of_row_MR, offsets_E1):  # type: ignore[override]
        buckets = ExpertBuckets(row_of_slot_N, slot_of_row_MR, offsets_E1)
        save = any(ctx.needs_input_grad[:3])
        y_NH, h_NI, gu_N2I = _forward(x_MH, buckets, w_gate_up_E2IH, w_down_EHI, save)
        if save:
            ctx.save_for_backward(
                x_MH, w_gate_up_E2IH, w_down_EHI, row_of_slot_N, slot_of_row_MR, offsets_E1, h_NI, gu_N2I
            )
        return y_NH

    @staticmethod
    def backward(ctx, dy_NH):  # type: ignore[override]
        x_MH, w_gate_up, w_down, row_of_slot, slot_of_row, offsets, h_NI, gu_N2I = ctx.saved_tensors
        buckets = ExpertBuckets(row_of_slot, slot_of_row, offsets)
        saved = _Saved(x_MH, w_gate_up, w_down, buckets, gu_N2I, h_NI=h_NI)
        dx, dw_gate_up, dw_down, _ = _backward(dy_NH.contiguous(), saved, ctx.needs_input_grad[:3])
        return dx, dw_gate_up, dw_down, None, None, None


class _ExpertMLPCombine(torch.autograd.Function):
    """``combine(expert_mlp(x))``, whose backward starts from the token gradients.

    Backward: ``d(gate, up)`` comes from one GEMM over the output gradient read per routed row
    (gathered in the kernel's loads, or into ``dy_NH`` for ``_grouped_mm``); with it come each
    row's gate-weight gradient ``<dy_token, y_row>``, computed as ``<dy_token @ W_down, h_row>`` (so
    ``y_NH`` is not kept), and ``weight * h_row``, which with the same gradient rows gives
    ``d down_proj``. Then ``dx``; ``on_input_grads`` gets ``dx`` and the weights' gradient before
    the two weight-gradient GEMMs run. Saved: x, the pre-activations, the metadata.
    """

    @staticmethod
    def forward(
        ctx,
        x_MH,
        w_gate_up_E2IH,
        w_down_EHI,
        weights_MR,
        row_of_slot_N,
        slot_of_row_MR,
        offsets_E1,
        out_dtype,
        on_input_grads,
        out_MH,
    ):  # type: ignore[override]
        buckets = ExpertBuckets(row_of_slot_N, slot_of_row_MR, offsets_E1)
        save = any(ctx.needs_input_grad[:4])
        y_NH, _, gu_N2I = _forward(x_MH, buckets, w_gate_up_E2IH, w_down_EHI, save)
        weights_f32 = weights_MR.float().contiguous()
        out_MH = _combine_into(y_NH, slot_of_row_MR, weights_f32, out_dtype, out_MH)
        if save:
            ctx.save_for_backward(
                x_MH,
                w_gate_up_E2IH,
                w_down_EHI,
                weights_f32,
                row_of_slot_N,
                slot_of_row_MR,
                offsets_E1,
                gu_N2I,
            )
            ctx.weights_dtype = weights_MR.dtype
            ctx.on_input_grads = on_input_grads
        return out_MH

    @staticmethod
    def backward(ctx, dout_MH):  # type: ignore[override]
        # prepare_backward may have unpacked them already (they unpack once under checkpointing).
        unpacked = getattr(ctx, "unpacked", None) or ctx.saved_tensors
        ctx.unpacked = None
        x_MH, w_gate_up, w_down, weights, row_of_slot, slot_of_row, offsets, gu_N2I = unpacked
        buckets = ExpertBuckets(row_of_slot, slot_of_row, offsets)
        dout_MH = dout_MH.to(x_MH.dtype).contiguous()
        weight_of_slot_N = _weight_of_slot(weights, slot_of_row, buckets.num_slots)
        needs = ctx.needs_input_grad
        x_NH, ctx.x_rows_NH = getattr(ctx, "x_rows_NH", None), None  # see prepare_backward
        saved = _Saved(x_MH, w_gate_up, w_down, buckets, gu_N2I, weight_of_slot_N=weight_of_slot_N, x_NH=x_NH)
        dweights = None

        def inputs_done(dx: torch.Tensor | None, dweight_N: torch.Tensor | None) -> int:
            nonlocal dweights
            if needs[3]:
                assert dweight_N is not None, "a combined backward computes the weights' gradient"
                dweights = buckets.per_read(dweight_N).to(ctx.weights_dtype)
            return 0 if ctx.on_input_grads is None else ctx.on_input_grads(dx, dweights)

        dx, dw_gate_up, dw_down, _ = _backward(dout_MH, saved, needs[:3], inputs_done)
        return dx, dw_gate_up, dw_down, dweights, None, None, None, None, None, None


def _combine_into(
    y_NH: torch.Tensor,
    slot_of_row_MR: torch.Tensor,
    weights_MR: torch.Tensor,
    out_dtype: torch.dtype,
    out_MH: torch.Tensor | RowSink | None,
) -> torch.Tensor:
    """The combine's gather-sum into ``out_MH``: a local tensor (or a new one), or a ``RowSink``
    that stores the rows itself and returns their stand-in."""
    if out_MH is None or isinstance(out_MH, torch.Tensor):
        return gather_sum(y_NH, slot_of_row_MR, weights_MR, out_dtype, out_MH)
    return out_MH.write(y_NH, slot_of_row_MR, weights_MR, out_dtype)


def prepare_backward(grad_fn: Any) -> None:
    """For an ``expert_mlp_combine`` node whose backward runs on ``torch._grouped_mm`` and wants
    ``d gate_up_proj``: gather the x rows that GEMM reads now, into the node (its backward takes
    them from there). Any other node: nothing. See ``Backend.prepare_backward``."""
    if type(grad_fn) is not _ExpertMLPCombine._backward_cls:
        return
    node: Any = grad_fn  # the attributes below are this module's own (set here, read by backward)
    if not node.needs_input_grad[1]:
        return
    # Saved tensors unpack once under activation checkpointing (the unpack is where it recomputes):
    # the backward takes them from here too.
    node.unpacked = node.saved_tensors
    x_MH, w_gate_up, w_down, _, row_of_slot, slot_of_row, offsets, _ = node.unpacked
    if _grouped_mm_ok(x_MH, w_gate_up, w_down, ExpertBuckets(row_of_slot, slot_of_row, offsets)):
        node.x_rows_NH = x_MH.index_select(0, row_of_slot)


def expert_mlp(
    x_MH: torch.Tensor, buckets: ExpertBuckets, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor
) -> torch.Tensor:
    """``y_NH`` (x's dtype) in bucket order; see the module docstring."""
    _check_dtypes(x_MH, w_gate_up_E2IH, w_down_EHI)
    if not needs_autograd(x_MH, w_gate_up_E2IH, w_down_EHI):
        return _forward(x_MH.contiguous(), buckets, w_gate_up_E2IH, w_down_EHI, False)[0]
    return _ExpertMLP.apply(
        x_MH.contiguous(),
        w_gate_up_E2IH,
        w_down_EHI,
        buckets.row_of_slot_N,
        buckets.slot_of_row_MR,
        buckets.offsets_E1,
    )


def expert_mlp_combine(
    x_MH: torch.Tensor,
    buckets: ExpertBuckets,
    w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    weights_MR: torch.Tensor,
    out_dtype: torch.dtype,
    on_input_grads: InputGradsHook | None = None,
    out_MH: torch.Tensor | RowSink | None = None,
) -> torch.Tensor:
    """``y_MH[m] = sum_r weights[m, r] * expert(x_MH[m])`` in ``out_dtype``: the local layer's path.
    ``on_input_grads``, ``out_MH``: see ``Backend.expert_mlp_combine``."""
    _check_dtypes(x_MH, w_gate_up_E2IH, w_down_EHI)
    if not needs_autograd(x_MH, w_gate_up_E2IH, w_down_EHI, weights_MR):  # inference: no graph node
        y_NH, _, _ = _forward(x_MH.contiguous(), buckets, w_gate_up_E2IH, w_down_EHI, False)
        return _combine_into(y_NH, buckets.slot_of_row_MR, weights_MR.float().contiguous(), out_dtype, out_MH)
    return _ExpertMLPCombine.apply(
        x_MH.contiguous(), w_gate_up_E2IH, w_down_EHI, weights_MR,
        buckets.row_of_slot_N, buckets.slot_of_row_MR, buckets.offsets_E1, out_dtype, on_input_grads, out_MH,
    )  # fmt: skip
