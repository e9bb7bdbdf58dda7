"""Expert parallelism over torch.distributed with gloo on the CPU (parallel/*.py and the layers).

The contract under test: on every rank, an expert-parallel layer's outputs, routing and the
gradients of its input equal the single-process layer's on all ranks' tokens concatenated; the
experts' gradients equal the single-process ones of the experts the rank holds; the router
gradients, summed over ranks, equal the single-process router gradient.

Shape legend: W ranks, T one rank's tokens, S all ranks' tokens, K experts per token, H hidden,
I expert intermediate, E experts.

How it runs: a process start costs seconds, so each world size starts once. This file is also the
worker: ``python test_ep.py RANK WORLD INIT_FILE OUT_DIR`` joins a gloo world and runs every check
of ``CHECKS`` in order, writing each rank's results as they come; the tests read them. A failing
check ends its rank (a rank out of step would leave its peers waiting in a collective) and the
runner stops the world, so later checks report "not run". Worlds are shared between pytest-xdist
workers through a file lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import os
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

import moe_replay as mr
from moe_replay.backends.registry import available_backends
from moe_replay.parallel.collectives import RowsInFlight, check_device
from moe_replay.parallel.peers import memory as peers
from moe_replay.parallel.peers import transport as alltoall_peers
from moe_replay.parallel.peers.transport import _Call

try:
    import fcntl
except ImportError:  # not POSIX: each pytest-xdist worker starts its own worlds
    fcntl = None

H, I = 16, 8
CFG_UNEVEN = mr.MoEConfig(num_experts=7, top_k=3, hidden_size=H, intermediate_size=I)
"""Prime E: W = 2 splits it [4, 3], W = 3 [3, 2, 2]."""
CFG_GROUPED = mr.MoEConfig(
    num_experts=6,
    top_k=2,
    hidden_size=H,
    intermediate_size=I,
    scoring="sigmoid",
    n_group=3,
    topk_group=2,
    score_bias=True,
    routed_scaling_factor=2.5,
)
"""DeepSeek-style routing: sigmoid, selection bias, groups, scaling."""
TOKEN_COUNTS = {
    2: ([9, 0], [6, 11]),  # a rank without tokens; uneven counts
    3: ([5, 0, 8], [4, 7, 1]),  # a middle rank without tokens; uneven counts, a rank with one token
}
MODES = ("allgather", "alltoall")
WORLD_SIZES = (2, 3)
WORLD_TIMEOUT_S = 300  # hang guard for a whole world (it takes seconds); not a speed assertion
F32 = {"rtol": 1e-5, "atol": 1e-5}


# ----------------------------------------------------------------------------------------------
# The checks (run inside every rank of a world)


@dataclasses.dataclass
class World:
    rank: int
    size: int
    group: dist.ProcessGroup

    def rows(self, counts: list[int]) -> slice:
        """This rank's rows of the concatenated tokens."""
        start = sum(counts[: self.rank])
        return slice(start, start + counts[self.rank])

    def gather_objects(self, obj: object) -> list[object]:
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


CHECKS: dict[str, Callable[[World], str | None]] = {}
"""name -> check(world); a check returns None when it passed, or a skip reason."""


def check(*modes: str) -> Callable[[Callable[..., str | None]], Callable[..., str | None]]:
    """Register a check, once per ``ep_mode`` given (``name[mode]``), else once."""

    def register(fn: Callable[..., str | None]) -> Callable[..., str | None]:
        name = fn.__name__.removeprefix("check_")
        for mode in modes:
            CHECKS[f"{name}[{mode}]"] = functools.partial(fn, mode=mode)
        if not modes:
            CHECKS[name] = fn
        return fn

    return register


def reference(cfg: mr.MoEConfig, dtype: torch.dtype = torch.float32) -> mr.MoE:
    """The single-process layer, identical on every rank (same seed)."""
    torch.manual_seed(0)
    ref = mr.MoE(cfg, backend="torch", dtype=dtype)
    if cfg.score_bias:
        with torch.no_grad():
            ref.router.bias.normal_(0.0, 0.1)
    return ref


def expert_parallel(
    world: World, cfg: mr.MoEConfig, mode: str, ref: mr.MoE, backend: str = "torch", **options: object
) -> mr.MoE:
    """An expert-parallel layer loaded from ``ref``'s full state dict (initialised per rank first,
    so the load is what makes it equal); ``options``: more of its ``EPConfig``, else the shorthand
    ``ep_mode``."""
    torch.manual_seed(100 + world.rank)
    dtype = ref.experts.gate_up_proj.dtype
    kwargs: dict[str, object] = {"ep": mr.EPConfig(mode=mode, **options)} if options else {"ep_mode": mode}
    ep = mr.MoE(cfg, backend=backend, dtype=dtype, ep_group=world.group, **kwargs)  # type: ignore[arg-type]
    ep.load_state_dict(ref.state_dict())
    return ep


def partial_forcing(num_tokens: int, cfg: mr.MoEConfig, gen: torch.Generator) -> torch.Tensor:
    """``[S, K]`` forced ids: distinct per row, about half the slots -1; row 0 fully forced,
    row 1 all -1."""
    E, K = cfg.num_experts, cfg.top_k
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(num_tokens)]).reshape(-1, K)
    free = torch.rand(num_tokens, K, generator=gen) < 0.5
    free[:1] = False
    free[1:2] = True
    return ids.masked_fill(free, -1)


def compare_with_reference(
    world: World,
    cfg: mr.MoEConfig,
    mode: str,
    counts: list[int],
    *,
    forced: bool = False,
    batch_axis: bool = False,
    backend: str = "torch",
    dtype: torch.dtype = torch.float32,
    tol: dict[str, float] = F32,
    chunks: int | None = None,
    transport: str | None = None,
    calls_before: int = 0,
) -> nn.Module:
    """Forward and backward of the EP layer on this rank's tokens against the reference
    (``chunks``, ``transport``: the alltoall dispatcher's, if not its defaults), after
    ``calls_before`` forwards of the same tokens without gradients; returns the EP layer."""
    K, S = cfg.top_k, sum(counts)
    gen = torch.Generator().manual_seed(1)
    x_SH = torch.randn(S, H, generator=gen).to(dtype)
    grad_SH = torch.randn(S, H, generator=gen).to(dtype)
    forced_SK = partial_forcing(S, cfg, gen) if forced else None

    ref = reference(cfg, dtype)
    x_ref = x_SH.clone().requires_grad_()
    y_ref, routing_ref = ref(x_ref, forced_expert_ids=forced_SK, return_routing=True)
    (y_ref.float() * grad_SH.float()).sum().backward()

    options = {"chunks": chunks, "transport": transport}
    ep = expert_parallel(
        world, cfg, mode, ref, backend, **{k: v for k, v in options.items() if v is not None}
    )
    rows, T = world.rows(counts), counts[world.rank]
    lead = (1, T) if batch_axis else (T,)
    x = x_SH[rows].clone().view(*lead, H)
    if T:  # the rank without tokens passes a fresh empty tensor that needs no grad
        x.requires_grad_()
    forced_local = None if forced_SK is None else forced_SK[rows].reshape(*lead, K)
    for _ in range(calls_before):
        with torch.no_grad():
            ep(x, forced_expert_ids=forced_local)
    y, routing = ep(x, forced_expert_ids=forced_local, return_routing=True)
    (y.float() * grad_SH[rows].view(*lead, H).float()).sum().backward()

    first, count = ep.local_experts
    assert ep.experts.gate_up_proj.shape[0] == count == ep.ep.partition.counts[world.rank]
    assert y.shape == (*lead, H) and y.dtype == dtype
    assert routing.expert_ids.shape == (*lead, K)
    assert torch.equal(routing.expert_ids.reshape(T, K), routing_ref.expert_ids[rows])
    assert_close(routing.weights.reshape(T, K), routing_ref.weights[rows], **F32)
    assert_close(y.reshape(T, H), y_ref[rows], **tol)
    if T:
        assert_close(x.grad.reshape(T, H), x_ref.grad[rows], **tol)
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad, group=world.group)  # the caller's job, as the layer documents
    assert_close(router_grad, ref.router.weight.grad, **tol)
    for name in ("gate_up_proj", "down_proj"):
        local_grad = getattr(ep.experts, name).grad
        assert_close(local_grad, getattr(ref.experts, name).grad[first : first + count], **tol)
    return ep


@check(*MODES)
def check_forward_backward(world: World, mode: str) -> None:
    for cfg in (CFG_UNEVEN, CFG_GROUPED):
        for counts in TOKEN_COUNTS[world.size]:
            compare_with_reference(world, cfg, mode, counts, batch_axis=0 not in counts)


@check(*MODES)
def check_forced_ids_partial(world: World, mode: str) -> None:
    for counts in TOKEN_COUNTS[world.size]:
        compare_with_reference(world, CFG_UNEVEN, mode, counts, forced=True, batch_axis=0 in counts)


@check(*MODES)
def check_record_then_replay(world: World, mode: str) -> None:
    """record on each rank gives its own tokens' routes; replaying them (whole, and with slots set
    free) routes exactly as the single-process layer with the same forced ids."""
    cfg, K = CFG_UNEVEN, CFG_UNEVEN.top_k
    for counts in TOKEN_COUNTS[world.size]:
        S, rows, T = sum(counts), world.rows(counts), counts[world.rank]
        gen = torch.Generator().manual_seed(2)
        x_SH = torch.randn(S, H, generator=gen)
        ref = reference(cfg)
        y_ref, routing_ref = ref(x_SH, return_routing=True)
        model = nn.Sequential(expert_parallel(world, cfg, mode, ref))
        x = x_SH[rows]

        with mr.record(model) as trace:
            y = model(x)
        assert trace["0"].shape == (T, K)
        assert torch.equal(trace["0"], routing_ref.expert_ids[rows])
        assert_close(y, y_ref[rows], **F32)

        forced_SK = partial_forcing(S, cfg, gen)
        y_forced_ref, routing_forced_ref = ref(x_SH, forced_expert_ids=forced_SK, return_routing=True)
        partial = mr.RoutingTrace({"0": forced_SK[rows]}, num_experts=cfg.num_experts, top_k=K)
        x_rep = x.clone().requires_grad_(T > 0)
        with mr.replay(model, partial), mr.record(model) as used:
            y_rep = model(x_rep)
            y_rep.sum().backward()
        assert torch.equal(used["0"], routing_forced_ref.expert_ids[rows])
        assert_close(y_rep, y_forced_ref[rows], **F32)


@check(*MODES)
def check_activation_checkpointing(
    world: World, mode: str, backend: str = "torch", transport: str | None = None
) -> None:
    """Recompute runs the layer's collectives again inside the backward, on every rank, and
    replay(None) makes it route as the forward did."""
    cfg = CFG_UNEVEN
    counts = TOKEN_COUNTS[world.size][0]
    S, rows = sum(counts), world.rows(counts)
    gen = torch.Generator().manual_seed(3)
    x_SH, grad_SH = torch.randn(S, H, generator=gen), torch.randn(S, H, generator=gen)
    ref = reference(cfg)
    x_ref = x_SH.clone().requires_grad_()
    (ref(x_ref) * grad_SH).sum().backward()

    options = {} if transport is None else {"transport": transport}
    ep = expert_parallel(world, cfg, mode, ref, backend, **options)
    x = x_SH[rows].clone().requires_grad_()
    with mr.replay(ep, None):
        y = checkpoint(ep, x, use_reentrant=False)
        (y * grad_SH[rows]).sum().backward()
    assert_close(y, ref(x_SH)[rows], **F32)
    assert_close(x.grad, x_ref.grad[rows], **F32)
    first, count = ep.local_experts
    assert_close(ep.experts.down_proj.grad, ref.experts.down_proj.grad[first : first + count], **F32)


@check(*MODES)
def check_quantized(world: World, mode: str) -> None:
    """QuantMoE.from_float of an EP layer is EP too and equals the single-process QuantMoE."""
    cfg = CFG_UNEVEN
    for counts in TOKEN_COUNTS[world.size]:
        S, rows = sum(counts), world.rows(counts)
        x_SH = torch.randn(S, H, generator=torch.Generator().manual_seed(4))
        ref = reference(cfg)
        ep = expert_parallel(world, cfg, mode, ref)
        for weight_dtype, group_size in (("int8", None), ("int4", 8)):
            q_ref = mr.QuantMoE.from_float(ref, weight_dtype, group_size)
            q_ep = mr.QuantMoE.from_float(ep, weight_dtype, group_size)
            assert q_ep.ep is not None and q_ep.ep.mode == mode
            assert q_ep.local_experts == ep.local_experts
            with torch.no_grad():
                assert_close(q_ep(x_SH[rows]), q_ref(x_SH)[rows], **F32)
            full = q_ep.full_state_dict()
            expected = q_ref.state_dict()
            assert list(full) == list(expected)
            assert all(torch.equal(full[key], expected[key]) for key in expected)
            # A full quantized checkpoint loads into an EP QuantMoE built from other weights.
            fresh = mr.MoE(cfg, backend="torch", ep_group=world.group, ep_mode=mode)
            q_fresh = mr.QuantMoE.from_float(fresh, weight_dtype, group_size)
            q_fresh.load_state_dict(expected)
            with torch.no_grad():
                assert_close(q_fresh(x_SH[rows]), q_ref(x_SH)[rows], **F32)


@check()
def check_alltoall_chunks(world: World) -> None:
    """Any number of token chunks gives the same results (the default is one): two, and more
    chunks than a rank has tokens (empty chunks still take part in every collective)."""
    for chunks in (2, 3):
        for counts in TOKEN_COUNTS[world.size]:
            compare_with_reference(world, CFG_UNEVEN, "alltoall", counts, forced=True, chunks=chunks)


@check()
def check_alltoall_sends_each_token_once_per_rank(world: World) -> None:
    """The alltoall dispatcher sends one row per (token, destination rank) pair, not one per
    (token, expert): a token with several experts on one rank crosses to it once."""
    cfg = CFG_UNEVEN  # K = 3 experts of 7: on 2 ranks every token has two experts on one rank
    ref = reference(cfg)
    ep = expert_parallel(world, cfg, "alltoall", ref)
    offsets = ep.ep.partition.offsets
    for counts in TOKEN_COUNTS[world.size]:
        S, rows, T = sum(counts), world.rows(counts), counts[world.rank]
        x_SH = torch.randn(S, H, generator=torch.Generator().manual_seed(5))
        y, routing = ep(x_SH[rows], return_routing=True)
        assert_close(y, ref(x_SH)[rows], **F32)
        ids = routing.expert_ids.tolist()
        expected = [
            sum(any(lo <= e < hi for e in row) for row in ids) for lo, hi in itertools.pairwise(offsets)
        ]
        assert ep.ep.dispatcher.last_send_rows == tuple(expected)
        if world.size == 2:
            assert sum(expected) < T * cfg.top_k or T == 0


@check()
def check_alltoall_collectives_per_call(world: World) -> None:
    """With the collectives transport the alltoall dispatcher runs one all-gather (the counts) and
    3 C all-to-alls forward (per chunk x, meta and the partial sums back), and 3 C all-to-alls
    backward (per chunk the partials' gradient, x's and meta's), as its module docstring says; with
    the peers transport, the all-gather and no all-to-all: on a GPU each collective is a host-side
    launch that every layer call pays."""
    cfg = CFG_UNEVEN
    ref = reference(cfg)
    T = TOKEN_COUNTS[world.size][1][world.rank]
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(T, H, generator=gen).requires_grad_()
    dy = torch.randn(T, H, generator=gen)

    def collectives(fn: Callable[[], object]) -> tuple[int, int]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        names = [event.name for event in prof.events()]
        return names.count("c10d::_allgather_base_"), names.count("c10d::alltoall_base_")

    for transport, chunks in (("collectives", 1), ("collectives", 2), ("collectives", 3), ("peers", 1)):
        ep = expert_parallel(world, cfg, "alltoall", ref, transport=transport, chunks=chunks)
        per_chunk = 3 * chunks if transport == "collectives" else 0
        with torch.no_grad():
            assert collectives(lambda ep=ep: ep(x)) == (1, per_chunk)
        outputs: list[torch.Tensor] = []
        assert collectives(lambda out=outputs, ep=ep: out.append(ep(x))) == (1, per_chunk)
        assert collectives(lambda out=outputs: out[0].backward(dy)) == (0, per_chunk)


@check()
def check_alltoall_peers(world: World) -> None:
    """The peer transport (symmetric memory; here shared-memory files mapped by every rank) gives
    the single-process results too: every token count (a rank without tokens included), replay
    with partial forcing, activation checkpointing, quantized experts, the buffer growing when
    a call needs more rows than the last (the second count set is larger), and staging before the
    count sync."""
    made: list[int] = []
    init = peers.PeerMemory.__init__

    def counted_init(self, group, device, nbytes):  # type: ignore[no-untyped-def]
        made.append(nbytes)
        init(self, group, device, nbytes)

    peers.PeerMemory.__init__ = counted_init  # type: ignore[method-assign]
    peers.release_peer_memory(world.group)  # every rank: the first call below makes it anew
    call_init = alltoall_peers._Call.__init__
    try:
        for cfg, calls_before in ((CFG_UNEVEN, 1), (CFG_GROUPED, 0)):
            for counts in TOKEN_COUNTS[world.size]:
                ep = compare_with_reference(
                    world,
                    cfg,
                    "alltoall",
                    counts,
                    forced=True,
                    batch_axis=0 not in counts,
                    transport="peers",
                    calls_before=calls_before,
                )
                # A call after the first uses the rows it pulled before the count sync.
                assert ep.ep.dispatcher.transport.pulled_early is (calls_before > 0)
        check_activation_checkpointing(world, "alltoall", transport="peers")
        # QuantMoE's experts (the base stages' combine, copied home by push_rows).
        counts = TOKEN_COUNTS[world.size][1]
        x_SH = torch.randn(sum(counts), H, generator=torch.Generator().manual_seed(8))
        ref = reference(CFG_UNEVEN)
        q_ref = mr.QuantMoE.from_float(ref, "int8", None)
        ep = expert_parallel(world, CFG_UNEVEN, "alltoall", ref, transport="peers")
        q_ep = mr.QuantMoE.from_float(ep, "int8", None)
        with torch.no_grad():
            assert_close(q_ep(x_SH[world.rows(counts)]), q_ref(x_SH)[world.rows(counts)], **F32)
        # A layer's calls after its first stage and pull their rows before the count sync, in
        # the last call's areas and at a capacity: used where every rank staged and the counts
        # fit, else staged and pulled again (the same results either way).
        ep = expert_parallel(world, CFG_UNEVEN, "alltoall", ref, transport="peers")
        early: list[bool] = []
        many = [8] * world.size
        many[-1] = 64  # one rank's tokens outgrow its area: no rank uses its early rows
        for counts in ([8] * world.size, [8] * world.size, many, many, [64] * world.size, [2] * world.size):
            x_SH = torch.randn(sum(counts), H, generator=torch.Generator().manual_seed(sum(counts)))
            with torch.no_grad():
                assert_close(ep(x_SH[world.rows(counts)]), ref(x_SH)[world.rows(counts)], **F32)
            early.append(ep.ep.dispatcher.transport.pulled_early)
        assert early == [False, True, False, True, False, True], early
        # A call's rows and their autograd nodes go when its outputs do, without the garbage
        # collector: nothing of a call refers back to its own outputs (a cycle through the
        # pulled rows once kept every call's rows alive until a collection).
        calls: list[weakref.ref] = []

        def tracked_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            call_init(self, *args, **kwargs)
            calls.append(weakref.ref(self))

        alltoall_peers._Call.__init__ = tracked_init  # type: ignore[method-assign]
        gc.collect()
        gc.disable()
        x = x_SH[world.rows(counts)].clone().requires_grad_()
        for _ in range(2):  # the second call takes the early rows
            ep(x).sum().backward()
        assert ep.ep.dispatcher.transport.pulled_early and len(calls) == 2
        assert all(ref() is None for ref in calls)
    finally:
        peers.PeerMemory.__init__ = init  # type: ignore[method-assign]
        alltoall_peers._Call.__init__ = call_init  # type: ignore[method-assign]
        gc.enable()
    assert len(made) >= 2 and made == sorted(made), made  # grown, never shrunk


@check()
def check_alltoall_transport_choice(world: World) -> None:
    """The transport is the layer's ``EPConfig``: collectives by default (the CPU and GPUs alike),
    peers only when asked for, and carried over to ``QuantMoE.from_float``."""
    ref = reference(CFG_UNEVEN)
    assert expert_parallel(world, CFG_UNEVEN, "alltoall", ref).ep.dispatcher.transport.name == "collectives"
    ep = expert_parallel(world, CFG_UNEVEN, "alltoall", ref, transport="peers")
    assert ep.ep.dispatcher.transport.name == "peers"
    assert mr.QuantMoE.from_float(ep, "int8", None).ep.dispatcher.transport.name == "peers"
    with pytest.raises(ValueError, match=r"ep_mode='allgather' contradicts ep=EPConfig\(mode='alltoall'\)"):
        mr.MoE(CFG_UNEVEN, ep_group=world.group, ep_mode="allgather", ep=mr.EPConfig(mode="alltoall"))


@check()
def check_bf16(world: World) -> None:
    """bf16 experts, both modes: equal to the bf16 single-process layer within bf16 rounding."""
    tol = {"rtol": 2e-2, "atol": 2e-2}
    for mode in MODES:
        compare_with_reference(
            world, CFG_UNEVEN, mode, TOKEN_COUNTS[world.size][1], dtype=torch.bfloat16, tol=tol
        )


@check()
def check_state_dict(world: World) -> None:
    """load_state_dict takes the full layer's state dict or this rank's shard; full_state_dict
    gathers it back exactly; the router is broadcast at construction."""
    cfg = CFG_GROUPED
    ref = reference(cfg)
    expected = ref.state_dict()

    torch.manual_seed(100 + world.rank)  # per-rank init: only the broadcast makes routers agree
    ep = mr.MoE(cfg, backend="torch", ep_group=world.group, ep_mode="alltoall")
    routers = world.gather_objects(ep.router.weight.detach().clone())
    assert all(torch.equal(router, routers[0]) for router in routers)

    ep.load_state_dict(expected)
    first, count = ep.local_experts
    shard = ep.state_dict()
    assert shard["experts.gate_up_proj"].shape[0] == count
    assert torch.equal(shard["experts.down_proj"], expected["experts.down_proj"][first : first + count])
    assert torch.equal(shard["router.bias"], expected["router.bias"])

    full = ep.full_state_dict()
    assert list(full) == list(expected)
    assert all(torch.equal(full[key], expected[key]) for key in expected)
    assert all(full[key].device == expected[key].device for key in expected)

    other = mr.MoE(cfg, backend="torch", ep_group=world.group, ep_mode="allgather")
    other.load_state_dict(shard)  # a checkpoint saved per rank loads as it is
    assert all(torch.equal(other.state_dict()[key], shard[key]) for key in shard)

    wrong = dict(expected)
    wrong["experts.down_proj"] = expected["experts.down_proj"][:-1]  # neither E nor this rank's count
    with pytest.raises(RuntimeError, match=r"size mismatch for experts.down_proj"):
        ep.load_state_dict(wrong)


@check()
def check_errors(world: World) -> None:
    """Bad arguments raise on every rank (so none is left waiting in a collective)."""
    group, cfg = world.group, CFG_UNEVEN
    with pytest.raises(ValueError, match=r"ep_mode must be one of \('allgather', 'alltoall'\), got 'ring'"):
        mr.MoE(cfg, ep_group=group, ep_mode="ring")
    with pytest.raises(TypeError, match=r"ep_mode must be a str.*got NoneType None"):
        mr.MoE(cfg, ep_group=group, ep_mode=None)
    with pytest.raises(ValueError, match=r"ep_mode='alltoall' needs an ep_group.*got ep_group=None"):
        mr.MoE(cfg, ep_mode="alltoall")
    with pytest.raises(
        TypeError, match=r"ep_group must be a torch.distributed.ProcessGroup or None, got str"
    ):
        mr.MoE(cfg, ep_group="world")
    few = dataclasses.replace(cfg, num_experts=world.size - 1, top_k=1)
    with pytest.raises(ValueError, match=f"num_experts={world.size - 1}, world_size={world.size}"):
        mr.MoE(few, ep_group=group)

    # A rank with another config, or another mode: every rank raises, naming the odd ranks.
    others = "1" if world.size == 2 else "1, 2"
    odd_cfg = dataclasses.replace(cfg, top_k=2) if world.rank == 0 else cfg
    with pytest.raises(ValueError, match=rf"ranks \[{others}\] of ep_group built this layer differently"):
        mr.MoE(odd_cfg, ep_group=group)
    odd_mode = "alltoall" if world.rank == 0 else "allgather"
    with pytest.raises(ValueError, match=rf"ranks \[{others}\] of ep_group built this layer differently"):
        mr.MoE(cfg, ep_group=group, ep_mode=odd_mode)

    # Non-finite expert weights on rank 0 only: QuantMoE.from_float raises on every rank.
    nan_layer = mr.MoE(cfg, backend="torch", ep_group=group)
    if world.rank == 0:
        with torch.no_grad():
            nan_layer.experts.down_proj[0, 0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"moe.experts.down_proj has non-finite .*on ranks \[0\] of ep_group"
    ):
        mr.QuantMoE.from_float(nan_layer, "int8")

    ep = mr.MoE(cfg, backend="torch", ep_group=group, ep_mode="alltoall")
    x = torch.randn(3, H)
    with pytest.raises(ValueError, match=r"forced_expert_ids must have shape \[N=3, top_k=3\]"):
        ep(x, forced_expert_ids=torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x is on meta, but .* backend 'gloo' runs collectives on cpu"):
        check_device(group, torch.device("meta"), "x")
    assert ep(x).shape == (3, H)  # the world is still in step


@check(*MODES)
def check_triton_backend(world: World, mode: str) -> str | None:
    """The dispatchers use only backend stages, so the Triton backend runs under them too, with
    both backward GEMM paths (its kernels; ``torch._grouped_mm``, whose CPU fallback runs here).
    Under ``alltoall`` its experts' backward sends the rows' gradients home before the weight
    gradients (``send_grads_now``), and on the ``_grouped_mm`` path uses the x rows that
    ``prepare_backward`` gathered while the output gradient travelled."""
    if "triton" not in available_backends("cpu"):
        return "the triton backend cannot run on the CPU here (no Triton, or no interpreter)"
    from moe_replay.backends.triton import experts as triton_experts

    sent_early: list[int] = []
    pushed_early: list[int] = []
    gathered_early: list[bool] = []
    send_grads_now, backward = RowsInFlight.send_grads_now, triton_experts._grouped_mm_grads
    push_early = _Call.push_early
    grouped_mm_default = triton_experts.GROUPED_MM_BACKWARD

    def counted_send(flight: RowsInFlight, *grads: torch.Tensor | None) -> None:
        sent_early.append(len(grads))
        send_grads_now(flight, *grads)

    def counted_push(call: _Call, *grads: torch.Tensor | None) -> int:
        pushed_early.append(sum(g is not None for g in grads))
        return push_early(call, *grads)

    def counted_backward(dy, saved, needs, inputs_done):  # type: ignore[no-untyped-def]
        gathered_early.append(saved.x_NH is not None)
        return backward(dy, saved, needs, inputs_done)

    RowsInFlight.send_grads_now = counted_send  # type: ignore[method-assign]
    _Call.push_early = counted_push  # type: ignore[method-assign]
    triton_experts._grouped_mm_grads = counted_backward
    try:
        for grouped_mm in ("0", "1"):
            triton_experts.GROUPED_MM_BACKWARD = grouped_mm
            for counts in TOKEN_COUNTS[world.size]:
                compare_with_reference(world, CFG_UNEVEN, mode, counts, backend="triton", tol=F32)
            if mode == "alltoall":
                counts = TOKEN_COUNTS[world.size][1]
                compare_with_reference(world, CFG_UNEVEN, mode, counts, backend="triton", chunks=2)
            # The prologue reads the experts' saved tensors: under checkpointing, that is where
            # the recompute (and its collectives) runs, on every rank alike.
            check_activation_checkpointing(world, mode, backend="triton")
            if mode == "alltoall":  # the peer transport: its kernels, its early copies, its prologue
                # The first count set (a rank without tokens) on a second call: the rows pulled
                # and bucketed before the sync, by the kernels (the other set on a first call).
                for calls_before, counts in enumerate(TOKEN_COUNTS[world.size][::-1]):
                    ep = compare_with_reference(
                        world,
                        CFG_UNEVEN,
                        mode,
                        counts,
                        backend="triton",
                        transport="peers",
                        forced=True,
                        calls_before=calls_before,
                    )
                    assert ep.ep.dispatcher.transport.pulled_early is (calls_before > 0)
                check_activation_checkpointing(world, mode, backend="triton", transport="peers")
    finally:
        RowsInFlight.send_grads_now = send_grads_now  # type: ignore[method-assign]
        _Call.push_early = push_early  # type: ignore[method-assign]
        triton_experts._grouped_mm_grads = backward
        triton_experts.GROUPED_MM_BACKWARD = grouped_mm_default
    # Once per chunk and backward, on every rank (a rank without tokens too). The _grouped_mm
    # path needs a routed row; without one (E_loc experts got no pair) the kernels run.
    backwards = 2 * (len(TOKEN_COUNTS[world.size]) + 3)
    assert sent_early == ([2] * backwards if mode == "alltoall" else []), sent_early
    peer_backwards = 2 * (len(TOKEN_COUNTS[world.size]) + 1)
    assert pushed_early == ([2] * peer_backwards if mode == "alltoall" else []), pushed_early
    assert gathered_early and all(gathered_early) == (mode == "alltoall"), gathered_early
    return None


# ----------------------------------------------------------------------------------------------
# The worker (this file as a script) and the runner


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _worker_main(rank: int, size: int, init_file: str, out_dir: str) -> int:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=60),
    )
    world = World(rank, size, dist.group.WORLD)
    results: dict[str, dict[str, str]] = {}
    out = Path(out_dir) / f"rank{rank}.json"
    for name, fn in CHECKS.items():
        try:
            reason = fn(world)
        except BaseException:
            results[name] = {"status": "fail", "error": traceback.format_exc()}
            _write_json(out, results)
            return 1  # its peers may be waiting in a collective: the runner stops them
        results[name] = {"status": "pass"} if reason is None else {"status": "skip", "reason": reason}
        _write_json(out, results)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _run_world(size: int, out_dir: Path) -> str:
    """Start ``size`` workers, wait, stop them all if one fails; a note on how it ended."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, logs = [], []
    for rank in range(size):
        log = (out_dir / f"rank{rank}.log").open("w")
        args = [sys.executable, __file__, str(rank), str(size), str(out_dir / "init"), str(out_dir)]
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env))
        logs.append(log)
    deadline, note = time.monotonic() + WORLD_TIMEOUT_S, "all workers exited"
    while any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            note = f"ranks {failed} failed" if failed else f"the world ran past {WORLD_TIMEOUT_S} s"
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    for p, log in zip(procs, logs):
        p.wait()
        log.close()
    return note + "; exit codes " + str([p.returncode for p in procs])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclasses.dataclass
class Outcome:
    results: list[dict[str, dict[str, str]]]
    note: str
    logs: list[str]


_OUTCOMES: dict[int, Outcome] = {}


def _world_outcome(size: int, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    if size not in _OUTCOMES:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER") and fcntl is not None:
            root = root.parent  # shared by the session's xdist workers
        out_dir = root / f"ep_world_{size}"
        with _locked(root / f"ep_world_{size}.lock"):
            if not (out_dir / "note").exists():
                out_dir.mkdir(exist_ok=True)
                (out_dir / "note").write_text(_run_world(size, out_dir))
        results = []
        for rank in range(size):
            path = out_dir / f"rank{rank}.json"
            results.append(json.loads(path.read_text()) if path.exists() else {})
        logs = [(out_dir / f"rank{rank}.log").read_text()[-3000:] for rank in range(size)]
        _OUTCOMES[size] = Outcome(results, (out_dir / "note").read_text(), logs)
    return _OUTCOMES[size]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CHECKS))
def test_expert_parallel(name: str, world_size: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    outcome = _world_outcome(world_size, tmp_path_factory)
    problems, skips = [], set()
    for rank, results in enumerate(outcome.results):
        result = results.get(name)
        if result is None:
            problems.append(f"rank {rank}: not run (an earlier check failed, or the world died)")
        elif result["status"] == "fail":
            problems.append(f"rank {rank}:\n{result['error']}")
        elif result["status"] == "skip":
            skips.add(result["reason"])
    if problems:
        logs = "\n".join(f"--- rank {rank} log (tail) ---\n{log}" for rank, log in enumerate(outcome.logs))
        pytest.fail(f"world of {world_size} ({outcome.note}):\n" + "\n".join(problems) + "\n" + logs)
    if skips:
        pytest.skip("; ".join(sorted(skips)))


if __name__ == "__main__":
    rank, size, init_file, out_dir = sys.argv[1:]
    sys.exit(_worker_main(int(rank), int(size), init_file, out_dir))
