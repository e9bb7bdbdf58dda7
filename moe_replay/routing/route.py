"""route(): the one function that turns router logits into expert ids and gate weights.

Shape legend: T tokens, E experts, K experts per token (top_k).

Semantics (``docs/routing.md``), implemented by every backend:

1. ``scores_TE = softmax(logits)`` or ``sigmoid(logits)``, in float32.
2. Selection scores are ``scores + bias`` (the bias steers selection only). With ``n_group``,
   experts split into ``n_group`` equal groups; a group's score is the sum of its two best
   selection scores (its one score if a group holds one expert); only the ``topk_group`` best
   groups stay selectable.
3. The router's own choice is the top-K of the selection scores.
4. ``forced_expert_ids_TK``: a slot holding ``e`` in ``[0, E)`` forces expert ``e``; ``-1`` is a
   free slot. Forced ids keep their slots; free slots are filled, in slot order, with the router's
   own choices in descending score order, skipping experts already forced in that row.
5. ``weights_TK`` are the scores (without bias) at the final ids; normalised to sum 1 if
   ``norm_topk_prob``; times ``routed_scaling_factor``. Gradients reach the logits through them,
   replayed or not.
6. ``validate=True`` checks forced ids (dtype, shape, range, repeats) and names the first bad row.
   ``validate=False`` skips the checks that need a host synchronisation; the result for an invalid
   row is then unspecified, but no backend reads or writes out of bounds.

Without a bias, selection ranks the logits themselves (both scorings are monotonic in them, and
ranking the logits makes every backend choose bit-identically); where two distinct logits round to
the same score, the larger logit wins. Ties in what is ranked go to the lower expert index.
"""

from __future__ import annotations

import torch

from moe_replay.backends.registry import get_backend
from moe_replay.config import MoEConfig
from moe_replay.types import Routing

__all__ = ["Routing", "check_bias", "check_forced_ids", "check_logits", "route"]


def check_logits(logits: torch.Tensor, cfg: MoEConfig) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] != cfg.num_experts:
        raise ValueError(
            f"logits must have shape [T, num_experts={cfg.num_experts}], got {tuple(logits.shape)}"
        )


def check_bias(bias: torch.Tensor | None, cfg: MoEConfig) -> None:
    if cfg.score_bias and bias is None:
        raise ValueError("bias is required when MoEConfig.score_bias is True, got None")
    if not cfg.score_bias and bias is not None:
        raise ValueError("bias was given but MoEConfig.score_bias is False; set score_bias=True to use it")
    if bias is not None and (bias.shape != (cfg.num_experts,) or not bias.is_floating_point()):
        raise ValueError(
            f"bias must be a floating-point tensor of shape [{cfg.num_experts}], "
            f"got {bias.dtype} {tuple(bias.shape)}"
        )


def check_forced_ids(
    forced_TK: torch.Tensor,
    num_tokens: int,
    cfg: MoEConfig,
    *,
    validate: bool,
    name: str = "forced_expert_ids",
) -> None:
    """Raise ``ValueError`` naming the first bad row of ``forced_TK``.

    The dtype and shape checks are free; the range and repeat checks read the values (a host
    synchronisation on a GPU) and run only with ``validate=True``.
    """
    if not isinstance(forced_TK, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(forced_TK).__name__}")
    if forced_TK.is_floating_point() or forced_TK.is_complex() or forced_TK.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {forced_TK.dtype}")
    if tuple(forced_TK.shape) != (num_tokens, cfg.top_k):
        raise ValueError(
            f"{name} must have shape [T={num_tokens}, top_k={cfg.top_k}], got {tuple(forced_TK.shape)}"
        )
    if not validate or num_tokens == 0:
        return
    ids = forced_TK.long()
    out_of_range_T = ((ids < -1) | (ids >= cfg.num_experts)).any(dim=1)
    sorted_ids = ids.sort(dim=1).values
    repeated_T = ((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)).any(dim=1)
    bad_rows = (out_of_range_T | repeated_T).nonzero()  # one sync; the first bad row of either kind
    if bad_rows.numel():
        row = int(bad_rows[0])
        if out_of_range_T[row]:
            raise ValueError(
                f"{name} row {row} holds {ids[row].tolist()}: ids must be -1 (free) or in "
                f"[0, {cfg.num_experts})"
            )
        raise ValueError(f"{name} row {row} holds {ids[row].tolist()}: an expert is repeated within the row")


def route(
    logits: torch.Tensor,
    cfg: MoEConfig,
    forced_expert_ids: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    validate: bool = True,
    *,
    backend: str | None = None,
) -> Routing:
    """Select K experts per token from ``logits [T, E]`` and weigh them (module docstring).

    ``forced_expert_ids [T, K]`` (any integer dtype, any device: it is moved to the logits' device)
    forces experts slot by slot, ``-1`` leaving a slot to the router. ``bias [E]`` is the selection
    bias of ``cfg.score_bias``. ``backend`` picks the implementation (see
    :func:`moe_replay.backends.get_backend`); all give the same ids and weights.
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    check_logits(logits, cfg)
    check_bias(bias, cfg)
    if forced_expert_ids is not None:
        check_forced_ids(forced_expert_ids, logits.shape[0], cfg, validate=validate)
        forced_expert_ids = forced_expert_ids.to(logits.device, non_blocking=True)
    impl = get_backend(backend, logits.device)
    return impl.route(logits, cfg, forced_expert_ids, bias)
