"""mr.MoE: forward and every gradient against a naive per-token, per-expert loop in float64.

Shape legend: T tokens, H hidden, I intermediate, E experts, K experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moe_replay as mr

# MoE (float32 router, experts in `dtype`) vs the float64 loop on the same parameter values.
# float32: reassociated sums over H, I and K. bfloat16: the experts compute in float32 from bf16
# values the reference shares, so the output carries one bf16 rounding (2**-9 relative); gradients
# of bf16 leaves are rounded once, x's twice (its router and expert parts are bf16, then summed).
TOL = {
    torch.float32: {"out": {"atol": 1e-5, "rtol": 1e-5}, "grad": {"atol": 1e-5, "rtol": 1e-4}},
    torch.bfloat16: {"out": {"atol": 1e-5, "rtol": 2**-8}, "grad": {"atol": 2e-3, "rtol": 2**-7}},
}

SOFTMAX: dict = {}  # Qwen3-MoE / Mixtral: softmax, normalised
OLMOE = {"norm_topk_prob": False}  # softmax, not normalised
DSV3 = {  # DeepSeek-V3: sigmoid, selection bias, groups, scaling
    "scoring": "sigmoid",
    "n_group": 4,
    "topk_group": 2,
    "score_bias": True,
    "routed_scaling_factor": 2.5,
}

# (T, E, K, kw, forcing)
CASES = [
    (9, 8, 2, SOFTMAX, None),  # plain top-2
    (9, 8, 2, OLMOE, None),  # weights not normalised
    (9, 8, 3, DSV3, None),  # groups, bias for selection only, scaled weights
    (1, 8, 2, SOFTMAX, None),  # T == 1
    (6, 5, 5, SOFTMAX, None),  # K == E: every expert for every token
    (3, 16, 1, SOFTMAX, None),  # E > T * K: idle experts (their gradients must be zeros)
    (7, 6, 2, SOFTMAX, "one_expert"),  # all tokens on expert 3 (forced), others get the rest
    (9, 8, 2, SOFTMAX, "partial"),  # replay: random mix of forced and free slots
    (9, 8, 3, DSV3, "partial"),  # replay with groups: forced ids may lie outside the kept groups
    (9, 7, 3, OLMOE, "full"),  # prime E, every slot forced
]
H, I = 16, 12


def make_moe(T: int, E: int, K: int, kw: dict, dtype: torch.dtype = torch.float32, seed: int = 0) -> mr.MoE:
    torch.manual_seed(seed)
    moe = mr.MoE(mr.MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, **kw), dtype=dtype)
    if moe.cfg.score_bias:
        with torch.no_grad():
            moe.router.bias.copy_(0.3 * torch.randn(E))
    return moe


def forced_ids(T: int, E: int, K: int, forcing: str | None, seed: int = 1) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed)
    if forcing is None:
        return None
    rows = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if forcing == "one_expert":
        rows = torch.full((T, K), -1)
        rows[:, 0] = 3
    elif forcing == "partial":
        rows[torch.rand(T, K, generator=g) < 0.5] = -1
    return rows


def naive_ids(
    logits: torch.Tensor, cfg: mr.MoEConfig, bias: torch.Tensor | None, forced: torch.Tensor | None
):
    """Float64 selection: scores (+ bias), groups by the sum of their two best, forced slots, fill."""
    scores = torch.softmax(logits, 1) if cfg.scoring == "softmax" else torch.sigmoid(logits)
    select = (scores + bias.double() if bias is not None else scores).tolist()
    ids = []
    for t, row in enumerate(select):
        if cfg.n_group is not None:
            S = cfg.experts_per_group
            group_score = [sum(sorted(row[g * S : (g + 1) * S])[-2:]) for g in range(cfg.n_group)]
            kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
            row = [s if e // S in kept else -math.inf for e, s in enumerate(row)]
        order = sorted(range(cfg.num_experts), key=lambda e: -row[e])
        slots = forced[t].tolist() if forced is not None else [-1] * cfg.top_k
        remaining = iter(e for e in order if e not in slots)
        ids.append([e if e >= 0 else next(remaining) for e in slots])
    return ids


def naive_moe(x, w_router, b_router, w_gate_up, w_down, cfg, forced=None):
    """y[t] = sum_j w[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]), one token and one expert at a time."""
    logits = x @ w_router.T
    ids = naive_ids(logits.detach(), cfg, b_router, forced)
    scores = torch.softmax(logits, 1) if cfg.scoring == "softmax" else torch.sigmoid(logits)
    y = []
    for t in range(x.shape[0]):
        w = torch.stack([scores[t, e] for e in ids[t]])
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        y_t = torch.zeros_like(x[t])
        for j, e in enumerate(ids[t]):
            gate, up = (
                w_gate_up[e, : cfg.intermediate_size] @ x[t],
                w_gate_up[e, cfg.intermediate_size :] @ x[t],
            )
            y_t = y_t + w[j] * (w_down[e] @ (F.silu(gate) * up))
        y.append(y_t)
    y = torch.stack(y) if y else x[:0] * (w_router.sum() + w_gate_up.sum() + w_down.sum())
    return y, ids


def params(moe: mr.MoE) -> list[torch.Tensor]:
    return [moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "E", "K", "kw", "forcing"), CASES)
def test_forward_and_gradients_match_naive_loop(
    T: int, E: int, K: int, kw: dict, forcing: str | None, dtype: torch.dtype
) -> None:
    moe = make_moe(T, E, K, kw, dtype)
    forced = forced_ids(T, E, K, forcing)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    upstream = torch.randn(T, H, generator=g).to(dtype).float()  # exactly representable in dtype
    y, routing = moe(x, forced_expert_ids=forced, return_routing=True)
    assert y.shape == x.shape and y.dtype == dtype
    (y.float() * upstream).sum().backward()

    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params(moe)]
    bias = moe.router.bias
    y64, ids = naive_moe(x64, p64[0], bias, p64[1], p64[2], moe.cfg, forced)
    (y64 * upstream.double()).sum().backward()

    assert routing.expert_ids.tolist() == ids
    if forced is not None:
        kept = forced >= 0
        assert torch.equal(routing.expert_ids[kept].long(), forced[kept])
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y64, **tol["out"])
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol["grad"])
    for p, ref in zip(params(moe), p64):
        assert p.grad is not None and p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad.double(), ref.grad, **tol["grad"])
    if K > 1 or not moe.cfg.norm_topk_prob:  # (one normalised weight is always 1: nothing to learn)
        assert moe.router.weight.grad.abs().sum() > 0  # replayed or not, the router learns


def test_idle_experts_get_zero_gradients() -> None:
    moe = make_moe(3, 16, 1, SOFTMAX)
    x = torch.randn(3, H)
    _, routing = moe(x, return_routing=True)
    moe(x).sum().backward()
    idle = sorted(set(range(16)) - set(routing.expert_ids.flatten().tolist()))
    assert len(idle) >= 13
    for e in idle:
        assert not moe.experts.gate_up_proj.grad[e].any() and not moe.experts.down_proj.grad[e].any()


# ----------------------------------------------------------------------------- replay semantics


@pytest.mark.parametrize("kw", [SOFTMAX, OLMOE, DSV3])
def test_forcing_the_routers_own_ids_gives_the_same_output(kw: dict) -> None:
    moe = make_moe(10, 8, 3, kw)
    x = torch.randn(10, H)
    y, routing = moe(x, return_routing=True)
    y_forced, routing_forced = moe(x, forced_expert_ids=routing.expert_ids, return_routing=True)
    assert torch.equal(routing_forced.expert_ids, routing.expert_ids)
    assert torch.equal(routing_forced.weights, routing.weights)
    assert torch.equal(y_forced, y)


def test_forced_ids_flat_or_token_shaped_for_3d_input() -> None:
    moe = make_moe(6, 8, 2, SOFTMAX)
    x = torch.randn(2, 3, H)
    forced = forced_ids(6, 8, 2, "partial")
    y_flat, r_flat = moe(x, forced_expert_ids=forced, return_routing=True)  # [N, K]
    y_lead, r_lead = moe(x, forced_expert_ids=forced.reshape(2, 3, 2), return_routing=True)  # [..., K]
    assert torch.equal(y_flat, y_lead) and torch.equal(r_flat.expert_ids, r_lead.expert_ids)
    assert r_flat.expert_ids.shape == (2, 3, 2)
    kept = forced.reshape(2, 3, 2) >= 0
    assert torch.equal(r_flat.expert_ids[kept].long(), forced.reshape(2, 3, 2)[kept])


def test_replayed_experts_with_underflowing_probability_stay_finite() -> None:
    moe = make_moe(4, 8, 2, SOFTMAX)
    with torch.no_grad():
        moe.router.weight.mul_(200.0)  # logit gaps of hundreds: most probabilities underflow to 0
    x = torch.randn(4, H, requires_grad=True)
    # every token replays the two experts the router likes least
    logits = moe.router(x.detach())
    worst = logits.argsort(dim=1)[:, :2]
    assert (torch.softmax(logits, 1).gather(1, worst) == 0).any()
    y = moe(x, forced_expert_ids=worst)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for p in params(moe):
        assert torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------- input shapes


def test_3d_input_equals_flattened_input() -> None:
    moe = make_moe(6, 8, 2, SOFTMAX)
    x = torch.randn(2, 3, H)
    y, routing = moe(x, return_routing=True)
    y_flat, routing_flat = moe(x.reshape(6, H), return_routing=True)
    assert y.shape == (2, 3, H) and routing.expert_ids.shape == routing.weights.shape == (2, 3, 2)
    assert torch.equal(y.reshape(6, H), y_flat)
    assert torch.equal(routing.expert_ids.reshape(6, 2), routing_flat.expert_ids)


@pytest.mark.parametrize(
    "make_view",
    [
        lambda base: base.t(),  # transposed
        lambda base: base.t()[::2],  # strided rows
        lambda base: base.t().reshape(2, 6, H)[:, ::2],  # 3-D, strided token axis
    ],
)
def test_non_contiguous_input(make_view) -> None:
    moe = make_moe(12, 8, 2, SOFTMAX)
    base = torch.randn(H, 12)
    x = make_view(base)
    assert not x.is_contiguous()
    y, routing = moe(x, return_routing=True)
    y_contiguous, routing_contiguous = moe(x.contiguous(), return_routing=True)
    assert torch.equal(routing.expert_ids, routing_contiguous.expert_ids)
    # not bit-equal: matmul kernels sum in a layout-dependent order
    torch.testing.assert_close(y, y_contiguous, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(0, H), (2, 0, H)])  # no tokens, flat or batched
def test_no_tokens(shape: tuple[int, ...]) -> None:
    moe = make_moe(0, 8, 2, SOFTMAX)
    x = torch.randn(*shape, requires_grad=True)
    y, routing = moe(x, return_routing=True)
    assert y.shape == shape and routing.expert_ids.shape == (*shape[:-1], 2)
    y.sum().backward()
    assert x.grad.shape == shape
    assert all(p.grad is not None and not p.grad.any() for p in params(moe))
    y_forced = moe(x, forced_expert_ids=torch.zeros(*shape[:-1], 2, dtype=torch.long))
    assert y_forced.shape == shape


def test_return_routing_is_the_routing_of_the_router_logits() -> None:
    moe = make_moe(5, 8, 2, DSV3)
    x = torch.randn(5, H)
    y, routing = moe(x, return_routing=True)
    assert isinstance(routing, mr.Routing)
    assert routing.expert_ids.dtype == torch.int32 and routing.weights.dtype == torch.float32
    assert routing.weights.requires_grad
    expected = mr.route(moe.router(x), moe.cfg, bias=moe.router.bias)
    assert torch.equal(routing.expert_ids, expected.expert_ids)
    assert torch.equal(routing.weights, expected.weights)
    assert torch.equal(moe(x), y)


# ----------------------------------------------------------------------------- module surface


def test_parameters_buffers_and_initialisation() -> None:
    torch.manual_seed(0)
    E, Hs, Is = 64, 256, 128
    cfg = mr.MoEConfig(num_experts=E, top_k=2, hidden_size=Hs, intermediate_size=Is, score_bias=True)
    moe = mr.MoE(cfg, dtype=torch.bfloat16)
    assert moe.router.weight.shape == (E, Hs) and moe.router.weight.dtype == torch.float32
    assert (
        moe.experts.gate_up_proj.shape == (E, 2 * Is, Hs) and moe.experts.gate_up_proj.dtype == torch.bfloat16
    )
    assert moe.experts.down_proj.shape == (E, Hs, Is) and moe.experts.down_proj.dtype == torch.bfloat16
    assert dict(moe.named_buffers()).keys() == {"router.bias"}
    assert moe.router.bias.dtype == torch.float32 and not moe.router.bias.any()
    assert set(moe.state_dict()) == {
        "router.weight",
        "router.bias",
        "experts.gate_up_proj",
        "experts.down_proj",
    }
    # documented initialisation: N(0, 1 / fan_in) (>= 16k samples each: std within 3%)
    for p, fan_in in ((moe.router.weight, Hs), (moe.experts.gate_up_proj, Hs), (moe.experts.down_proj, Is)):
        assert abs(p.float().std().item() * math.sqrt(fan_in) - 1) < 0.03
        assert abs(p.float().mean().item()) * math.sqrt(fan_in) < 0.03
    plain = mr.MoE(mr.MoEConfig(num_experts=4, top_k=1, hidden_size=8, intermediate_size=8))
    assert plain.router.bias is None and not dict(plain.named_buffers())


def test_extra_repr_names_the_config() -> None:
    text = repr(make_moe(1, 8, 3, DSV3))
    for part in (
        "num_experts=8",
        "top_k=3",
        f"hidden_size={H}",
        f"intermediate_size={I}",
        "scoring=sigmoid",
        "n_group=4, topk_group=2",
        "score_bias=True",
        "routed_scaling_factor=2.5",
    ):
        assert part in text, (part, text)
    assert "n_group" not in repr(make_moe(1, 8, 2, SOFTMAX))
    assert "backend=torch" in repr(
        mr.MoE(mr.MoEConfig(num_experts=4, top_k=1, hidden_size=8, intermediate_size=8), backend="torch")
    )


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("x", "forced", "error", "match"),
    [
        ([[0.0] * H], None, TypeError, r"x must be a torch.Tensor, got list"),
        (
            torch.zeros(4, H, dtype=torch.long),
            None,
            ValueError,
            r"x must be a floating-point tensor.*torch.int64",
        ),
        (
            torch.zeros(4, H + 1),
            None,
            ValueError,
            rf"\[..., hidden_size={H}\], got torch.float32 \(4, {H + 1}\)",
        ),
        (torch.tensor(1.0), None, ValueError, r"hidden_size=16\], got torch.float32 \(\)"),  # 0-d
        (
            torch.zeros(4, H),
            [[0, 1]] * 4,
            TypeError,
            r"forced_expert_ids must be a torch.Tensor or None, got list",
        ),
        (
            torch.zeros(4, H),
            torch.zeros(4, 3, dtype=torch.long),
            ValueError,
            r"shape \[N=4, top_k=2\].*got \(4, 3\)",
        ),
        (
            torch.zeros(4, H),
            torch.zeros(5, 2, dtype=torch.long),
            ValueError,
            r"shape \[N=4, top_k=2\].*got \(5, 2\)",
        ),
        (  # as many ids as tokens, but not in x's token shape
            torch.zeros(2, 3, H),
            torch.tensor([[[0, 1]] * 2] * 3),
            ValueError,
            r"\[N=6, top_k=2\] or \[\*\[2, 3\], 2\] for x of token shape \[2, 3\], got \(3, 2, 2\)",
        ),
        (torch.zeros(2, 3, H), torch.tensor([0, 1] * 6), ValueError, r"got \(12,\)"),  # flat ids
        (torch.zeros(4, H), torch.zeros(4, 2), ValueError, r"integer dtype, got torch.float32"),
        (torch.zeros(4, H), torch.tensor([[0, 1], [2, 2], [3, 9], [0, 1]]), ValueError, r"row 1 .*repeated"),
        (torch.zeros(4, H), torch.tensor([[0, 1], [2, 3], [3, 8], [0, 1]]), ValueError, r"row 2 .*\[0, 8\)"),
    ],
)
def test_bad_input_raises_naming_the_problem(x, forced, error: type, match: str) -> None:
    moe = make_moe(4, 8, 2, SOFTMAX)
    with pytest.raises(error, match=match):
        moe(x, forced_expert_ids=forced)


def test_bad_constructor_arguments_raise() -> None:
    cfg = mr.MoEConfig(num_experts=4, top_k=1, hidden_size=8, intermediate_size=8)
    with pytest.raises(TypeError, match=r"cfg must be a MoEConfig, got dict"):
        mr.MoE({"num_experts": 4})
    with pytest.raises(ValueError, match=r"backend='cuda-magic' is not registered; registered: \[.*'torch'"):
        mr.MoE(cfg, backend="cuda-magic")
    with pytest.raises(TypeError, match=r"backend must be a str or None, got int"):
        mr.MoE(cfg, backend=1)
