"""Quantized grouped SwiGLU experts (``QuantMoE`` on the triton backend): forward only.

Shape legend: M input rows, N routed rows in bucket order, E experts, H hidden, I intermediate,
D a GEMM's input features, O its output features, G = D / group_size weight groups.

The same function as the torch reference (``backends/torch/quant.py``), formats as in
``moe_replay.quantize``: each GEMM's input is quantized per row to int8, multiplied with the integer
weights (int8 as stored, int4 unpacked to int8 in the kernel: W8A8 and W4A8), the products of each
weight group summed in int32 on the tensor cores, then scaled: per group by the weight scale, at
the end by the row's activation scale. fp8 weights (e4m3, 128 x 128 blocks) take e4m3 inputs
quantized per 128 inputs of each row: each group's products are one float32 tensor-core dot,
scaled by the row group's and the weight block's scales (DeepSeek-V3's recipe). Four launches,
grids known from shapes, no host sync::

    _quantize_rows_kernel(x_MH)            -> q_x_MH int8, scale_M      (each token once, not K times)
    _quant_linear_kernel(SWIGLU, GATHER_A) -> h_NI float32               (gate and up GEMMs, SwiGLU)
    _quantize_rows_kernel(h_NI)            -> q_h_NI int8, scale_N
    _quant_linear_kernel                   -> y_NH float32               (down GEMM)

(``_quantize_row_groups_kernel`` in place of ``_quantize_rows_kernel`` for fp8.)

Row tiles walk the expert buckets as the bf16 kernels do (``_common.expert_of_tile``): a tile
never straddles two experts.

Precision notes:

* Activation quantization equals ``quantize.quantize_rows`` (``quantize_row_groups``) bit for bit:
  the absmax is exact, ``scale = absmax / 127`` (``/ 448``) and ``x / scale`` are IEEE divisions
  (``div_rn``: Triton's ``/`` on float32 is the approximate ``div.full`` on NVIDIA GPUs), rounding
  is half to even (``_round_to_e4m3`` for fp8).
* Integer sums are exact: a group's sum is at most ``127 * qmax * group_size`` in magnitude, below
  2**31 for every size ``_check_int32`` accepts (int8: D < 133,143).
* Scaling is float32 (the reference's is float64): the first GEMM's outputs are within a few
  float32 roundings of the reference. The second GEMM's input ``h`` then differs by as much, and
  an element whose ``h / scale`` sits on a rounding boundary can round to the neighbouring
  value, so the outputs differ from the reference by rare steps of one activation quantum
  (see the tolerance table of tests/backends/test_triton_quant.py).
* fp8 products are exact in float32 but their sums are not (Hopper's fp8 MMA keeps about 14 bits
  of its accumulator): each 128-input group gets its own dot, added to the float32 accumulator
  outside the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_replay.backends.base import ExpertBuckets
from moe_replay.backends.triton._common import (
    expert_of_tile,
    grouped_tile_order,
    interpreting,
    launch_fitting,
    max_row_tiles,
    pow2,
)
from moe_replay.quantize import FP8_BLOCK, QuantizedWeight

# 1.5 * 2**23: adding then subtracting it rounds a float32 of magnitude below 2**22 to an integer,
# half to even (the IEEE default rounding of the addition), on every device and the interpreter.
_ROUND_MAGIC = tl.constexpr(12582912.0)


# fmt: off
@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, M, D, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    amax = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & ((d0 + cols) < D)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + (d0 + cols)[None, :], mask=ok, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full([BLOCK_M], 127.0, tl.float32)), 1.0)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & ((d0 + cols) < D)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + (d0 + cols)[None, :], mask=ok, other=0.0)
        v = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(scale[:, None], [BLOCK_M, BLOCK_D]))
        v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
        q = tl.minimum(tl.maximum(v, -127.0), 127.0).to(tl.int8)
        tl.store(q_ptr + rows64[:, None] * D + (d0 + cols)[None, :], q, mask=ok)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


@triton.jit
def _round_to_e4m3(v):
    """``v`` (float32, |v| <= 448) rounded half to even to the nearest e4m3 value, as float32.

    The conversion to float8 then only changes the type, whatever its rounding: Triton's
    interpreter converts values that round up across a power of two wrongly (124.3 -> 64)."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp_exponent = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; subnormals below 2**-6
    magic = (((ulp_exponent + 23 + 127) << 23) | (1 << 22)).to(tl.float32, bitcast=True)  # 1.5 * 2**(ulp + 23)
    return (v + magic) - magic


@triton.jit
def _quantize_row_groups_kernel(
    x_ptr, q_ptr, scale_ptr, M, D, stride_xm,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    # One program: BLOCK_M rows x one group of GROUP inputs -> e4m3 values and one scale per row.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = g * GROUP + tl.arange(0, GROUP)
    ok = row_ok[:, None]
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full([BLOCK_M], 448.0, tl.float32)), 1.0)
    v = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], [BLOCK_M, GROUP]))
    q = _round_to_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0)).to(tl.float8e4nv)
    tl.store(q_ptr + rows64[:, None] * D + cols[None, :], q, mask=ok)
    tl.store(scale_ptr + rows64 * (D // GROUP) + g, scale, mask=row_ok)


@triton.jit
def _int_weight_tile(w_ptrs, k0, cols_ok, D, INT4: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` int8 tile of inputs ``k0:k0 + BLOCK_K`` (zeros past D).

    ``w_ptrs``: ``[BLOCK_K, BLOCK_N]`` pointers (int8), or ``[BLOCK_K // 2, BLOCK_N]`` ones to the
    packed bytes (int4: byte j holds input 2j in its low nibble, 2j + 1 in its high one)."""
    if INT4:
        kp = tl.arange(0, BLOCK_K // 2)
        ok = ((k0 // 2 + kp) < D // 2)[:, None] & cols_ok[None, :]
        packed = tl.load(w_ptrs, mask=ok, other=0)
        lo = ((packed & 0xF).to(tl.int8) ^ 8) - 8  # sign-extend the two's-complement nibbles
        hi = ((packed >> 4).to(tl.int8) ^ 8) - 8
        return tl.join(lo, hi).permute(0, 2, 1).reshape(BLOCK_K, BLOCK_N)
    else:
        ks = tl.arange(0, BLOCK_K)
        return tl.load(w_ptrs, mask=((k0 + ks) < D)[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def _quant_linear_kernel(
    a_ptr, a_scale_ptr, row_of_slot_ptr, offsets_ptr, w_ptr, w_scale_ptr, out_ptr,
    E, D, O, M_TILES, stride_am, stride_asm, stride_we, stride_wo, stride_se, stride_so,
    GROUP: tl.constexpr, INT4: tl.constexpr, FP8: tl.constexpr, SCALE_ROWS: tl.constexpr,
    GATHER_A: tl.constexpr, SWIGLU: tl.constexpr,
    SUB_GROUPS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, W_BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # out[n, :O] = a_scale[src(n)] * sum_g w_scale[e, :, g] * (q_a[src(n), group g] @ q_w[e, :, group g]^T)
    # With SWIGLU the weight has 2O rows (gate, then up) and out is silu(gate) * up.
    # FP8: e4m3 operands, float32 dots per K tile (within one 128-input group), each scaled by
    # its rows' group scales (a_scale [N, G], row stride stride_asm) and its block's weight scale
    # (one per SCALE_ROWS outputs).
    # SUB_GROUPS: a K tile holds several groups (or straddles two), each summed by its own masked
    # dot; otherwise each group is a whole number of K tiles and one int32 sum is scaled per group.
    pid_m, pid_n = grouped_tile_order(tl.program_id(0), M_TILES, tl.cdiv(O, BLOCK_N), GROUP_M)
    expert, row_start, row_end, exists = expert_of_tile(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if exists:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        if GATHER_A:
            a_rows = tl.load(row_of_slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < O
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
        w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wo
        g_ptrs = w_base + tl.arange(0, W_BLOCK_K)[:, None]  # bytes: BLOCK_K // 2 for int4
        u_ptrs = g_ptrs + O * stride_wo
        s_base = w_scale_ptr + expert.to(tl.int64) * stride_se
        s_g_ptrs = s_base + (cols // SCALE_ROWS) * stride_so
        s_u_ptrs = s_base + ((cols + O) // SCALE_ROWS) * stride_so
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        int_g = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        int_u = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        for k0 in range(0, D, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_ok[:, None] & ((k0 + ks) < D)[None, :], other=0.0)
            wg = _int_weight_tile(g_ptrs, k0, col_ok, D, INT4, BLOCK_K, BLOCK_N)
            if SWIGLU:
                wu = _int_weight_tile(u_ptrs, k0, col_ok, D, INT4, BLOCK_K, BLOCK_N)
            if FP8:
                g = k0 // GROUP
                a_s = tl.load(a_scale_ptr + a_rows * stride_asm + g, mask=row_ok, other=0.0)[:, None]
                acc_g += tl.dot(a, wg) * a_s * tl.load(s_g_ptrs + g, mask=col_ok, other=0.0)[None, :]
                if SWIGLU:
                    acc_u += tl.dot(a, wu) * a_s * tl.load(s_u_ptrs + g, mask=col_ok, other=0.0)[None, :]
            elif SUB_GROUPS:
                group_of_k = ((k0 + ks) // GROUP)[:, None]
                for g in range(k0 // GROUP, (tl.minimum(k0 + BLOCK_K, D) - 1) // GROUP + 1):
                    in_g = group_of_k == g
                    s_g = tl.load(s_g_ptrs + g, mask=col_ok, other=0.0)[None, :]
                    part = tl.dot(a, tl.where(in_g, wg, tl.zeros_like(wg)), out_dtype=tl.int32)
                    acc_g += part.to(tl.float32) * s_g
                    if SWIGLU:
                        s_u = tl.load(s_u_ptrs + g, mask=col_ok, other=0.0)[None, :]
                        part = tl.dot(a, tl.where(in_g, wu, tl.zeros_like(wu)), out_dtype=tl.int32)
                        acc_u += part.to(tl.float32) * s_u
            else:
                int_g = tl.dot(a, wg, int_g)
                if SWIGLU:
                    int_u = tl.dot(a, wu, int_u)
                if ((k0 + BLOCK_K) % GROUP == 0) | (k0 + BLOCK_K >= D):  # the group ends here
                    g = k0 // GROUP
                    acc_g += int_g.to(tl.float32) * tl.load(s_g_ptrs + g, mask=col_ok, other=0.0)[None, :]
                    int_g = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
                    if SWIGLU:
                        acc_u += int_u.to(tl.float32) * tl.load(s_u_ptrs + g, mask=col_ok, other=0.0)[None, :]
                        int_u = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            a_ptrs += BLOCK_K
            g_ptrs += W_BLOCK_K
            u_ptrs += W_BLOCK_K
        if FP8:  # scaled per group already
            out = acc_g
            up = acc_u
        else:
            a_scale = tl.load(a_scale_ptr + a_rows, mask=row_ok, other=0.0)[:, None]
            out = acc_g * a_scale
            up = acc_u * a_scale
        if SWIGLU:
            out = out * tl.sigmoid(out) * up
        out_ok = row_ok[:, None] & col_ok[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * O + cols[None, :], out, mask=out_ok)
# fmt: on


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by mean rows per expert, as for the bf16
# kernels; int8 operands take twice the K per byte of shared memory. Not yet tuned on a GPU
# (benchmarks/bench_quant.py measures them).
_LARGE_TILES = (128, 128, 128, 8, 3)
_MEDIUM_TILES = (64, 128, 128, 4, 4)
_DECODE_TILES = (16, 64, 256, 4, 4)
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
GROUP_M = 8
_QUANT_ROWS = {"BLOCK_M": 4, "BLOCK_D": 1024}  # rows per program, columns per step


def _tiles(num_rows: int, num_experts: int, swiglu: bool) -> dict:
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    per_expert = num_rows / max(num_experts, 1)
    table = _LARGE_TILES if per_expert >= 96 else _MEDIUM_TILES if per_expert >= 24 else _DECODE_TILES
    cfg = dict(zip(_TILE_KEYS, table))
    if swiglu and cfg["BLOCK_M"] >= 128:  # two float32 and two int32 accumulators per tile
        cfg["BLOCK_N"] //= 2
    return cfg


def quantize_rows(x_nD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_replay.quantize.quantize_rows`` as a kernel: ``(q_nD int8, scale_n float32)``."""
    n, D = x_nD.shape
    q = torch.empty(n, D, dtype=torch.int8, device=x_nD.device)
    scale = torch.empty(n, dtype=torch.float32, device=x_nD.device)
    if n:
        x_nD = x_nD if x_nD.stride(1) == 1 else x_nD.contiguous()
        block_d = min(_QUANT_ROWS["BLOCK_D"], pow2(D, 16))
        _quantize_rows_kernel[(triton.cdiv(n, _QUANT_ROWS["BLOCK_M"]),)](
            x_nD, q, scale, n, D, x_nD.stride(0), BLOCK_M=_QUANT_ROWS["BLOCK_M"], BLOCK_D=block_d
        )
    return q, scale


def quantize_row_groups(x_nD: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_replay.quantize.quantize_row_groups`` as a kernel: ``(q_nD e4m3, scale_nG float32)``."""
    n, D = x_nD.shape
    q = torch.empty(n, D, dtype=torch.float8_e4m3fn, device=x_nD.device)
    scale = torch.empty(n, D // group, dtype=torch.float32, device=x_nD.device)
    if n and D:
        x_nD = x_nD if x_nD.stride(1) == 1 else x_nD.contiguous()
        rows = _QUANT_ROWS["BLOCK_M"]
        _quantize_row_groups_kernel[(triton.cdiv(n, rows), D // group)](
            x_nD, q, scale, n, D, x_nD.stride(0), BLOCK_M=rows, GROUP=group
        )
    return q, scale


def _check_int32(weight: QuantizedWeight) -> None:
    if weight.weight_dtype == "fp8":
        return
    qmax = 127 if weight.weight_dtype == "int8" else 7
    if 127 * qmax * weight.group_size >= 2**31:
        raise ValueError(
            f"{weight.weight_dtype} groups of {weight.group_size} inputs can overflow the kernels' "
            "int32 sums; use backend='torch' for this layer"
        )


def quant_linear(
    q_a: torch.Tensor,
    a_scale: torch.Tensor,
    buckets: ExpertBuckets,
    weight: QuantizedWeight,
    gather_a: bool,
    swiglu: bool,
    tiles: dict | None = None,
) -> torch.Tensor:
    """Float32 ``out[n] = (a[src(n)] @ w_e^T)`` for int8 rows ``q_a`` with scales ``a_scale [n]``
    (fp8 weights: e4m3 rows with scales ``a_scale [n, G]`` per group of inputs), ``e``
    n's expert, ``src(n)`` = ``row_of_slot[n]`` with ``gather_a``, else ``n``. With ``swiglu`` the
    weight's rows are gate then up and ``out = silu(gate) * up`` (``[N, O / 2]``)."""
    _check_int32(weight)
    N, E = buckets.num_slots, buckets.num_experts
    D = weight.in_features
    O = weight.out_features // 2 if swiglu else weight.out_features
    out = torch.empty(N, O, dtype=torch.float32, device=q_a.device)
    if N == 0 or O == 0:
        return out
    int4, fp8 = weight.weight_dtype == "int4", weight.weight_dtype == "fp8"
    cfg = tiles or _tiles(N, E, swiglu)
    qweight, scale = weight.qweight, weight.scale

    def launch(cfg: dict) -> None:
        block_k = cfg["BLOCK_K"]
        # Groups of 32, 64, 128...: K tiles of at most one group each (one int32 sum per group;
        # masked dots per group would repeat the tile's GEMM once per group it holds).
        while weight.group_size != D and weight.group_size % block_k and block_k > 32:
            block_k //= 2
        m_tiles = max_row_tiles(N, E, cfg["BLOCK_M"])
        sub_groups = weight.group_size != D and weight.group_size % block_k != 0
        _quant_linear_kernel[(triton.cdiv(O, cfg["BLOCK_N"]) * m_tiles,)](
            q_a, a_scale, buckets.row_of_slot_N, buckets.offsets_E1, qweight, scale, out,
            E, D, O, m_tiles, q_a.stride(0), a_scale.stride(0), qweight.stride(0), qweight.stride(1),
            scale.stride(0), scale.stride(1), GROUP=weight.group_size, INT4=int4, FP8=fp8,
            SCALE_ROWS=weight.scale_rows, GATHER_A=gather_a, SWIGLU=swiglu, SUB_GROUPS=sub_groups,
            E_PAD=pow2(E, 16), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
            W_BLOCK_K=block_k // 2 if int4 else block_k, GROUP_M=GROUP_M,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip

    launch_fitting("quant_linear", cfg, q_a.device, launch)
    return out


def quant_expert_mlp(
    x_MH: torch.Tensor, buckets: ExpertBuckets, gate_up: QuantizedWeight, down: QuantizedWeight
) -> torch.Tensor:
    """Float32 ``y_NH`` in bucket order: each expert's SwiGLU with both GEMMs quantized."""
    for name, w in (("gate_up", gate_up), ("down", down)):
        if not (w.qweight.is_contiguous() and w.scale.is_contiguous()):
            raise ValueError(f"the triton backend needs contiguous {name} weights and scales")
    fp8 = gate_up.weight_dtype == "fp8"
    if fp8 and x_MH.is_cuda and torch.cuda.get_device_capability(x_MH.device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(x_MH.device)
        raise ValueError(
            f"fp8 experts need compute capability >= 8.9 (fp8 tensor cores), the device has {major}.{minor}; "
            "use backend='torch' for this layer"
        )
    quantize = quantize_row_groups if fp8 else quantize_rows
    q_x_MH, scale_M = quantize(x_MH)
    h_NI = quant_linear(q_x_MH, scale_M, buckets, gate_up, gather_a=True, swiglu=True)
    q_h_NI, scale_N = quantize(h_NI)
    return quant_linear(q_h_NI, scale_N, buckets, down, gather_a=False, swiglu=False)
