"""The Hugging Face MoE families :func:`moe_replay.hf.attach` supports, as data.

Everything a router states about itself is read from the module at attach time (see
:func:`moe_replay.integrations.hf_router.recognise`): its top-k, its experts, its
``norm_topk_prob``, ``routed_scaling_factor`` / ``route_scale``, ``num_group`` / ``topk_group``,
its score function (``score_fn``, ``expert_selection_fn``) and any selection bias
(``e_score_correction_bias``, ``expert_bias``). What a router does without saying so, this
table says: which scoring it applies, whether it ranks scores or logits, whether it
renormalises when it has no ``norm_topk_prob`` attribute, and how.

Each entry is read for one ``config.model_type``; vision-language wrappers are listed with
their text models' rules (their vision towers have no routed experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scoring = Literal["softmax", "sigmoid", "sparsemixer"]


@dataclass(frozen=True, kw_only=True)
class Family:
    """How one model type's routers route, where the router's attributes do not say."""

    module: str
    """transformers.models.<module> defines the family's blocks (missing: not in this transformers)."""
    scoring: Scoring = "softmax"
    """Scores from logits, unless the router names its own (``score_fn``, ``expert_selection_fn``).
    ``sparsemixer``: PhiMoE's top-2 with per-slot masked softmax weights."""
    select: Literal["scores", "logits"] = "scores"
    """``scores``: top-k of the (biased, group-masked) scores, weights gathered from the scores;
    ``logits``: top-k of the raw logits, then the scoring applied to the k picked logits only."""
    norm: bool = False
    """Renormalise the k weights when the router has no ``norm_topk_prob`` attribute."""
    norm_eps: float = 0.0
    """Added to the sum before dividing (``1e-20`` for DeepSeek-V3-style routers)."""
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    """A group's score with grouped selection: sum of its two best (DeepSeek-V3), or its best (V2)."""
    dense_output: bool = False
    """The router returns ``(scores [T, E], logits [T, E])`` with zeros off the top-k (Llama 4)."""
    rule: str
    """The routing rule in words (documentation)."""
    shared: str = "none"
    """Shared experts, in words (documentation)."""


_V3 = {
    "scoring": "sigmoid",
    "norm_eps": 1e-20,
    "rule": "sigmoid; top-k of score + bias within the best groups; renormalised (norm_topk_prob); scaled",
}
_SOFTMAX = "softmax; top-k; renormalised if norm_topk_prob"
_SOFTMAX_NORM = "softmax; top-k; renormalised"
_QWEN_SHARED = "1, sigmoid-gated"
_LOGITS_SOFTMAX = "top-k of the logits; softmax over the k picked"

FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family(module="qwen3_moe", rule=_SOFTMAX),
    "qwen3_next": Family(module="qwen3_next", rule=_SOFTMAX, shared=_QWEN_SHARED),
    "qwen3_5_moe": Family(module="qwen3_5_moe", norm=True, rule=_SOFTMAX_NORM, shared=_QWEN_SHARED),
    "qwen3_5_moe_text": Family(module="qwen3_5_moe", norm=True, rule=_SOFTMAX_NORM, shared=_QWEN_SHARED),
    "qwen3_vl_moe": Family(module="qwen3_vl_moe", norm=True, rule=_SOFTMAX_NORM),
    "qwen3_vl_moe_text": Family(module="qwen3_vl_moe", norm=True, rule=_SOFTMAX_NORM),
    "qwen2_moe": Family(module="qwen2_moe", rule=_SOFTMAX, shared=_QWEN_SHARED),
    "mixtral": Family(module="mixtral", norm=True, rule=_SOFTMAX_NORM),
    "minimax": Family(module="minimax", norm=True, rule=_SOFTMAX_NORM),
    "phimoe": Family(
        module="phimoe",
        scoring="sparsemixer",
        select="logits",
        rule="sparsemixer: top-2 of the logits; each slot a softmax over the logits near its pick",
    ),
    "olmoe": Family(module="olmoe", rule=_SOFTMAX),
    "flex_olmo": Family(module="flex_olmo", rule=_SOFTMAX),
    "jamba": Family(module="jamba", rule="softmax; top-k; not renormalised"),
    "hunyuan_v1_moe": Family(module="hunyuan_v1_moe", norm=True, rule=_SOFTMAX_NORM, shared="1 (shared_mlp)"),
    "ernie4_5_moe": Family(
        module="ernie4_5_moe",
        norm=True,
        rule="softmax; top-k of score + bias; renormalised (sum clamped at norm_min)",
        shared="moe_num_shared_experts",
    ),
    "dbrx": Family(
        module="dbrx", rule="softmax; top-k; divided by the p-norm (moe_normalize_expert_weights)"
    ),
    "deepseek_v2": Family(
        module="deepseek_v2",
        group_score="max",
        rule="softmax; top-k (group_limited_greedy: within the groups of best max score); scaled",
        shared="n_shared_experts",
    ),
    "deepseek_v3": Family(module="deepseek_v3", **_V3, shared="n_shared_experts"),
    "kimi_k25": Family(module="deepseek_v3", **_V3, shared="n_shared_experts"),
    "deepseek_v32": Family(module="deepseek_v32", **_V3, shared="n_shared_experts"),
    "deepseek_v4": Family(
        module="deepseek_v4",
        norm=True,
        norm_eps=1e-20,
        rule="scoring_func (sqrtsoftplus); top-k of score + bias; renormalised; scaled; "
        "hash layers are not routing sites",
        shared="1",
    ),
    "glm4_moe": Family(module="glm4_moe", **_V3, shared="n_shared_experts"),
    "glm4_moe_lite": Family(module="glm4_moe_lite", **_V3, shared="n_shared_experts"),
    "glm4v_moe": Family(module="glm4v_moe", **_V3, shared="n_shared_experts"),
    "glm4v_moe_text": Family(module="glm4v_moe", **_V3, shared="n_shared_experts"),
    "glm_moe_dsa": Family(module="glm_moe_dsa", **_V3, shared="n_shared_experts"),
    "dots1": Family(module="dots1", **_V3, shared="n_shared_experts"),
    "nemotron_h": Family(module="nemotron_h", **_V3, shared="1 (non-gated MLP)"),
    "exaone_moe": Family(module="exaone_moe", **_V3, shared="num_shared_experts"),
    "bailing_hybrid": Family(module="bailing_hybrid", **_V3, shared="n_shared_experts"),
    "kimi_linear": Family(module="kimi_linear", **_V3, shared="n_shared_experts"),
    "minimax_m2": Family(
        module="minimax_m2",
        scoring="sigmoid",
        norm=True,
        rule="sigmoid; top-k of score + bias (on the block); renormalised",
    ),
    "afmoe": Family(
        module="afmoe",
        scoring="sigmoid",
        norm=True,
        norm_eps=1e-20,
        rule="sigmoid; top-k of score + expert_bias; renormalised; route_scale",
        shared="num_shared_experts",
    ),
    "lfm2_moe": Family(
        module="lfm2_moe",
        scoring="sigmoid",
        norm_eps=1e-6,
        rule="sigmoid; top-k of score (+ expert_bias if use_expert_bias); renormalised if "
        "norm_topk_prob; scaled",
    ),
    "longcat_flash": Family(
        module="longcat_flash",
        rule="softmax; top-k of score + bias over routed and zero (identity) experts; scaled",
        shared="zero (identity) experts",
    ),
    "gpt_oss": Family(module="gpt_oss", select="logits", rule=_LOGITS_SOFTMAX + " (router with a bias)"),
    "granitemoe": Family(module="granitemoe", select="logits", rule=_LOGITS_SOFTMAX),
    "granitemoeshared": Family(module="granitemoeshared", select="logits", rule=_LOGITS_SOFTMAX, shared="1"),
    "granitemoehybrid": Family(module="granitemoehybrid", select="logits", rule=_LOGITS_SOFTMAX, shared="1"),
    "cohere2_moe": Family(
        module="cohere2_moe",
        select="logits",
        rule="top-k of the logits; softmax over the k, or sigmoid (renormalised if norm_topk_prob)",
        shared="num_shared_experts",
    ),
    "llama4": Family(
        module="llama4",
        scoring="sigmoid",
        select="logits",
        dense_output=True,
        rule="top-k of the logits; sigmoid of each picked logit; scales the expert's input",
        shared="1",
    ),
    "llama4_text": Family(
        module="llama4",
        scoring="sigmoid",
        select="logits",
        dense_output=True,
        rule="top-k of the logits; sigmoid of each picked logit; scales the expert's input",
        shared="1",
    ),
}
"""``config.model_type`` -> its routing rule."""

UNSUPPORTED: dict[str, str] = {
    "switch_transformers": "top-1 (argmax) routing with an expert capacity: tokens over an expert's "
    "capacity are dropped, so the routing of a token depends on the other tokens of the batch",
    "nllb_moe": "top-2 routing with an expert capacity that drops tokens (as switch_transformers)",
    "jetmoe": "mixture of attention heads (MoA) as well as MLP experts: the attention experts are routed "
    "inside the attention module",
    "ernie4_5_vl_moe": "separate text and vision expert sets chosen per token by a modality mask inside "
    "the block, not one top-k over one router",
}
"""MoE model types attach rejects, with the reason."""
