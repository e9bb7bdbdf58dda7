"""Grouped SwiGLU experts: forward and backward as grouped GEMMs over expert buckets.

Shape legend: M input rows, N routed rows in bucket order, E experts, H hidden, I intermediate.
``w_gate_up_E2IH``: rows ``0..I-1`` gate, ``I..2I-1`` up. ``w_down_EHI``.

Kernels (one launch each, grids known from shapes, no host synchronisation):

* ``_gate_up_kernel``: ``h_NI = silu(x @ Wg^T) * (x @ Wu^T)`` with the gather ``x = x_MH[row_of_slot]``
  in its loads and SwiGLU in its epilogue (two accumulators, gate and up, per tile). With
  gradients requested it also stores the pre-activations ``gu_N2I`` for the backward.
* ``_grouped_linear_kernel``: ``out_N? = A_N? @ W_e^T`` per bucket, W given by strides so the same
  kernel does the down projection and both data-gradient GEMMs; its ``SWIGLU_BWD`` epilogue turns
  ``dh`` into ``d(gate, up)`` using the saved pre-activations.
* ``_grouped_wgrad_kernel``: ``dW_e = A_e^T @ B_e`` summed over expert e's rows, B optionally
  gathered through ``row_of_slot``. An expert with no rows gets a zero gradient.

Row tiles never straddle two experts (see ``expert_of_tile``). Accumulation is float32; ``h``,
``gu`` and the outputs are stored in the activations' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_replay.backends.base import ExpertBuckets
from moe_replay.backends.triton._common import (
    dot_flags,
    expert_of_tile,
    interpreting,
    max_row_tiles,
    mma,
    pow2,
)
from moe_replay.backends.triton.combine import gather_sum


@triton.jit
def _gate_up_kernel(
    x_ptr,
    row_of_slot_ptr,
    offsets_ptr,
    w_ptr,
    h_ptr,
    gu_ptr,
    E,
    H,
    I,
    stride_xm,
    stride_we,
    stride_wn,
    stride_wk,
    SAVE_GU: tl.constexpr,
    EVEN_K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    expert, row_start, row_end, exists = expert_of_tile(offsets_ptr, tl.program_id(1), E, E_PAD, BLOCK_M)
    if exists:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        src = tl.load(row_of_slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < I
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :]
        g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < H
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_g = mma(a, g, acc_g, DOT_FP32, IEEE)
            acc_u = mma(a, u, acc_u, DOT_FP32, IEEE)
            a_ptrs += BLOCK_K
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
    a_ptr,
    offsets_ptr,
    w_ptr,
    out_ptr,
    gu_ptr,
    E,
    K_DIM,
    N_OUT,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    SWIGLU_BWD: tl.constexpr,
    EVEN_K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    expert, row_start, row_end, exists = expert_of_tile(offsets_ptr, tl.program_id(1), E, E_PAD, BLOCK_M)
    if exists:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N_OUT
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows64[:, None] * stride_am + ks[None, :]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K_DIM, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < K_DIM
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(a, w, acc, DOT_FP32, IEEE)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        out_ok = row_ok[:, None] & col_ok[None, :]
        if SWIGLU_BWD:  # acc is dh [rows, I]; out is d(gate, up) [N, 2I]
            gu = gu_ptr + rows64[:, None] * (2 * N_OUT) + cols[None, :]
            g = tl.load(gu, mask=out_ok, other=0.0).to(tl.float32)
            u = tl.load(gu + N_OUT, mask=out_ok, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            dg = acc * u * s * (1.0 + g * (1.0 - s))
            du = acc * g * s
            dgu = out_ptr + rows64[:, None] * (2 * N_OUT) + cols[None, :]
            tl.store(dgu, dg.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.store(dgu + N_OUT, du.to(out_ptr.dtype.element_ty), mask=out_ok)
        else:
            tl.store(
                out_ptr + rows64[:, None] * N_OUT + cols[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=out_ok,
            )


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    row_of_slot_ptr,
    offsets_ptr,
    dw_ptr,
    P,
    Q,
    stride_am,
    stride_bm,
    GATHER_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = tl.program_id(0) // num_q
    pid_q = tl.program_id(0) % num_q
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
        a = tl.load(
            a_ptr + rows.to(tl.int64)[:, None] * stride_am + ps[None, :],
            mask=r_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        if GATHER_B:
            src = tl.load(row_of_slot_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        b = tl.load(
            b_ptr + src[:, None] * stride_bm + qs[None, :], mask=r_ok[:, None] & q_ok[None, :], other=0.0
        )
        acc = mma(tl.trans(a), b, acc, DOT_FP32, IEEE)
    dw = dw_ptr + expert.to(tl.int64) * P * Q + ps[:, None] * Q + qs[None, :]
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


def _row_tiles(num_rows: int, num_experts: int) -> dict:
    """Tile shapes for the row-grouped kernels, from the mean rows per expert."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    per_expert = num_rows / max(num_experts, 1)
    if per_expert >= 96:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
    if per_expert >= 24:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    # Decode sizes: a few rows per expert, so the time is reading each active expert's weights
    # once; narrow column tiles spread that read over more programs.
    return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}


def _gate_up_tiles(num_rows: int, num_experts: int) -> dict:
    """Like ``_row_tiles`` with the column tile halved: each tile keeps two accumulators."""
    cfg = _row_tiles(num_rows, num_experts)
    if cfg["BLOCK_M"] >= 64:
        cfg["BLOCK_N"] //= 2
    return cfg


def _wgrad_tiles() -> dict:
    if interpreting():
        return {"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def gate_up_fwd(
    x_MH: torch.Tensor,
    buckets: ExpertBuckets,
    w_gate_up_E2IH: torch.Tensor,
    save_gu: bool,
    tiles: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    N, E = buckets.num_slots, buckets.num_experts
    H, I = x_MH.shape[1], w_gate_up_E2IH.shape[1] // 2
    h_NI = torch.empty(N, I, dtype=x_MH.dtype, device=x_MH.device)
    gu_N2I = torch.empty(N, 2 * I, dtype=x_MH.dtype, device=x_MH.device) if save_gu else None
    if N == 0:
        return h_NI, gu_N2I
    cfg = tiles or _gate_up_tiles(N, E)
    block_n = cfg["BLOCK_N"]
    grid = (triton.cdiv(I, block_n), max_row_tiles(N, E, cfg["BLOCK_M"]))
    _gate_up_kernel[grid](
        x_MH, buckets.row_of_slot_N, buckets.offsets_E1, w_gate_up_E2IH, h_NI, gu_N2I if save_gu else h_NI,
        E, H, I, x_MH.stride(0), *w_gate_up_E2IH.stride(),
        SAVE_GU=save_gu, EVEN_K=H % cfg["BLOCK_K"] == 0, E_PAD=pow2(E, 16),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot_flags(x_MH.dtype),
    )  # fmt: skip
    return h_NI, gu_N2I


def grouped_linear(
    a_NK: torch.Tensor,
    buckets: ExpertBuckets,
    w_E: torch.Tensor,
    w_strides_enk: tuple[int, int, int],
    n_out: int,
    gu_N2I: torch.Tensor | None = None,
    tiles: dict | None = None,
) -> torch.Tensor:
    """``out[n] = a[n] @ W_e^T`` where ``W_e[j, k] = w_E[e*s_e + j*s_n + k*s_k]`` is ``[n_out, K]``.

    With ``gu_N2I`` the epilogue is the SwiGLU backward and the result is ``d(gate, up) [N, 2 * n_out]``.
    """
    N, K_dim = a_NK.shape
    E = buckets.num_experts
    width = 2 * n_out if gu_N2I is not None else n_out
    out = torch.empty(N, width, dtype=a_NK.dtype, device=a_NK.device)
    if N == 0:
        return out
    cfg = tiles or _row_tiles(N, E)
    grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), max_row_tiles(N, E, cfg["BLOCK_M"]))
    _grouped_linear_kernel[grid](
        a_NK, buckets.offsets_E1, w_E, out, gu_N2I if gu_N2I is not None else out,
        E, K_dim, n_out, a_NK.stride(0), *w_strides_enk,
        SWIGLU_BWD=gu_N2I is not None, EVEN_K=K_dim % cfg["BLOCK_K"] == 0, E_PAD=pow2(E, 16),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot_flags(a_NK.dtype),
    )  # fmt: skip
    return out


def grouped_wgrad(
    a_NP: torch.Tensor,
    b_MQ: torch.Tensor,
    buckets: ExpertBuckets,
    gather_b: bool,
    dtype: torch.dtype,
    tiles: dict | None = None,
) -> torch.Tensor:
    """``dW[e] = sum over e's rows n of a[n]^T b[src(n)]``, ``[E, P, Q]`` (src = row_of_slot if gathered)."""
    P, Q, E = a_NP.shape[1], b_MQ.shape[1], buckets.num_experts
    dw = torch.empty(E, P, Q, dtype=dtype, device=a_NP.device)
    if E == 0:
        return dw
    cfg = tiles or _wgrad_tiles()
    grid = (triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(Q, cfg["BLOCK_Q"]), E)
    _grouped_wgrad_kernel[grid](
        a_NP, b_MQ, buckets.row_of_slot_N, buckets.offsets_E1, dw, P, Q, a_NP.stride(0), b_MQ.stride(0),
        GATHER_B=gather_b, BLOCK_P=cfg["BLOCK_P"], BLOCK_Q=cfg["BLOCK_Q"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot_flags(a_NP.dtype),
    )  # fmt: skip
    return dw


class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MH, w_gate_up_E2IH, w_down_EHI, row_of_slot_N, slot_of_row_MR, offsets_E1):  # type: ignore[override]
        buckets = ExpertBuckets(row_of_slot_N, slot_of_row_MR, offsets_E1)
        save_gu = any(ctx.needs_input_grad[:3])
        h_NI, gu_N2I = gate_up_fwd(x_MH, buckets, w_gate_up_E2IH, save_gu)
        H = w_down_EHI.shape[1]
        y_NH = grouped_linear(h_NI, buckets, w_down_EHI, w_down_EHI.stride(), H)
        if save_gu:
            ctx.save_for_backward(
                x_MH, w_gate_up_E2IH, w_down_EHI, row_of_slot_N, slot_of_row_MR, offsets_E1, h_NI, gu_N2I
            )
        return y_NH

    @staticmethod
    def backward(ctx, dy_NH):  # type: ignore[override]
        x_MH, w_gate_up, w_down, row_of_slot, slot_of_row, offsets, h_NI, gu_N2I = ctx.saved_tensors
        buckets = ExpertBuckets(row_of_slot, slot_of_row, offsets)
        dy_NH = dy_NH.contiguous()
        I = w_down.shape[2]
        s_e, s_h, s_i = w_down.stride()
        dgu_N2I = grouped_linear(dy_NH, buckets, w_down, (s_e, s_i, s_h), I, gu_N2I=gu_N2I)
        dx = dw_gate_up = dw_down = None
        if ctx.needs_input_grad[0]:
            s_e, s_2i, s_h = w_gate_up.stride()
            dx_NH = grouped_linear(dgu_N2I, buckets, w_gate_up, (s_e, s_h, s_2i), x_MH.shape[1])
            dx = gather_sum(dx_NH, slot_of_row, None, x_MH.dtype)
        if ctx.needs_input_grad[1]:
            dw_gate_up = grouped_wgrad(dgu_N2I, x_MH, buckets, gather_b=True, dtype=w_gate_up.dtype)
        if ctx.needs_input_grad[2]:
            dw_down = grouped_wgrad(dy_NH, h_NI, buckets, gather_b=False, dtype=w_down.dtype)
        return dx, dw_gate_up, dw_down, None, None, None


def expert_mlp(
    x_MH: torch.Tensor, buckets: ExpertBuckets, w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor
) -> torch.Tensor:
    """``y_NH`` (x's dtype) in bucket order; see the module docstring."""
    if not (x_MH.dtype == w_gate_up_E2IH.dtype == w_down_EHI.dtype):
        raise ValueError(
            "the triton backend needs x and the expert weights in one dtype, got "
            f"x {x_MH.dtype}, gate_up_proj {w_gate_up_E2IH.dtype}, down_proj {w_down_EHI.dtype}"
        )
    return _ExpertMLP.apply(
        x_MH.contiguous(),
        w_gate_up_E2IH,
        w_down_EHI,
        buckets.row_of_slot_N,
        buckets.slot_of_row_MR,
        buckets.offsets_E1,
    )
