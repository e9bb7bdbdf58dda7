"""Quantized experts on the triton backend (``backends/triton/quant.py``) against the torch reference.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) at small sizes, where the interpreter's tiles are 16 x 16 x 32 (rows, columns,
inputs); on a GPU the same tests run on CUDA.

Tolerances against the reference (which scales exact integer sums in float64):

==========================  =======================================================================
activation quantization     bit for bit (same divisions, same rounding; e4m3 too)
one GEMM (``quant_linear``) the integer sums are exact; float32 scaling: each output within
                            ``LINEAR_RTOL`` = 1e-6 of the reference (three roundings of 2**-24),
                            plus as much of the largest output, as int4 adds its groups' scaled
                            sums in float32 and they can cancel
fp8 GEMM                    each 128-input group's e4m3 products summed by one float32 dot, then
                            scaled: as above on the CPU; on a GPU ``FP8_GPU_RTOL`` = 1e-3, as
                            Hopper's fp8 MMA keeps about 14 bits in its accumulator (DeepSeek-V3
                            report; not yet measured here)
SwiGLU on the first GEMM    ``SWIGLU_RTOL`` = 1e-5: ``silu`` adds its own float32 roundings
expert MLP (two GEMMs)      the float32 ``h`` feeds a second quantization, where an element next to
                            a rounding boundary (within ~1e-5 of one) can take the neighbouring
                            integer: a rare step of one quantum, which moves its output row by
                            about ``amax(h_row) / (127 |h_row|)`` of its size (estimated: a few
                            1e-3 for these small rows). ``MLP_TOL`` = 1e-2; measured on the CPU,
                            where none of these cases has such a step: at most 3e-7. The
                            one-GEMM tests carry the exactness; these check the wiring
layer output                float32: ``MLP_TOL``; bfloat16 / float16 outputs add their own rounding
                            (2**-9 / 2**-12 relative per element; Triton's interpreter truncates
                            float32 to bfloat16, up to 2**-8)
==========================  =======================================================================
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import moe_replay as mr
from moe_replay.backends.registry import get_backend
from moe_replay.backends.torch import quant as reference
from moe_replay.quantize import QuantizedWeight, quantize_row_groups, quantize_rows, quantize_weight

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from moe_replay.backends.triton import quant  # noqa: E402  (after the interpreter check)

TRITON = get_backend("triton", DEVICE)
TORCH = get_backend("torch", DEVICE)

LINEAR_RTOL = 1e-6
SWIGLU_RTOL = 1e-5
FP8_GPU_RTOL = 1e-3
MLP_TOL = 1e-2
OUT_TOL = {torch.float32: MLP_TOL, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------- activation quantization


def test_quantize_rows_equals_reference_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 1100, generator=gen) * 3  # rows over several programs, D over two column steps
    x[5] = 0.0  # a zero row: scale 1
    x[6, :] = 0.0
    x[6, 0] = 127.0  # scale exactly 1: the next values sit on rounding ties, half to even
    x[6, 1:7] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    x[7] = 1e-3 * torch.randn(1100, generator=gen)  # tiny values: scale far below 1
    for inp in (x, x.bfloat16(), x[:, ::2], x.half()):  # float32; bf16; strided columns; fp16
        q, scale = quant.quantize_rows(inp.to(DEVICE))
        q_ref, scale_ref = quantize_rows(inp.to(DEVICE))
        assert q.dtype == torch.int8 and scale.dtype == torch.float32
        assert torch.equal(q, q_ref)
        assert torch.equal(scale, scale_ref)
    q, _ = quant.quantize_rows(x[6:7].to(DEVICE))
    assert q[0, :7].tolist() == [127, 0, 2, 2, 0, -2, -2]


def test_quantize_row_groups_equals_reference_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(13, 256, generator=gen) * 3  # two groups of 128 per row
    x[2] = 0.0  # a zero row: scale 1 in both groups
    x[3, :128] = 0.0
    x[3, 0] = 448.0  # scale exactly 1: ties between e4m3 values round half to even
    x[3, 1:6] = torch.tensor([17.0, 19.0, -9.5, 0.5 * 2**-9, 1.5 * 2**-9])  # incl. subnormal ties
    x[4] = 1e-4 * torch.randn(256, generator=gen)  # tiny values
    x[5, 128:] = torch.linspace(-448, 448, 128)  # across every binade
    for inp in (x, x.bfloat16(), x.t().contiguous().t()):  # float32; bf16; column-major
        q, scale = quant.quantize_row_groups(inp.to(DEVICE))
        q_ref, scale_ref = quantize_row_groups(inp.to(DEVICE))
        assert q.dtype == torch.float8_e4m3fn and scale.shape == (13, 2)
        assert torch.equal(q.float(), q_ref.float())
        assert torch.equal(scale, scale_ref)
    q, _ = quant.quantize_row_groups(x[3:4].to(DEVICE))
    assert q[0, :6].float().tolist() == [448.0, 16.0, 20.0, -10.0, 0.0, 2**-8]


def test_quantize_rows_no_rows() -> None:
    q, scale = quant.quantize_rows(torch.zeros(0, 8, device=DEVICE))
    assert q.shape == (0, 8) and scale.shape == (0,)


# ----------------------------------------------------------------------------- one GEMM


LINEAR_CASES = [
    # (T, E, K, D, O, weight_dtype, group_size): each line names the path or edge it covers
    (7, 4, 2, 48, 40, "int8", None),  # T < BLOCK_M; D and O not multiples of the tiles; one group
    (20, 3, 2, 64, 32, "int4", 32),  # groups of one K tile: one int32 sum per group (aligned path)
    (20, 3, 2, 128, 16, "int4", 64),  # groups of two K tiles: the int32 sum runs over tiles
    (9, 5, 3, 18, 10, "int4", 2),  # odd sizes, 16 groups per K tile (masked dots per group)
    (11, 3, 2, 36, 12, "int4", 6),  # groups of 6 straddle K tiles (32 inputs each)
    (7, 4, 2, 256, 256, "fp8", None),  # fp8: two 128-input groups, two output blocks (gate, up)
]


@pytest.mark.parametrize("swiglu", [False, True])  # one GEMM; gate and up with SwiGLU (O / 2 columns)
@pytest.mark.parametrize("T,E,K,D,O,weight_dtype,group_size", LINEAR_CASES)
def test_quant_linear_matches_reference(T, E, K, D, O, weight_dtype, group_size, swiglu) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(T + D)
    weight = quantize_weight(torch.randn(E, O, D, generator=gen).to(DEVICE), weight_dtype, group_size)
    x = torch.randn(T, D, generator=gen).to(DEVICE)
    buckets = TRITON.dispatch(torch.randint(0, E, (T, K), generator=gen).to(DEVICE), E)
    q_x, scale = (quant.quantize_row_groups if weight_dtype == "fp8" else quant.quantize_rows)(x)
    got = quant.quant_linear(q_x, scale, buckets, weight, gather_a=True, swiglu=swiglu)
    x_NH = x[buckets.row_of_slot_N.long()]
    bounds = buckets.offsets_E1.tolist()
    want = torch.cat([reference.quant_linear(x_NH[bounds[e] : bounds[e + 1]], weight, e) for e in range(E)])
    if swiglu:
        gate, up = want.chunk(2, dim=1)
        want = F.silu(gate) * up
    assert got.dtype == torch.float32 and got.shape == want.shape
    rtol = SWIGLU_RTOL if swiglu else LINEAR_RTOL
    if weight_dtype == "fp8" and CUDA:
        rtol = FP8_GPU_RTOL
    atol = rtol * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_int8_sums_are_exact_integers() -> None:
    # Unit scales: the output is the integer sum itself, which float32 holds exactly below 2**24
    # (here at most 127 * 127 * 64 = 1,032,256): equal, not close.
    gen = torch.Generator().manual_seed(3)
    q_w = torch.randint(-127, 128, (2, 24, 64), generator=gen, dtype=torch.int8)
    weight = QuantizedWeight(q_w.to(DEVICE), torch.ones(2, 24, 1, device=DEVICE), "int8", 64)
    q_x = torch.randint(-127, 128, (5, 64), generator=gen, dtype=torch.int8).to(DEVICE)
    q_x[0] = 127  # the largest sums
    buckets = TRITON.dispatch(torch.tensor([[0], [1], [1], [0], [1]], device=DEVICE), 2)
    got = quant.quant_linear(q_x, torch.ones(5, device=DEVICE), buckets, weight, gather_a=True, swiglu=False)
    rows = buckets.row_of_slot_N.long().cpu()
    experts = torch.repeat_interleave(torch.arange(2), buckets.tokens_per_expert().long().cpu())
    want = torch.einsum("nd,nod->no", q_x.cpu()[rows].long(), q_w[experts].long())
    assert torch.equal(got.cpu(), want.float())


def test_sums_that_could_overflow_int32_raise() -> None:
    weight = QuantizedWeight(
        torch.zeros(1, 1, 1, dtype=torch.int8), torch.ones(1, 1, 1), "int8", group_size=140_000
    )
    buckets = TORCH.dispatch(torch.zeros(1, 1, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"int8 groups of 140000 inputs can overflow"):
        quant.quant_linear(torch.zeros(1, 1, dtype=torch.int8), torch.ones(1), buckets, weight, True, False)


# ----------------------------------------------------------------------------- the layer


LAYER_CASES = [
    # (T, E, K, H, I, weight_dtype, group_size): each line names the edge it covers
    (7, 4, 2, 32, 40, "int8", None),  # T < BLOCK_M, I not a multiple of the column tile
    (33, 6, 6, 48, 40, "int8", None),  # top_k == num_experts, H not a multiple of BLOCK_K
    (1, 5, 1, 16, 16, "int4", 8),  # one token: four idle experts; groups below one K tile
    (40, 3, 1, 64, 32, "int4", 32),  # several row tiles per expert; aligned groups
    (3, 8, 1, 32, 16, "int4", 16),  # most experts empty
    (13, 5, 3, 18, 10, "int8", None),  # odd sizes
    (9, 4, 2, 36, 12, "int4", 6),  # groups straddling K tiles
    (0, 4, 2, 32, 16, "int8", None),  # no tokens
    (9, 4, 2, 128, 256, "fp8", None),  # fp8 blocks; T < BLOCK_M
]


def layers(E: int, K: int, H: int, I: int, weight_dtype: str, group_size: int | None) -> tuple:
    torch.manual_seed(E * 10 + H)
    cfg = mr.MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)
    ref = mr.MoE(cfg, backend="torch", device=DEVICE)
    tri = mr.MoE(cfg, backend="triton", device=DEVICE)
    tri.load_state_dict(ref.state_dict())
    return tuple(mr.QuantMoE.from_float(m, weight_dtype, group_size) for m in (ref, tri))


@pytest.mark.parametrize("T,E,K,H,I,weight_dtype,group_size", LAYER_CASES)
def test_layer_matches_reference(T, E, K, H, I, weight_dtype, group_size, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = []
    original = quant.quant_linear
    monkeypatch.setattr(quant, "quant_linear", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    ref, tri = layers(E, K, H, I, weight_dtype, group_size)
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=gen).to(DEVICE)
    with torch.no_grad():
        y_r, routing_r = ref(x, return_routing=True)
        y_t, routing_t = tri(x, return_routing=True)
    assert calls == [1, 1]  # both GEMMs ran as kernels (not the reference)
    assert torch.equal(routing_t.expert_ids, routing_r.expert_ids)
    assert y_t.shape == x.shape and y_t.dtype == x.dtype
    if T:
        assert rel(y_t, y_r) < MLP_TOL


def test_layer_all_tokens_on_one_expert() -> None:
    ref, tri = layers(4, 1, 32, 16, "int4", 16)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    forced = torch.full((50, 1), 2, device=DEVICE)  # 50 rows: four row tiles on expert 2, none elsewhere
    with torch.no_grad():
        assert rel(tri(x, forced_expert_ids=forced), ref(x, forced_expert_ids=forced)) < MLP_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations(dtype: torch.dtype) -> None:
    # The activations are quantized from their own values (bf16/fp16 exactly representable in
    # float32); only the output's final rounding differs from float32.
    ref, tri = layers(6, 2, 32, 24, "int8", None)
    x = torch.randn(21, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    with torch.no_grad():
        y_r, y_t = ref(x), tri(x)
    assert y_t.dtype == dtype
    assert rel(y_t, y_r) < OUT_TOL[dtype]


def test_replay_on_the_quantized_layer_uses_the_recorded_routes() -> None:
    ref, tri = layers(8, 2, 32, 16, "int4", 8)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with torch.no_grad(), mr.record(ref) as trace:
        y_r = ref(x)
    with torch.no_grad(), mr.replay(tri, trace):
        y_t, routing = tri(x, return_routing=True)
    assert torch.equal(routing.expert_ids.long(), trace[""].long().to(DEVICE))
    assert rel(y_t, y_r) < MLP_TOL


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not CUDA, reason="CUDA graphs and host syncs exist on a GPU only")
@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", None), ("int4", 128), ("fp8", None)])
def test_gpu_capture_in_a_graph_without_host_sync(weight_dtype: str, group_size: int | None) -> None:
    if weight_dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability 8.9+")
    E, K, H, I, T = 16, 4, 512, 256, 64
    gen = torch.Generator().manual_seed(8)
    gate_up = quantize_weight(torch.randn(E, 2 * I, H, generator=gen).cuda(), weight_dtype, group_size)
    down = quantize_weight(torch.randn(E, H, I, generator=gen).cuda(), weight_dtype, group_size)
    x = torch.randn(T, H, generator=gen).cuda().bfloat16()
    buckets = TRITON.dispatch(torch.randint(0, E, (T, K), generator=gen).cuda(), E)
    want = TRITON.quant_expert_mlp(x, buckets, gate_up, down)  # warm-up: compiles outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = TRITON.quant_expert_mlp(x, buckets, gate_up, down)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert rel(want, TORCH.quant_expert_mlp(x, buckets, gate_up, down)) < MLP_TOL
