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
    """One layer's replay inside one ``replay`` scope: forced ids, then the ids it resolved."""

    def __init__(self, layer: str, top_k: int, forced_ids: torch.Tensor | None) -> None:
        self.layer = layer
        self.top_k = top_k
        self.forced_ids = forced_ids  # [..., K] from the trace (already validated), or None: freeze
        self.resolved_TK: torch.Tensor | None = None

    def route(self, num_tokens: int, route_fn: RouteFn) -> Routing:
        if self.resolved_TK is not None:
            if self.resolved_TK.shape[0] != num_tokens:
                raise ValueError(
                    f"layer {self.layer!r} ran on {num_tokens} tokens, but its routing in this replay scope "
                    f"was resolved for {self.resolved_TK.shape[0]} tokens; a replay scope reuses the first "
                    "forward's routing, so open one scope per batch"
                )
            # Full rows of distinct, in-range ids resolved earlier: nothing left to validate.
            return route_fn(self.resolved_TK, False)
        forced_TK = None
        if self.forced_ids is not None:
            traced = self.forced_ids.numel() // self.top_k
            if traced != num_tokens:
                raise ValueError(
                    f"layer {self.layer!r}: the trace holds {traced} tokens "
                    f"(shape {tuple(self.forced_ids.shape)}), the forward has {num_tokens}"
                )
            forced_TK = self.forced_ids.reshape(num_tokens, self.top_k)
        routing = route_fn(forced_TK, False)
        self.resolved_TK = routing.expert_ids.detach()
        return routing


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

    ``lead_shape`` is the token shape of the layer's input (``x.shape[:-1]``); recorders get the
    ids in that shape, so a batch axis is kept.
    """
    if site is None or not site.active:
        return route_fn(forced_TK, True)
    if site.replay is not None:
        if forced_TK is not None:
            raise ValueError(
                f"layer {site.name!r}: forced_expert_ids were passed inside mr.replay, which already "
                "decides this layer's routing; pass one or the other"
            )
        routing = site.replay.route(num_tokens, route_fn)
    else:
        routing = route_fn(forced_TK, True)
    if site.recorders and not _in_backward():
        ids = routing.expert_ids.detach().reshape(*lead_shape, site.top_k)
        for recorder in site.recorders:
            recorder(ids)
    return routing
