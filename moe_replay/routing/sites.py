"""Routing sites: the modules whose routing ``record`` and ``replay`` can see and steer.

A routing site is any module carrying a :class:`RoutingSite` in its ``moe_replay_site``
attribute: every :class:`moe_replay.MoE` does, and Hugging Face MoE blocks do after
``moe_replay.hf.attach``. Contexts find sites with ``model.named_modules()`` and key them by
qualified name; they install their state on the site and remove it on exit. There is no global
registry of layers.

A site routes through :func:`route_at_site`, which

* without an active context, calls the layer's own routing unchanged;
* under ``replay``, takes forced ids from the trace for the first forward of the layer in the
  scope and reuses the ids it resolved for every later forward (activation-checkpoint recompute);
* under ``record``, hands the ids actually used to every active recorder, skipping forwards that
  run inside a backward pass (checkpoint recompute), so each token is recorded once.

Shape legend: T tokens, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_replay.routing.route import Routing

SITE_ATTR = "moe_replay_site"

RouteFn = Callable[[torch.Tensor | None, bool], Routing]
"""``route_fn(forced_ids_TK or None, validate)``: the layer's routing with optional forcing."""


class ReplayState:
    """One layer's replay inside one ``replay`` scope: forced ids, then the ids it resolved.

    The first forward in the scope routes with the trace's ids (``-1`` slots decided by the
    router) and keeps the final ids; every later forward reuses them as full forced rows, so the
    router's scores no longer matter for selection (activation-checkpoint recompute routes
    exactly like the forward, near-ties included). Gate weights are always recomputed from the
    current logits, so gradients reach the router.
    """

    def __init__(self, layer: str, top_k: int, forced_ids: torch.Tensor | None) -> None:
        self.layer = layer
        self.top_k = top_k
        self.forced_ids = forced_ids  # [..., K] from the trace (already validated), or None: freeze
        self.resolved_TK: torch.Tensor | None = None
        self.resolved_shape: tuple[int, ...] = ()

    def route(self, num_tokens: int, route_fn: RouteFn, lead_shape: tuple[int, ...] | None = None) -> Routing:
        """Ids for this forward of ``num_tokens`` tokens (token shape ``lead_shape``, if known)."""
        lead = tuple(lead_shape) if lead_shape is not None else (num_tokens,)
        if self.resolved_TK is not None:
            if self.resolved_TK.shape[0] != num_tokens:
                raise ValueError(
                    f"layer {self.layer!r} ran on token shape {list(lead)} ({num_tokens} tokens), but its "
                    f"routing in this replay scope was resolved for token shape {list(self.resolved_shape)} "
                    f"({self.resolved_TK.shape[0]} tokens); a replay scope reuses the first forward's "
                    "routing, so open one scope per batch"
                )
            # Full rows of distinct, in-range ids resolved earlier: nothing left to validate.
            return route_fn(self.resolved_TK, False)
        forced_TK = None
        if self.forced_ids is not None:
            forced_TK = self._forced_for(num_tokens, lead)
        routing = route_fn(forced_TK, False)
        self.resolved_TK = routing.expert_ids.detach()
        self.resolved_shape = lead
        return routing

    def _forced_for(self, num_tokens: int, lead: tuple[int, ...]) -> torch.Tensor:
        """The trace's ids as ``[T, K]`` for a forward of token shape ``lead``.

        The trace fits when it holds as many tokens as the forward; when both have the same
        number of token axes, the axes must agree too (a ``[S, B]`` trace does not replay a
        ``[B, S]`` batch). A trace and a forward with different numbers of axes (``[B, S]`` ids
        for a layer that flattens its input to ``[B*S]``) are matched in row-major order.
        """
        ids = self.forced_ids
        assert ids is not None, "only a scope with forced ids has them to fit"
        traced_shape = tuple(ids.shape[:-1])
        traced = ids.numel() // self.top_k
        if traced != num_tokens or (len(traced_shape) == len(lead) and traced_shape != lead):
            raise ValueError(
                f"layer {self.layer!r}: the trace holds ids of shape {list(ids.shape)} ({traced} tokens), "
                f"the forward routes token shape {list(lead)} ({num_tokens} tokens, ids "
                f"{[*lead, self.top_k]})"
            )
        return ids.reshape(num_tokens, self.top_k)


@dataclass
class RoutingSite:
    """What record/replay need to know of a routing module, and their state while active."""

    num_experts: int
    top_k: int
    name: str = ""
    replay: ReplayState | None = None
    recorders: list[Callable[[torch.Tensor], None]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.replay is not None or bool(self.recorders)


def mark_site(module: nn.Module, num_experts: int, top_k: int) -> RoutingSite:
    """Make ``module`` a routing site that routes ``top_k`` of ``num_experts`` experts per token.

    The module's forward must then route through :func:`route_at_site` with the returned site
    (or ``site_of(module)``). Marking again replaces the site. Returns the site.
    """
    for arg, value in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
    site = RoutingSite(num_experts=num_experts, top_k=top_k)
    # object.__setattr__ keeps nn.Module from treating the site as a submodule or buffer.
    object.__setattr__(module, SITE_ATTR, site)
    return site


def unmark_site(module: nn.Module) -> None:
    if hasattr(module, SITE_ATTR):
        object.__delattr__(module, SITE_ATTR)


def site_of(module: nn.Module) -> RoutingSite | None:
    return getattr(module, SITE_ATTR, None)


def find_sites(model: nn.Module) -> Iterator[tuple[str, RoutingSite]]:
    """(qualified name, site) of every routing site in ``model``, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        site = site_of(module)
        if site is not None:
            yield name, site


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. a checkpointed recompute)."""
    return torch._C._current_graph_task_id() != -1


def route_at_site(
    site: RoutingSite | None,
    route_fn: RouteFn,
    num_tokens: int,
    lead_shape: tuple[int, ...],
    forced_TK: torch.Tensor | None = None,
) -> Routing:
    """Route ``num_tokens`` tokens at ``site``, applying any active replay and recorders.

    ``route_fn(forced_TK, validate)`` is the layer's own routing: it must return a
    :class:`Routing` with ``expert_ids [num_tokens, K]`` that keep every forced slot.
    ``lead_shape`` is the token shape of the layer's input (``x.shape[:-1]``, product
    ``num_tokens``); recorders get the ids in that shape, so a batch axis is kept, and replay
    checks a trace against it. ``forced_TK`` are ids the caller forces itself (``[T, K]`` or
    ``None``); inside ``replay`` they are an error, since the scope decides the routing.
    ``site=None`` or an inactive site routes with ``route_fn(forced_TK, True)`` unchanged.
    """
    if site is None or not site.active:
        return route_fn(forced_TK, True)
    if site.replay is not None:
        if forced_TK is not None:
            raise ValueError(
                f"layer {site.name!r}: forced_expert_ids were passed inside mr.replay, which already "
                "decides this layer's routing; pass one or the other"
            )
        routing = site.replay.route(num_tokens, route_fn, lead_shape)
    else:
        routing = route_fn(forced_TK, True)
    if site.recorders and not _in_backward():
        ids = routing.expert_ids.detach().reshape(*lead_shape, site.top_k)
        for recorder in site.recorders:
            recorder(ids)
    return routing
