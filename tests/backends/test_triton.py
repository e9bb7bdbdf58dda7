"""Triton backend against the torch reference, stage by stage and as a layer.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at small sizes; on a GPU the same tests run on CUDA, and the ``gpu`` tests
add realistic sizes, CUDA-graph capture and the no-host-sync guarantee.
"""

from __future__ import annotations

import os

import pytest
import torch

import moe_replay as mr
from moe_replay.backends.base import ExpertBuckets
from moe_replay.backends.registry import get_backend

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

TRITON = get_backend("triton", DEVICE)
TORCH = get_backend("torch", DEVICE)

# Relative Frobenius error of the triton backend against the float32 reference.
# bf16: h, the pre-activations and each expert's output are rounded to bf16 (the reference keeps
# float32 throughout), 3-4 roundings of 2**-9 each.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def random_forced(T: int, E: int, K: int, gen: torch.Generator, free: float = 0.5) -> torch.Tensor:
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
    ids = ids.long()
    ids[torch.rand(T, K, generator=gen) < free] = -1
    return ids


ROUTE_CASES = [
    # (num_experts, top_k, extra config) — each line names the edge it covers
    (8, 2, {}),  # softmax, normalised (Qwen3/Mixtral)
    (8, 2, {"norm_topk_prob": False}),  # softmax, not normalised (OLMoE)
    (7, 7, {}),  # top_k == num_experts, prime E
    (
        16,
        4,
        {
            "scoring": "sigmoid",
            "n_group": 4,
            "topk_group": 2,
            "score_bias": True,
            "routed_scaling_factor": 2.5,
        },
    ),  # DeepSeek-V3
    (16, 4, {"scoring": "sigmoid", "norm_topk_prob": False}),  # sigmoid, not normalised
    (12, 3, {"n_group": 6, "topk_group": 2}),  # groups without bias, non-power-of-2 group count
    (6, 1, {"n_group": 6, "topk_group": 3}),  # groups of one expert
    (33, 5, {"score_bias": True}),  # softmax + bias, E just over a power of 2
]


@pytest.mark.parametrize("E,K,extra", ROUTE_CASES)
# forced: none; half the slots; every slot (replay: blocks skip selection); free slots only in the
# last rows (one row block selects, the others skip)
@pytest.mark.parametrize("forced", ["none", "partial", "full", "last rows free"])
def test_route_matches_reference(E: int, K: int, extra: dict, forced: str) -> None:
    gen = torch.Generator().manual_seed(E * 100 + K)
    cfg = mr.MoEConfig(num_experts=E, top_k=K, hidden_size=4, intermediate_size=4, **extra)
    T = 37  # not a multiple of the kernel's row block
    logits = torch.randn(T, E, generator=gen).to(DEVICE).requires_grad_()
    bias = (torch.randn(E, generator=gen) * 0.1).to(DEVICE) if cfg.score_bias else None
    forced_ids = None
    if forced != "none":
        forced_ids = random_forced(T, E, K, gen, free=0.5 if forced == "partial" else 0.0)
        if forced == "last rows free":
            forced_ids[-3:, -1] = -1
        forced_ids = forced_ids.to(DEVICE)
    got = mr.route(logits, cfg, forced_ids, bias, backend="triton")
    want = mr.route(logits, cfg, forced_ids, bias, backend="torch")
    assert got.expert_ids.dtype == torch.int32
    assert torch.equal(got.expert_ids, want.expert_ids)
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(T, K, generator=gen).to(DEVICE)
    (g_got,) = torch.autograd.grad((got.weights * upstream).sum(), logits)
    (g_want,) = torch.autograd.grad((want.weights * upstream).sum(), logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "E,K,extra", [(8, 3, {}), (33, 5, {"score_bias": True}), (16, 4, {"scoring": "sigmoid"})]
)
@pytest.mark.parametrize("forced", [False, True])
def test_route_ties_signed_zeros_and_infinities(E: int, K: int, extra: dict, forced: bool) -> None:
    """Selection order on repeated values, -0.0 against +0.0 and -inf logits: ties go to the lower
    expert index, as in the reference (the kernel ranks packed integer keys, not floats)."""
    gen = torch.Generator().manual_seed(E + K)
    cfg = mr.MoEConfig(num_experts=E, top_k=K, hidden_size=4, intermediate_size=4, **extra)
    T = 41
    logits = torch.randint(-2, 3, (T, E), generator=gen).float() / 2  # few distinct values
    logits[torch.rand(T, E, generator=gen) < 0.2] = -0.0
    logits[torch.rand(T, E, generator=gen) < 0.1] = float("-inf")
    logits[0] = float("-inf")  # a row of -inf only: K distinct experts all the same
    logits[1, : E // 2] = -0.0
    logits[1, E // 2 :] = 0.0
    logits = logits.to(DEVICE)
    bias = torch.zeros(E, device=DEVICE) if cfg.score_bias else None
    forced_ids = random_forced(T, E, K, gen).to(DEVICE) if forced else None
    got = mr.route(logits, cfg, forced_ids, bias, backend="triton")
    want = mr.route(logits, cfg, forced_ids, bias, backend="torch")
    assert torch.equal(got.expert_ids, want.expert_ids)
    assert (got.expert_ids.sort(1).values.diff(dim=1) > 0).all()  # distinct in every row
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_route_zero_tokens_and_underflow() -> None:
    cfg = mr.MoEConfig(num_experts=8, top_k=2, hidden_size=4, intermediate_size=4)
    empty = mr.route(torch.zeros(0, 8, device=DEVICE), cfg, backend="triton")
    assert empty.expert_ids.shape == (0, 2) and empty.weights.shape == (0, 2)
    # Expert 7 is forced with a logit 500 below the best: its softmax underflows to 0.
    logits = torch.zeros(3, 8, device=DEVICE)
    logits[:, 0] = 500.0
    logits.requires_grad_()
    forced = torch.tensor([[7, -1]] * 3, device=DEVICE)
    r = mr.route(logits, cfg, forced, backend="triton")
    assert r.expert_ids[:, 0].tolist() == [7, 7, 7] and r.expert_ids[:, 1].tolist() == [0, 0, 0]
    assert torch.isfinite(r.weights).all()
    (g,) = torch.autograd.grad(r.weights[:, 0].sum(), logits)
    assert torch.isfinite(g).all()


def test_route_validate_false_never_goes_out_of_bounds() -> None:
    cfg = mr.MoEConfig(num_experts=4, top_k=2, hidden_size=4, intermediate_size=4)
    logits = torch.randn(3, 4, device=DEVICE)
    bad = torch.tensor([[9, -1], [-7, 1], [2, 2]], device=DEVICE)  # too large, too small, repeated
    r = mr.route(logits, cfg, bad, validate=False, backend="triton")
    ref = mr.route(logits, cfg, bad, validate=False, backend="torch")
    assert ((r.expert_ids >= 0) & (r.expert_ids < 4)).all()
    assert torch.equal(r.expert_ids, ref.expert_ids)  # out-of-range ids act as free slots in both
    assert r.expert_ids[2].tolist() == [2, 2]  # repeats stay repeated: the caller skipped validation


DISPATCH_CASES = [
    (7, 2, 4),  # fewer slots than one block
    (300, 3, 5),  # several blocks, a partial last block
    (1, 1, 1),  # one token, one expert
    (0, 2, 3),  # no tokens
    (129, 8, 16),  # top_k 8, 1032 slots
    (50, 1, 64),  # most experts idle (R = 1: expert-parallel regrouping)
    (700, 6, 20),  # 33 blocks: more than one step of the fused scan
]

# (SMALL_N, FUSED_SCAN_BLOCKS) selecting each launch path of the triton dispatch
DISPATCH_PATHS = {"one launch": (10**9, 0), "count, scan+scatter": (0, 10**9), "count, scan, scatter": (0, 0)}


@pytest.mark.parametrize("path", list(DISPATCH_PATHS))
@pytest.mark.parametrize("M,R,E", DISPATCH_CASES)
def test_dispatch_equals_stable_argsort(M: int, R: int, E: int, path: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from moe_replay.backends.triton import dispatch as triton_dispatch

    small_n, fused_blocks = DISPATCH_PATHS[path]
    monkeypatch.setattr(triton_dispatch, "SMALL_N", small_n)
    monkeypatch.setattr(triton_dispatch, "FUSED_SCAN_BLOCKS", fused_blocks)
    gen = torch.Generator().manual_seed(M + R + E)
    ids = random_forced(M, E, R, gen, free=0.0).to(DEVICE)
    got, want = TRITON.dispatch(ids, E), TORCH.dispatch(ids, E)
    assert torch.equal(got.offsets_E1, want.offsets_E1)
    assert torch.equal(got.row_of_slot_N, want.row_of_slot_N)
    assert torch.equal(got.slot_of_row_MR, want.slot_of_row_MR)


def test_dispatch_all_tokens_on_one_expert() -> None:
    ids = torch.full((200, 1), 3, device=DEVICE)
    b = TRITON.dispatch(ids, 5)
    assert b.offsets_E1.tolist() == [0, 0, 0, 0, 200, 200]
    assert b.row_of_slot_N.tolist() == list(range(200))


LAYER_CASES = [
    # (T, E, K, H, I)
    (7, 4, 2, 32, 48),  # T < BLOCK_M, I not a multiple of the column tile
    (33, 6, 6, 48, 40),  # top_k == num_experts, H not a multiple of BLOCK_K
    (1, 5, 1, 16, 16),  # one token: four idle experts
    (40, 3, 1, 64, 32),  # several row tiles per expert
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,H,I", LAYER_CASES)
def test_layer_forward_backward_matches_reference(T, E, K, H, I, dtype) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(T * 7 + E)
    cfg = mr.MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)
    ref = mr.MoE(cfg, backend="torch", device=DEVICE, dtype=dtype)
    tri = mr.MoE(cfg, backend="triton", device=DEVICE, dtype=dtype)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(T, H, device=DEVICE, dtype=dtype)
    dy = torch.randn(T, H, device=DEVICE, dtype=dtype)
    forced = random_forced(T, E, K, torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for layer in (ref, tri):
        xg = x.clone().requires_grad_()
        y, routing = layer(xg, forced_expert_ids=forced, return_routing=True)
        y.backward(dy)
        results.append((y, routing.expert_ids, xg.grad, [p.grad for p in layer.parameters()]))
    (y_r, ids_r, dx_r, grads_r), (y_t, ids_t, dx_t, grads_t) = results
    assert torch.equal(ids_t, ids_r)
    assert y_t.dtype == dtype
    tol = TOL[dtype]
    assert rel(y_t, y_r) < tol
    assert rel(dx_t, dx_r) < tol
    for g_t, g_r in zip(grads_t, grads_r):
        assert rel(g_t, g_r) < tol


@pytest.mark.parametrize("T,E,K,H,I", [LAYER_CASES[0], LAYER_CASES[1]])
def test_layer_with_tma_descriptors_matches_reference(T, E, K, H, I, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The TMA-descriptor loads (forward GEMMs on sm90) also run in the interpreter."""
    from moe_replay.backends.triton import experts

    monkeypatch.setattr(experts, "_tma_default", lambda t: True)
    test_layer_forward_backward_matches_reference(T, E, K, H, I, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,H,I", LAYER_CASES)
def test_layer_backward_through_grouped_mm_matches_reference(T, E, K, H, I, dtype, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The backward with ``torch._grouped_mm`` GEMMs (the default on sm90 in bf16; forced here, on
    the CPU through its fallback) and the elementwise SwiGLU backward."""
    from moe_replay.backends.triton import experts

    monkeypatch.setattr(experts, "GROUPED_MM_BACKWARD", "1")
    calls = []
    original = experts._grouped_mm_grads
    monkeypatch.setattr(experts, "_grouped_mm_grads", lambda *a: calls.append(1) or original(*a))
    test_layer_forward_backward_matches_reference(T, E, K, H, I, dtype)
    assert calls  # the path under test ran


def test_grouped_mm_backward_rows_path_and_idle_experts(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from moe_replay.backends.triton import experts

    monkeypatch.setattr(experts, "GROUPED_MM_BACKWARD", "1")
    test_expert_mlp_rows_match_reference()
    test_expert_mlp_idle_experts_get_zero_gradient()


def test_grouped_mm_backward_needs_aligned_rows(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Rows that ``torch._grouped_mm`` cannot address (16-byte alignment) keep our kernels."""
    from moe_replay.backends.triton import experts

    monkeypatch.setattr(experts, "GROUPED_MM_BACKWARD", "1")
    buckets = TRITON.dispatch(torch.zeros(3, 1, dtype=torch.long, device=DEVICE), 2)
    x = torch.zeros(3, 16, dtype=torch.bfloat16, device=DEVICE)
    for I, ok in ((24, True), (20, False)):
        w1 = torch.zeros(2, 2 * I, 16, dtype=torch.bfloat16, device=DEVICE)
        w2 = torch.zeros(2, 16, I, dtype=torch.bfloat16, device=DEVICE)
        assert experts._grouped_mm_ok(x, w1, w2, buckets) is ok
        assert not experts._grouped_mm_ok(x, w1.transpose(1, 2).contiguous().transpose(1, 2), w2, buckets)
    monkeypatch.setattr(experts, "GROUPED_MM_BACKWARD", "0")
    assert not experts._grouped_mm_ok(x, torch.zeros(2, 48, 16), torch.zeros(2, 16, 24), buckets)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("N,I", [(0, 8), (5, 8), (9, 1100)])  # I > one column block of the kernel
def test_swiglu_bwd_matches_autograd(N: int, I: int, weighted: bool) -> None:
    from moe_replay.backends.triton.swiglu import swiglu_bwd

    gen = torch.Generator().manual_seed(N + I)
    gu = torch.randn(N, 2 * I, generator=gen).to(DEVICE).requires_grad_()
    dh = torch.randn(N, I, generator=gen).to(DEVICE)
    w = torch.rand(N, generator=gen).to(DEVICE) if weighted else None
    g, u = gu.chunk(2, dim=1)
    h = torch.nn.functional.silu(g) * u
    (want_dgu,) = torch.autograd.grad(h, gu, dh * w[:, None] if weighted else dh)
    dgu, dweight, hw = swiglu_bwd(dh, gu.detach(), w)
    assert rel(dgu, want_dgu) < 1e-6
    if weighted:
        assert rel(dweight, (dh * h).sum(1)) < 1e-6
        assert rel(hw, h * w[:, None]) < 1e-6
    else:
        assert dweight is None and hw is None


def test_tiles_that_do_not_fit_shrink_and_are_remembered(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Tiles tuned for an H100 fall back to fewer stages, then a smaller K block, elsewhere."""
    from triton.runtime.errors import OutOfResources

    from moe_replay.backends.triton import _common

    monkeypatch.setattr(_common, "_SHRUNK", {})
    tried = []

    def launch(cfg: dict) -> None:
        tried.append((cfg["num_stages"], cfg["BLOCK_K"]))
        if cfg["num_stages"] * cfg["BLOCK_K"] > 64:  # a pretend shared-memory limit
            raise OutOfResources(300_000, 232_448, "shared memory")

    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
    _common.launch_fitting("linear", cfg, torch.device(DEVICE), launch)
    assert tried == [(4, 64), (3, 64), (2, 64), (2, 32)]
    tried.clear()
    _common.launch_fitting("linear", cfg, torch.device(DEVICE), launch)  # remembered: straight to what fits
    assert tried == [(2, 32)]

    def never_fits(cfg: dict) -> None:
        raise OutOfResources(300_000, 232_448, "shared memory")

    with pytest.raises(OutOfResources):
        tiny = {**cfg, "BLOCK_K": 16, "num_stages": 2}
        _common.launch_fitting("wgrad", tiny, torch.device(DEVICE), never_fits)


def test_expert_mlp_rows_match_reference() -> None:
    """The unfused rows path (expert parallelism combines elsewhere), forward and backward."""
    gen = torch.Generator().manual_seed(5)
    E, H, I = 5, 24, 40
    x = torch.randn(11, H, generator=gen).to(DEVICE).requires_grad_()
    w1 = torch.randn(E, 2 * I, H, generator=gen).to(DEVICE).requires_grad_()
    w2 = torch.randn(E, H, I, generator=gen).to(DEVICE).requires_grad_()
    buckets = TRITON.dispatch(random_forced(11, E, 3, gen, free=0.0).to(DEVICE), E)
    upstream = torch.randn(33, H, generator=gen).to(DEVICE)
    grads = []
    for backend in (TRITON, TORCH):
        y = backend.expert_mlp(x, buckets, w1, w2)
        grads.append((y, *torch.autograd.grad((y * upstream).sum(), (x, w1, w2))))
    for got, want in zip(*grads):
        assert rel(got, want) < TOL[torch.float32]


def test_layer_zero_tokens_and_3d_input() -> None:
    cfg = mr.MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=16)
    tri = mr.MoE(cfg, backend="triton", device=DEVICE)
    ref = mr.MoE(cfg, backend="torch", device=DEVICE)
    ref.load_state_dict(tri.state_dict())
    assert tri(torch.zeros(0, 16, device=DEVICE)).shape == (0, 16)
    x = torch.randn(2, 3, 16, device=DEVICE)
    assert rel(tri(x), ref(x)) < TOL[torch.float32]


def test_layer_without_gradients_records_no_graph_and_computes_the_same() -> None:
    """Without gradients the stages skip their autograd Functions (host time): same outputs."""
    torch.manual_seed(0)
    cfg = mr.MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=32)
    tri = mr.MoE(cfg, backend="triton", device=DEVICE)
    x = torch.randn(9, 16, device=DEVICE)
    with_graph, routing = tri(x, return_routing=True)
    assert with_graph.grad_fn is not None and routing.weights.grad_fn is not None
    with torch.no_grad():
        plain, plain_routing = tri(x, return_routing=True)
    assert plain.grad_fn is None and plain_routing.weights.grad_fn is None
    assert torch.equal(plain, with_graph.detach()) and torch.equal(
        plain_routing.expert_ids, routing.expert_ids
    )
    experts_only = TRITON.expert_mlp(
        x,
        TRITON.dispatch(routing.expert_ids, 6),
        tri.experts.gate_up_proj.detach(),
        tri.experts.down_proj.detach(),
    )
    assert experts_only.grad_fn is None and experts_only.shape == (9 * 2, 16)


def test_expert_mlp_idle_experts_get_zero_gradient() -> None:
    torch.manual_seed(0)
    E, H, I = 5, 16, 32
    x = torch.randn(6, H, device=DEVICE)
    ids = torch.tensor([[1], [1], [3], [1], [3], [3]], device=DEVICE)
    w1 = torch.randn(E, 2 * I, H, device=DEVICE, requires_grad=True)
    w2 = torch.randn(E, H, I, device=DEVICE, requires_grad=True)
    buckets = TRITON.dispatch(ids, E)
    TRITON.expert_mlp(x, buckets, w1, w2).sum().backward()
    for e in (0, 2, 4):
        assert w1.grad[e].abs().sum() == 0 and w2.grad[e].abs().sum() == 0
    assert w1.grad[1].abs().sum() > 0 and w2.grad[3].abs().sum() > 0


def test_permute_rows_and_its_backward() -> None:
    gen = torch.Generator().manual_seed(3)
    ids = random_forced(9, 6, 3, gen, free=0.0).to(DEVICE)
    x = torch.randn(9, 20, device=DEVICE, requires_grad=True)
    buckets = TRITON.dispatch(ids, 6)
    out = TRITON.permute_rows(x, buckets)
    torch.testing.assert_close(out, TORCH.permute_rows(x, buckets))
    upstream = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * upstream).sum(), x)
    (g_ref,) = torch.autograd.grad((TORCH.permute_rows(x, buckets) * upstream).sum(), x)
    torch.testing.assert_close(g, g_ref)


# -1 slots (a (row, read) without a routed row: the expert-parallel receiver's and origin's
# buckets). Built from a dispatch with a sink expert E for the missing reads, the sink cut off.
MISSING_CASES = [
    (9, 3, 5, 0.4),  # some reads missing, row 0 entirely, several row blocks
    (5, 2, 4, 1.0),  # every read missing: no routed rows, outputs are zero
]


def buckets_with_missing(T: int, R: int, E: int, missing: float) -> tuple[torch.Tensor, ExpertBuckets]:
    """``(ids_MR with -1 for missing reads, buckets whose slot is -1 there)``."""
    gen = torch.Generator().manual_seed(T + R + E)
    ids = random_forced(T, E, R, gen, free=missing)
    ids[0] = -1
    ids = ids.to(DEVICE)
    sink = TRITON.dispatch(torch.where(ids >= 0, ids, E), E + 1)
    n = int(sink.offsets_E1[E])
    slot = torch.where(sink.slot_of_row_MR < n, sink.slot_of_row_MR, -1)
    return ids, ExpertBuckets(sink.row_of_slot_N[:n], slot, sink.offsets_E1[: E + 1])


def present_sum(ids_MR: torch.Tensor, w_MR: torch.Tensor, read, width: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Naive loop: ``out[m] = sum over r with ids[m, r] >= 0 of w[m, r] * read(m, r)``."""
    M, R = ids_MR.shape
    rows = [
        sum((w_MR[m, r] * read(m, r) for r in range(R) if ids_MR[m, r] >= 0), w_MR.new_zeros(width))
        for m in range(M)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("T,R,E,missing", MISSING_CASES)
def test_combine_and_permute_rows_skip_missing_slots(T: int, R: int, E: int, missing: float) -> None:
    H = 20
    ids, b = buckets_with_missing(T, R, E, missing)
    gen = torch.Generator().manual_seed(8)
    y = torch.randn(b.num_slots, H, generator=gen).to(DEVICE).requires_grad_()
    # NaN weights on missing reads: they must add nothing, and get a zero gradient
    w = torch.rand(T, R, generator=gen).to(DEVICE).masked_fill(ids < 0, float("nan")).requires_grad_()
    out = TRITON.combine(y, b, w, torch.float32)
    upstream = torch.randn(T, H, generator=gen).to(DEVICE)
    dy, dw = torch.autograd.grad((out * upstream).sum(), (y, w))

    slots = b.slot_of_row_MR.tolist()
    y64 = y.detach().double()
    ref = present_sum(ids, w.detach().double(), lambda m, r: y64[slots[m][r]], H)
    torch.testing.assert_close(out.double(), ref)
    dy_ref = torch.zeros_like(y64)
    dw_ref = torch.zeros(T, R, dtype=torch.float64, device=DEVICE)
    for m in range(T):
        for r in range(R):
            if slots[m][r] >= 0:
                dy_ref[slots[m][r]] = w[m, r].double() * upstream[m].double()
                dw_ref[m, r] = upstream[m].double() @ y64[slots[m][r]]
    torch.testing.assert_close(dy.double(), dy_ref)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-5)  # float32 dot of H terms

    x = torch.randn(T, H, generator=gen).to(DEVICE).requires_grad_()
    x_NH = TRITON.permute_rows(x, b)
    assert torch.equal(x_NH, x.detach()[b.row_of_slot_N.long()])
    up_N = torch.randn(b.num_slots, H, generator=gen).to(DEVICE)
    (dx,) = torch.autograd.grad((x_NH * up_N).sum(), x)
    ones = torch.ones(T, R, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(
        dx.double(), present_sum(ids, ones, lambda m, r: up_N[slots[m][r]].double(), H)
    )


@pytest.mark.parametrize("T,R,E,missing", MISSING_CASES)
def test_expert_mlp_combine_skips_missing_slots(T: int, R: int, E: int, missing: float) -> None:
    """The fused experts+combine on the receiver's buckets: forward and every gradient."""
    H, I = 16, 24
    ids, b = buckets_with_missing(T, R, E, missing)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(T, H, generator=gen).to(DEVICE).requires_grad_()
    w = torch.rand(T, R, generator=gen).to(DEVICE).masked_fill(ids < 0, float("nan")).requires_grad_()
    w1 = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(DEVICE).requires_grad_()
    w2 = (torch.randn(E, H, I, generator=gen) / I**0.5).to(DEVICE).requires_grad_()
    upstream = torch.randn(T, H, generator=gen).to(DEVICE)
    leaves = (x, w, w1, w2)
    out = TRITON.expert_mlp_combine(x, b, w1, w2, w, torch.float32)
    grads = torch.autograd.grad((out * upstream).sum(), leaves, allow_unused=True)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64, w1_64, w2_64 = leaves64

    def expert_output(m: int, r: int) -> torch.Tensor:
        e = int(ids[m, r])
        gate, up = (w1_64[e] @ x64[m]).chunk(2)
        return w2_64[e] @ (torch.nn.functional.silu(gate) * up)

    anchor = 0 * sum(leaf.nan_to_num().sum() for leaf in leaves64)  # every leaf in the graph
    ref = present_sum(ids, w64, expert_output, H) + anchor
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), leaves64, allow_unused=True)
    assert rel(out, ref) < TOL[torch.float32]
    for got, want, leaf in zip(grads, ref_grads, leaves64):
        want = torch.zeros_like(leaf) if want is None else want  # nothing routed: zero gradients
        got = torch.zeros_like(leaf) if got is None else got
        assert torch.isfinite(got).all() and rel(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("grouped_mm", ["0", "1"])
def test_expert_mlp_combine_hands_input_grads_over_before_weight_grads(grouped_mm: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``on_input_grads`` (expert parallelism sends the rows' gradients home there) gets dx and
    the weights' gradient once, before any weight-gradient GEMM; on the ``torch._grouped_mm`` path
    the GEMM after it leaves the SMs the hook reports busy (the carveout is restored after), and
    the x rows ``prepare_backward`` gathered ahead are used. The gradients are the same bits as a
    plain backward's."""
    from moe_replay.backends.triton import experts

    monkeypatch.setattr(experts, "GROUPED_MM_BACKWARD", grouped_mm)
    T, R, E, H, I = 12, 3, 5, 16, 24
    _, b = buckets_with_missing(T, R, E, 0.3)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(T, H, generator=gen).to(DEVICE).requires_grad_()
    w = torch.rand(T, R, generator=gen).to(DEVICE).requires_grad_()
    w1 = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(DEVICE).requires_grad_()
    w2 = (torch.randn(E, H, I, generator=gen) / I**0.5).to(DEVICE).requires_grad_()
    upstream = torch.randn(T, H, generator=gen).to(DEVICE)
    leaves = (x, w, w1, w2)

    def backward(hook: object, prologue: bool) -> tuple[torch.Tensor, ...]:
        out = TRITON.expert_mlp_combine(x, b, w1, w2, w, torch.float32, hook)
        if prologue:
            TRITON.prepare_backward(out.grad_fn)
            assert (getattr(out.grad_fn, "x_rows_NH", None) is not None) == (grouped_mm == "1")
        grads = torch.autograd.grad((out * upstream).sum(), leaves)
        assert getattr(out.grad_fn, "x_rows_NH", None) is None  # used, then dropped
        return grads

    plain = backward(None, prologue=False)
    events: list[tuple] = []
    if grouped_mm == "1":
        grouped_mm_op = torch._grouped_mm

        def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
            events.append(("gemm", torch._C._get_sm_carveout_experimental()))
            return grouped_mm_op(*args, **kwargs)

        monkeypatch.setattr(torch, "_grouped_mm", recorded)
    else:
        wgrad = experts.grouped_wgrad
        monkeypatch.setattr(experts, "grouped_wgrad", lambda *a: events.append(("wgrad",)) or wgrad(*a))

    def hook(dx: torch.Tensor, dweights: torch.Tensor) -> int:
        events.append(("hook", dx, dweights))
        return 7

    grads = backward(hook, prologue=True)
    hooks = [i for i, event in enumerate(events) if event[0] == "hook"]
    assert len(hooks) == 1
    _, dx, dweights = events[hooks[0]]
    assert dx is not None and torch.equal(dx, grads[0]) and torch.equal(dweights, grads[1])
    after = [event[1:] for event in events[hooks[0] + 1 :]]
    if grouped_mm == "1":  # dh, d x rows; then d down_proj beside the transfer, d gate_up_proj
        assert [event[1:] for event in events[: hooks[0]]] == [(None,), (None,)]
        assert after == [(7,), (None,)]
    else:  # our kernels: both weight gradients after the hook
        assert hooks[0] == 0 and after == [(), ()]
    assert torch._C._get_sm_carveout_experimental() is None
    for got, want in zip(grads, plain):
        assert torch.equal(got, want)


def test_replay_uses_triton_routing() -> None:
    cfg = mr.MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=16)
    layer = mr.MoE(cfg, backend="triton", device=DEVICE)
    x = torch.randn(5, 16, device=DEVICE)
    with mr.record(layer) as trace:
        layer(x)
    with torch.no_grad():
        layer.router.weight.add_(torch.randn_like(layer.router.weight))
    with mr.replay(layer, trace):
        _, routing = layer(x, return_routing=True)
    assert torch.equal(routing.expert_ids.cpu(), trace[""].cpu().to(torch.int32))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_torch_compile_matches_eager(backend: str) -> None:
    """A compiled layer (Dynamo runs the Triton stages as they are, see the backend's docstring)
    gives the eager results, forward, backward and under replay. Inductor on a GPU; on the CPU,
    where the kernels run in Triton's interpreter, Dynamo alone."""
    torch._dynamo.reset()
    cfg = mr.MoEConfig(num_experts=6, top_k=2, hidden_size=32, intermediate_size=48)
    layer = mr.MoE(cfg, backend=backend, device=DEVICE)
    compiled = torch.compile(layer, backend="inductor" if CUDA else "eager")
    x = torch.randn(9, 32, device=DEVICE)
    grads = []
    for fn in (layer, compiled):
        xg = x.clone().requires_grad_()
        with mr.record(layer) as trace:
            y = fn(xg)
        y.square().sum().backward()
        with torch.no_grad(), mr.replay(layer, trace):
            replayed = fn(x)
        grads.append((y, xg.grad, replayed, trace))
    (y_e, dx_e, replayed_e, trace_e), (y_c, dx_c, replayed_c, trace_c) = grads
    assert trace_c == trace_e
    for got, want in ((y_c, y_e), (dx_c, dx_e), (replayed_c, replayed_e)):
        torch.testing.assert_close(got, want)


def test_mismatched_dtypes_raise() -> None:
    cfg = mr.MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=16)
    layer = mr.MoE(cfg, backend="triton", device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        layer(torch.randn(3, 16, device=DEVICE))


# ------------------------------------------------------------------------------------------
# Real GPU only: sizes the interpreter cannot afford, CUDA graphs, no host synchronisation.

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "T,E,K,H,I,extra",
    [
        (512, 128, 8, 2048, 768, {}),  # Qwen3-30B-A3B
        (300, 64, 8, 1024, 1024, {"norm_topk_prob": False}),  # OLMoE-like, T not a tile multiple
        (
            256,
            256,
            8,
            1024,
            512,
            {"scoring": "sigmoid", "score_bias": True, "n_group": 8, "topk_group": 4},
        ),  # DSv3-like
        (2048, 8, 2, 1024, 1792, {}),  # Mixtral-like: many rows per expert
        (1, 128, 8, 2048, 768, {}),  # decode
    ],
)
@pytest.mark.parametrize("grouped_mm", ["auto", "0"])
def test_gpu_layer_matches_reference(T, E, K, H, I, extra, grouped_mm, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Both backward paths: ``torch._grouped_mm`` GEMMs (the default here) and our kernels."""
    from moe_replay.backends.triton import experts

    monkeypatch.setattr(experts, "GROUPED_MM_BACKWARD", grouped_mm)
    torch.manual_seed(0)
    cfg = mr.MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, **extra)
    tri = mr.MoE(cfg, backend="triton", device="cuda", dtype=torch.bfloat16)
    ref = mr.MoE(cfg, backend="torch", device="cuda", dtype=torch.bfloat16)
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    outs = []
    for layer in (ref, tri):
        xg = x.clone().requires_grad_()
        y, routing = layer(xg, return_routing=True)
        y.backward(dy)
        outs.append((y, routing.expert_ids, xg.grad, [p.grad for p in layer.parameters()]))
    (y_r, ids_r, dx_r, g_r), (y_t, ids_t, dx_t, g_t) = outs
    assert torch.equal(ids_t, ids_r)
    assert rel(y_t, y_r) < TOL[torch.bfloat16]
    assert rel(dx_t, dx_r) < TOL[torch.bfloat16]
    for a, b in zip(g_t, g_r):
        assert rel(a, b) < TOL[torch.bfloat16]
    idle = torch.ones(E, dtype=torch.bool, device="cuda")
    idle[ids_r.flatten()] = False
    assert tri.experts.gate_up_proj.grad[idle].abs().sum() == 0  # empty groups: zero, not garbage
    assert tri.experts.down_proj.grad[idle].abs().sum() == 0


@gpu
@pytest.mark.gpu
def test_gpu_replayed_forward_has_no_host_sync_and_captures_in_a_graph() -> None:
    cfg = mr.MoEConfig(num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768)
    layer = mr.MoE(cfg, backend="triton", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), mr.record(layer) as trace:
        eager = layer(x)
    trace = trace.to("cuda")  # a graph cannot copy from pageable host memory
    # Each forward consumes one trace: the synchronisation check, the warm-up and the capture.
    with torch.no_grad(), mr.replay(layer, [trace] * 3):
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x)  # raises if anything synchronises with the host
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        graph.replay()
    torch.testing.assert_close(captured, eager)
