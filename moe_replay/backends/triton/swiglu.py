"""The SwiGLU backward as one elementwise pass, for backward GEMMs that are not ours.

Shape legend: N routed rows (bucket order), I expert intermediate.

When ``torch._grouped_mm`` computes ``dh_NI = dy_NH @ W_down`` (see ``experts._grouped_mm_grads``),
the SwiGLU backward that our own GEMM does in its epilogue runs here, one read of ``dh`` and the
saved pre-activations ``gu_N2I = [gate | up]``, per row::

    h      = silu(g) * u
    dw     = <dh, h>                     (the row's gate-weight gradient, when rows are weighted)
    dh'    = w * dh                      (w = 1 for unweighted rows)
    d gate = dh' * u * s * (1 + g * (1 - s)),   s = sigmoid(g)
    d up   = dh' * silu(g)
    hw     = w * h                       (what d down_proj multiplies, when rows are weighted)

Float32 arithmetic; ``d(gate, up)`` and ``hw`` are stored in ``dh``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 4  # rows per program
BLOCK_I = 1024  # columns per step of a program's loop over I


@triton.jit
def swiglu_grad(dh, g, u):
    """``(d gate, d up)`` of ``h = silu(g) * u`` for the gradient ``dh`` (float32 tiles)."""
    s = tl.sigmoid(g)
    return dh * u * s * (1.0 + g * (1.0 - s)), dh * g * s


@triton.jit
def swiglu_weigh(dh, g, u, w):
    """For rows weighted by ``w`` (``[rows, 1]``) in the forward: ``(<dh, h>`` per row, the row's
    share of d(gate weight); ``w * dh``, the gradient the SwiGLU backward then takes; ``w * h``,
    what d down_proj multiplies``)``, with ``h = silu(g) * u`` (float32 tiles)."""
    h = g * tl.sigmoid(g) * u
    return tl.sum(dh * h, 1), dh * w, h * w


# fmt: off
@triton.jit
def _swiglu_bwd_kernel(
    dh_ptr, gu_ptr, weight_ptr, dgu_ptr, dweight_ptr, hw_ptr, N, I,
    WEIGHTED: tl.constexpr, ROWS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    if WEIGHTED:
        w = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)[:, None]
    dot = tl.zeros([ROWS], tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        ok = row_ok[:, None] & (cols < I)[None, :]
        dh = tl.load(dh_ptr + rows64[:, None] * I + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        gu = gu_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        g = tl.load(gu, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu + I, mask=ok, other=0.0).to(tl.float32)
        if WEIGHTED:
            part, dh, hw = swiglu_weigh(dh, g, u, w)
            dot += part
            tl.store(hw_ptr + rows64[:, None] * I + cols[None, :], hw.to(hw_ptr.dtype.element_ty), mask=ok)
        dg, du = swiglu_grad(dh, g, u)
        dgu = dgu_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        tl.store(dgu, dg.to(dgu_ptr.dtype.element_ty), mask=ok)
        tl.store(dgu + I, du.to(dgu_ptr.dtype.element_ty), mask=ok)
    if WEIGHTED:
        tl.store(dweight_ptr + rows, dot, mask=row_ok)
# fmt: on


def swiglu_bwd(
    dh_NI: torch.Tensor, gu_N2I: torch.Tensor, weight_of_slot_N: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(d(gate, up) [N, 2I], dweight [N] float32, hw [N, I])``; the last two are None for
    unweighted rows (``weight_of_slot_N`` None). See the module docstring."""
    N, I = dh_NI.shape
    weighted = weight_of_slot_N is not None
    dgu = torch.empty(N, 2 * I, dtype=dh_NI.dtype, device=dh_NI.device)
    dweight = torch.empty(N, dtype=torch.float32, device=dh_NI.device) if weighted else None
    hw = torch.empty(N, I, dtype=dh_NI.dtype, device=dh_NI.device) if weighted else None
    if N == 0:
        return dgu, dweight, hw
    block_i = min(BLOCK_I, triton.next_power_of_2(I))
    _swiglu_bwd_kernel[(triton.cdiv(N, ROWS),)](
        dh_NI.contiguous(), gu_N2I, weight_of_slot_N if weighted else dh_NI, dgu,
        dweight if weighted else dgu, hw if weighted else dgu, N, I,
        WEIGHTED=weighted, ROWS=ROWS, BLOCK_I=block_i, num_warps=4,
    )  # fmt: skip
    return dgu, dweight, hw
