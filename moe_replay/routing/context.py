"""``record`` and ``replay``: context managers over every routing site of a model.

Both find the sites with ``model.named_modules()`` when entered (names without wrapper prefixes) and
open a scope in the calling thread's context (:mod:`moe_replay.routing.sites`), closed on exit, also
when the body raises. Nothing is stored on the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from moe_replay.config import MoEConfig
from moe_replay.routing.route import check_forced_ids
from moe_replay.routing.sites import (
    RoutingSite,
    SiteReplay,
    enter_record,
    enter_replay,
    find_sites,
    leave,
    open_scopes,
)
from moe_replay.routing.trace import RoutingTrace


def _sites(model: nn.Module) -> list[tuple[str, RoutingSite]]:
    sites = list(find_sites(model))
    if not sites:
        raise ValueError(
            f"model ({type(model).__name__}) has no routing sites: no moe_replay.MoE layers and no "
            "Hugging Face MoE blocks attached with moe_replay.hf.attach"
        )
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
    """Record the expert ids every routing site of ``model`` uses in this thread.

    Yields a :class:`RoutingTrace` that is filled when the block exits: layer name (wrapper
    prefixes removed) -> ids with the token shape of the layer's input. A layer called several
    times (prefill, then decode steps) gets its calls appended along the token axis, batch axis
    kept: ``[B, S_total, K]``. Forwards that run inside a backward pass (activation-checkpoint
    recompute) are not recorded again. Inside ``replay``, the ids actually used are recorded.
    Forwards in other threads are not recorded (scopes belong to the thread or context that
    opened them).
    """
    sites = _sites(model)
    shapes = {(site.num_experts, site.top_k) for _, site in sites}
    if len(shapes) != 1:
        raise ValueError(
            f"record needs every routing site to share (num_experts, top_k), got {sorted(shapes)}"
        )
    ((num_experts, top_k),) = shapes
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name, _ in sites}
    token = enter_record({site: chunks[name].append for name, site in sites})
    trace = RoutingTrace({}, num_experts=num_experts, top_k=top_k)
    try:
        yield trace
    finally:
        leave(token)
    recorded = {name: _concat_calls(name, calls) for name, calls in chunks.items() if calls}
    trace._assign(recorded)


def _check_trace_fits(name: str, site: RoutingSite, trace: RoutingTrace, which: str) -> None:
    """``ValueError`` naming the layer and both shapes unless ``trace[name]`` can drive ``site``.

    The token count is checked at the layer's forward, when it is known.
    """
    ids = trace[name]
    if trace.top_k != site.top_k or trace.num_experts != site.num_experts:
        raise ValueError(
            f"layer {name!r} routes top_k={site.top_k} of num_experts={site.num_experts} (ids [..., "
            f"{site.top_k}]), {which} holds ids of shape {list(ids.shape)} (top_k={trace.top_k}) "
            f"of num_experts={trace.num_experts}"
        )
    cfg = MoEConfig(num_experts=site.num_experts, top_k=site.top_k, hidden_size=1, intermediate_size=1)
    flat = ids.reshape(-1, site.top_k)
    label = f"trace layer {name!r}" if which == "the trace" else f"{which} layer {name!r}"
    check_forced_ids(flat, flat.shape[0], cfg, validate=True, name=label)


def _as_trace_list(trace: object) -> list[RoutingTrace] | None:
    if trace is None:
        return None
    if isinstance(trace, RoutingTrace):
        return [trace]
    if isinstance(trace, (list, tuple)):
        if not trace:
            raise ValueError("trace must be a RoutingTrace, a non-empty list of them, or None; got []")
        for i, piece in enumerate(trace):
            if not isinstance(piece, RoutingTrace):
                raise TypeError(f"trace[{i}] must be a moe_replay.RoutingTrace, got {type(piece).__name__}")
        return list(trace)
    raise TypeError(
        "trace must be a moe_replay.RoutingTrace, a list of them (one per micro-batch) or None, got "
        f"{type(trace).__name__}"
    )


@contextmanager
def replay(
    model: nn.Module, trace: RoutingTrace | Sequence[RoutingTrace] | None, *, strict: bool = True
) -> Iterator[None]:
    """Route every site of ``model`` from ``trace`` in this thread; recomputes reuse their forward's ids.

    **Every forward that is not a recompute resolves its own routes.** ``trace`` ids force experts
    slot by slot (``-1``: the router decides, without duplicates), and each trace drives exactly
    one forward of each layer: a second forward of a layer in the scope is a ``ValueError``. To
    replay micro-batches (gradient accumulation), either open one scope per micro-batch with its
    slice (``trace.split(micro_batch_size)``), or pass the list of micro-batch traces:
    ``replay(model, [t0, t1, ...])`` routes the k-th forward of each layer with ``tk``.
    ``trace=None`` freezes routing: the router decides every forward, and each recompute reuses
    its forward's ids exactly.

    **A recompute reuses exactly the ids of the forward it recomputes.** The ids are stored on the
    activation-checkpoint region of that forward (``torch.utils.checkpoint``, reentrant or not,
    Hugging Face gradient checkpointing, ``checkpoint_wrapper``), not found by call order or
    through this scope: backward may run inside or after the scope, with several micro-batches'
    forwards in flight, in any order.

    **Scopes belong to the thread (or ``contextvars`` context) that opened them**: another thread
    running the same model sees no scope. Layer names ignore wrapper prefixes (``torch.compile``'s
    ``_orig_mod.``, ``checkpoint_wrapper``, DDP / FSDP ``module.``), so a trace recorded on the bare
    model replays on the wrapped one and back.

    With ``strict`` (default), a model layer missing from the trace, or a trace layer missing
    from the model, is a ``ValueError``; with ``strict=False`` a missing layer is frozen instead
    and trace layers the model lacks are not used (a trace sharing no layer with the model is
    still an error). Checked on entry (``ValueError`` naming the layer): ``top_k`` and
    ``num_experts`` of every traced layer, ids in range and distinct within a row. Checked at each
    forward: the token count (and the token shape when the trace and the input have the same number
    of token axes). With a list, the scope checks on a normal exit that every traced layer ran once
    per trace (or not at all). Replay scopes do not nest; ``record`` may be nested inside one.
    """
    traces = _as_trace_list(trace)
    sites = _sites(model)
    open_replays = open_scopes().replays
    for name, site in sites:
        if site in open_replays:
            raise ValueError(f"layer {name!r} is already inside an mr.replay scope; scopes do not nest")
    names = {name for name, _ in sites}
    pieces = traces or []
    for i, piece in enumerate(pieces):
        which = "the trace" if len(pieces) == 1 else f"trace[{i}]"
        missing = [name for name in names if name not in piece]
        extra = [name for name in piece if name not in names]
        if strict and (missing or extra):
            raise ValueError(
                f"{which} and model disagree: layers missing from the trace: {sorted(missing)}; "
                f"trace layers not in the model: {sorted(extra)} (pass strict=False to let the router "
                "decide the missing layers)"
            )
        if len(piece) and len(missing) == len(names):
            raise ValueError(
                f"no layer of {which} is a routing site of the model: trace layers {piece.layer_names[:4]}"
                f"{'...' if len(piece) > 4 else ''}, model layers {sorted(names)[:4]}"
                f"{'...' if len(names) > 4 else ''} (was the trace recorded on another model?)"
            )
        for name, site in sites:
            if name in piece:
                _check_trace_fits(name, site, piece, which)
    replays: dict[RoutingSite, SiteReplay] = {}
    for name, site in sites:
        if traces is not None and all(name in piece for piece in traces):
            replays[site] = SiteReplay(name, site.top_k, [piece[name] for piece in traces])
        elif traces is not None and any(name in piece for piece in traces):
            raise ValueError(
                f"layer {name!r} is in some micro-batch traces but not in all; every trace must hold "
                "the same layers"
            )
        else:
            replays[site] = SiteReplay(name, site.top_k, None)
    token = enter_replay(replays)
    try:
        yield
    finally:
        leave(token)
    if traces is not None and len(traces) > 1:
        partial = [
            f"{r.layer!r} ran {r.forwards}"
            for r in replays.values()
            if r.traces is not None and r.forwards not in (0, len(traces))
        ]
        if partial:
            raise ValueError(
                f"mr.replay was given {len(traces)} micro-batch traces, but layers ran a different number "
                f"of forwards: {', '.join(partial)}"
            )
