"""Routing sites: the modules whose routing ``record`` and ``replay`` can see and steer.

A routing site is any module carrying a :class:`RoutingSite` in its ``moe_replay_site``
attribute: every :class:`moe_replay.MoE` does, and Hugging Face MoE blocks do after
``moe_replay.hf.attach``. Every forward of a site routes through :func:`route_at_site`. There is
no global registry of layers and no scope state on the modules: the open ``record`` / ``replay``
scopes live in a :class:`contextvars.ContextVar`, so they belong to the thread (or asyncio task)
that opened them, and a model shared with another thread routes there as if no scope were open.

What :func:`route_at_site` does, in order:

1. **Recompute.** A forward that runs inside a backward pass as the recompute of an activation
   checkpoint region (``torch.utils.checkpoint``, reentrant or not, which is also what Hugging Face
   ``gradient_checkpointing_enable()``, ``checkpoint_wrapper`` and the composable ``checkpoint``
   use) takes exactly the ids its forward used: the forward stored them on the checkpoint region
   (the ``CheckpointFunction`` context or the non-reentrant ``_CheckpointFrame``), and the i-th call
   of the site in the recompute takes the region's i-th ids. The routes live as long as the
   region, i.e. as long as the autograd graph that needs them, so recompute is exact whatever the
   scope does meanwhile: several micro-batches in flight, backward after the scope has closed,
   backward in another thread. A recompute whose forward stored nothing (an unrecognised
   checkpoint mechanism inside the region, e.g. another saved-tensor hook) is a ``RuntimeError``,
   never a silent re-route.
2. **Otherwise a new forward**, which resolves its own routes: under ``replay`` from the trace
   meant for this forward (free slots and frozen layers: the router), else from the caller's
   forced ids or the router.
3. **Inside a checkpoint region** (grad enabled), the ids are stored on the region for step 1.
4. **Under ``record``**, the ids are handed to the scope's recorders (recomputes are never recorded
   again).

Site names: contexts key sites by qualified module name with wrapper components removed
(``torch.compile``'s ``_orig_mod``, ``checkpoint_wrapper``'s ``_checkpoint_wrapped_module``,
FSDP1's ``_fsdp_wrapped_module``, DDP's and ``DataParallel``'s ``module``), so a trace recorded on
the bare model replays on the wrapped one and back.

Shape legend: T tokens, K experts per token.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import FrameType

import torch
from torch import nn
from torch.utils import checkpoint as _torch_checkpoint

from moe_replay.routing.route import Routing

SITE_ATTR = "moe_replay_site"

RouteFn = Callable[[torch.Tensor | None, bool | None], Routing]
"""``route_fn(forced_ids_TK or None, validate)``: the layer's routing with optional forcing;
``validate`` as in :func:`moe_replay.route` (``True``, ``False`` or ``None``: without a sync)."""

Recorder = Callable[[torch.Tensor], None]


LogitsRouteFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool | None], Routing]
"""``route_logits(logits_TE, bias_E, forced_TK, validate)``: a site's routing as a function of its
logits, for the ``moe_replay::route_ids`` custom op (``torch.compile``)."""

_site_keys = itertools.count()
_sites_by_key: weakref.WeakValueDictionary[int, RoutingSite] = weakref.WeakValueDictionary()


@dataclass(eq=False)
class RoutingSite:
    """What record/replay need to know of a routing module (its scope state is in :data:`_SCOPES`).

    Compared by identity: two layers with equal shapes are different sites. ``key`` names the site
    to the ``moe_replay::route_ids`` custom op (an int, as custom ops take no Python objects); it is
    a lookup, not a registry of layers: nothing iterates the sites or depends on their order.
    """

    num_experts: int
    top_k: int
    route_logits: LogitsRouteFn | None = None
    kind: str = "layer"
    """The module's class name, for errors outside scopes (which know the qualified name)."""
    key: int = field(init=False)

    def __post_init__(self) -> None:
        self._register()

    def _register(self) -> None:
        self.key = next(_site_keys)
        _sites_by_key[self.key] = self

    def __setstate__(self, state: dict) -> None:
        # A deep copy or an unpickled model is another site: it gets its own key.
        self.__dict__.update(state)
        self._register()


def site_by_key(key: int) -> RoutingSite:
    site = _sites_by_key.get(key)
    if site is None:
        raise RuntimeError(f"routing site {key} no longer exists (its module was deleted or detached)")
    return site


# --------------------------------------------------------------------------------------------
# Scopes (per thread / context)
# --------------------------------------------------------------------------------------------


class SiteReplay:
    """One site's replay inside one ``replay`` scope: which trace each new forward consumes.

    ``traces`` holds, per new forward of the site in the scope, the ids to force (``[..., K]``,
    already validated) or ``None`` for a frozen site (the router decides every forward).
    A frozen site takes any number of forwards; a traced site takes exactly one forward per trace.
    """

    def __init__(self, layer: str, top_k: int, traces: list[torch.Tensor] | None) -> None:
        self.layer = layer
        self.top_k = top_k
        self.traces = traces
        self.forwards = 0

    def forced_for_next_forward(self, num_tokens: int, lead: tuple[int, ...]) -> torch.Tensor | None:
        """The ids the next (non-recompute) forward of ``num_tokens`` tokens must force, ``[T, K]``."""
        self.forwards += 1
        if self.traces is None:
            return None
        if self.forwards > len(self.traces):
            given = "its trace" if len(self.traces) == 1 else f"all {len(self.traces)} micro-batch traces"
            raise ValueError(
                f"layer {self.layer!r}: forward {self.forwards} in one mr.replay scope, which already used "
                f"{given} (each trace drives one forward; activation-checkpoint recomputes do not count). "
                "To replay micro-batches, open one scope per micro-batch with its slice of the trace "
                "(trace.split(micro_batch_size)), or pass the list of micro-batch traces: "
                "mr.replay(model, trace.split(micro_batch_size)) gives the k-th forward the k-th trace"
            )
        return self._fit(self.traces[self.forwards - 1], num_tokens, lead)

    def _fit(self, ids: torch.Tensor, num_tokens: int, lead: tuple[int, ...]) -> torch.Tensor:
        """``ids`` as ``[T, K]`` for a forward of token shape ``lead``.

        The trace fits when it holds as many tokens as the forward; when both have the same
        number of token axes, the axes must agree too (a ``[S, B]`` trace does not replay a
        ``[B, S]`` batch). A trace and a forward with different numbers of axes (``[B, S]`` ids
        for a layer that flattens its input to ``[B*S]``) are matched in row-major order.
        """
        traced_shape = tuple(ids.shape[:-1])
        traced = ids.numel() // self.top_k
        if traced != num_tokens or (len(traced_shape) == len(lead) and traced_shape != lead):
            which = "" if self.traces is None or len(self.traces) == 1 else f" for forward {self.forwards}"
            raise ValueError(
                f"layer {self.layer!r}: the trace{which} holds ids of shape {list(ids.shape)} ({traced} "
                f"tokens), the forward routes token shape {list(lead)} ({num_tokens} tokens, ids "
                f"{[*lead, self.top_k]})"
            )
        return ids.reshape(num_tokens, self.top_k)


@dataclass(frozen=True)
class _Scopes:
    """The record and replay scopes open in one context, by site."""

    replays: Mapping[RoutingSite, SiteReplay] = field(default_factory=dict)
    recorders: Mapping[RoutingSite, tuple[Recorder, ...]] = field(default_factory=dict)


_NO_SCOPES = _Scopes()
_SCOPES: ContextVar[_Scopes | None] = ContextVar("moe_replay_scopes", default=None)


def open_scopes() -> _Scopes:
    """The scopes open in the calling thread / context."""
    return _SCOPES.get() or _NO_SCOPES


def enter_replay(replays: Mapping[RoutingSite, SiteReplay]) -> object:
    """Open a replay scope over ``replays``' sites in this context; returns the token for :func:`leave`."""
    scopes = open_scopes()
    return _SCOPES.set(_Scopes({**scopes.replays, **replays}, scopes.recorders))


def enter_record(recorders: Mapping[RoutingSite, Recorder]) -> object:
    """Add a recorder to each site of ``recorders`` in this context; returns the token for :func:`leave`."""
    scopes = open_scopes()
    merged = dict(scopes.recorders)
    for site, recorder in recorders.items():
        merged[site] = (*merged.get(site, ()), recorder)
    return _SCOPES.set(_Scopes(scopes.replays, merged))


def leave(token: object) -> None:
    _SCOPES.reset(token)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Activation-checkpoint regions
# --------------------------------------------------------------------------------------------

_REGION_ATTR = "_moe_replay_routes"
_REENTRANT_FORWARD = _torch_checkpoint.CheckpointFunction.forward.__code__
_REENTRANT_BACKWARD = _torch_checkpoint.CheckpointFunction.backward.__code__
_CHECKPOINT_FILE = _torch_checkpoint.__file__
_NON_REENTRANT_PACK = "_checkpoint_hook.__init__.<locals>.pack_hook"


class _RegionRoutes:
    """The ids each site used in one checkpoint region's forward, in call order, and how many of
    them each backward's recompute has taken (keyed by the backward's graph task)."""

    def __init__(self) -> None:
        self.routes: dict[RoutingSite, list[torch.Tensor]] = {}
        self.taken: dict[tuple[int, RoutingSite], int] = {}

    def take(self, site: RoutingSite, name: str, num_tokens: int) -> torch.Tensor:
        routes = self.routes.get(site, [])
        key = (torch._C._current_graph_task_id(), site)
        i = self.taken.get(key, 0)
        if i >= len(routes):
            raise RuntimeError(
                f"layer {name!r} is being recomputed by activation checkpointing, but its checkpointed "
                f"forward stored {len(routes)} routing(s) for it and the recompute asks for call {i + 1}. "
                "moe_replay finds a forward's routes through torch.utils.checkpoint's region; another "
                "saved-tensor hook or checkpoint implementation inside the region hides it, and "
                "recomputing with fresh routes could silently differ from the forward"
            )
        ids_TK = routes[i]
        if ids_TK.shape[0] != num_tokens:
            raise RuntimeError(
                f"layer {name!r}: the recompute routes {num_tokens} tokens, its forward routed "
                f"{ids_TK.shape[0]}; the checkpointed function is not deterministic in its shapes"
            )
        self.taken[key] = i + 1
        return ids_TK


def _region_routes(owner: object) -> _RegionRoutes:
    routes = getattr(owner, _REGION_ATTR, None)
    if routes is None:
        routes = _RegionRoutes()
        setattr(owner, _REGION_ATTR, routes)
    return routes


def _forward_region() -> object | None:
    """The checkpoint region the current (original) forward runs in, or ``None``.

    Non-reentrant checkpointing runs the region with a saved-tensor hook whose pack function
    closes over the region's frame (also inside an autograd Function's forward, e.g. a compiled
    graph, where grad mode is off); reentrant checkpointing runs it under ``no_grad`` inside
    ``CheckpointFunction.forward``, whose ``ctx`` is the region.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None:
        pack = hooks[0]
        closure = pack.__closure__
        if getattr(pack, "__qualname__", "") == _NON_REENTRANT_PACK and closure is not None:
            return closure[pack.__code__.co_freevars.index("frame")].cell_contents
        return None
    if torch.is_grad_enabled():
        return None
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _REENTRANT_FORWARD:
            return frame.f_locals["ctx"]
        frame = frame.f_back
    return None


def _recompute_region() -> object | None:
    """The checkpoint region whose recompute is running (called inside a backward pass), or ``None``:
    the innermost ``CheckpointFunction.backward`` (reentrant) or non-reentrant unpack hook on the
    Python stack."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code is _REENTRANT_BACKWARD:
            return frame.f_locals["ctx"]
        non_reentrant = code.co_name == "unpack_hook" and code.co_filename == _CHECKPOINT_FILE
        if non_reentrant and "frame" in code.co_freevars:
            return frame.f_locals["frame"]
        frame = frame.f_back
    return None


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. a checkpointed recompute)."""
    return torch._C._current_graph_task_id() != -1


# --------------------------------------------------------------------------------------------
# Marking modules and finding sites
# --------------------------------------------------------------------------------------------


def mark_site(
    module: nn.Module, num_experts: int, top_k: int, route_logits: LogitsRouteFn | None = None
) -> RoutingSite:
    """Make ``module`` a routing site that routes ``top_k`` of ``num_experts`` experts per token.

    The module's forward must then route through :func:`route_at_site` with the returned site
    (or ``site_of(module)``), or, under ``torch.compile``, through the ``moe_replay::route_ids``
    custom op, which needs ``route_logits``. Marking again replaces the site. Returns the site.
    """
    for arg, value in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
    kind = type(module).__name__
    site = RoutingSite(num_experts=num_experts, top_k=top_k, route_logits=route_logits, kind=kind)
    # object.__setattr__ keeps nn.Module from treating the site as a submodule or buffer.
    object.__setattr__(module, SITE_ATTR, site)
    return site


def unmark_site(module: nn.Module) -> None:
    if hasattr(module, SITE_ATTR):
        object.__delattr__(module, SITE_ATTR)


def site_of(module: nn.Module) -> RoutingSite | None:
    return getattr(module, SITE_ATTR, None)


_ALWAYS_WRAPPER_ATTRS = frozenset(
    {
        "_orig_mod",  # torch.compile's OptimizedModule
        "_checkpoint_wrapped_module",  # torch.distributed checkpoint_wrapper
        "_offload_wrapped_module",  # torch.distributed offload_wrapper
        "_fsdp_wrapped_module",  # FSDP1
    }
)


def _is_wrapper_child(parent: nn.Module, child_name: str) -> bool:
    if child_name in _ALWAYS_WRAPPER_ATTRS:
        return True
    # DDP and DataParallel keep the model as `.module`; a user's own submodule named "module" stays.
    return child_name == "module" and isinstance(
        parent, (nn.parallel.DistributedDataParallel, nn.parallel.DataParallel)
    )


def _named_modules_unwrapped(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` with wrapper components dropped from the names (each module once)."""
    seen: set[int] = set()
    stack = [(prefix, module)]
    while stack:
        name, mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        yield name, mod
        children = []
        for child_name, child in mod.named_children():
            if _is_wrapper_child(mod, child_name):
                children.append((name, child))
            else:
                children.append((f"{name}.{child_name}" if name else child_name, child))
        stack.extend(reversed(children))  # depth-first, in module order, like named_modules()


def find_sites(model: nn.Module) -> Iterator[tuple[str, RoutingSite]]:
    """(qualified name without wrapper components, site) of every routing site in ``model``, in
    module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in _named_modules_unwrapped(model):
        site = site_of(module)
        if site is not None:
            yield name, site


# --------------------------------------------------------------------------------------------
# Routing a forward
# --------------------------------------------------------------------------------------------


def route_at_site(
    site: RoutingSite | None,
    route_fn: RouteFn,
    num_tokens: int,
    lead_shape: tuple[int, ...],
    forced_TK: torch.Tensor | None = None,
    *,
    validate: bool | None = True,
    name: str | None = None,
    compiled: bool = False,
) -> Routing:
    """Route ``num_tokens`` tokens at ``site``: recompute, replay, region storage and recording
    (module docstring).

    ``route_fn(forced_TK, validate)`` is the layer's own routing: it must return a
    :class:`Routing` with ``expert_ids [num_tokens, K]`` that keep every forced slot.
    ``lead_shape`` is the token shape of the layer's input (``x.shape[:-1]``, product
    ``num_tokens``); recorders get the ids in that shape, so a batch axis is kept, and replay
    checks a trace against it. ``forced_TK`` are ids the caller forces itself (``[T, K]`` or
    ``None``, checked by ``route_fn`` with ``validate``); inside ``replay`` they are an error, since
    the scope decides the routing. ``name`` names the layer in errors outside scopes.
    ``compiled``: called from the ``moe_replay::route_ids`` custom op, where a forward inside a
    backward pass that is not a ``torch.utils.checkpoint`` recompute is always an error: it is
    ``torch.compile`` recomputing a checkpointed region inside its own backward graph, where the
    forward's routes cannot be found.
    ``site=None`` routes with ``route_fn(forced_TK, validate)`` unchanged.
    """
    if site is None:
        return route_fn(forced_TK, validate)
    scopes = open_scopes()
    replay = scopes.replays.get(site)
    label = replay.layer if replay is not None else (name or f"{site.kind} (routing site {site.key})")
    in_backward = _in_backward()
    routing = None
    if in_backward:
        region = _recompute_region()
        if region is not None:
            stored_TK = _region_routes(region).take(site, label, num_tokens)
            routing = route_fn(stored_TK, False)
        elif compiled:
            raise RuntimeError(
                f"layer {label!r}: torch.compile recomputes this layer's routing inside its backward "
                "graph (activation checkpointing inside the compiled region), where moe_replay cannot "
                "find the routes of the forward it repeats; checkpoint outside the compiled region "
                "(e.g. compile each block and wrap the compiled blocks in torch.utils.checkpoint), or "
                "compile without activation checkpointing"
            )
        elif replay is not None:
            raise RuntimeError(
                f"layer {label!r} ran a forward inside a backward pass under mr.replay, but not as the "
                "recompute of a torch.utils.checkpoint region, so moe_replay cannot tell which forward "
                "it repeats; use torch.utils.checkpoint (reentrant or not) for activation checkpointing"
            )
    if routing is None:
        if replay is not None:
            if forced_TK is not None:
                raise ValueError(
                    f"layer {label!r}: forced_expert_ids were passed inside mr.replay, which already "
                    "decides this layer's routing; pass one or the other"
                )
            routing = route_fn(replay.forced_for_next_forward(num_tokens, lead_shape), False)
        else:
            routing = route_fn(forced_TK, validate)
    region = _forward_region()
    if region is not None:
        _region_routes(region).routes.setdefault(site, []).append(routing.expert_ids.detach())
    recorders = scopes.recorders.get(site, ())
    if recorders and not in_backward:
        ids = routing.expert_ids.detach().reshape(*lead_shape, site.top_k)
        for recorder in recorders:
            recorder(ids)
    return routing
