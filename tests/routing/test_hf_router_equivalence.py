"""mr.route against the routers of Hugging Face transformers 5.x, on random weights.

For each family the HF router gives (logits, weights, ids); ``mr.route`` on the same logits with
the matching ``MoEConfig`` must pick the same experts (as sets: HF's ``topk(sorted=False)`` order
is unspecified) with the same weights. Random float weights make exact ties improbable.
"""

from __future__ import annotations

import pytest
import torch

import moe_replay as mr

transformers = pytest.importorskip("transformers")  # the [hf] extra

from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, MixtralTopKRouter  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import (  # noqa: E402
    Qwen3MoeSparseMoeBlock,
    Qwen3MoeTopKRouter,
)

H, T = 32, 64


def by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert id, so routings are compared as sets of (expert, weight)."""
    order = ids.long().argsort(dim=1)
    return ids.long().gather(1, order), weights.float().gather(1, order)


def assert_same_routing(hf_ids: torch.Tensor, hf_weights: torch.Tensor, routing: mr.Routing) -> None:
    ids_a, w_a = by_expert(hf_ids, hf_weights)
    ids_b, w_b = by_expert(routing.expert_ids, routing.weights)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(w_b, w_a, atol=1e-6, rtol=1e-5)


def randomise(module: torch.nn.Module, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=H**-0.5)
    return torch.randn(T, H)


def router_cases() -> list:
    cfg = transformers.Qwen3MoeConfig
    return [
        # Qwen3-MoE: softmax, top-k renormalised
        pytest.param(
            Qwen3MoeTopKRouter,
            cfg(num_experts=16, num_experts_per_tok=4, hidden_size=H, norm_topk_prob=True),
            {"num_experts": 16, "top_k": 4},
            id="qwen3_moe",
        ),
        # Qwen3-MoE with norm_topk_prob=False (its config default)
        pytest.param(
            Qwen3MoeTopKRouter,
            cfg(num_experts=16, num_experts_per_tok=4, hidden_size=H, norm_topk_prob=False),
            {"num_experts": 16, "top_k": 4, "norm_topk_prob": False},
            id="qwen3_moe_unnormalised",
        ),
        # OLMoE: softmax, not renormalised
        pytest.param(
            OlmoeTopKRouter,
            transformers.OlmoeConfig(
                num_experts=64, num_experts_per_tok=8, hidden_size=H, norm_topk_prob=False
            ),
            {"num_experts": 64, "top_k": 8, "norm_topk_prob": False},
            id="olmoe",
        ),
        # Mixtral: softmax, top-2, always renormalised
        pytest.param(
            MixtralTopKRouter,
            transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, hidden_size=H),
            {"num_experts": 8, "top_k": 2},
            id="mixtral",
        ),
    ]


@pytest.mark.parametrize(("router_cls", "hf_config", "cfg_kw"), router_cases())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_softmax_routers(router_cls: type, hf_config: object, cfg_kw: dict, seed: int) -> None:
    router = router_cls(hf_config)
    x = randomise(router, seed)
    with torch.no_grad():
        logits, weights, ids = router(x)
    cfg = mr.MoEConfig(hidden_size=H, intermediate_size=8, **cfg_kw)
    assert_same_routing(ids, weights, mr.route(logits, cfg))
    # the same through mr.MoE's own float32 router holding the HF router weight
    moe = mr.MoE(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(router.weight)
        _, routing = moe(x, return_routing=True)
    assert_same_routing(ids, weights, routing)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deepseek_v3_router(norm_topk_prob: bool, seed: int) -> None:
    hf_config = transformers.DeepseekV3Config(
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=8,
        topk_group=3,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm_topk_prob,
        hidden_size=H,
    )
    router = DeepseekV3TopkRouter(hf_config)
    x = randomise(router, seed)
    with torch.no_grad():
        # A non-negative bias keeps every selection score > 0. transformers 5.24 masks the dropped
        # groups with -inf, as we do; versions that filled them with 0.0 instead agree with -inf
        # exactly when all kept selection scores are positive, so this test holds for both.
        router.e_score_correction_bias.copy_(0.1 * torch.rand(32))
        logits, weights, ids = router(x)
    cfg = mr.MoEConfig(
        num_experts=32,
        top_k=4,
        hidden_size=H,
        intermediate_size=8,
        scoring="sigmoid",
        norm_topk_prob=norm_topk_prob,
        n_group=8,
        topk_group=3,
        score_bias=True,
        routed_scaling_factor=2.5,
    )
    routing = mr.route(logits, cfg, bias=router.e_score_correction_bias)
    assert_same_routing(ids, weights, routing)
    # the groups matter on these inputs: without them some token routes differently
    ungrouped = mr.MoEConfig(**{**cfg.__dict__, "n_group": None, "topk_group": None})
    free = mr.route(logits, ungrouped, bias=router.e_score_correction_bias)
    assert not torch.equal(by_expert(free.expert_ids, free.weights)[0], by_expert(ids, weights)[0])


@pytest.mark.parametrize(
    ("block_cls", "hf_config"),
    [
        (  # Qwen3-MoE block: experts stored as gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]
            Qwen3MoeSparseMoeBlock,
            lambda: transformers.Qwen3MoeConfig(
                num_experts=8,
                num_experts_per_tok=2,
                hidden_size=H,
                moe_intermediate_size=16,
                norm_topk_prob=True,
            ),
        ),
        (  # Mixtral block: the same layout under other names of the config
            MixtralSparseMoeBlock,
            lambda: transformers.MixtralConfig(
                num_local_experts=8, num_experts_per_tok=2, hidden_size=H, intermediate_size=16
            ),
        ),
    ],
)
def test_moe_layer_equals_hf_block_with_the_same_weights(block_cls: type, hf_config) -> None:
    block = block_cls(hf_config()).eval()
    x = randomise(block, 3).reshape(4, T // 4, H)
    cfg = mr.MoEConfig(num_experts=8, top_k=2, hidden_size=H, intermediate_size=16)
    moe = mr.MoE(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(block.gate.weight)
        moe.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        moe.experts.down_proj.copy_(block.experts.down_proj)
        torch.testing.assert_close(moe(x), block(x), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The rule moe_replay.hf reads from a router, against the router itself
# --------------------------------------------------------------------------------------------


def _phimoe_block(seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    config = transformers.PhimoeConfig(
        num_local_experts=16,
        num_experts_per_tok=2,
        hidden_size=H,
        intermediate_size=8,
        router_jitter_noise=0.01,
    )
    block = PhimoeSparseMoeBlock(config).eval()
    return block, randomise(block.router, seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phimoe_sparsemixer_rule(seed: int) -> None:
    # Evaluation mode: sparsemixer's ids are the top-2 logits, in order, and each slot's weight is
    # a softmax over the logits near that slot's pick; the rule reproduces both.
    from moe_replay.integrations.hf_families import FAMILIES
    from moe_replay.integrations.hf_router import recognise, route_with_rule

    block, x = _phimoe_block(seed)
    rule = recognise(FAMILIES["phimoe"], block, "router", where="phimoe")
    assert (rule.scoring, rule.top_k, rule.jitter_eps) == ("sparsemixer", 2, 0.01)
    with torch.no_grad():
        logits, weights, ids = block.router(x)
    ours = route_with_rule(logits, rule, None, None)
    assert torch.equal(ours.expert_ids.long(), ids.long())  # slot order matters here
    torch.testing.assert_close(ours.weights, weights.float(), atol=1e-6, rtol=1e-5)
    # Forcing the second-best expert into slot 0: its weight is a softmax over the logits near it,
    # which now include the best one, so it is below 1 and the best expert fills slot 1.
    forced = torch.full_like(ids, -1)
    forced[:, 0] = ids[:, 1]
    swapped = route_with_rule(logits, rule, forced, None)
    assert torch.equal(swapped.expert_ids.long(), ids.flip(-1).long())
    assert (swapped.weights[:, 0] < 1).all() and torch.isfinite(swapped.weights).all()


def test_phimoe_refuses_top_k_other_than_2() -> None:
    from moe_replay.integrations.hf_families import FAMILIES
    from moe_replay.integrations.hf_router import recognise

    block, _ = _phimoe_block(0)
    block.router.top_k = 3
    with pytest.raises(ValueError, match="routes exactly 2 experts, got top_k=3"):
        recognise(FAMILIES["phimoe"], block, "router", where="phimoe")
