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
   row is then unspecified, but no backend reads or writes out of bounds. ``validate=None`` checks
   without a synchronisation (on a GPU the error is raised later, and bad rows get NaN weights).

Without a bias, selection ranks the logits themselves (both scorings are monotonic in them, and
ranking the logits makes every backend choose bit-identically); where two distinct logits round to
the same score, the larger logit wins. Ties in what is ranked go to the lower expert index.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from moe_replay.backends.registry import get_backend
from moe_replay.config import MoEConfig
from moe_replay.types import Routing

if TYPE_CHECKING:
    from moe_replay.backends.base import Backend

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


def bad_forced_rows(forced_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Bool ``[T]``: rows holding an id below -1 or at least ``num_experts``, or an expert twice.

    Plain tensor ops on the ids' device, no host synchronisation (the Triton route kernel makes the
    same check in its own pass).
    """
    ids = forced_TK.long()
    out_of_range_T = ((ids < -1) | (ids >= num_experts)).any(dim=1)
    K = ids.shape[1]
    later_KK = torch.ones(K, K, dtype=torch.bool, device=ids.device).triu(1)
    same_TKK = (ids[:, :, None] == ids[:, None, :]) & later_KK & (ids[:, :, None] >= 0)
    return out_of_range_T | same_TKK.flatten(1).any(dim=1)


def _bad_row_error(name: str, forced_TK: torch.Tensor, row: int, num_experts: int) -> ValueError:
    ids = forced_TK[row].long().tolist()
    if any(i < -1 or i >= num_experts for i in ids):
        return ValueError(f"{name} row {row} holds {ids}: ids must be -1 (free) or in [0, {num_experts})")
    return ValueError(f"{name} row {row} holds {ids}: an expert is repeated within the row")


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
    bad_rows = bad_forced_rows(forced_TK, cfg.num_experts).nonzero()  # one sync
    if bad_rows.numel():
        raise _bad_row_error(name, forced_TK, int(bad_rows[0]), cfg.num_experts)


class DeferredCheck:
    """The verdict of a forced-id check made on the device, read later without stalling the host.

    The routing kernel writes ``T - r`` for the first bad row ``r`` into a flag (0: every row is
    valid) and gives bad rows NaN weights, so their outputs are NaN, never plausible. On a GPU the
    flag is copied to pinned host memory behind an event; :func:`raise_deferred_errors` (called by
    every later :func:`route` in the thread) and the routing's backward read it and raise the
    ``ValueError`` naming the row, once.
    """

    def __init__(
        self,
        host_1: torch.Tensor,
        event: torch.cuda.Event | None,
        forced_TK: torch.Tensor,
        num_experts: int,
        name: str,
    ) -> None:
        self.host_1, self.event = host_1, event
        self.forced_TK, self.num_experts, self.name = forced_TK, num_experts, name
        self.reported = False

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def raise_if_bad(self) -> None:
        """Wait for the verdict (already there unless called right after the launch) and raise,
        once: a check that has raised is done."""
        if self.reported:
            return
        if self.event is not None:
            self.event.synchronize()
        flag = int(self.host_1[0])
        self.reported = True  # the flag's slot may be reused from here on
        if flag:
            raise _bad_row_error(self.name, self.forced_TK, self.forced_TK.shape[0] - flag, self.num_experts)


class _CheckSlots:
    """Flags for :class:`DeferredCheck` on one GPU, used in turn by one thread: device flags, their
    pinned host copies and events, allocated once (a pinned allocation per call would cost a
    ``cudaHostAlloc``, which synchronises)."""

    SIZE = 64

    def __init__(self, device: torch.device) -> None:
        self.flags = torch.zeros(self.SIZE, dtype=torch.int32, device=device)
        self.host = torch.zeros(self.SIZE, dtype=torch.int32, pin_memory=True)
        self.events = [torch.cuda.Event() for _ in range(self.SIZE)]
        self.checks: list[DeferredCheck | None] = [None] * self.SIZE
        self.next = 0

    def take(self) -> int:
        """A free slot: the oldest, whose check (``SIZE`` calls ago) is resolved first."""
        i = self.next
        self.next = (i + 1) % self.SIZE
        previous = self.checks[i]
        if previous is not None:
            previous.raise_if_bad()
        return i


_pending = threading.local()


def _capturing() -> bool:
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def raise_deferred_errors() -> None:
    """Raise the first failed :class:`DeferredCheck` of this thread whose verdict has arrived (and
    not yet raised in a backward). Nothing is read while a CUDA graph is being captured."""
    pending: list[DeferredCheck] = getattr(_pending, "checks", [])
    if not pending or _capturing():
        return
    while pending and pending[0].ready():
        pending.pop(0).raise_if_bad()


class _RaiseInBackward(torch.autograd.Function):
    """Identity on the weights whose backward raises a failed deferred check before gradients flow."""

    @staticmethod
    def forward(ctx, weights_TK, check):  # type: ignore[override]
        ctx.check = check
        return weights_TK.view_as(weights_TK)

    @staticmethod
    def backward(ctx, grad_TK):  # type: ignore[override]
        ctx.check.raise_if_bad()
        return grad_TK, None


def route(
    logits: torch.Tensor,
    cfg: MoEConfig,
    forced_expert_ids: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    validate: bool | None = True,
    *,
    backend: str | None = None,
) -> Routing:
    """Select K experts per token from ``logits [T, E]`` and weigh them (module docstring).

    ``forced_expert_ids [T, K]`` (any integer dtype, any device: it is moved to the logits' device)
    forces experts slot by slot, ``-1`` leaving a slot to the router. ``bias [E]`` is the selection
    bias of ``cfg.score_bias``. ``backend`` picks the implementation (see
    :func:`moe_replay.backends.get_backend`); all give the same ids and weights.

    ``validate``: ``True`` checks the forced ids now and raises (a host synchronisation on a
    GPU); ``False`` checks nothing (bad rows give unspecified routes, never an out-of-bounds
    access); ``None`` checks without a synchronisation: on the CPU as ``True``, on a GPU on the
    device, giving bad rows NaN weights and raising the ``ValueError`` at the next ``route`` call
    of this thread or in the backward of these weights (:class:`DeferredCheck`).
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate must be True, False or None, got {validate!r}")
    raise_deferred_errors()
    check_logits(logits, cfg)
    check_bias(bias, cfg)
    impl = get_backend(backend, logits.device)
    if forced_expert_ids is None:
        return impl.route(logits, cfg, None, bias)
    on_device = validate is None and logits.device.type != "cpu"
    check_now = validate is not False and not on_device
    check_forced_ids(forced_expert_ids, logits.shape[0], cfg, validate=check_now)
    forced_TK = forced_expert_ids.to(logits.device, non_blocking=True)
    if not on_device:
        return impl.route(logits, cfg, forced_TK, bias)
    return route_checked_on_device(impl, logits, cfg, forced_TK, bias)


def route_checked_on_device(
    impl: Backend, logits: torch.Tensor, cfg: MoEConfig, forced_TK: torch.Tensor, bias: torch.Tensor | None
) -> Routing:
    """``impl.route`` with the forced ids checked by the routing kernel (:class:`DeferredCheck`).

    Inside a CUDA graph capture only the NaN weights remain: the flag is never read back.
    """
    device = logits.device
    if device.type != "cuda" or _capturing():
        flag_1 = torch.zeros(1, dtype=torch.int32, device=device)
        routing = impl.route(logits, cfg, forced_TK, bias, bad_row_flag=flag_1)
        if device.type == "cuda":
            return routing
        check = DeferredCheck(flag_1, None, forced_TK, cfg.num_experts, "forced_expert_ids")
    else:
        slots_by_device = getattr(_pending, "slots", None)
        if slots_by_device is None:
            slots_by_device = _pending.slots = {}
        slots = slots_by_device.get(device)
        if slots is None:
            slots = slots_by_device[device] = _CheckSlots(device)
        i = slots.take()
        flag_1, host_1, event = slots.flags[i : i + 1], slots.host[i : i + 1], slots.events[i]
        flag_1.zero_()
        routing = impl.route(logits, cfg, forced_TK, bias, bad_row_flag=flag_1)
        host_1.copy_(flag_1, non_blocking=True)
        event.record()
        check = slots.checks[i] = DeferredCheck(
            host_1, event, forced_TK, cfg.num_experts, "forced_expert_ids"
        )
    if not hasattr(_pending, "checks"):
        _pending.checks = []
    _pending.checks.append(check)
    weights = routing.weights
    if weights.requires_grad:
        weights = _RaiseInBackward.apply(weights, check)
    return Routing(routing.expert_ids, weights)
