"""Hugging Face transformers (5.x) MoE models as routing sites: ``attach`` / ``detach``.

``attach(model)`` makes every MoE block of a supported model a routing site, keyed by the block's
module name (``model.layers.3.mlp``), so ``mr.record`` and ``mr.replay`` see and steer it:

    import moe_replay as mr
    mr.hf.attach(model)
    with mr.record(model) as trace:                 # per block: [B, prompt_len + new_tokens - 1, K]
        sequences = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    forced = mr.hf.align_generation_trace(trace, full_mask)   # [B, L, K], -1 where the router decides
    with mr.replay(model, forced):
        model(sequences, attention_mask=full_mask, position_ids=..., labels=...).loss.backward()

How it hooks in, per instance (no transformers class is patched; ``detach`` undoes it exactly):

* the block's ``forward`` is wrapped to note its input's token shape ``[B, S]`` (recorders keep
  the batch axis) and to check that the block really called its router;
* the router's (``gate`` / ``router``) ``forward`` is wrapped: it runs the model's own router, then
  :func:`moe_replay.routing.sites.route_at_site` decides the ids. Without forcing (no context,
  ``record`` alone, a frozen first forward) those are the model's own ids and weights, bitwise,
  so outputs are those of the unattached model. With forced ids (``replay``), ids follow
  :func:`moe_replay.route` semantics on the router's own logits (forced slots kept, free slots
  filled with the best remaining experts) and the weights come from the current router;
* with ``experts="moe_replay"``, the experts module's ``forward`` runs moe_replay's dispatch /
  expert_mlp / combine on the model's own ``gate_up_proj`` / ``down_proj`` tensors (not copied).

Architectures and their routing (``MoEConfig`` fields in brackets):

* Qwen3-MoE, Qwen2-MoE, OLMoE: softmax, top-k, optional renormalisation [``scoring="softmax"``,
  ``norm_topk_prob`` from the router]. Qwen2-MoE's shared expert and its sigmoid gate stay in the
  block's own forward, as do Qwen3's ``mlp_only_layers`` (dense, not routing sites).
* Mixtral: softmax, top-k, always renormalised [``norm_topk_prob=True``]. Router jitter (training
  only) multiplies the block input before the router, as in the original.
* DeepSeek-V3, GLM-4-MoE: sigmoid scores, ``e_score_correction_bias`` for selection only, group
  limited selection, ``routed_scaling_factor`` [``scoring="sigmoid"``, ``score_bias=True`` with the
  router's current ``e_score_correction_bias``, ``n_group``, ``topk_group``, ``norm_topk_prob``,
  ``routed_scaling_factor``]. Shared experts stay in the block's forward; the leading dense layers
  (``first_k_dense_replace``) are plain MLPs and not routing sites.
* gpt-oss: the router is a linear layer *with* a bias; it takes the top-k of the logits, *then*
  softmaxes the k picked logits. ``MoEConfig``'s contract ranks softmax scores, the same order
  only up to rounding (two logits one ulp apart can share one float32 probability), so gpt-oss is
  routed by its own function with the same forcing rules: forced slots kept, free slots filled in
  slot order with the highest remaining *logits* (ties to the lower index), weights
  ``softmax(logits at the final ids)`` in float32, cast to the dtype the model's router returns.
  Its experts (interleaved gate/up with biases, clamped ``alpha``-sigmoid GLU) are not SwiGLU, so
  ``experts="moe_replay"`` raises for it.

The load-balancing loss (``output_router_logits=True``) is transformers' own: computed from the
router logits with the router's own top-k, replay does not change it.

Precision notes:

* Router logits are the model's own (its dtype: bfloat16 for Qwen/OLMoE/Mixtral/gpt-oss in a
  bfloat16 model, float32 for DeepSeek-V3/GLM-4-MoE); moe_replay scores them in float32, as the
  models do (``softmax(..., dtype=float)``, ``logits.float()``).
* Under replay, a row whose final ids equal the model's own choice slot for slot keeps the
  model's own weights; other rows get moe_replay's weights cast to the model's weight dtype. The
  two are the same function of the logits (e.g. softmax-then-renormalise vs. softmax of the k
  logits) and differ by rounding only; keeping the model's own weights where routing agrees makes
  replaying a model's own routes bitwise identical to not replaying, and makes a frozen scope's
  recompute match its first forward exactly.
* With autograd enabled, the router wrapper always runs that forced path (the model's own ids
  forced when nothing else is), so a forward and its activation-checkpoint recompute build the
  same graph whatever the replay state; without autograd (generation) it returns the model's
  own routing untouched and costs nothing.

Shape legend: B batch, S sequence, T = B * S tokens, H hidden, E experts, K experts per token,
I expert intermediate.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from moe_replay.backends.registry import get_backend, registered_backends
from moe_replay.backends.torch.route import select_experts
from moe_replay.config import MoEConfig
from moe_replay.routing.route import Routing, check_forced_ids, route
from moe_replay.routing.sites import mark_site, route_at_site, site_of, unmark_site
from moe_replay.routing.trace import RoutingTrace

__all__ = ["SUPPORTED_MODEL_TYPES", "align_generation_trace", "attach", "detach"]

_MODEL_ATTR = "_moe_replay_hf"  # on the model: the _Attachment
_BLOCK_ATTR = "_moe_replay_hf_block"  # on each MoE block: its _BlockState
_ROUTER_ATTR = "_moe_replay_hf_router"  # on each block's router: its _RouterState
_EXPERTS_ATTR = "_moe_replay_hf_experts"  # on each block's experts (experts="moe_replay"): _ExpertsState

RoutingKind = Literal["softmax", "sigmoid_grouped", "gpt_oss"]


@dataclass(frozen=True)
class _Arch:
    """Where a model type keeps its MoE blocks and how its router routes."""

    module: str
    """transformers module defining the block class."""
    block_class: str
    """The MoE block (router + experts [+ shared experts]); its forward takes ``[B, S, H]``."""
    router_attr: str
    """Name of the block's router submodule; its forward returns (logits, weights, ids)."""
    routing: RoutingKind
    swiglu_experts: bool
    """Experts are ``down(silu(gate x) * up x)`` with ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``."""


_ARCHS: dict[str, _Arch] = {
    "qwen3_moe": _Arch(
        "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate", "softmax", True
    ),
    "qwen2_moe": _Arch(
        "transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate", "softmax", True
    ),
    "mixtral": _Arch(
        "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", "gate", "softmax", True
    ),
    "olmoe": _Arch(
        "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", "gate", "softmax", True
    ),
    "deepseek_v3": _Arch(
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        "DeepseekV3MoE",
        "gate",
        "sigmoid_grouped",
        True,
    ),
    "glm4_moe": _Arch(
        "transformers.models.glm4_moe.modeling_glm4_moe", "Glm4MoeMoE", "gate", "sigmoid_grouped", True
    ),
    "gpt_oss": _Arch("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssMLP", "router", "gpt_oss", False),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ARCHS)
"""``config.model_type`` values :func:`attach` supports."""


@dataclass
class _BlockState:
    """What an attached MoE block needs at call time (stored on the block, so deepcopy follows)."""

    arch: _Arch
    cfg: MoEConfig
    own_forward: Callable[..., Any] | None
    """An instance-level forward the block had before attach (restored by detach), usually None."""
    lead_shape: tuple[int, ...] | None = None
    """Token shape of the input of the call in progress, ``[B, S]``."""
    router_calls: int = 0


@dataclass
class _RouterState:
    block: nn.Module
    own_forward: Callable[..., Any] | None


@dataclass
class _ExpertsState:
    backend: str | None
    own_forward: Callable[..., Any] | None


@dataclass
class _Attachment:
    """Everything attach changed, for detach: (module, state attribute) pairs and the block names."""

    blocks: list[str]
    patched: list[tuple[nn.Module, str]]


# --------------------------------------------------------------------------------------------
# Routing configuration per architecture
# --------------------------------------------------------------------------------------------


def _routing_config(arch: _Arch, router: nn.Module, experts: nn.Module) -> MoEConfig:
    """The ``MoEConfig`` describing ``router``'s routing (read from the instance, not the config)."""
    num_experts, top_k, hidden = int(router.num_experts), int(router.top_k), int(router.hidden_dim)
    intermediate = int(getattr(experts, "intermediate_dim", getattr(experts, "intermediate_size", 0)))
    common = {
        "num_experts": num_experts,
        "top_k": top_k,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
    }
    if arch.routing == "softmax":
        # Mixtral's router has no norm_topk_prob attribute: it always renormalises.
        return MoEConfig(
            **common, scoring="softmax", norm_topk_prob=bool(getattr(router, "norm_topk_prob", True))
        )
    if arch.routing == "sigmoid_grouped":
        return MoEConfig(
            **common,
            scoring="sigmoid",
            norm_topk_prob=bool(router.norm_topk_prob),
            n_group=int(router.num_group),
            topk_group=int(router.topk_group),
            score_bias=True,
            routed_scaling_factor=float(router.routed_scaling_factor),
        )
    # gpt-oss: routed by _route_gpt_oss; the config carries the shape (for forced-id checks) and
    # the closest MoEConfig description (softmax over the k picked logits).
    return MoEConfig(**common, scoring="softmax", norm_topk_prob=True)


def _route_gpt_oss(
    logits_TE: torch.Tensor, cfg: MoEConfig, forced_TK: torch.Tensor | None, validate: bool
) -> Routing:
    """gpt-oss routing with forcing: ids by descending logit, weights softmax of the k picked logits."""
    if forced_TK is not None:
        check_forced_ids(forced_TK, logits_TE.shape[0], cfg, validate=validate)
        forced_TK = forced_TK.to(logits_TE.device)
    ids_TK = select_experts(logits_TE.detach().float(), cfg.top_k, forced_TK)
    weights_TK = torch.softmax(logits_TE.float().gather(1, ids_TK), dim=1)
    return Routing(ids_TK.to(torch.int32), weights_TK)


# --------------------------------------------------------------------------------------------
# The per-instance forwards installed by attach
# --------------------------------------------------------------------------------------------


def _call_original(
    module: nn.Module, own_forward: Callable[..., Any] | None, *args: Any, **kwargs: Any
) -> Any:
    if own_forward is not None:
        return own_forward(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def _block_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, with its input's token shape noted for the router wrapper."""
    state: _BlockState = getattr(self, _BLOCK_ATTR)
    outer = (state.lead_shape, state.router_calls)
    state.lead_shape, state.router_calls = tuple(hidden_states.shape[:-1]), 0
    try:
        out = _call_original(self, state.own_forward, hidden_states, *args, **kwargs)
        if state.router_calls == 0:
            # E.g. a hub kernel replaced the block's forward: its routing would escape record/replay.
            raise RuntimeError(
                f"{type(self).__name__}.forward did not call its router {state.arch.router_attr!r}; "
                "moe_replay cannot see or replay this block's routing (was its forward replaced, e.g. by "
                "kernels.kernelize?)"
            )
        return out
    finally:
        state.lead_shape, state.router_calls = outer


def _router_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The model's router, then the routing site's decision (module docstring)."""
    rstate: _RouterState = getattr(self, _ROUTER_ATTR)
    block = rstate.block
    bstate: _BlockState = getattr(block, _BLOCK_ATTR)
    bstate.router_calls += 1
    logits_TE, own_weights_TK, own_ids_TK = _call_original(
        self, rstate.own_forward, hidden_states, *args, **kwargs
    )
    num_tokens = own_ids_TK.shape[0]
    lead = bstate.lead_shape if bstate.lead_shape is not None else (num_tokens,)
    cfg, arch = bstate.cfg, bstate.arch
    own = Routing(own_ids_TK.to(torch.int32), own_weights_TK)

    def route_fn(forced_TK: torch.Tensor | None, validate: bool) -> Routing:
        if forced_TK is None:
            if not torch.is_grad_enabled():
                return own
            # With autograd on, route the model's own ids through the forced path anyway: a frozen
            # replay scope's checkpoint recompute arrives with forced ids, and must save the same
            # tensors as its forward did (torch.utils.checkpoint checks). Values stay the model's own.
            forced_TK, validate = own.expert_ids, False
        if arch.routing == "gpt_oss":
            forced = _route_gpt_oss(logits_TE, cfg, forced_TK, validate)
        else:
            bias = self.e_score_correction_bias if cfg.score_bias else None
            forced = route(logits_TE, cfg, forced_TK, bias, validate)
        # Rows routed as the model would keep its own weights (Precision notes).
        agrees_T1 = (forced.expert_ids == own.expert_ids).all(dim=1, keepdim=True)
        weights_TK = torch.where(agrees_T1, own_weights_TK, forced.weights.to(own_weights_TK.dtype))
        return Routing(forced.expert_ids, weights_TK)

    routing = route_at_site(site_of(block), route_fn, num_tokens, lead)
    if routing is own:
        return logits_TE, own_weights_TK, own_ids_TK
    return logits_TE, routing.weights, routing.expert_ids.to(own_ids_TK.dtype)


def _experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``y_TH`` for ``hidden_states [T, H]``, ids and weights ``[T, K]``, through moe_replay's stages:
    dispatch, then experts + combine (fused where the backend fuses them), on the model's own
    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
    state: _ExpertsState = getattr(self, _EXPERTS_ATTR)
    backend = get_backend(state.backend, hidden_states.device)
    buckets = backend.dispatch(top_k_index.to(torch.int32), self.gate_up_proj.shape[0])
    return backend.expert_mlp_combine(
        hidden_states, buckets, self.gate_up_proj, self.down_proj, top_k_weights, hidden_states.dtype
    )


# --------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _check_swiglu_experts(name: str, experts: nn.Module, model: nn.Module) -> None:
    config = getattr(experts, "config", None) or getattr(model, "config", None)
    act = getattr(config, "hidden_act", None)
    problems = []
    if act != "silu":
        problems.append(f"activation {act!r} (need 'silu')")
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        problems.append("transposed or interleaved gate/up layout")
    if getattr(experts, "has_bias", False):
        problems.append("expert biases")
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        problems.append("no gate_up_proj/down_proj tensors")
    elif (
        gate_up.dim() != 3
        or down.dim() != 3
        or down.shape[2] * 2 != gate_up.shape[1]
        or down.shape[1] != gate_up.shape[2]
    ):
        problems.append(
            f"gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} not [E, 2I, H] / [E, H, I]"
        )
    if problems:
        raise ValueError(
            f"experts='moe_replay': experts of {name!r} are not plain SwiGLU: {'; '.join(problems)}"
        )


def _install(
    module: nn.Module, state_attr: str, state: Any, forward: Callable[..., Any], patched: list
) -> None:
    # A bound method (not a closure) so that copy.deepcopy(model) rebinds it to the copy.
    object.__setattr__(module, state_attr, state)
    module.forward = types.MethodType(forward, module)
    patched.append((module, state_attr))


def attach(model: nn.Module, experts: str | None = None, *, backend: str | None = None) -> list[str]:
    """Make every MoE block of the transformers model ``model`` a routing site; return their names.

    ``model`` is an instance of a supported architecture (:data:`SUPPORTED_MODEL_TYPES`, read from
    ``model.config.model_type``); the blocks are keyed by module name (``model.layers.1.mlp``).
    Nothing is copied and no transformers class is modified: the blocks', routers' (and with
    ``experts="moe_replay"`` experts') ``forward`` are replaced on these instances. Parameters,
    buffers and state-dict keys are unchanged. Outside ``mr.record`` / ``mr.replay`` the model
    computes exactly what it computed before (bitwise).

    ``experts``: ``None`` keeps the model's experts implementation; ``"moe_replay"`` runs the
    experts through moe_replay's backend stages on the model's own weight tensors (SwiGLU experts
    only; results then agree with the original within the dtype's tolerance, not bitwise).
    ``backend``: the moe_replay backend for those experts (``None``: automatic, per call).

    Raises ``TypeError`` for a non-module, ``ValueError`` for an unsupported model type (listing
    the supported ones), a model already attached, a model with no MoE block, a bad ``experts`` or
    ``backend``, or non-SwiGLU experts with ``experts="moe_replay"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    model_type = _model_type(model)
    if model_type not in _ARCHS:
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported by moe_replay.hf.attach; "
            f"supported model types: {list(SUPPORTED_MODEL_TYPES)}"
        )
    if experts not in (None, "moe_replay"):
        raise ValueError(f"experts must be None (the model's own) or 'moe_replay', got {experts!r}")
    if backend is not None:
        if experts is None:
            raise ValueError(f"backend={backend!r} only applies with experts='moe_replay', got experts=None")
        if not isinstance(backend, str) or backend not in registered_backends():
            raise ValueError(f"backend must be None or one of {registered_backends()}, got {backend!r}")
    if getattr(model, _MODEL_ATTR, None) is not None:
        raise ValueError(
            f"{type(model).__name__} is already attached; call moe_replay.hf.detach(model) first"
        )
    arch = _ARCHS[model_type]
    block_class = getattr(importlib.import_module(arch.module), arch.block_class)
    blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, block_class)]
    if not blocks:
        raise ValueError(
            f"model ({type(model).__name__}, {model_type!r}) holds no {arch.block_class} block to attach"
        )

    # Check everything before changing anything, so a failed attach leaves the model untouched.
    plans = []
    for name, block in blocks:
        if site_of(block) is not None:
            raise ValueError(f"module {name!r} is already a routing site")
        router, block_experts = getattr(block, arch.router_attr), block.experts
        if experts == "moe_replay":
            if not arch.swiglu_experts:
                raise ValueError(
                    f"experts='moe_replay' needs SwiGLU experts; {model_type!r} "
                    f"({type(block_experts).__name__}) uses interleaved gate/up with biases and a clamped "
                    "GLU; use experts=None for it"
                )
            _check_swiglu_experts(name, block_experts, model)
        plans.append((name, block, router, block_experts, _routing_config(arch, router, block_experts)))

    patched: list[tuple[nn.Module, str]] = []
    for _, block, router, block_experts, cfg in plans:
        own = block.__dict__.get("forward")
        _install(block, _BLOCK_ATTR, _BlockState(arch, cfg, own), _block_forward, patched)
        _install(
            router,
            _ROUTER_ATTR,
            _RouterState(block, router.__dict__.get("forward")),
            _router_forward,
            patched,
        )
        if experts == "moe_replay":
            state = _ExpertsState(backend, block_experts.__dict__.get("forward"))
            _install(block_experts, _EXPERTS_ATTR, state, _experts_forward, patched)
        mark_site(block, cfg.num_experts, cfg.top_k)
    names = [name for name, *_ in plans]
    object.__setattr__(model, _MODEL_ATTR, _Attachment(names, patched))
    return names


def detach(model: nn.Module) -> None:
    """Undo :func:`attach`: every block, router and experts module gets its original ``forward``
    back and stops being a routing site. ``ValueError`` if ``model`` is not attached."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    attachment: _Attachment | None = getattr(model, _MODEL_ATTR, None)
    if attachment is None:
        raise ValueError(
            f"{type(model).__name__} is not attached (moe_replay.hf.attach was not called on it)"
        )
    for module, state_attr in reversed(attachment.patched):
        own = getattr(module, state_attr).own_forward
        del module.forward
        if own is not None:
            module.forward = own
        object.__delattr__(module, state_attr)
        if state_attr == _BLOCK_ATTR:
            unmark_site(module)
    object.__delattr__(model, _MODEL_ATTR)


# --------------------------------------------------------------------------------------------
# Generation traces -> training traces
# --------------------------------------------------------------------------------------------


def align_generation_trace(trace: RoutingTrace, attention_mask: torch.Tensor | None = None) -> RoutingTrace:
    """The trace recorded during ``generate``, aligned with the returned sequences for replay.

    ``trace`` holds, per layer, ``[B, L - 1, K]`` ids for sequences ``[B, L]`` (prompt plus new
    tokens: the last sampled token is never forwarded). The result holds ``[B, L, K]``: the
    recorded ids, a ``-1`` row for the last position, and ``-1`` rows where ``attention_mask``
    (``[B, L]``, optional) is 0 — padding, whose routing the training router decides.

    Feed the sequences as one teacher-forced forward with the same ``attention_mask`` and the
    position ids ``generate`` used for left-padded prompts, ``(attention_mask.cumsum(-1) - 1)
    .clamp(min=0)``; otherwise the hidden states, and so the free rows, differ from generation.

    The trace lines up with the sequences for greedy or sampled decoding with the KV cache (the
    default): a prefill of the prompts, then one forward per new token. Without the cache every
    step re-forwards the whole sequence, and beam search reorders the batch between steps; neither
    gives an aligned trace (a mask of the wrong length is a ``ValueError`` here).
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace must be a moe_replay.RoutingTrace, got {type(trace).__name__}")
    if len(trace) == 0:
        raise ValueError("trace is empty: nothing was recorded")
    if len(trace.token_shape) != 2:
        raise ValueError(
            f"trace must hold [B, L - 1, K] ids per layer (recorded around generate), got token shape "
            f"{list(trace.token_shape)}"
        )
    B, S = trace.token_shape
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}"
            )
        if tuple(attention_mask.shape) != (B, S + 1):
            raise ValueError(
                f"attention_mask must have shape [B={B}, L={S + 1}] (the trace holds L - 1 = {S} positions), "
                f"got {tuple(attention_mask.shape)}"
            )
    layers = {}
    for name, ids_BSK in trace.items():
        free_B1K = torch.full((B, 1, trace.top_k), -1, dtype=ids_BSK.dtype, device=ids_BSK.device)
        ids_BLK = torch.cat([ids_BSK, free_B1K], dim=1)
        if attention_mask is not None:
            padding_BL1 = (attention_mask == 0).to(ids_BLK.device).unsqueeze(-1)
            ids_BLK = ids_BLK.masked_fill(padding_BL1, -1)
        layers[name] = ids_BLK
    return RoutingTrace(layers, num_experts=trace.num_experts, top_k=trace.top_k)
