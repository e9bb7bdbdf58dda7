"""Count the ops and collectives of one expert-parallel layer call (torch.profiler, CPU, gloo).

    python benchmarks/count_ep_ops.py [--world 2] [--tokens 64] [--backend torch|triton] [-v]

Why counts: on a GPU host where each torch op or Triton launch costs 20-100 µs of CPU time, a
dispatcher made of small index ops is host-bound: the number of ops per call, not their work,
sets its time. Counts are exact and the same on any machine, unlike CPU timings.

Spawns ``--world`` gloo ranks on the CPU; rank 0 prints. Routing is forced (seeded uniform ids
through ``mr.replay``), so the router does the same in every mode. Two warm-up rounds, then one
profiled call per pass: the forward under ``torch.no_grad()``, the forward with autograd, and
that forward's ``backward()``. Counted: the layer's dispatcher call (``dispatch_experts``) in the
forward, and in the backward the autograd nodes of the ops it ran; in both, split into the
experts stage (``experts.forward_combined``: the same work with or without expert parallelism)
and the rest (``dispatch``: for ``alltoall`` the count exchange, the send/receive metadata, the
collectives and the origin's combine). The single-process layer's ``local_dispatch`` on one
rank's tokens is the baseline. Columns:

* ``top``: aten ops called from Python or the autograd engine (not from inside another aten op),
  Triton launches included: the host's per-op cost;
* ``kernels``: ops that launch a device kernel of their own: aten ops that are not views,
  allocations, metadata or wrappers of other ops (``aten::view``, ``aten::empty``, ``aten::to``,
  ``aten::zeros``, ...; their inner ops count), plus Triton launches (``--backend triton``: the
  interpreter on the CPU, ``TRITON_INTERPRET=1`` is set);
* ``coll``: c10d collectives (one NCCL call each on a GPU).

A CPU proxy for the GPU's count: the CPU's elementwise ops add a cast copy for inputs of mixed
dtypes, which CUDA kernels do on load (reductions, scans and index ops cast on both); reductions'
output fills on the CPU are left out. Counts do not depend on sizes, except the Triton dispatch:
one launch up to 1024 slots, two up to 128 blocks of 128 slots, three and a fill above
(``--tokens 512`` shows the two-launch path).
Host syncs (``.tolist()``) leave no trace on the CPU; read them off the code.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import tempfile
from collections.abc import Callable, Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import record_function

import moe_replay as mr

SHAPE = {"num_experts": 16, "top_k": 4, "hidden_size": 64, "intermediate_size": 32}
"""Small: counts do not depend on sizes (module docstring). E = 16 splits over 2, 4 and 8 ranks."""

NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::reshape",
    "aten::_reshape_alias", "aten::slice", "aten::select", "aten::as_strided", "aten::unsqueeze",
    "aten::squeeze", "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::alias",
    "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::split", "aten::split_with_sizes", "aten::narrow", "aten::unbind", "aten::chunk",
    "aten::_unsafe_view", "aten::view_as", "aten::expand_as", "aten::unflatten", "aten::flatten",
    "aten::set_", "aten::result_type", "aten::contiguous", "aten::lift", "aten::_to_copy",
    "aten::to", "aten::requires_grad_", "aten::resize_", "aten::_has_compatible_shallow_copy_type",
    "aten::numel", "aten::size", "aten::stride", "aten::dim", "aten::is_nonzero", "aten::new_empty",
    "aten::numpy_T", "aten::scalar_tensor", "aten::new_empty_strided",
}  # fmt: skip
"""Ops that launch no kernel themselves (an ``aten::to`` that copies has an ``aten::copy_`` child,
which counts; ``aten::scalar_tensor`` wraps a Python number, which CUDA kernels take as an
argument)."""

WRAPPERS = {
    "aten::index_put_", "aten::new_zeros", "aten::zeros", "aten::zeros_like", "aten::ones",
    "aten::ones_like", "aten::full", "aten::full_like", "aten::new_full", "aten::new_ones",
    "aten::clone", "aten::slice_backward", "aten::select_backward", "aten::masked_fill",
    "aten::linear", "aten::matmul", "aten::einsum", "aten::repeat_interleave", "aten::argsort",
    "aten::stack", "aten::type_as", "aten::float", "aten::long", "aten::int",
}  # fmt: skip
"""Ops that only call other ops (counted there)."""
REDUCTIONS = {"aten::sum", "aten::any", "aten::all", "aten::amax", "aten::amin", "aten::prod", "aten::mean"}

TRITON = "triton::"


def _ancestors(event: FunctionEvent) -> Iterator[FunctionEvent]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _is_op(event: FunctionEvent) -> bool:
    return event.name.startswith(("aten::", TRITON))


def _is_collective(event: FunctionEvent) -> bool:
    return event.name.startswith(("c10d::", "gloo:", "nccl:")) and "wait" not in event.name


def _launches(event: FunctionEvent) -> bool:
    """Whether ``event`` launches a kernel of its own: a Triton launch, or an aten op that is not a
    view, an allocation or a wrapper of other ops (nor the CPU's output fill in a reduction)."""
    name = event.name
    if name.startswith(TRITON):
        return True
    if name in NO_KERNEL or name in WRAPPERS or not name.startswith("aten::") or _in_triton_launch(event):
        return False
    if any(child.name == name for child in event.cpu_children):  # aten::arange -> aten::arange.out
        return False
    parent = event.cpu_parent
    return not (name == "aten::fill_" and parent is not None and parent.name in REDUCTIONS)


def _in_triton_launch(event: FunctionEvent) -> bool:
    """Whether ``event`` runs inside a Triton launch (the interpreter's copies on the CPU)."""
    return any(a.name.startswith(TRITON) for a in _ancestors(event))


def count(events: list[FunctionEvent]) -> dict[str, object]:
    """Op counts of ``events`` (whole call trees)."""
    events = [e for e in events if not _in_triton_launch(e)]
    ids = {id(e) for e in events}
    ops = [e for e in events if _is_op(e)]
    top = [e for e in ops if not any(_is_op(a) for a in _ancestors(e) if id(a) in ids)]
    kernels = [e for e in ops if _launches(e)]
    collectives = [
        e for e in events if _is_collective(e) and not any(_is_collective(a) for a in _ancestors(e))
    ]
    return {
        "top": len(top),
        "kernels": len(kernels),
        "coll": len(collectives),
        "kernel_names": collections.Counter(e.name.removeprefix("aten::") for e in kernels),
    }


def _subtree(event: FunctionEvent) -> Iterator[FunctionEvent]:
    yield event
    for child in event.cpu_children:
        yield from _subtree(child)


def _within(events: list[FunctionEvent], name: str) -> list[FunctionEvent]:
    return [e for e in events if any(a.name == name for a in _ancestors(e))]


def split_passes(events: list[FunctionEvent]) -> dict[str, dict[str, list[FunctionEvent]]]:
    """Per pass, the dispatcher's events split into ``experts`` and ``dispatch`` (the rest)."""
    passes = {}
    for name in ("fwd (no grad)", "fwd (grad)"):
        call = _within(_within(events, f"count.{name}"), "count.dispatcher")
        experts = {id(e) for e in _within(call, "count.experts")}
        passes[name] = {
            "dispatch": [e for e in call if id(e) not in experts and not e.name.startswith("count.")],
            "experts": [e for e in call if id(e) in experts],
        }
    # Backward: the autograd nodes of the forward ops, matched by sequence number. Every op in grad
    # mode records the number the next node will get; the op that makes the node is the last one.
    fwd = _within(events, "count.fwd (grad)")
    maker = {}
    for e in sorted(fwd, key=lambda e: e.time_range.start):
        if e.sequence_nr >= 0:
            maker[e.sequence_nr] = e
    in_call = {id(e) for e in _within(fwd, "count.dispatcher")}
    in_experts = {id(e) for e in _within(fwd, "count.experts")}
    seq_dispatcher = {seq for seq, e in maker.items() if id(e) in in_call}
    seq_experts = {seq for seq, e in maker.items() if id(e) in in_experts}
    nodes = [
        e
        for e in _within(events, "count.bwd")
        if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in seq_dispatcher
    ]
    passes["bwd"] = {
        "dispatch": [s for e in nodes if e.sequence_nr not in seq_experts for s in _subtree(e)],
        "experts": [s for e in nodes if e.sequence_nr in seq_experts for s in _subtree(e)],
    }
    return passes


def _trace_triton_launches() -> None:
    """Name every Triton launch in the profile (``triton::<kernel>``)."""
    from triton.runtime.jit import KernelInterface

    def getitem(self: KernelInterface, grid: object) -> Callable[..., object]:
        def launch(*args: object, **kwargs: object) -> object:
            name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "kernel")
            with record_function(f"{TRITON}{name}"):
                return self.run(*args, grid=grid, warmup=False, **kwargs)

        return launch

    KernelInterface.__getitem__ = getitem


def profile_layer(layer: mr.MoE, x: torch.Tensor, trace: mr.RoutingTrace) -> dict[str, dict[str, list]]:
    model = torch.nn.Sequential(layer)
    dispatcher, forward_combined = layer.dispatch_experts, layer.experts.forward_combined

    def dispatch(*args: object) -> torch.Tensor:
        with record_function("count.dispatcher"):
            return dispatcher(*args)

    def experts(*args: object) -> torch.Tensor:
        with record_function("count.experts"):
            return forward_combined(*args)

    layer.dispatch_experts, layer.experts.forward_combined = dispatch, experts
    with mr.replay(model, trace):
        dy = torch.randn_like(x)
        for _ in range(2):
            with torch.no_grad():
                model(x)
            model(x).backward(dy)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.no_grad(), record_function("count.fwd (no grad)"):
                model(x)
            with record_function("count.fwd (grad)"):
                y = model(x)
            with record_function("count.bwd"):
                y.backward(dy)
    layer.dispatch_experts = dispatcher
    del layer.experts.forward_combined
    return split_passes(list(prof.events()))


def report(title: str, passes: dict[str, dict[str, list]], verbose: bool) -> None:
    print(f"\n{title}")
    print(f"  {'pass':<14} {'stage':<9} {'top':>5} {'kernels':>8} {'coll':>5}")
    for name, stages in passes.items():
        for stage, events in stages.items():
            c = count(events)
            print(f"  {name:<14} {stage:<9} {c['top']:>5} {c['kernels']:>8} {c['coll']:>5}")
            if verbose and stage == "dispatch":
                kernels = ", ".join(f"{k} {n}" for k, n in sorted(c["kernel_names"].items()))
                print(f"      kernels: {kernels}")
            if verbose > 1 and stage == "dispatch":
                ids = {id(e) for e in events if not _in_triton_launch(e)}
                for e in sorted(events, key=lambda e: e.time_range.start):
                    if id(e) not in ids:
                        continue
                    if (_is_op(e) or _is_collective(e)) and not any(
                        (_is_op(a) or _is_collective(a)) and id(a) in ids for a in _ancestors(e)
                    ):
                        below = [s.name.removeprefix("aten::") for s in _subtree(e) if _launches(s)]
                        print(f"        {e.name} ({len(below)} kernels: {' '.join(below)})")


def make_inputs(cfg: mr.MoEConfig, T: int, seed: int) -> tuple[torch.Tensor, mr.RoutingTrace]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, cfg.hidden_size, generator=gen).requires_grad_()
    ids = torch.rand(T, cfg.num_experts, generator=gen).argsort(dim=1)[:, : cfg.top_k].int()
    return x, mr.RoutingTrace({"0": ids}, num_experts=cfg.num_experts, top_k=cfg.top_k)


def worker(rank: int, args: argparse.Namespace, init_file: str) -> None:
    torch.set_num_threads(1)
    if args.backend == "triton":
        _trace_triton_launches()
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    cfg = mr.MoEConfig(**SHAPE)
    x, trace = make_inputs(cfg, args.tokens, seed=rank)
    if rank == 0:
        torch.manual_seed(0)
        local = mr.MoE(cfg, backend=args.backend)
        title = f"local_dispatch (1 process), T={args.tokens}, backend {args.backend}"
        report(title, profile_layer(local, x, trace), args.verbose)
    torch.manual_seed(0)
    layer = mr.MoE(cfg, backend=args.backend, ep_group=dist.group.WORLD, ep_mode=args.mode)
    passes = profile_layer(layer, x, trace)
    if rank == 0:
        report(f"{args.mode}, {args.world} ranks, T={args.tokens} per rank", passes, args.verbose)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--backend", default="torch", choices=("torch", "triton"))
    p.add_argument("--mode", default="alltoall", choices=("allgather", "alltoall"))
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="list the dispatch stage's kernels (-vv: its ops in order)",
    )
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, os.path.join(tmp, "init")), nprocs=args.world)


if __name__ == "__main__":
    main()
