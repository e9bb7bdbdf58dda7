"""mr.QuantMoE: int8/int4 experts against the float layer and against an integer reference.

Shape legend: T tokens, H hidden, I intermediate, E experts, K experts per token, O output
features, D input features, G = D / group_size weight groups.

The reference below quantizes with the formats of ``moe_replay.quantize`` (symmetric, scale =
absmax / qmax, zero rows get scale 1), multiplies the integers in int64, and scales the exact
integer sums: per group by the weight scale, then by the row's activation scale, in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_replay as mr

QMAX = {"int8": 127, "int4": 7}


def make_moe(E: int, K: int, H: int, I: int, seed: int = 0, **kw: object) -> mr.MoE:
    torch.manual_seed(seed)
    return mr.MoE(mr.MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, **kw))


def ref_quantize(w_OD: torch.Tensor, qmax: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 q [O, D], float32 scale [O, G]) with w ≈ q * scale, symmetric per group."""
    O, D = w_OD.shape
    w = w_OD.float().reshape(O, D // group_size, group_size)
    amax = w.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(w / scale.unsqueeze(2)).clamp(-qmax, qmax)
    return q.to(torch.int64).reshape(O, D), scale


def ref_linear(x_nD: torch.Tensor, q_OD: torch.Tensor, scale_OG: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` with x quantized per row to int8 and integer products summed exactly in int64."""
    q_x, scale_n = ref_quantize(x_nD, 127, x_nD.shape[1])
    group = q_OD.shape[1] // scale_OG.shape[1]
    acc = torch.zeros(x_nD.shape[0], q_OD.shape[0], dtype=torch.float64)
    for g in range(scale_OG.shape[1]):
        cols = slice(g * group, (g + 1) * group)
        int_sum_nO = (q_x[:, None, cols] * q_OD[None, :, cols]).sum(dim=2)  # int64, exact
        acc += int_sum_nO.double() * scale_OG[:, g].double()
    return (acc * scale_n.double()).float()


def ref_expert(
    x_nH: torch.Tensor, moe: mr.MoE, e: int, weight_dtype: str, group_size: int | None
) -> torch.Tensor:
    H, I = moe.cfg.hidden_size, moe.cfg.intermediate_size
    qmax = QMAX[weight_dtype]
    q_gu, s_gu = ref_quantize(moe.experts.gate_up_proj[e].detach(), qmax, group_size or H)
    q_dn, s_dn = ref_quantize(moe.experts.down_proj[e].detach(), qmax, group_size or I)
    gate, up = ref_linear(x_nH, q_gu, s_gu).chunk(2, dim=1)
    return ref_linear(F.silu(gate) * up, q_dn, s_dn)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D/2] -> int64 [..., D]: low nibble = even input, high nibble = odd, two's complement."""
    lo, hi = (packed & 0xF).long(), (packed >> 4).long()
    both = torch.stack([lo, hi], dim=-1).flatten(-2)
    return torch.where(both >= 8, both - 16, both)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("weight_dtype", "group_size", "H", "I"),
    [
        ("int8", None, 16, 8),  # one scale per output channel
        ("int4", 8, 16, 8),  # two groups along H, one along I
        ("int4", 2, 6, 4),  # smallest group: many groups per row
    ],
)
def test_stored_integers_match_the_reference_quantizer(
    weight_dtype: str, group_size: int | None, H: int, I: int
) -> None:
    moe = make_moe(4, 2, H, I)
    with torch.no_grad():
        moe.experts.down_proj[1] = 0.0  # an all-zero expert: scale 1, integers 0
    experts = mr.QuantMoE.from_float(moe, weight_dtype=weight_dtype, group_size=group_size).experts
    for name, w in (("gate_up", moe.experts.gate_up_proj), ("down", moe.experts.down_proj)):
        qweight, scale = getattr(experts, f"{name}_qweight"), getattr(experts, f"{name}_scale")
        if weight_dtype == "int4":
            assert qweight.dtype == torch.uint8 and qweight.shape[-1] == w.shape[-1] // 2
            ints = unpack_nibbles(qweight)
        else:
            assert qweight.dtype == torch.int8
            ints = qweight.long()
        for e in range(4):
            q_ref, s_ref = ref_quantize(w[e].detach(), QMAX[weight_dtype], group_size or w.shape[-1])
            assert torch.equal(ints[e], q_ref)
            assert torch.equal(scale[e], s_ref)
    assert torch.equal(experts.down_scale[1], torch.ones_like(experts.down_scale[1]))


@pytest.mark.parametrize(
    ("weight_dtype", "group_size", "H", "I"),
    [
        ("int8", None, 16, 8),  # per-channel int8
        ("int4", 8, 16, 8),  # int4, groups of 8
        ("int4", 2, 6, 4),  # int4, groups of 2 (three scales per gate/up row)
    ],
)
def test_top1_output_equals_integer_reference_exactly(
    weight_dtype: str, group_size: int | None, H: int, I: int
) -> None:
    # top_k = 1 with normalisation: every gate weight is exactly 1, so each output row is one
    # expert's quantized MLP, bit for bit. Forced ids spread tokens; expert 3 stays idle.
    moe = make_moe(4, 1, H, I)
    qmoe = mr.QuantMoE.from_float(moe, weight_dtype=weight_dtype, group_size=group_size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, H, generator=g)
    x[4] = 0.0  # a zero token: activation scale 1
    forced = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1, 1]).unsqueeze(1)
    y, routing = qmoe(x, forced_expert_ids=forced, return_routing=True)
    assert torch.equal(routing.weights, torch.ones(10, 1))
    expected = torch.cat(
        [ref_expert(x[t : t + 1], moe, int(forced[t]), weight_dtype, group_size) for t in range(10)]
    )
    assert torch.equal(y, expected)
    assert not y[4].any()


@pytest.mark.parametrize(("weight_dtype", "group_size"), [("int8", None), ("int4", 4)])
def test_topk_output_matches_integer_reference(weight_dtype: str, group_size: int | None) -> None:
    moe = make_moe(6, 3, 16, 8)
    qmoe = mr.QuantMoE.from_float(moe, weight_dtype=weight_dtype, group_size=group_size)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(2))
    y, routing = qmoe(x, return_routing=True)
    expected = torch.stack(
        [
            sum(
                routing.weights[t, j]
                * ref_expert(x[t : t + 1], moe, int(routing.expert_ids[t, j]), weight_dtype, group_size)[0]
                for j in range(3)
            )
            for t in range(7)
        ]
    )
    # only the float32 weighted sum over K differs in order from the reference
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    ("weight_dtype", "group_size", "bound"),
    [
        # measured relative error ||y_q - y|| / ||y||: int8 0.021 (per-channel weights and per-token
        # activations, each ~0.7% of rms; silu(gate) * up has heavy tails, so its int8 steps are coarser)
        ("int8", None, 0.03),
        # int4 with groups of 32: 0.177; of 128: 0.207 (7 levels per sign: ~8-10% per weight matrix)
        ("int4", 32, 0.22),
        ("int4", 128, 0.25),
    ],
)
def test_close_to_the_float_layer(weight_dtype: str, group_size: int | None, bound: float) -> None:
    moe = make_moe(8, 2, 256, 128)
    qmoe = mr.QuantMoE.from_float(moe, weight_dtype=weight_dtype, group_size=group_size)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, routing = moe(x, return_routing=True)
    y_q, routing_q = qmoe(x, return_routing=True)
    assert torch.equal(routing_q.expert_ids, routing.expert_ids)  # the router is the float router
    assert torch.equal(routing_q.weights, routing.weights)
    assert ((y_q - y).norm() / y.norm()).item() < bound


def test_scales_are_applied_right_dequantized_weights_leave_only_activation_error() -> None:
    # A float MoE holding the dequantized int4 weights differs from QuantMoE only by the int8
    # activation rounding: measured 0.017, against 0.18 for the quantized weights themselves.
    moe = make_moe(8, 2, 256, 128)
    qmoe = mr.QuantMoE.from_float(moe, weight_dtype="int4", group_size=32)
    gate_up, down = qmoe.experts.weights()
    with torch.no_grad():
        moe.experts.gate_up_proj.copy_(gate_up.dequantize())
        moe.experts.down_proj.copy_(down.dequantize())
        x = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
        y = moe(x)
    assert ((qmoe(x) - y).norm() / y.norm()).item() < 0.025


# ----------------------------------------------------------------------------- fp8 (e4m3, 128 x 128 blocks)


def ref_fp8_blocks(w_OD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 e4m3 values [O, D], float32 scale [O / 128, D / 128]): one scale per 128 x 128 block."""
    O, D = w_OD.shape
    blocks = w_OD.float().reshape(O // 128, 128, D // 128, 128)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.double().reshape(O, D), scale


def ref_fp8_linear(x_nD: torch.Tensor, q_OD: torch.Tensor, scale_BG: torch.Tensor) -> torch.Tensor:
    """x quantized per 128 inputs of each row to e4m3; each block's products summed in float64
    (exact), scaled by the row group's and the weight block's scales."""
    n, D = x_nD.shape
    groups = x_nD.float().reshape(n, D // 128, 128)
    amax = groups.abs().amax(dim=2)
    sx = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    q_x = (groups / sx[:, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).double().reshape(n, D)
    sw_OG = scale_BG.repeat_interleave(128, dim=0).double()
    acc = torch.zeros(n, q_OD.shape[0], dtype=torch.float64)
    for g in range(D // 128):
        cols = slice(g * 128, (g + 1) * 128)
        acc += (q_x[:, cols] @ q_OD[:, cols].T) * sx[:, g : g + 1].double() * sw_OG[:, g]
    return acc.float()


def test_fp8_stored_blocks_match_the_reference_quantizer() -> None:
    moe = make_moe(3, 1, 256, 128)
    with torch.no_grad():
        moe.experts.down_proj[1, 128:, :] = 0.0  # an all-zero block: scale 1
    experts = mr.QuantMoE.from_float(moe, weight_dtype="fp8").experts
    assert experts.gate_up_qweight.dtype == torch.float8_e4m3fn
    assert experts.gate_up_scale.shape == (3, 2, 2) and experts.down_scale.shape == (3, 2, 1)
    for name, w in (("gate_up", moe.experts.gate_up_proj), ("down", moe.experts.down_proj)):
        for e in range(3):
            q_ref, s_ref = ref_fp8_blocks(w[e].detach())
            assert torch.equal(getattr(experts, f"{name}_qweight")[e].double(), q_ref)
            assert torch.equal(getattr(experts, f"{name}_scale")[e], s_ref)
    assert experts.down_scale[1, 1, 0] == 1.0


def test_fp8_top1_output_equals_the_block_reference_exactly() -> None:
    moe = make_moe(4, 1, 128, 256)
    qmoe = mr.QuantMoE.from_float(moe, weight_dtype="fp8")
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(5))
    x[2] = 0.0  # a zero token: scale 1
    forced = torch.tensor([[0], [1], [2], [0], [3], [1]])
    y = qmoe(x, forced_expert_ids=forced)
    expected = []
    for t in range(6):
        e = int(forced[t])
        q_gu, s_gu = ref_fp8_blocks(moe.experts.gate_up_proj[e].detach())
        q_dn, s_dn = ref_fp8_blocks(moe.experts.down_proj[e].detach())
        gate, up = ref_fp8_linear(x[t : t + 1], q_gu, s_gu).chunk(2, dim=1)
        expected.append(ref_fp8_linear(F.silu(gate) * up, q_dn, s_dn))
    assert torch.equal(y, torch.cat(expected))
    assert not y[2].any()


def test_fp8_close_to_the_float_layer() -> None:
    # measured relative error 0.065 (int8 per channel: 0.021): e4m3 keeps 3 mantissa bits, a
    # relative rounding of up to 2**-4 on every weight and activation, in both GEMMs
    moe = make_moe(8, 2, 256, 128)
    qmoe = mr.QuantMoE.from_float(moe, weight_dtype="fp8")
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = moe(x)
    assert ((qmoe(x) - y).norm() / y.norm()).item() < 0.08


# ----------------------------------------------------------------------------- replay and shapes


def test_forced_ids_and_replay_work() -> None:
    moe = make_moe(8, 2, 16, 8)
    qmoe = mr.QuantMoE.from_float(moe, weight_dtype="int8")
    x = torch.randn(2, 5, 16)
    forced = torch.full((2, 5, 2), -1)
    forced[:, :, 1] = 7
    y, routing = qmoe(x, forced_expert_ids=forced, return_routing=True)
    assert y.shape == x.shape and routing.expert_ids.shape == (2, 5, 2)
    assert (routing.expert_ids[..., 1] == 7).all() and (routing.expert_ids[..., 0] != 7).all()
    with torch.no_grad():
        _, routing_float = moe(x, forced_expert_ids=forced, return_routing=True)
    assert torch.equal(routing.expert_ids, routing_float.expert_ids)
    # forcing its own ids changes nothing
    y_own = qmoe(x, forced_expert_ids=routing.expert_ids)
    assert torch.equal(y_own, y)
    # record on the float layer, replay on the quantized one
    x2 = torch.randn(2, 5, 16)
    with torch.no_grad(), mr.record(moe) as trace:
        moe(x2, forced_expert_ids=forced)
    with mr.replay(qmoe, trace):
        _, replayed = qmoe(x2, return_routing=True)
    assert torch.equal(replayed.expert_ids.long(), trace[""].long())


@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 16), (1, 16)])  # no tokens (flat, batched); one token
def test_token_counts(shape: tuple[int, ...]) -> None:
    qmoe = mr.QuantMoE.from_float(make_moe(4, 2, 16, 8), weight_dtype="int4", group_size=8)
    y = qmoe(torch.randn(*shape))
    assert y.shape == shape


def test_low_precision_input_keeps_its_dtype() -> None:
    moe = make_moe(4, 2, 16, 8)
    qmoe = mr.QuantMoE.from_float(moe, weight_dtype="int8")
    x = torch.randn(5, 16)
    y_bf16 = qmoe(x.bfloat16())
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), qmoe(x.bfloat16().float()), atol=1e-2, rtol=2**-7)


def test_from_float_keeps_config_router_and_bias() -> None:
    moe = make_moe(8, 2, 16, 8, scoring="sigmoid", n_group=4, topk_group=2, score_bias=True)
    with torch.no_grad():
        moe.router.bias.copy_(torch.linspace(-0.2, 0.2, 8))
    qmoe = mr.QuantMoE.from_float(moe, weight_dtype="int4", group_size=4)
    assert qmoe.cfg == moe.cfg
    assert torch.equal(qmoe.router.weight, moe.router.weight)
    assert torch.equal(qmoe.router.bias, moe.router.bias)
    assert not any(p.requires_grad for p in qmoe.parameters())
    text = repr(qmoe)
    assert "weight_dtype=int4" in text and "gate_up_group_size=4" in text and "n_group=4" in text


# ----------------------------------------------------------------------------- inference only, bad args


def test_asking_for_gradients_raises() -> None:
    qmoe = mr.QuantMoE.from_float(make_moe(4, 2, 16, 8), weight_dtype="int8")
    x = torch.randn(3, 16, requires_grad=True)
    with pytest.raises(ValueError, match=r"QuantMoE is inference-only.*x with requires_grad=True"):
        qmoe(x)
    with torch.no_grad():
        assert qmoe(x).shape == (3, 16)  # fine without autograd
    qmoe.router.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"inference-only.*router.weight with requires_grad=True"):
        qmoe(x.detach())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"weight_dtype": "int2"},
            ValueError,
            r"weight_dtype must be one of \('int8', 'int4', 'fp8'\), got 'int2'",
        ),
        ({"weight_dtype": "int8", "group_size": 8}, ValueError, r"group_size must be None, got 8"),
        ({"weight_dtype": "int4"}, ValueError, r"int4 weights need group_size .*got None"),
        ({"weight_dtype": "int4", "group_size": 0}, ValueError, r"positive even number for int4, got 0"),
        ({"weight_dtype": "int4", "group_size": 3}, ValueError, r"positive even number for int4, got 3"),
        (
            {"weight_dtype": "int4", "group_size": 16},
            ValueError,
            r"group_size=16 must divide intermediate_size=8",
        ),
        (
            {"weight_dtype": "int4", "group_size": 8.0},
            TypeError,
            r"group_size must be an int or None, got float",
        ),
        (
            {"weight_dtype": "fp8", "group_size": 128},
            ValueError,
            r"128 x 128 blocks; group_size must be None, got 128",
        ),
        (
            {"weight_dtype": "int4", "group_size": True},
            TypeError,
            r"group_size must be an int or None, got bool",
        ),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    moe = make_moe(4, 2, 16, 8)
    with pytest.raises(error, match=match):
        mr.QuantMoE.from_float(moe, **kwargs)


@pytest.mark.parametrize(
    ("name", "value"),
    [("gate_up_proj", float("nan")), ("down_proj", float("inf")), ("down_proj", float("-inf"))],
)
def test_non_finite_weights_raise(name: str, value: float) -> None:
    moe = make_moe(4, 2, 16, 8)
    with torch.no_grad():
        getattr(moe.experts, name)[2, 1, 3] = value
    with pytest.raises(ValueError, match=rf"moe.experts.{name} has non-finite values .* experts \[2\]"):
        mr.QuantMoE.from_float(moe, weight_dtype="int8")


def test_fp8_needs_sizes_in_blocks_of_128() -> None:
    with pytest.raises(ValueError, match=r"fp8 weights need hidden_size to be a multiple of 128, got 16"):
        mr.QuantMoE.from_float(make_moe(4, 2, 16, 128), weight_dtype="fp8")
    with pytest.raises(
        ValueError, match=r"fp8 weights need intermediate_size to be a multiple of 128, got 8"
    ):
        mr.QuantMoE.from_float(make_moe(4, 2, 128, 8), weight_dtype="fp8")


def test_from_float_needs_a_moe() -> None:
    with pytest.raises(TypeError, match=r"moe must be a moe_replay.MoE, got Linear"):
        mr.QuantMoE.from_float(torch.nn.Linear(4, 4))
