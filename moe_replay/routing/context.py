"""``record`` and ``replay``: context managers over every routing site of a model.

Both find the sites with ``model.named_modules()`` when entered, install their state on them, and
remove it on exit, also when the body raises. Nothing global is touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moe_replay.config import MoEConfig
from moe_replay.routing.route import check_forced_ids
from moe_replay.routing.sites import ReplayState, RoutingSite, find_sites
from moe_replay.routing.trace import RoutingTrace


def _sites(model: nn.Module) -> list[tuple[str, RoutingSite]]:
    sites = list(find_sites(model))
    if not sites:
        raise ValueError(
            f"model ({type(model).__name__}) has no routing sites: no moe_replay.MoE layers and no "
            "Hugging Face MoE blocks attached with moe_replay.hf.attach"
        )
    for name, site in sites:
        site.name = name
    return sites


def _concat_calls(name: str, chunks: list[torch.Tensor]) -> torch.Tensor:
    """Join one layer's per-call ids along the token axis (dim -2), keeping any batch axes."""
    if len(chunks) == 1:
        return chunks[0]
    if chunks[0].dim() == 1:  # [K]: a layer called on single tokens without a token axis
        return torch.stack(chunks)
    batch = chunks[0].shape[:-2]
    for chunk in chunks[1:]:
        if chunk.shape[:-2] != batch:
            raise ValueError(
                f"layer {name!r} was called on inputs with batch shapes {list(batch)} and "
                f"{list(chunk.shape[:-2])}; calls inside one mr.record must share the batch axes"
            )
    return torch.cat(chunks, dim=-2)


@contextmanager
def record(model: nn.Module) -> Iterator[RoutingTrace]:
    """Record the expert ids every routing site of ``model`` uses.

    Yields a :class:`RoutingTrace` that is filled when the block exits: layer name -> ids with the
    token shape of the layer's input. A layer called several times (prefill, then decode steps)
    gets its calls appended along the token axis, batch axis kept: ``[B, S_total, K]``. Forwards
    that run inside a backward pass (activation-checkpoint recompute) are not recorded again.
    Inside ``replay``, the ids actually used are recorded.
    """
    sites = _sites(model)
    shapes = {(site.num_experts, site.top_k) for _, site in sites}
    if len(shapes) != 1:
        raise ValueError(
            f"record needs every routing site to share (num_experts, top_k), got {sorted(shapes)}"
        )
    ((num_experts, top_k),) = shapes
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name, _ in sites}
    installed = []
    for name, site in sites:
        recorder = chunks[name].append
        site.recorders.append(recorder)
        installed.append((site, recorder))
    trace = RoutingTrace({}, num_experts=num_experts, top_k=top_k)
    try:
        yield trace
    finally:
        for site, recorder in installed:
            site.recorders.remove(recorder)
    recorded = {name: _concat_calls(name, calls) for name, calls in chunks.items() if calls}
    trace._assign(recorded)


def _check_trace_fits(name: str, site: RoutingSite, trace: RoutingTrace) -> None:
    """``ValueError`` naming the layer and both shapes unless ``trace[name]`` can drive ``site``.

    The token count is checked at the layer's first forward, when it is known.
    """
    ids = trace[name]
    if trace.top_k != site.top_k or trace.num_experts != site.num_experts:
        raise ValueError(
            f"layer {name!r} routes top_k={site.top_k} of num_experts={site.num_experts} (ids [..., "
            f"{site.top_k}]), the trace holds ids of shape {list(ids.shape)} (top_k={trace.top_k}) "
            f"of num_experts={trace.num_experts}"
        )
    cfg = MoEConfig(num_experts=site.num_experts, top_k=site.top_k, hidden_size=1, intermediate_size=1)
    flat = ids.reshape(-1, site.top_k)
    check_forced_ids(flat, flat.shape[0], cfg, validate=True, name=f"trace layer {name!r}")


@contextmanager
def replay(model: nn.Module, trace: RoutingTrace | None, *, strict: bool = True) -> Iterator[None]:
    """Route every site of ``model`` from ``trace``; within the scope, each layer's first forward
    decides its ids and later forwards reuse them.

    ``trace`` ids force experts slot by slot (``-1``: the router decides, without duplicates).
    ``trace=None`` freezes routing: the router decides on the first forward, recompute reuses it.
    With ``strict`` (default), a model layer missing from the trace, or a trace layer missing
    from the model, is a ``ValueError``; with ``strict=False`` a missing layer is frozen instead
    and trace layers the model lacks are not used (a trace sharing no layer with the model is
    still an error). Run backward inside the scope, so checkpointed layers recompute with the
    same routing.

    Checked on entry (``ValueError`` naming the layer): ``top_k`` and ``num_experts`` of every
    traced layer, ids in range and distinct within a row. Checked at each layer's first forward:
    the token count (and the token shape when the trace and the input have the same number of
    token axes). Replay scopes do not nest; ``record`` may be nested inside one.
    """
    if trace is not None and not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace must be a moe_replay.RoutingTrace or None, got {type(trace).__name__}")
    sites = _sites(model)
    for name, site in sites:
        if site.replay is not None:
            raise ValueError(f"layer {name!r} is already inside an mr.replay scope; scopes do not nest")
    if trace is not None:
        names = {name for name, _ in sites}
        missing = [name for name in names if name not in trace]
        extra = [name for name in trace if name not in names]
        if strict and (missing or extra):
            raise ValueError(
                f"trace and model disagree: layers missing from the trace: {sorted(missing)}; "
                f"trace layers not in the model: {sorted(extra)} (pass strict=False to let the router "
                "decide the missing layers)"
            )
        if len(trace) and len(missing) == len(names):
            raise ValueError(
                f"no layer of the trace is a routing site of the model: trace layers {trace.layer_names[:4]}"
                f"{'...' if len(trace) > 4 else ''}, model layers {sorted(names)[:4]}"
                f"{'...' if len(names) > 4 else ''} (was the trace recorded on another model?)"
            )
        for name, site in sites:
            if name in trace:
                _check_trace_fits(name, site, trace)
    for name, site in sites:
        forced = trace[name] if trace is not None and name in trace else None
        site.replay = ReplayState(name, site.top_k, forced)
    try:
        yield
    finally:
        for _, site in sites:
            site.replay = None
