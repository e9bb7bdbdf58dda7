"""Small random-weight configs of every supported Hugging Face MoE family (tests, the demo).

:func:`small_config` builds a transformers config of ``model_type`` with the given shape and
each family's routing features switched on (selection biases, groups, shared experts, scaling,
zero experts, a hash layer for DeepSeek-V4), with every layer routed where the family allows it.
Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class SmallShape:
    """The shape of a small model."""

    layers: int = 2
    """Decoder layers."""
    hidden: int = 32
    """Hidden size H (a multiple of 8: four heads of H / 4)."""
    experts: int = 8
    """Routed experts per MoE layer E (a multiple of 4: four routing groups where grouped)."""
    top_k: int = 2
    """Experts per token K."""
    expert_intermediate: int = 16
    """Intermediate size I of one expert."""
    vocab: int = 64
    """Vocabulary V."""
    max_positions: int = 64
    """Longest sequence."""


# Where a family's first layers are dense by default, this many are (0 would leave no dense MLP
# for the families whose shared layout needs one; 1 keeps the test of "dense layers are not
# sites" alive while most layers route).
_FIRST_DENSE = 1

_MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}


def _family_overrides(model_type: str, s: SmallShape, heads: int) -> dict[str, Any]:
    n = s.layers
    hybrid = ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    grouped = {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "n_shared_experts": 1}
    if model_type in ("qwen3_next", "qwen3_5_moe_text"):
        return {
            "layer_types": hybrid,
            "shared_expert_intermediate_size": 24,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
        }
    if model_type == "qwen2_moe":
        return {"shared_expert_intermediate_size": 24}
    if model_type in ("deepseek_v3", "deepseek_v32", "glm_moe_dsa", "glm4_moe_lite", "dots1", "exaone_moe"):
        extra = {"num_key_value_heads": heads, "first_k_dense_replace": _FIRST_DENSE, **_MLA, **grouped}
        if model_type in ("deepseek_v32", "glm_moe_dsa"):  # the sparse-attention indexer
            extra.update({"index_n_heads": 2, "index_head_dim": 16, "index_topk": 4})
        if model_type == "exaone_moe":
            extra.update({"num_shared_experts": 1, "mlp_layer_types": ["dense"] + ["sparse"] * (n - 1)})
        return extra
    if model_type == "deepseek_v2":  # group_limited_greedy: a group's score is its best expert's
        return {
            "num_key_value_heads": heads,
            "first_k_dense_replace": _FIRST_DENSE,
            **_MLA,
            "topk_method": "group_limited_greedy",
            **grouped,
        }
    if model_type == "glm4_moe":
        return {"first_k_dense_replace": _FIRST_DENSE, **grouped}
    if model_type == "glm4v_moe_text":  # multimodal rotary sections over the rotary half of a head
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 0, 1]}
        return {"first_k_dense_replace": _FIRST_DENSE, "rope_parameters": rope, **grouped}
    if model_type == "deepseek_v4":  # one hash-routed layer (not a site), then routed layers
        return {
            "num_key_value_heads": heads,
            "mlp_layer_types": ["hash_moe"] + ["moe"] * (n - 1),
            **_MLA,
            "routed_scaling_factor": 2.5,
        }
    if model_type == "longcat_flash":  # zero (identity) experts share the routing with real ones
        return {
            "num_layers": n,
            "num_key_value_heads": heads,
            "head_dim": _MLA["qk_rope_head_dim"],  # its rotary part: the interleaved rope spans head_dim
            **_MLA,
            "ffn_hidden_size": 48,
            "expert_ffn_hidden_size": s.expert_intermediate,
            "moe_topk": s.top_k,
            "zero_expert_num": 4,
            "routed_scaling_factor": 2.5,
        }
    if model_type == "kimi_linear":
        return {
            "num_key_value_heads": heads,
            **_MLA,
            "layer_types": hybrid,
            "linear_head_dim": 8,
            "linear_num_heads": 4,
            "mlp_layer_types": ["sparse"] * n,
            **grouped,
        }
    if model_type == "bailing_hybrid":
        return {
            "num_key_value_heads": heads,
            **_MLA,
            "layer_types": hybrid,
            "mlp_layer_types": ["sparse"] * n,
            "linear_head_dim": 8,
            "linear_num_heads": 4,
            **grouped,
        }
    if model_type == "granitemoehybrid":
        return {
            "layer_types": ["mamba" if i % 2 == 0 else "attention" for i in range(n)],
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_state": 8,
            "mamba_chunk_size": 8,
            "shared_intermediate_size": 24,
        }
    if model_type == "granitemoeshared":
        return {"shared_intermediate_size": 24}
    if model_type == "jamba":
        return {
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 1,
            "expert_layer_offset": 0,
            "mamba_d_state": 8,
            "mamba_dt_rank": 4,
            "use_mamba_kernels": False,
        }
    if model_type == "nemotron_h":
        return {
            "layers_block_type": ["attention" if i % 2 == 0 else "moe" for i in range(n)],
            "mamba_num_heads": 4,
            "mamba_head_dim": 16,
            "ssm_state_size": 8,
            "n_groups": 1,
            "chunk_size": 8,
            "moe_shared_expert_intermediate_size": 24,
            **grouped,
        }
    if model_type == "lfm2_moe":
        return {
            "layer_types": ["conv" if i % 2 == 0 else "full_attention" for i in range(n)],
            "num_dense_layers": 0,
            "use_expert_bias": True,
            "routed_scaling_factor": 2.5,
        }
    if model_type == "ernie4_5_moe":
        return {"moe_num_shared_experts": 1, "moe_layer_start_index": 0, "moe_layer_interval": 1}
    if model_type == "afmoe":
        return {"num_dense_layers": 0, "num_shared_experts": 1, "route_scale": 2.5}
    if model_type == "minimax":
        return {"layer_types": ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(n)]}
    if model_type == "cohere2_moe":
        return {"num_shared_experts": 1}
    if model_type == "hunyuan_v1_moe":
        return {"moe_topk": s.top_k}
    if model_type == "gpt_oss":
        return {"sliding_window": 8}
    if model_type == "llama4_text":
        return {"interleave_moe_layer_step": 1, "intermediate_size_mlp": 48}
    if model_type == "qwen3_vl_moe_text":
        return {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
        }
    return {}


def small_config(model_type: str, shape: SmallShape | None = None) -> Any:
    """A transformers config of ``model_type`` (a text model type of
    ``moe_replay.hf.SUPPORTED_MODEL_TYPES``) with ``shape``; ``ValueError`` for a type the installed
    transformers does not know."""
    import transformers

    s = shape or SmallShape()
    heads = 4
    if model_type == "dbrx":
        return transformers.DbrxConfig(
            d_model=s.hidden,
            n_heads=heads,
            n_layers=s.layers,
            max_seq_len=s.max_positions,
            vocab_size=s.vocab,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=s.hidden**-0.5,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={
                "ffn_hidden_size": s.expert_intermediate,
                "moe_num_experts": s.experts,
                "moe_top_k": s.top_k,
                "moe_normalize_expert_weights": 1.0,
            },
        )
    common = {
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": s.hidden // heads,
        "max_position_embeddings": s.max_positions,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        # Weights ~ N(0, 1/H): unit-scale activations and router logits, as in a trained model,
        # so routing is not a sea of near-ties.
        "initializer_range": s.hidden**-0.5,
        "intermediate_size": s.expert_intermediate,
        "moe_intermediate_size": s.expert_intermediate,
        "num_experts": s.experts,
        "num_local_experts": s.experts,
        "n_routed_experts": s.experts,
        "num_experts_per_tok": s.top_k,
    }
    overrides = _family_overrides(model_type, s, heads)
    try:
        return transformers.AutoConfig.for_model(model_type, **{**common, **overrides})
    except ValueError as err:
        raise ValueError(
            f"model_type {model_type!r}: no config in transformers {transformers.__version__}"
        ) from err
