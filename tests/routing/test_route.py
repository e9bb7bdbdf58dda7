"""route(): selection, forcing, weights and validation against a naive per-row reference.

The reference below is written from docs/routing.md with Python loops. It takes the
float32 scores (``softmax(logits.float())`` / ``sigmoid``, plus bias, elementwise) from torch so both
rank exactly the same numbers, and re-implements everything that is logic: group limiting, top-k
with ties to the lower index, forced slots, filling free slots. Weights are recomputed in float64.

Without a bias the router ranks the float32 logits themselves: softmax and sigmoid are monotonic,
so this is the top-k of the scores, and it keeps two distinct logits apart where their scores round
to the same float32 (sigmoid(17) == sigmoid(20) == 1.0). Group scores are always built from scores.
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_replay as mr
from moe_replay.backends.registry import available_backends

# float32 weights vs the float64 formula: a few ulps of float32 softmax/sigmoid and one division.
WEIGHT_TOL = {"atol": 2e-6, "rtol": 2e-5}


def cfg_of(E: int, K: int, **kw: object) -> mr.MoEConfig:
    return mr.MoEConfig(num_experts=E, top_k=K, hidden_size=4, intermediate_size=4, **kw)


# ----------------------------------------------------------------------------- naive reference


def naive_selection_scores(logits: torch.Tensor, cfg: mr.MoEConfig, bias: torch.Tensor | None) -> list[list]:
    """Per row: the float32 values the router ranks, as Python floats, -inf outside the kept groups."""
    l32 = logits.float()
    scores = torch.softmax(l32, dim=1) if cfg.scoring == "softmax" else torch.sigmoid(l32)
    if bias is not None:
        scores = scores + bias.float()
    ranked = scores if bias is not None else l32
    rows = []
    for score_row, row in zip(scores.tolist(), ranked.tolist()):
        if cfg.n_group is not None:
            S = cfg.experts_per_group
            group_scores = []
            for g in range(cfg.n_group):
                best = sorted(score_row[g * S : (g + 1) * S], reverse=True)[:2]
                # the sum of the two best, rounded to float32 as the library adds float32 tensors
                group_scores.append(float(np.float32(best[0]) + np.float32(best[1] if S > 1 else 0.0)))
            kept = sorted(range(cfg.n_group), key=lambda g: (-group_scores[g], g))[: cfg.topk_group]
            row = [s if e // S in kept else -math.inf for e, s in enumerate(row)]
        rows.append(row)
    return rows


def naive_ids(select_rows: list[list], K: int, forced: torch.Tensor | None) -> list[list[int]]:
    out = []
    for t, row in enumerate(select_rows):
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))  # descending, ties to lower index
        slots = forced[t].tolist() if forced is not None else [-1] * K
        taken = {e for e in slots if e >= 0}
        remaining = iter(e for e in order if e not in taken)
        out.append([e if e >= 0 else next(remaining) for e in slots])
    return out


def naive_weights(logits: torch.Tensor, ids: list[list[int]], cfg: mr.MoEConfig) -> torch.Tensor:
    l64 = logits.double()
    scores = torch.softmax(l64, dim=1) if cfg.scoring == "softmax" else torch.sigmoid(l64)
    w = torch.tensor([[scores[t, e].item() for e in row] for t, row in enumerate(ids)], dtype=torch.float64)
    w = w.reshape(len(ids), cfg.top_k)
    if cfg.norm_topk_prob:
        w = w / w.sum(dim=1, keepdim=True)
    return w * cfg.routed_scaling_factor


def naive_route(
    logits: torch.Tensor,
    cfg: mr.MoEConfig,
    forced: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    ids = naive_ids(naive_selection_scores(logits, cfg, bias), cfg.top_k, forced)
    return ids, naive_weights(logits, ids, cfg)


# ----------------------------------------------------------------------------- property tests


@st.composite
def routing_cases(draw: st.DrawFn) -> tuple:
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    kw: dict = {
        "scoring": draw(st.sampled_from(["softmax", "sigmoid"])),
        "norm_topk_prob": draw(st.booleans()),
        "score_bias": draw(st.booleans()),
        "routed_scaling_factor": draw(st.sampled_from([1.0, 2.5])),
    }
    if draw(st.booleans()):
        n_group = draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0]))
        min_groups = -(-K // (E // n_group))
        kw.update(n_group=n_group, topk_group=draw(st.integers(min_groups, n_group)))
    cfg = cfg_of(E, K, **kw)
    T = draw(st.integers(0, 6))
    # logits from a drawn seed (drawing T*E floats one by one is slow); a coarse integer grid makes
    # exact ties common (tie-breaking), a wide normal makes everything else
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        logits = torch.randint(-3, 4, (T, E), generator=g).float()
    else:
        logits = 6 * torch.randn(T, E, generator=g)
    bias = 0.5 * torch.randn(E, generator=g) if cfg.score_bias else None
    full_rows, rows = [], []
    for _ in range(T):
        experts = draw(st.permutations(range(E)))[:K]
        keep = draw(st.lists(st.booleans(), min_size=K, max_size=K))
        full_rows.append(experts)
        rows.append([e if k else -1 for e, k in zip(experts, keep)])
    forced = torch.tensor(rows, dtype=torch.int64).reshape(T, K)
    full = torch.tensor(full_rows, dtype=torch.int64).reshape(T, K)
    return cfg, logits, bias, forced, full


@settings(max_examples=150, deadline=None)
@given(routing_cases())
def test_route_matches_naive_reference(case: tuple) -> None:
    cfg, logits, bias, forced, _ = case
    r = mr.route(logits, cfg, forced_expert_ids=forced, bias=bias)
    T, K = forced.shape
    assert r.expert_ids.dtype == torch.int32 and r.weights.dtype == torch.float32
    assert r.expert_ids.shape == (T, K) and r.weights.shape == (T, K)
    ids = r.expert_ids.long()
    # every row: K distinct experts in [0, E)
    assert ((ids >= 0) & (ids < cfg.num_experts)).all()
    assert all(len(set(row)) == K for row in ids.tolist())
    # every forced slot kept
    is_forced = forced >= 0
    assert torch.equal(ids[is_forced], forced[is_forced])
    # free slots: the router's best remaining experts, in order; weights: the formula
    expected_ids, expected_w = naive_route(logits, cfg, forced, bias)
    assert ids.tolist() == expected_ids
    torch.testing.assert_close(r.weights.double(), expected_w, **WEIGHT_TOL)


@pytest.mark.skipif(
    "triton" not in available_backends("cpu"), reason="no Triton, or not under TRITON_INTERPRET=1"
)
@settings(max_examples=40, deadline=None)
@given(routing_cases())
def test_triton_route_matches_naive_reference(case: tuple) -> None:
    """The Triton kernel (packed-key top-k, replayed blocks skipping selection) against the same
    naive loop, on the same drawn cases: ties, groups, bias, partial and full forcing."""
    cfg, logits, bias, forced, full = case
    for ids_forced in (forced, full, None):
        r = mr.route(logits, cfg, forced_expert_ids=ids_forced, bias=bias, backend="triton")
        expected_ids, expected_w = naive_route(logits, cfg, ids_forced, bias)
        assert r.expert_ids.long().tolist() == expected_ids
        torch.testing.assert_close(r.weights.double(), expected_w.reshape(r.weights.shape), **WEIGHT_TOL)


@settings(max_examples=100, deadline=None)
@given(routing_cases())
def test_all_free_slots_equal_no_forcing(case: tuple) -> None:
    cfg, logits, bias, forced, _ = case
    free = mr.route(logits, cfg, forced_expert_ids=torch.full_like(forced, -1), bias=bias)
    unforced = mr.route(logits, cfg, bias=bias)
    assert torch.equal(free.expert_ids, unforced.expert_ids)
    assert torch.equal(free.weights, unforced.weights)


@settings(max_examples=100, deadline=None)
@given(routing_cases())
def test_forcing_the_routers_own_ids_changes_nothing(case: tuple) -> None:
    cfg, logits, bias, _, _ = case
    own = mr.route(logits, cfg, bias=bias)
    forced = mr.route(logits, cfg, forced_expert_ids=own.expert_ids, bias=bias)
    assert torch.equal(forced.expert_ids, own.expert_ids)
    assert torch.equal(forced.weights, own.weights)


@settings(max_examples=100, deadline=None)
@given(routing_cases())
def test_full_rows_are_exactly_the_forced_ids(case: tuple) -> None:
    """The seed's semantics for full rows: softmax(logits) gathered at the forced ids, renormalised."""
    cfg, logits, _, _, full = case
    cfg = cfg_of(cfg.num_experts, cfg.top_k)  # softmax, norm_topk_prob
    r = mr.route(logits, cfg, forced_expert_ids=full)
    assert torch.equal(r.expert_ids.long(), full)
    p = torch.softmax(logits.double(), dim=1).gather(1, full)
    torch.testing.assert_close(r.weights.double(), p / p.sum(dim=1, keepdim=True), **WEIGHT_TOL)


# ----------------------------------------------------------------------------- worked examples


def test_free_slots_skip_forced_experts_instead_of_duplicating() -> None:
    # Router order 3 > 5 > 1 > ... The seed filled slot 0 with the router's slot-0 choice (3), giving
    # [3, 3]; the free slot must take the best expert not already forced in the row.
    logits = torch.tensor([[0.0, 1.0, -1.0, 3.0, -2.0, 2.0]])
    cfg = cfg_of(6, 2)
    r = mr.route(logits, cfg, forced_expert_ids=torch.tensor([[-1, 3]]))
    assert r.expert_ids.tolist() == [[5, 3]]
    r = mr.route(logits, cfg, forced_expert_ids=torch.tensor([[0, -1]]))
    assert r.expert_ids.tolist() == [[0, 3]]  # the seed would have used slot 1's choice (5) here


def test_free_slots_are_filled_in_slot_order() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    r = mr.route(logits, cfg_of(6, 4), forced_expert_ids=torch.tensor([[-1, 1, -1, -1]]))
    assert r.expert_ids.tolist() == [[0, 1, 2, 3]]
    r = mr.route(logits, cfg_of(6, 4), forced_expert_ids=torch.tensor([[-1, 5, -1, 0]]))
    assert r.expert_ids.tolist() == [[1, 5, 2, 0]]


def test_ties_break_to_the_lower_expert_index() -> None:
    logits = torch.zeros(2, 8)
    r = mr.route(logits, cfg_of(8, 3))
    assert r.expert_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    r = mr.route(logits, cfg_of(8, 3), forced_expert_ids=torch.tensor([[-1, 0, -1], [6, -1, -1]]))
    assert r.expert_ids.tolist() == [[1, 0, 2], [6, 0, 1]]


def test_bias_steers_selection_but_not_weights() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    cfg = cfg_of(4, 2, scoring="sigmoid", score_bias=True, norm_topk_prob=False)
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])  # lifts expert 3 from last to first
    r = mr.route(logits, cfg, bias=bias)
    assert r.expert_ids.tolist() == [[3, 0]]
    torch.testing.assert_close(r.weights, torch.sigmoid(logits[:, [3, 0]]))


def test_group_score_is_the_sum_of_the_two_best() -> None:
    # sigmoid scores: group 0 = [0.9, 0.05, ...] (best single expert, sum 0.95),
    # group 1 = [0.6, 0.6] (sum 1.2). One group kept: group 1, although expert 0 scores highest.
    probs = torch.tensor([[0.9, 0.05, 0.6, 0.6, 0.1, 0.1]])
    logits = torch.logit(probs)
    cfg = cfg_of(6, 2, scoring="sigmoid", n_group=3, topk_group=1)
    r = mr.route(logits, cfg)
    assert r.expert_ids.tolist() == [[2, 3]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.5, 0.5]]))


def test_forced_expert_outside_the_kept_groups_is_kept() -> None:
    probs = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.3, 0.4]])
    cfg = cfg_of(6, 2, scoring="sigmoid", n_group=3, topk_group=1)
    r = mr.route(torch.logit(probs), cfg, forced_expert_ids=torch.tensor([[-1, 4]]))
    assert r.expert_ids.tolist() == [[0, 4]]  # the free slot comes from kept group 0 only


def test_routed_scaling_factor_multiplies_weights() -> None:
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    plain = mr.route(logits, cfg_of(8, 2))
    scaled = mr.route(logits, cfg_of(8, 2, routed_scaling_factor=2.5))
    assert torch.equal(plain.expert_ids, scaled.expert_ids)
    torch.testing.assert_close(scaled.weights, 2.5 * plain.weights)


@pytest.mark.parametrize("T", [0, 1])  # no tokens; a single token
@pytest.mark.parametrize("grouped", [False, True])
def test_tiny_token_counts(T: int, grouped: bool) -> None:
    kw = {"n_group": 2, "topk_group": 1} if grouped else {}
    cfg = cfg_of(4, 2, **kw)
    logits = torch.randn(T, 4, requires_grad=True)
    for forced in (None, torch.full((T, 2), -1)):
        r = mr.route(logits, cfg, forced_expert_ids=forced)
        assert r.expert_ids.shape == (T, 2) and r.weights.shape == (T, 2)
        r.weights.sum().backward()
        assert logits.grad.shape == (T, 4)


def test_low_precision_logits_are_scored_in_float32() -> None:
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    r = mr.route(logits, cfg_of(8, 2))
    ref = mr.route(logits.float(), cfg_of(8, 2))
    assert torch.equal(r.expert_ids, ref.expert_ids) and r.weights.dtype == torch.float32
    assert torch.equal(r.weights, ref.weights)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_any_integer_dtype_of_forced_ids(dtype: torch.dtype) -> None:
    logits = torch.randn(3, 8)
    forced = torch.tensor([[7, -1], [-1, -1], [2, 5]], dtype=dtype)
    r = mr.route(logits, cfg_of(8, 2), forced_expert_ids=forced)
    assert r.expert_ids[0, 0] == 7 and r.expert_ids[2].tolist() == [2, 5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_forced_ids_on_another_device_are_moved() -> None:
    logits = torch.randn(3, 8)
    forced = torch.tensor([[7, -1], [-1, -1], [2, 5]])  # stays on the CPU
    r = mr.route(logits.cuda(), cfg_of(8, 2), forced_expert_ids=forced, backend="torch")
    assert r.expert_ids.device.type == "cuda"
    assert torch.equal(
        r.expert_ids.cpu(), mr.route(logits, cfg_of(8, 2), forced_expert_ids=forced).expert_ids
    )


# ----------------------------------------------------------------------------- gradients


CONFIGS = [
    {},  # softmax, normalised (Qwen3-MoE, Mixtral)
    {"norm_topk_prob": False},  # softmax, not normalised (OLMoE)
    {"scoring": "sigmoid"},  # sigmoid, normalised
    {"scoring": "sigmoid", "norm_topk_prob": False, "routed_scaling_factor": 2.5},  # sigmoid, raw, scaled
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("replayed", [False, True])
def test_weight_gradients_match_float64_formula(kw: dict, replayed: bool) -> None:
    g = torch.Generator().manual_seed(2)
    cfg = cfg_of(8, 3, **kw)
    logits = torch.randn(6, 8, generator=g, dtype=torch.float64)
    forced = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(6)]) if replayed else None
    ids, _ = naive_route(logits, cfg, forced)
    ids_t = torch.tensor(ids)
    upstream = torch.randn(6, 3, generator=g, dtype=torch.float64)

    l32 = logits.float().requires_grad_()
    r = mr.route(l32, cfg, forced_expert_ids=forced)
    assert r.expert_ids.long().tolist() == ids
    (r.weights.double() * upstream).sum().backward()

    l64 = logits.clone().requires_grad_()
    scores = torch.softmax(l64, 1) if cfg.scoring == "softmax" else torch.sigmoid(l64)
    w = scores.gather(1, ids_t)
    if cfg.norm_topk_prob:
        w = w / w.sum(1, keepdim=True)
    ((w * cfg.routed_scaling_factor) * upstream).sum().backward()
    torch.testing.assert_close(l32.grad.double(), l64.grad, atol=1e-6, rtol=1e-5)
    assert l32.grad.abs().sum() > 0  # replayed or not, the router learns


@pytest.mark.parametrize("kw", CONFIGS)
def test_replayed_experts_with_underflowing_probability_stay_finite(kw: dict) -> None:
    # Logit gaps of hundreds: softmax/sigmoid of the replayed experts underflow to exactly 0 in float32.
    logits = torch.tensor([[400.0, 0.0, -300.0, -700.0, 1.0, 2.0]], requires_grad=True)
    cfg = cfg_of(6, 2, **kw)
    for forced in ([[2, 3]], [[3, -1]], [[0, 3]]):  # both underflow; one; the best next to the worst
        r = mr.route(logits, cfg, forced_expert_ids=torch.tensor(forced))
        (r.weights * torch.tensor([[1.0, -2.0]])).sum().backward()
        assert torch.isfinite(r.weights).all(), (forced, r.weights)
        assert torch.isfinite(logits.grad).all(), (forced, logits.grad)
        logits.grad = None
    # softmax + normalisation of two underflowing experts: softmax of their gathered logits
    if cfg.scoring == "softmax" and cfg.norm_topk_prob:
        r = mr.route(logits, cfg, forced_expert_ids=torch.tensor([[2, 3]]))
        torch.testing.assert_close(r.weights, torch.softmax(torch.tensor([[-300.0, -700.0]]), 1))


# ----------------------------------------------------------------------------- bad input


LOGITS = torch.randn(4, 8)


@pytest.mark.parametrize(
    ("forced", "match"),
    [
        (torch.zeros(4, 2), r"forced_expert_ids must have an integer dtype, got torch.float32"),
        (torch.zeros(4, 2, dtype=torch.bool), r"integer dtype, got torch.bool"),
        (torch.zeros(4, 3, dtype=torch.long), r"shape \[T=4, top_k=2\], got \(4, 3\)"),  # wrong k
        (torch.zeros(5, 2, dtype=torch.long), r"shape \[T=4, top_k=2\], got \(5, 2\)"),  # wrong T
        (torch.zeros(8, dtype=torch.long), r"shape \[T=4, top_k=2\], got \(8,\)"),  # flat
        (
            torch.tensor([[0, 1], [2, 3], [-2, 1], [9, 1]]),
            r"row 2 holds \[-2, 1\].*-1 \(free\) or in \[0, 8\)",
        ),
        (torch.tensor([[0, 1], [8, 3], [4, 4], [0, 1]]), r"row 1 holds \[8, 3\].*in \[0, 8\)"),  # == E
        (torch.tensor([[0, 1], [2, 3], [4, 4], [5, 5]]), r"row 2 holds \[4, 4\]: an expert is repeated"),
    ],
)
def test_bad_forced_ids_raise_naming_the_problem(forced: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mr.route(LOGITS, cfg_of(8, 2), forced_expert_ids=forced)


def test_repeated_free_slots_are_not_repeats() -> None:
    r = mr.route(LOGITS, cfg_of(8, 3), forced_expert_ids=torch.tensor([[-1, -1, 2]] * 4))
    assert all(len(set(row)) == 3 for row in r.expert_ids.tolist())


def test_validate_false_never_indexes_out_of_bounds() -> None:
    # Result unspecified for invalid rows, but the reference must not crash on them.
    forced = torch.tensor([[8, 1], [-5, 1], [100, -1], [0, 1]])
    r = mr.route(LOGITS, cfg_of(8, 2), forced_expert_ids=forced, validate=False)
    assert ((r.expert_ids >= 0) & (r.expert_ids < 8)).all()
    assert r.expert_ids[3].tolist() == [0, 1]  # the valid row is routed as usual


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"logits": [[0.0] * 8]}, TypeError, r"logits must be a torch.Tensor, got list"),
        ({"logits": torch.zeros(4, 8, dtype=torch.long)}, ValueError, r"logits must be a floating-point"),
        ({"logits": torch.zeros(4, 7)}, ValueError, r"shape \[T, num_experts=8\], got \(4, 7\)"),
        ({"logits": torch.zeros(2, 4, 8)}, ValueError, r"shape \[T, num_experts=8\], got \(2, 4, 8\)"),
        ({"cfg": {"num_experts": 8}}, TypeError, r"cfg must be a MoEConfig, got dict"),
        ({"bias": torch.zeros(8)}, ValueError, r"bias was given but MoEConfig.score_bias is False"),
        (
            {"forced_expert_ids": [[0, 1]] * 4},
            TypeError,
            r"forced_expert_ids must be a torch.Tensor, got list",
        ),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    args = {"logits": LOGITS, "cfg": cfg_of(8, 2), **kwargs}
    with pytest.raises(error, match=match):
        mr.route(**args)


@pytest.mark.parametrize(
    ("bias", "match"),
    [
        (None, r"bias is required when MoEConfig.score_bias is True, got None"),
        (torch.zeros(7), r"bias must be a floating-point tensor of shape \[8\], got torch.float32 \(7,\)"),
        (
            torch.zeros(8, dtype=torch.long),
            r"bias must be a floating-point tensor of shape \[8\], got torch.int64",
        ),
    ],
)
def test_bad_bias_raises(bias: torch.Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mr.route(LOGITS, cfg_of(8, 2, score_bias=True), bias=bias)


# ----------------------------------------------------------------------------- checks without a sync

DEVICE_CHECK_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
))]  # fmt: skip


def naive_bad_rows(forced: torch.Tensor, E: int) -> list[int]:
    """The rows a validating loop would refuse: an id outside [-1, E) or an expert twice."""
    bad = []
    for t, row in enumerate(forced.tolist()):
        chosen = [e for e in row if e >= 0]
        if any(e < -1 or e >= E for e in row) or len(set(chosen)) != len(chosen):
            bad.append(t)
    return bad


@pytest.mark.parametrize("backend", DEVICE_CHECK_BACKENDS)
@pytest.mark.parametrize(
    "bad",
    [
        {},  # every row valid: the same routing as a host-checked call
        {3: [5, 5, -1]},  # a repeat
        {1: [0, 9, -1], 6: [2, 2, 2]},  # out of range first, a repeat later
        {0: [-2, 1, 2]},  # below -1, in the first row
    ],
)
def test_device_check_poisons_bad_rows_and_raises_later(backend, bad):
    from moe_replay.backends.registry import get_backend

    route_mod = importlib.import_module("moe_replay.routing.route")

    cfg = mr.MoEConfig(num_experts=8, top_k=3, hidden_size=4, intermediate_size=4)
    T = 9
    logits = torch.randn(T, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    forced = torch.full((T, 3), -1, dtype=torch.int32)
    forced[:, 0] = torch.arange(T) % 8
    for row, ids in bad.items():
        forced[row] = torch.tensor(ids)
    expected_bad = naive_bad_rows(forced, 8)
    assert expected_bad == sorted(bad)
    good = [t for t in range(T) if t not in expected_bad]
    reference = mr.route(logits.detach()[good], cfg, forced[good], backend="torch")
    impl = get_backend(backend, "cpu")
    for raised_by in ("backward", "next route call"):
        r = route_mod.route_checked_on_device(impl, logits, cfg, forced, None)
        nan_rows = r.weights.isnan().any(dim=1).nonzero().flatten().tolist()
        assert nan_rows == expected_bad
        assert torch.equal(r.expert_ids[good], reference.expert_ids)
        torch.testing.assert_close(r.weights[good].detach(), reference.weights)
        if not expected_bad:
            r.weights.sum().backward()  # no error anywhere
            mr.route(logits.detach(), cfg)
            return
        message = rf"forced_expert_ids row {expected_bad[0]} holds"
        with pytest.raises(ValueError, match=message):
            if raised_by == "backward":  # before gradients flow
                r.weights.sum().backward()
            else:
                mr.route(logits.detach(), cfg)
        mr.route(logits.detach(), cfg)  # raised once, then done


def test_validate_none_checks_on_the_host_on_the_cpu_and_false_checks_nothing():
    cfg = mr.MoEConfig(num_experts=8, top_k=2, hidden_size=4, intermediate_size=4)
    logits = torch.randn(3, 8)
    forced = torch.tensor([[0, 1], [2, 2], [-1, -1]])
    with pytest.raises(ValueError, match="row 1 holds"):
        mr.route(logits, cfg, forced, validate=None)
    assert mr.route(logits, cfg, forced, validate=False).expert_ids.shape == (3, 2)
    with pytest.raises(TypeError, match="validate must be True, False or None"):
        mr.route(logits, cfg, forced, validate="yes")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_forward_with_forced_ids_needs_no_sync_and_captures_in_a_cuda_graph():
    cfg = mr.MoEConfig(num_experts=16, top_k=4, hidden_size=64, intermediate_size=32)
    moe = mr.MoE(cfg, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    forced = torch.stack([torch.randperm(16, device="cuda")[:4] for _ in range(32)]).int()
    forced[::3, 1] = -1
    torch.cuda.synchronize()
    with torch.no_grad():
        y_checked = moe(x, forced_expert_ids=forced, validate=True)
        moe(x, forced_expert_ids=forced)  # allocates the thread's pinned check flags, once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation below raises
        try:
            moe(x, forced_expert_ids=forced)
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                moe(x, forced_expert_ids=forced)  # warm-up on the capture stream
                with torch.cuda.graph(graph, stream=stream):
                    y_graph = moe(x, forced_expert_ids=forced)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(y_graph, y_checked, rtol=0, atol=0)
    bad = forced.clone()
    bad[5, 2] = bad[5, 0]
    with torch.no_grad():
        y = moe(x, forced_expert_ids=bad)
        torch.cuda.synchronize()
        assert y[5].isnan().all() and not y[:5].isnan().any()
        with pytest.raises(ValueError, match="row 5 holds"):
            moe(x)
