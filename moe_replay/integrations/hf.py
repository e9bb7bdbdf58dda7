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

Which families, and each one's routing rule: :data:`SUPPORTED_MODEL_TYPES`, ``docs/hf.md``.

How it hooks in, per instance (no transformers class is patched; ``detach`` undoes it exactly):

* a block is any module holding an ``experts`` module and a router (``gate`` / ``router``);
  the block's ``forward`` is wrapped to note its input's token shape ``[B, S]`` (recorders keep
  the batch axis) and to check that the block really routed;
* the call that routes is wrapped: the router's ``forward``, or the block's
  ``route_tokens_to_experts`` where the router only computes logits (DBRX). It runs the model's
  own routing, finds the logits ``[T, E]``, weights ``[T, K]`` and ids ``[T, K]`` among its
  outputs (or arguments) by dtype and shape, whatever order a transformers version returns them
  in (a router that returns no logits gets them recomputed from its input and weight, in
  float32 as it computes them), then :func:`moe_replay.routing.sites.route_at_site` decides
  the ids. Without forcing (no context, ``record`` alone, a frozen first forward) those are the
  model's own ids and weights, bitwise, so outputs are those of the unattached model. With
  forced ids (``replay``), ids follow :func:`moe_replay.route` semantics under the router's own
  rule (forced slots kept, free slots filled with the best remaining experts) and the weights
  come from the current logits;
* the rule (scoring, selection bias, groups, normalisation, scaling) is read from the router
  module at attach time, completed by a small per-family table for what a router does without
  saying so (:mod:`moe_replay.integrations.hf_router`, :mod:`moe_replay.integrations.hf_families`);
* with ``experts="moe_replay"``, the experts module's ``forward`` runs moe_replay's dispatch /
  expert_mlp / combine on the model's own ``gate_up_proj`` / ``down_proj`` tensors (not copied);
  plain SwiGLU experts only.

Shared experts, their gates and dense layers stay in the blocks' own forwards and are not routing
sites. DeepSeek-V4's hash-routed layers (experts from a fixed token-id table) are not routing
sites either. Multi-token-prediction blocks (a module path with a part starting ``mtp`` or
``nextn``; transformers itself drops MTP weights at load) are skipped unless ``mtp=True``; then
they are sites under their own module names (``model.mtp.0.mlp``), after the decoder's.

The load-balancing loss (``output_router_logits=True``) is transformers' own: computed from the
router logits with the router's own top-k, replay does not change it.

Precision notes:

* Router logits are the model's own (their dtype: the model's for Qwen/OLMoE/Mixtral/gpt-oss,
  float32 for DeepSeek-V3-style routers); moe_replay scores them in float32.
* Under replay, a row whose final ids equal the model's own choice slot for slot keeps the
  model's own weights; other rows get moe_replay's weights cast to the model's weight dtype. The
  two are the same function of the logits (e.g. softmax-then-renormalise vs. softmax of the k
  logits) and differ by rounding only; keeping the model's own weights where routing agrees makes
  replaying a model's own routes bitwise identical to not replaying, and makes a frozen scope's
  recompute match its first forward exactly.
* With autograd enabled, the routing wrapper always runs that forced path (the model's own ids
  forced when nothing else is), so a forward and its activation-checkpoint recompute build the
  same graph whatever the replay state; without autograd (generation) it returns the model's
  own routing untouched and costs nothing.
* Free slots are filled by ranking in float32. A router that ranks bfloat16 scores can order two
  experts whose scores round together differently; forced slots and the model's own rows are
  unaffected.

Shape legend: B batch, S sequence, T = B * S tokens, H hidden, E experts, K experts per token,
I expert intermediate.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_replay import ops
from moe_replay.backends.registry import registered_backends
from moe_replay.config import MoEConfig
from moe_replay.integrations.hf_families import FAMILIES, UNSUPPORTED, Family
from moe_replay.integrations.hf_router import (
    RouterRule,
    gate_weights,
    recognise,
    route_with_rule,
    router_weight,
)
from moe_replay.routing.route import Routing, check_forced_ids
from moe_replay.routing.sites import mark_site, route_at_site, site_of, unmark_site
from moe_replay.routing.trace import RoutingTrace

__all__ = ["SUPPORTED_MODEL_TYPES", "UNSUPPORTED_MODEL_TYPES", "align_generation_trace", "attach", "detach"]

_MODEL_ATTR = "_moe_replay_hf"  # on the model: the _Attachment
_BLOCK_ATTR = "_moe_replay_hf_block"  # on each MoE block: its _BlockState
_ROUTER_ATTR = "_moe_replay_hf_router"  # on the module owning the routing call: its _RouterState
_EXPERTS_ATTR = "_moe_replay_hf_experts"  # on each block's experts (experts="moe_replay"): _ExpertsState

_ROUTER_NAMES = ("gate", "router")
_METHOD_ROUTING = "route_tokens_to_experts"  # a block method routing the router's logits (DBRX)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)
"""``config.model_type`` values :func:`attach` supports."""

UNSUPPORTED_MODEL_TYPES: dict[str, str] = dict(UNSUPPORTED)
"""MoE ``config.model_type`` values :func:`attach` rejects, with the reason."""


@dataclass
class _BlockState:
    """What an attached MoE block needs at call time (stored on the block, so deepcopy follows)."""

    rule: RouterRule
    cfg: MoEConfig
    """Shape of the routing (num_experts, top_k) for forced-id checks."""
    routing_call: str
    """What routes, for messages: ``'gate'``, ``'router'`` or ``'route_tokens_to_experts'``."""
    router_name: str
    """The block's router child: ``'gate'`` or ``'router'``."""
    own_forward: Callable[..., Any] | None
    """An instance-level forward the block had before attach (restored by detach), usually None."""
    lead_shape: tuple[int, ...] | None = None
    """Token shape of the input of the call in progress, ``[B, S]``."""
    router_calls: int = 0


@dataclass
class _RouterState:
    block: nn.Module
    own_forward: Callable[..., Any] | None
    """The instance-level callable the wrapped attribute had before attach, usually None."""


@dataclass
class _ExpertsState:
    backend: str | None
    own_forward: Callable[..., Any] | None


@dataclass
class _Attachment:
    """Everything attach changed, for detach: (module, state attribute, method) and the block names."""

    blocks: list[str]
    patched: list[tuple[nn.Module, str, str]]


# --------------------------------------------------------------------------------------------
# The routing call's outputs: found by dtype and shape
# --------------------------------------------------------------------------------------------


@dataclass
class _Decoded:
    """The model's own routing, and how to hand a different one back in the call's own layout."""

    logits: Callable[[], torch.Tensor]
    """The logits ``[T, E]`` (a call: recomputing them costs a matmul, only paid when routing)."""
    own: Routing
    own_weights_TK: torch.Tensor
    rebuild: Callable[[Routing], Any]


def _is_tensor(value: object, *, floating: bool, width: int) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 2
        and value.is_floating_point() == floating
        and value.shape[1] == width
    )


def _router_input(args: tuple, rule: RouterRule) -> torch.Tensor | None:
    return next((a for a in args if torch.is_tensor(a) and a.shape[-1] == rule.hidden_size), None)


def _recomputed_logits(router: nn.Module, hidden: torch.Tensor, rule: RouterRule) -> torch.Tensor:
    """The logits of a router that returns none (LongCat-Flash in transformers 5.17), computed as
    it computes them: its float32 weight applied to its float32 input."""
    return F.linear(hidden.reshape(-1, rule.hidden_size).float(), router_weight(router).float())


def _decode(out: Any, args: tuple, kwargs: dict, rule: RouterRule, where: str, router: nn.Module) -> _Decoded:
    items = list(out) if isinstance(out, tuple) else [out]
    E, K = rule.num_experts, rule.top_k
    if rule.dense_output:  # Llama 4: (scores [T, E], zero off the top-k; logits [T, E])
        scores_TE, logits_TE = items[0], items[1]
        ids_TK = torch.topk(logits_TE, K, dim=1).indices  # the router's own call: its own ids
        own_weights_TK = scores_TE.gather(1, ids_TK)

        def rebuild_dense(routing: Routing) -> Any:
            ids, weights = routing.expert_ids.long(), routing.weights.to(scores_TE.dtype)
            return (torch.zeros_like(scores_TE).scatter(1, ids, weights), logits_TE)

        own = Routing(ids_TK.to(torch.int32), own_weights_TK)
        return _Decoded(lambda: logits_TE, own, own_weights_TK, rebuild_dense)

    ids_at = [i for i, t in enumerate(items) if _is_tensor(t, floating=False, width=K)]
    weights_at = [i for i, t in enumerate(items) if _is_tensor(t, floating=True, width=K)]
    logits_at = [i for i, t in enumerate(items) if _is_tensor(t, floating=True, width=E)]
    logits = [items[i] for i in logits_at] or [
        t for t in (*args, *kwargs.values()) if _is_tensor(t, floating=True, width=E)
    ]
    hidden = _router_input(args, rule)
    if len(logits) == 1:
        logits_fn = functools.partial(lambda t: t, logits[0])
    elif not logits and hidden is not None:  # a router that returns no logits
        logits_fn = functools.partial(_recomputed_logits, router, hidden, rule)
    else:
        logits_fn = None
    if len(ids_at) != 1 or len(weights_at) != 1 or logits_fn is None:
        import transformers

        raise RuntimeError(
            f"{where}: expected the routing call to return one [T, {K}] id tensor and one [T, {K}] weight "
            f"tensor and to return or receive one [T, {E}] logit tensor, got {_describe(items)}; this "
            f"family's routing in transformers {transformers.__version__} is not one moe_replay can read"
        )
    (i_ids,), (i_weights,) = ids_at, weights_at
    own_ids_TK, own_weights_TK = items[i_ids], items[i_weights]

    def rebuild(routing: Routing) -> Any:
        new = list(items)
        new[i_ids], new[i_weights] = routing.expert_ids.to(own_ids_TK.dtype), routing.weights
        return tuple(new) if isinstance(out, tuple) else new[0]

    return _Decoded(logits_fn, Routing(own_ids_TK.to(torch.int32), own_weights_TK), own_weights_TK, rebuild)


def _describe(items: list) -> str:
    return str([f"{t.dtype} {list(t.shape)}" if torch.is_tensor(t) else type(t).__name__ for t in items])


# --------------------------------------------------------------------------------------------
# The per-instance forwards installed by attach
# --------------------------------------------------------------------------------------------


def _call_original(
    module: nn.Module, method: str, own: Callable[..., Any] | None, *args: Any, **kwargs: Any
) -> Any:
    if own is not None:
        return own(*args, **kwargs)
    return getattr(type(module), method)(module, *args, **kwargs)


def _block_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, with its input's token shape noted for the routing wrapper."""
    state: _BlockState = getattr(self, _BLOCK_ATTR)
    outer = (state.lead_shape, state.router_calls)
    state.lead_shape, state.router_calls = tuple(hidden_states.shape[:-1]), 0
    try:
        out = _call_original(self, "forward", state.own_forward, hidden_states, *args, **kwargs)
        if state.router_calls == 0:
            # E.g. a hub kernel replaced the block's forward: its routing would escape record/replay.
            raise RuntimeError(
                f"{type(self).__name__}.forward did not call its router {state.routing_call!r}; "
                "moe_replay cannot see or replay this block's routing (was its forward replaced, e.g. by "
                "kernels.kernelize?)"
            )
        return out
    finally:
        state.lead_shape, state.router_calls = outer


def _make_routing_wrapper(method: str) -> Callable[..., Any]:
    def routing_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The model's own routing, then the routing site's decision (module docstring)."""
        rstate: _RouterState = getattr(self, _ROUTER_ATTR)
        block = rstate.block
        bstate: _BlockState = getattr(block, _BLOCK_ATTR)
        bstate.router_calls += 1
        out = _call_original(self, method, rstate.own_forward, *args, **kwargs)
        rule, cfg = bstate.rule, bstate.cfg
        router = getattr(block, bstate.router_name)
        decoded = _decode(out, args, kwargs, rule, bstate.routing_call, router)
        own = decoded.own
        num_tokens = own.expert_ids.shape[0]
        lead = bstate.lead_shape if bstate.lead_shape is not None else (num_tokens,)

        if torch.compiler.is_compiling():
            return decoded.rebuild(_compiled_routing(block, bstate, decoded, lead))

        def route_fn(forced_TK: torch.Tensor | None, validate: bool | None) -> Routing:
            if forced_TK is None:
                if not torch.is_grad_enabled():
                    return own
                # With autograd on, route the model's own ids through the forced path anyway: a frozen
                # replay scope's checkpoint recompute arrives with forced ids, and must save the same
                # tensors as its forward did (torch.utils.checkpoint checks). Values stay the model's own.
                forced_TK = own.expert_ids  # valid, on the router's device
            else:
                check_forced_ids(forced_TK, num_tokens, cfg, validate=bool(validate))
                forced_TK = forced_TK.to(own.expert_ids.device)
            forced = route_with_rule(decoded.logits(), rule, forced_TK, rule.bias(block))
            # Rows routed as the model would keep its own weights (Precision notes).
            agrees_T1 = (forced.expert_ids == own.expert_ids).all(dim=1, keepdim=True)
            own_weights_TK = decoded.own_weights_TK
            weights_TK = torch.where(agrees_T1, own_weights_TK, forced.weights.to(own_weights_TK.dtype))
            return Routing(forced.expert_ids, weights_TK)

        routing = route_at_site(site_of(block), route_fn, num_tokens, lead)
        if routing is own:
            return out
        return decoded.rebuild(routing)

    routing_call.__name__ = method
    return routing_call


def _compiled_routing(
    block: nn.Module, bstate: _BlockState, decoded: _Decoded, lead: tuple[int, ...]
) -> Routing:
    """The routing as ``torch.compile`` traces it: ids from the ``moe_replay::route_ids`` custom op
    (the site's logic, run eagerly), weights traced from the logits (the model's own where the
    row's ids are its own, as in the eager path)."""
    site = site_of(block)
    assert site is not None  # attached
    rule, own = bstate.rule, decoded.own
    logits_TE = decoded.logits()
    ids_TK = ops.route_ids(
        logits_TE.detach(), rule.bias(block), None, site.key, list(lead), 1, own.expert_ids
    )
    agrees_T1 = (ids_TK == own.expert_ids).all(dim=1, keepdim=True)
    own_weights_TK = decoded.own_weights_TK
    weights_TK = gate_weights(logits_TE, ids_TK.long(), rule).to(own_weights_TK.dtype)
    return Routing(ids_TK, torch.where(agrees_T1, own_weights_TK, weights_TK))


def _route_logits(
    rule: RouterRule,
    cfg: MoEConfig,
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    forced_TK: torch.Tensor | None,
    validate: bool | None,
) -> Routing:
    """A block's routing as a function of its logits (the site's ``route_logits``, for compile)."""
    if forced_TK is not None:
        check_forced_ids(forced_TK, logits_TE.shape[0], cfg, validate=bool(validate))
        forced_TK = forced_TK.to(logits_TE.device)
    return route_with_rule(logits_TE, rule, forced_TK, bias_E)


_ROUTING_WRAPPERS = {name: _make_routing_wrapper(name) for name in ("forward", _METHOD_ROUTING)}


def _experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``y_TH`` for ``hidden_states [T, H]``, ids and weights ``[T, K]``, through moe_replay's stages:
    dispatch, then experts + combine (fused where the backend fuses them), on the model's own
    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
    state: _ExpertsState = getattr(self, _EXPERTS_ATTR)
    ids_TK = top_k_index.to(torch.int32)
    gate_up, down = self.gate_up_proj, self.down_proj
    run = ops.experts if torch.compiler.is_compiling() else ops.run_experts
    return run(hidden_states, ids_TK, top_k_weights, gate_up, down, state.backend or "")


# --------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------


def _family(model: nn.Module) -> tuple[str, Family]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in UNSUPPORTED:
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported by moe_replay.hf.attach: "
            f"{UNSUPPORTED[model_type]}"
        )
    if model_type not in FAMILIES:
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported by moe_replay.hf.attach; "
            f"supported model types: {list(SUPPORTED_MODEL_TYPES)}"
        )
    family = FAMILIES[model_type]
    if importlib.util.find_spec(f"transformers.models.{family.module}") is None:
        import transformers

        raise ValueError(
            f"model type {model_type!r} needs transformers.models.{family.module}, which the installed "
            f"transformers {transformers.__version__} does not have"
        )
    return model_type, family


def _router_of(block: nn.Module) -> str | None:
    """Name of ``block``'s router child, if ``block`` is an MoE block (it holds ``experts`` too)."""
    if not isinstance(getattr(block, "experts", None), nn.Module):
        return None
    for name in _ROUTER_NAMES:
        router = getattr(block, name, None)
        if isinstance(router, nn.Module):
            try:
                router_weight(router)
            except ValueError:
                continue
            return name
    return None


def _is_mtp(name: str) -> bool:
    return any(part.startswith("mtp") or "nextn" in part for part in name.split("."))


def _is_silu(act: object) -> bool:
    return act is F.silu or isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _swiglu_problems(experts: nn.Module, model: nn.Module) -> list[str]:
    """Why ``experts`` is not plain SwiGLU ``down(silu(gate x) * up x)`` on ``[E, 2I, H]`` / ``[E, H, I]``."""
    problems = []
    params = list(inspect.signature(type(experts).forward).parameters)
    if len(params) < 4:
        problems.append(f"its forward takes {params[1:]}, not (hidden_states, top_k_index, top_k_weights)")
    act = getattr(experts, "act_fn", None)
    if act is None:
        config = getattr(experts, "config", None) or getattr(model, "config", None)
        act = getattr(config, "hidden_act", None)
        if act != "silu":
            problems.append(f"activation {act!r} (need 'silu')")
    elif not _is_silu(act):
        problems.append(f"activation {type(act).__name__} (need SiLU)")
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        problems.append("transposed or interleaved gate/up layout")
    if getattr(experts, "has_bias", False):
        problems.append("expert biases")
    if getattr(experts, "limit", None) is not None or hasattr(experts, "alpha"):
        problems.append("a clamped or scaled GLU (limit / alpha)")
    if getattr(experts, "zero_expert_num", 0):
        problems.append("zero (identity) experts handled inside the experts module")
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
    return problems


def _install(
    module: nn.Module,
    state_attr: str,
    state: Any,
    method: str,
    function: Callable[..., Any],
    patched: list,
) -> None:
    # A bound method (not a closure) so that copy.deepcopy(model) rebinds it to the copy.
    object.__setattr__(module, state_attr, state)
    object.__setattr__(module, method, types.MethodType(function, module))
    patched.append((module, state_attr, method))


def attach(
    model: nn.Module, experts: str | None = None, *, backend: str | None = None, mtp: bool = False
) -> list[str]:
    """Make every MoE block of the transformers model ``model`` a routing site; return their names.

    ``model`` is an instance of a supported architecture (:data:`SUPPORTED_MODEL_TYPES`, read from
    ``model.config.model_type``); the blocks are keyed by module name (``model.layers.1.mlp``).
    Nothing is copied and no transformers class is modified: the blocks', routing calls' (and with
    ``experts="moe_replay"`` experts') ``forward`` are replaced on these instances. Parameters,
    buffers and state-dict keys are unchanged. Outside ``mr.record`` / ``mr.replay`` the model
    computes exactly what it computed before (bitwise).

    ``experts``: ``None`` keeps the model's experts implementation; ``"moe_replay"`` runs the
    experts through moe_replay's backend stages on the model's own weight tensors (SwiGLU experts
    only; results then agree with the original within the dtype's tolerance, not bitwise).
    ``backend``: the moe_replay backend for those experts (``None``: automatic, per call).
    ``mtp``: also attach multi-token-prediction blocks (module docstring).

    Raises ``TypeError`` for a non-module, ``ValueError`` for an unsupported model type (listing
    the supported ones, or saying why it is not), a family the installed transformers lacks, a
    model already attached, a model with no MoE block, a bad ``experts``, ``backend`` or ``mtp``,
    or non-SwiGLU experts with ``experts="moe_replay"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    model_type, family = _family(model)
    if experts not in (None, "moe_replay"):
        raise ValueError(f"experts must be None (the model's own) or 'moe_replay', got {experts!r}")
    if backend is not None:
        if experts is None:
            raise ValueError(f"backend={backend!r} only applies with experts='moe_replay', got experts=None")
        if not isinstance(backend, str) or backend not in registered_backends():
            raise ValueError(f"backend must be None or one of {registered_backends()}, got {backend!r}")
    if not isinstance(mtp, bool):
        raise TypeError(f"mtp must be a bool, got {type(mtp).__name__} {mtp!r}")
    if getattr(model, _MODEL_ATTR, None) is not None:
        raise ValueError(
            f"{type(model).__name__} is already attached; call moe_replay.hf.detach(model) first"
        )
    blocks = []
    for name, module in model.named_modules():
        router_name = _router_of(module)
        if router_name is None or hasattr(getattr(module, router_name), "tid2eid"):
            continue  # not an MoE block, or DeepSeek-V4's hash routing (a fixed token-id table)
        if _is_mtp(name) and not mtp:
            continue
        blocks.append((name, module, router_name))
    blocks.sort(key=lambda item: _is_mtp(item[0]))  # MTP blocks after the decoder's (stable)
    if not blocks:
        raise ValueError(
            f"model ({type(model).__name__}, {model_type!r}) holds no MoE block (a module with an 'experts' "
            "module and a 'gate' or 'router') to attach"
        )

    # Check everything before changing anything, so a failed attach leaves the model untouched.
    plans = []
    for name, block, router_name in blocks:
        if site_of(block) is not None:
            raise ValueError(f"module {name!r} is already a routing site")
        rule = recognise(family, block, router_name, where=f"{model_type} block {name!r}")
        if experts == "moe_replay":
            problems = _swiglu_problems(block.experts, model)
            if problems:
                raise ValueError(
                    f"experts='moe_replay' needs plain SwiGLU experts; {model_type!r} block {name!r} "
                    f"({type(block.experts).__name__}) has {'; '.join(problems)}; use experts=None for it"
                )
        intermediate = getattr(block.experts, "down_proj", None)
        cfg = MoEConfig(
            num_experts=rule.num_experts,
            top_k=rule.top_k,
            hidden_size=rule.hidden_size,
            intermediate_size=int(intermediate.shape[-1]) if isinstance(intermediate, torch.Tensor) else 1,
        )
        method_owned = callable(getattr(type(block), _METHOD_ROUTING, None))
        plans.append((name, block, router_name, rule, cfg, method_owned))

    patched: list[tuple[nn.Module, str, str]] = []
    for _, block, router_name, rule, cfg, method_owned in plans:
        call = _METHOD_ROUTING if method_owned else router_name
        own = block.__dict__.get("forward")
        _install(
            block,
            _BLOCK_ATTR,
            _BlockState(rule, cfg, call, router_name, own),
            "forward",
            _block_forward,
            patched,
        )
        owner, method = (block, _METHOD_ROUTING) if method_owned else (getattr(block, router_name), "forward")
        rstate = _RouterState(block, owner.__dict__.get(method))
        _install(owner, _ROUTER_ATTR, rstate, method, _ROUTING_WRAPPERS[method], patched)
        if experts == "moe_replay":
            state = _ExpertsState(backend, block.experts.__dict__.get("forward"))
            _install(block.experts, _EXPERTS_ATTR, state, "forward", _experts_forward, patched)
        rule = getattr(block, _BLOCK_ATTR).rule
        mark_site(block, cfg.num_experts, cfg.top_k, route_logits=functools.partial(_route_logits, rule, cfg))
    names = [name for name, *_ in plans]
    object.__setattr__(model, _MODEL_ATTR, _Attachment(names, patched))
    return names


def detach(model: nn.Module) -> None:
    """Undo :func:`attach`: every block, routing call and experts module gets its original
    ``forward`` back and stops being a routing site. ``ValueError`` if ``model`` is not attached."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    attachment: _Attachment | None = getattr(model, _MODEL_ATTR, None)
    if attachment is None:
        raise ValueError(
            f"{type(model).__name__} is not attached (moe_replay.hf.attach was not called on it)"
        )
    for module, state_attr, method in reversed(attachment.patched):
        own = getattr(module, state_attr).own_forward
        object.__delattr__(module, method)
        if own is not None:
            object.__setattr__(module, method, own)
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
