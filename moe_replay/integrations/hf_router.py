"""One routing function for every Hugging Face MoE router: its rule read from the module, with forcing.

:func:`recognise` reads a block's router (and the family's table entry, for what the router does
without saying so) into a :class:`RouterRule`; :func:`route_with_rule` routes logits by that rule
with :func:`moe_replay.route`'s forcing semantics: forced slots kept, free slots filled in slot
order with the best remaining experts by the rule's own selection, weights computed from the
current logits at the final ids.

The rule's parts:

* scoring: ``softmax`` over the experts, ``sigmoid`` per expert, the router's own ``score_fn``
  (DeepSeek-V4's ``sqrtsoftplus``), or PhiMoE's ``sparsemixer``;
* selection: top-k of the scores (plus a selection-only bias, within the best groups), or top-k of
  the raw logits with the scoring applied to the k picked logits only (gpt-oss, Granite, Cohere2,
  Llama 4);
* normalisation of the k weights: none, divided by their sum (``+ eps``, or clamped at a floor),
  or by their p-norm (DBRX); then a scaling factor.

Shape legend: T tokens, E experts, G groups, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moe_replay.backends.torch.route import select_experts
from moe_replay.integrations.hf_families import Family
from moe_replay.routing.route import Routing


@dataclass(frozen=True, kw_only=True)
class RouterRule:
    """How one block's router turns logits into ids and weights (resolved at attach)."""

    num_experts: int
    top_k: int
    hidden_size: int
    scoring: Literal["softmax", "sigmoid", "sparsemixer", "score_fn"]
    score_fn: Callable[[torch.Tensor], torch.Tensor] | None
    """The router's own elementwise score function (``scoring="score_fn"``)."""
    select: Literal["scores", "logits"]
    bias_path: tuple[str, ...] | None
    """Attribute path from the block to the selection bias ``[E]`` (read at each call)."""
    n_group: int | None
    topk_group: int | None
    group_score: Literal["top2_sum", "max"]
    norm: Literal["none", "sum", "p"]
    norm_eps: float
    norm_floor: float | None
    norm_p: float | None
    scale: float
    jitter_eps: float
    """PhiMoE's ``router_jitter_noise``: how near a pick's logit the other logits count."""
    dense_output: bool

    def bias(self, block: nn.Module) -> torch.Tensor | None:
        if self.bias_path is None:
            return None
        value: object = block
        for part in self.bias_path:
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):  # replaced after attach
            raise TypeError(f"{'.'.join(self.bias_path)} must be a tensor, got {type(value).__name__}")
        return value.reshape(self.num_experts)


def router_weight(router: nn.Module) -> torch.Tensor:
    """The router's ``[E, H]`` weight (on the router, or on its one linear layer)."""
    for owner in (router, *(getattr(router, n, None) for n in ("classifier", "wg", "gate", "layer"))):
        weight = getattr(owner, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return weight
    raise ValueError(f"router {type(router).__name__} holds no [num_experts, hidden] weight")


_BIAS_PATHS = (
    ("{router}", "e_score_correction_bias"),
    ("{router}", "moe_statics", "e_score_correction_bias"),  # ERNIE 4.5
    ("e_score_correction_bias",),  # MiniMax-M2: on the block, passed to the router
    ("expert_bias",),  # AFMoE, LFM2-MoE (when use_expert_bias)
)


def _find_bias(block: nn.Module, router_name: str, num_experts: int) -> tuple[str, ...] | None:
    for template in _BIAS_PATHS:
        path = tuple(part.format(router=router_name) for part in template)
        value: object = block
        for part in path:
            value = getattr(value, part, None)
        if isinstance(value, torch.Tensor) and value.numel() == num_experts:
            return path
    return None


def recognise(family: Family, block: nn.Module, router_name: str, where: str) -> RouterRule:
    """The rule of ``block``'s router ``getattr(block, router_name)``; ``where`` names it in errors."""
    router = getattr(block, router_name)
    weight = router_weight(router)
    num_experts, hidden = int(weight.shape[0]), int(weight.shape[1])
    top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None)
    if not isinstance(top_k, int) or not 1 <= top_k < num_experts:
        raise ValueError(
            f"{where}: top_k must be an int in [1, num_experts={num_experts}), got {top_k!r} "
            "(with top_k == num_experts every expert is used and there is nothing to route)"
        )

    scoring, score_fn = family.scoring, None
    if callable(getattr(router, "score_fn", None)):
        scoring, score_fn = "score_fn", router.score_fn
    elif hasattr(router, "expert_selection_fn"):  # Cohere2-MoE
        scoring = router.expert_selection_fn
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"{where}: expert_selection_fn must be 'softmax' or 'sigmoid', got {scoring!r}")
    if scoring == "sparsemixer" and top_k != 2:
        raise ValueError(f"{where}: PhiMoE's sparsemixer routes exactly 2 experts, got top_k={top_k}")

    norm_p = getattr(block, "moe_normalize_expert_weights", None)  # DBRX
    if norm_p is not None:
        norm = "p"
    elif hasattr(router, "norm_topk_prob"):
        norm = "sum" if router.norm_topk_prob else "none"
    else:
        norm = "sum" if family.norm else "none"

    n_group, topk_group = getattr(router, "num_group", None), getattr(router, "topk_group", None)
    method = getattr(router, "topk_method", None)  # DeepSeek-V2
    if method == "greedy":
        n_group = topk_group = None
    elif method not in (None, "group_limited_greedy"):
        raise ValueError(f"{where}: topk_method must be 'greedy' or 'group_limited_greedy', got {method!r}")
    if n_group is not None and (topk_group is None or n_group <= 1):
        n_group = topk_group = None  # one group: nothing to limit
    if n_group is not None and (num_experts % n_group or not 1 <= topk_group <= n_group):
        raise ValueError(
            f"{where}: n_group={n_group} must divide num_experts={num_experts} and topk_group={topk_group} "
            f"be in [1, n_group]"
        )

    scale = getattr(router, "routed_scaling_factor", None) or getattr(router, "route_scale", None) or 1.0
    return RouterRule(
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden,
        scoring=scoring,
        score_fn=score_fn,
        select=family.select,
        bias_path=_find_bias(block, router_name, num_experts) if family.select == "scores" else None,
        n_group=n_group,
        topk_group=topk_group,
        group_score=family.group_score,
        norm=norm,
        norm_eps=family.norm_eps,
        norm_floor=getattr(router, "norm_min", None),  # ERNIE 4.5
        norm_p=None if norm_p is None else float(norm_p),
        scale=float(scale),
        jitter_eps=float(getattr(router, "router_jitter_noise", 0.0) or 0.0),
        dense_output=family.dense_output,
    )


# --------------------------------------------------------------------------------------------
# Routing by a rule
# --------------------------------------------------------------------------------------------


def _scores(logits_TE: torch.Tensor, rule: RouterRule) -> torch.Tensor:
    if rule.scoring == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if rule.scoring == "sigmoid":
        return torch.sigmoid(logits_TE)
    assert rule.score_fn is not None
    return rule.score_fn(logits_TE)


def _kept_experts(select_TE: torch.Tensor, rule: RouterRule) -> torch.Tensor:
    """Bool ``[T, E]``: the experts of each token's ``topk_group`` best groups (ties: lower group)."""
    T = select_TE.shape[0]
    grouped_TGS = select_TE.view(T, rule.n_group, -1)
    if rule.group_score == "max":
        group_TG = grouped_TGS.max(dim=2).values
    else:
        group_TG = grouped_TGS.topk(min(2, grouped_TGS.shape[2]), dim=2).values.sum(dim=2)
    best = torch.sort(group_TG, dim=1, descending=True, stable=True).indices[:, : rule.topk_group]
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best, True)
    return keep_TG.repeat_interleave(grouped_TGS.shape[2], dim=1)


def selection(logits_TE: torch.Tensor, rule: RouterRule, bias_E: torch.Tensor | None) -> torch.Tensor:
    """What the router ranks, ``[T, E]`` float32: its top-k are the router's own choice.

    Without a bias or groups that is the logits themselves (every scoring is monotonic), so the
    ranking does not depend on how a score rounds; where two logits round to one score, the
    larger logit wins. Ties go to the lower expert index.
    """
    logits = logits_TE.detach().float()
    if rule.select == "logits" or (bias_E is None and rule.n_group is None):
        return logits
    scores = _scores(logits, rule)
    select = scores + bias_E if bias_E is not None else scores
    rank = select if bias_E is not None else logits
    if rule.n_group is not None:
        rank = rank.masked_fill(~_kept_experts(select, rule), float("-inf"))
    return rank


def _sparsemixer_weights(logits_TE: torch.Tensor, ids_TK: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """PhiMoE's weights at any ids: slot j is a softmax over the logits within ``2 * jitter_eps``
    (relatively) of slot j's own logit, earlier slots' experts excluded. For the router's own
    (top-2) ids this is exactly sparsemixer's evaluation-mode multiplier."""
    remaining_TE = logits_TE
    slots = []
    for j in range(ids_TK.shape[1]):
        pick_T1 = ids_TK[:, j : j + 1]
        with torch.no_grad():
            threshold_T1 = remaining_TE.gather(1, pick_T1)
            factor_TE = logits_TE.abs().clamp(min=threshold_T1)
            far_TE = ((threshold_T1 - logits_TE) / factor_TE) > 2 * jitter_eps
        gates_TE = remaining_TE.masked_fill(far_TE, float("-inf"))
        slots.append(torch.softmax(gates_TE, dim=-1).gather(1, pick_T1))
        remaining_TE = remaining_TE.scatter(1, pick_T1, float("-inf"))
    return torch.cat(slots, dim=1)


def gate_weights(logits_TE: torch.Tensor, ids_TK: torch.Tensor, rule: RouterRule) -> torch.Tensor:
    """Float32 weights ``[T, K]`` at ``ids_TK``, differentiable w.r.t. the logits.

    Softmax then renormalise is computed as the softmax of the k gathered logits (the same
    function, finite when a forced expert's probability underflows), sigmoid then renormalise
    (without eps) as the softmax of the gathered log-sigmoids.
    """
    logits = logits_TE.float()
    picked_TK = logits.gather(1, ids_TK)
    if rule.scoring == "sparsemixer":
        weights = _sparsemixer_weights(logits, ids_TK, rule.jitter_eps)
    elif rule.select == "logits" and rule.scoring == "softmax":
        weights = torch.softmax(picked_TK, dim=1)
    elif rule.scoring == "softmax":
        if rule.norm == "sum" and rule.norm_floor is None:
            weights = torch.softmax(picked_TK, dim=1)
        elif rule.norm == "sum":  # ERNIE 4.5: the sum clamped at norm_min
            weights = torch.softmax(logits, dim=1).gather(1, ids_TK)
            weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=rule.norm_floor)
        elif rule.norm == "p":  # DBRX: scale-free, so the softmax of the k logits gives the same ratios
            weights = torch.softmax(picked_TK, dim=1)
            weights = weights / torch.linalg.vector_norm(weights, ord=rule.norm_p, dim=1, keepdim=True)
        else:
            weights = torch.softmax(logits, dim=1).gather(1, ids_TK)
    elif rule.norm == "sum" and rule.norm_eps == 0.0 and rule.scoring == "sigmoid":
        weights = torch.softmax(F.logsigmoid(picked_TK), dim=1)
    else:  # elementwise scores (sigmoid, score_fn): scoring the picked logits is picking the scores
        weights = _scores(picked_TK, rule)
        if rule.norm == "sum":
            weights = weights / (weights.sum(dim=1, keepdim=True) + rule.norm_eps)
    if rule.scale != 1.0:
        weights = weights * rule.scale
    return weights


def route_with_rule(
    logits_TE: torch.Tensor, rule: RouterRule, forced_TK: torch.Tensor | None, bias_E: torch.Tensor | None
) -> Routing:
    """Ids (forced slots kept, free slots the best remaining by the rule) and weights at them."""
    ids_TK = select_experts(selection(logits_TE, rule, bias_E), rule.top_k, forced_TK)
    return Routing(ids_TK.to(torch.int32), gate_weights(logits_TE, ids_TK, rule))
