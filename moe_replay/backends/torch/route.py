"""Reference routing: plain PyTorch, float32, readable over clever.

Shape legend: T tokens, E experts, G groups, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_replay.config import MoEConfig
from moe_replay.routing.route import bad_forced_rows
from moe_replay.types import Routing


def _descending_order(scores_TE: torch.Tensor) -> torch.Tensor:
    """Expert indices by descending score; ties go to the lower index (a stable sort)."""
    return torch.sort(scores_TE, dim=1, descending=True, stable=True).indices


def kept_experts(select_TE: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Bool ``[T, E]``: the experts of each token's ``topk_group`` best groups.

    A group's score is the sum of its two best selection scores (DeepSeek-V3); ties between
    groups go to the lower group index.
    """
    T = select_TE.shape[0]
    per_group = cfg.experts_per_group
    assert cfg.n_group is not None, "kept_experts is for group-limited routing"
    grouped_TGS = select_TE.view(T, cfg.n_group, per_group)
    group_score_TG = grouped_TGS.topk(min(2, per_group), dim=2).values.sum(dim=2)
    kept_groups = _descending_order(group_score_TG)[:, : cfg.topk_group]
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, kept_groups, True)
    return keep_TG.repeat_interleave(per_group, dim=1)


def selection_scores(logits_TE: torch.Tensor, cfg: MoEConfig, bias_E: torch.Tensor | None) -> torch.Tensor:
    """What the router ranks experts by: a tensor whose top-K are the router's own choices.

    Without a bias this is the logits themselves: softmax and sigmoid are monotonic, and ranking
    the logits makes every backend choose bit-identically (computed scores may differ in the last
    ulp between implementations). With a bias it is ``scores + bias``. Either way the experts
    outside the kept groups are set to -inf.
    """
    logits = logits_TE.detach().float()
    if bias_E is None and cfg.n_group is None:
        return logits
    scores = torch.softmax(logits, dim=1) if cfg.scoring == "softmax" else torch.sigmoid(logits)
    select = scores + bias_E.float() if bias_E is not None else scores
    rank = select if bias_E is not None else logits
    if cfg.n_group is not None:
        rank = rank.masked_fill(~kept_experts(select, cfg), float("-inf"))
    return rank


def select_experts(select_TE: torch.Tensor, top_k: int, forced_TK: torch.Tensor | None) -> torch.Tensor:
    """Final ids ``[T, K]`` (int64): forced slots kept, free slots filled with the best remaining experts."""
    if forced_TK is None:
        return _descending_order(select_TE)[:, :top_k]
    T, E = select_TE.shape
    forced = forced_TK.long()
    is_forced = (forced >= 0) & (forced < E)  # with validate=False, out-of-range ids act as free slots
    rows_TK = torch.arange(T, device=forced.device).unsqueeze(1).expand(T, top_k)
    remaining_TE = select_TE.clone()
    remaining_TE[rows_TK[is_forced], forced[is_forced]] = float("-inf")
    remaining_order = _descending_order(remaining_TE)[:, :top_k]
    free_rank = (torch.cumsum((~is_forced).long(), dim=1) - 1).clamp(min=0)
    return torch.where(is_forced, forced, remaining_order.gather(1, free_rank))


def gate_weights(logits_TE: torch.Tensor, ids_TK: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Float32 gate weights at ``ids_TK``, finite with finite gradients for any finite logits.

    softmax + norm is the softmax of the gathered logits (the same function as gathering the
    softmax and renormalising, without 0/0 when a replayed expert's probability underflows);
    sigmoid + norm is likewise the softmax of the gathered log-sigmoids.
    """
    logits = logits_TE.float()
    picked_TK = logits.gather(1, ids_TK)
    if cfg.scoring == "softmax":
        if cfg.norm_topk_prob:
            weights = torch.softmax(picked_TK, dim=1)
        else:
            weights = torch.softmax(logits, dim=1).gather(1, ids_TK)
    elif cfg.norm_topk_prob:
        weights = torch.softmax(F.logsigmoid(picked_TK), dim=1)
    else:
        weights = torch.sigmoid(picked_TK)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights


def route(
    logits_TE: torch.Tensor,
    cfg: MoEConfig,
    forced_TK: torch.Tensor | None,
    bias_E: torch.Tensor | None,
    bad_row_flag: torch.Tensor | None = None,
) -> Routing:
    select_TE = selection_scores(logits_TE, cfg, bias_E)
    ids_TK = select_experts(select_TE, cfg.top_k, forced_TK)
    weights_TK = gate_weights(logits_TE, ids_TK, cfg)
    if bad_row_flag is not None and forced_TK is not None and forced_TK.shape[0]:
        # The device-side check (Backend.route): NaN weights for bad rows, T - first bad row.
        T = forced_TK.shape[0]
        bad_T = bad_forced_rows(forced_TK, cfg.num_experts)
        countdown_T = torch.arange(T, 0, -1, device=bad_T.device, dtype=torch.int32)
        bad_row_flag.copy_(torch.where(bad_T, countdown_T, 0).max().view(1))
        weights_TK = torch.where(bad_T[:, None], float("nan"), weights_TK)
    return Routing(ids_TK.to(torch.int32), weights_TK)
