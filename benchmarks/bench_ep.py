"""Expert parallelism: equality with the single-process layer, then per-rank time and weak scaling.

Run on N GPUs of one host (NCCL)::

    torchrun --nproc-per-node N benchmarks/bench_ep.py --json ep.json

and on the CPU (gloo, tiny shapes: a smoke test of this script)::

    torchrun --nproc-per-node 2 benchmarks/bench_ep.py --device cpu --small --json ep_cpu.json

What it does, in order (every rank takes part; rank 0 prints and writes the JSON, rewritten after
every result, so a run cut short keeps what it measured):

1. Equality. Each rank builds the single-process layer (weights broadcast from rank 0) and runs it
   on the tokens of all ranks concatenated; the expert-parallel layer loaded from it runs on this
   rank's tokens, in both modes. Compared: outputs, input gradients, router gradients (summed
   over ranks), expert gradients (this rank's slice). Token counts differ per rank, the last rank
   has none. Cases: float32 at a small shape (tight tolerance), and bf16 at the benchmark shape
   (bf16 tolerance). Routing is forced (all slots) with seeded uniform ids, so a float-level
   difference in router logits cannot flip a near-tie; routing under EP is covered by the CPU
   tests (tests/parallel/test_ep.py).
2. Timing. Shape Qwen3-30B-A3B (H=2048, E=128, K=8, I=768, softmax, norm), bf16, T tokens per
   rank for T in --tokens (default 4096,16384). Routing: seeded uniform random ids (K distinct
   per token, a different seed per rank) forced through ``mr.replay``. Cases per T: ``1gpu`` (the
   single-process layer holding all 128 experts, on this rank's T tokens, every rank at once on
   its own GPU), ``allgather`` and ``alltoall`` (the layer spread over all ranks). Passes:
   ``fwd`` (under ``torch.no_grad()``) and ``fwd+bwd`` (forward with autograd, then backward of
   a fixed output gradient; parameter gradients reset between iterations, outside the timing).
   Two timings, by CUDA events (perf_counter on the CPU), after --warmup iterations: "isolated",
   the median of --iters iterations that each start after a barrier and a device sync (the host's
   launch time is fully exposed), and "steady", --iters iterations back to back after one barrier
   divided by --iters (as layers run in a training step: the host runs ahead of the GPU except
   where a host sync, such as alltoall's count exchange, drains it). Efficiencies use steady.
   Reported per case: every rank's median (ms), their max (a step waits for the slowest rank),
   peak memory per rank, and the weak-scaling efficiency ``time_1gpu(T) / time_ep(T per rank)``
   with time_1gpu the median over ranks of their 1gpu medians and time_ep the max over ranks.

Exit status: 0 when every equality case passed and every timing ran, 1 otherwise (results are
written either way).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import moe_replay as mr
from moe_replay.backends.registry import get_backend
from moe_replay.bench import write_json

QWEN3 = {"num_experts": 128, "top_k": 8, "hidden_size": 2048, "intermediate_size": 768}
SMALL = {"num_experts": 10, "top_k": 3, "hidden_size": 64, "intermediate_size": 32}
"""--small: E = 10 splits unevenly over 3 or 4 ranks."""
EQUALITY_F32 = {"num_experts": 18, "top_k": 4, "hidden_size": 256, "intermediate_size": 128}
"""E = 18 splits unevenly over 4 ranks ([5, 5, 4, 4])."""
MODES = ("allgather", "alltoall")


# ----------------------------------------------------------------------------------------------
# Setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda: NCCL; cpu: gloo")
    p.add_argument("--small", action="store_true", help="tiny shapes and token counts (CPU smoke test)")
    p.add_argument("--tokens", default=None, help="tokens per rank, comma-separated (default 4096,16384)")
    p.add_argument("--modes", default=",".join(MODES), help="ep modes to time, comma-separated")
    p.add_argument(
        "--chunks",
        default=None,
        help="alltoall token chunks to time, comma-separated (cases alltoall/c<n>; default: the "
        "dispatcher's default, case alltoall)",
    )
    p.add_argument(
        "--transports",
        default=None,
        help="alltoall transports to time and check, comma-separated: collectives, peers (cases "
        "alltoall/<transport>; default: the dispatcher's default, case alltoall)",
    )
    p.add_argument("--backend", default=None, help="moe_replay backend (default: automatic)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed iterations per case (default 3; 1 small)"
    )
    p.add_argument("--iters", type=int, default=None, help="timed iterations per case (default 10; 3 small)")
    p.add_argument("--skip-equality", action="store_true", help="time only")
    p.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="T",
        help="only profile alltoall forward and forward+backward at T tokens per rank (torch.profiler, "
        "rank 0 prints its table)",
    )
    p.add_argument(
        "--a2a-only",
        action="store_true",
        help="with --profile: skip the profiler, only time the bare token all-to-all (to compare NCCL "
        "settings, e.g. NCCL_P2P_USE_CUDA_MEMCPY or NCCL_MIN_P2P_NCHANNELS, run by run)",
    )
    p.add_argument(
        "--trace-dir",
        default=None,
        help="with --profile: every rank writes its Chrome trace there (trace_rank<r>.json.gz)",
    )
    p.add_argument(
        "--with-stack",
        action="store_true",
        help="with --profile: record Python calls too (trace_timeline.py --host reads them)",
    )
    p.add_argument(
        "--nccl-priority",
        choices=("high", "normal"),
        default="high",
        help="the NCCL streams' priority (ProcessGroupNCCL.Options.is_high_priority_stream); high lets "
        "an all-to-all overlap a GEMM that fills the GPU",
    )
    p.add_argument("--timeout-s", type=int, default=300, help="collective timeout: a hung rank fails")
    p.add_argument("--json", default=None, help="where rank 0 writes the results")
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = "64,256" if args.small else "4096,16384"
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    args.chunks = [int(c) for c in args.chunks.split(",") if c] if args.chunks else []
    args.transports = [t for t in args.transports.split(",") if t] if args.transports else []
    for transport in args.transports:
        if transport not in ("collectives", "peers"):
            p.error(f"--transports: {transport!r} is not one of collectives, peers")
    if args.chunks and args.transports:
        p.error("--chunks and --transports do not combine (peers runs one chunk)")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"--modes: {mode!r} is not one of {MODES}")
    if args.warmup is None:
        args.warmup = 1 if args.small else 3
    if args.iters is None:
        args.iters = 3 if args.small else 10
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    return args


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str, timeout_s: int, high_priority: bool = False) -> torch.device:
    """Join the torchrun world (or a world of one without torchrun); this rank's device.
    ``high_priority``: NCCL runs its kernels on a high-priority stream, so that an all-to-all
    started while a GEMM fills the GPU gets SMs as the GEMM's blocks retire, not after them."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
    timeout = datetime.timedelta(seconds=timeout_s)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here; use --device cpu --small for a CPU run")
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = high_priority
        options._timeout = timeout
        dist.init_process_group("nccl", timeout=timeout, pg_options=options)
        return torch.device("cuda", local)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


class Report:
    """Everything measured; rank 0 rewrites the JSON after each addition (atomically)."""

    def __init__(self, path: str | None, meta: dict[str, Any]) -> None:
        self.path = Path(path) if path and dist.get_rank() == 0 else None
        self.data: dict[str, Any] = {"meta": meta, "status": "running", "equality": [], "timings": []}
        self.ok = True
        self.write()

    def add(self, section: str, record: dict[str, Any]) -> None:
        self.data[section].append(record)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        write_json(self.path, self.data)


def _nccl_version() -> str:
    try:
        version = torch.cuda.nccl.version()
    except Exception as error:  # informational only
        return f"unknown ({type(error).__name__})"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def say(*parts: object) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


# ----------------------------------------------------------------------------------------------
# Equality


def uniform_ids(num_tokens: int, cfg: mr.MoEConfig, seed: int) -> torch.Tensor:
    """``[T, K]`` int32: K distinct experts per token, uniformly at random (seeded, on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, cfg.num_experts, generator=gen).argsort(dim=1)[:, : cfg.top_k].int()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    scale = b.float().abs().max().item()
    return (a.float() - b.float()).abs().max().item() / max(scale, 1e-30)


def ep_cases(modes: list[str], args: argparse.Namespace) -> list[str]:
    """The EP cases to run: a mode, or ``alltoall/c<chunks>``, ``alltoall/<transport>``."""
    cases = []
    for mode in modes:
        if mode == "alltoall" and args.chunks:
            cases += [f"{mode}/c{c}" for c in args.chunks]
        elif mode == "alltoall" and args.transports:
            cases += [f"{mode}/{t}" for t in args.transports]
        else:
            cases.append(mode)
    return cases


def ep_config(case: str) -> mr.EPConfig:
    """The layer's ``EPConfig`` for ``case`` (see :func:`ep_cases`)."""
    mode, _, option = case.partition("/")
    if not option:
        return mr.EPConfig(mode=mode)
    if option[0] == "c" and option[1:].isdigit():
        return mr.EPConfig(mode=mode, chunks=int(option[1:]))
    return mr.EPConfig(mode=mode, transport=option)


def equality_case(
    name: str,
    cfg: mr.MoEConfig,
    counts: list[int],
    dtype: torch.dtype,
    tol: float,
    device: torch.device,
    cases: list[str],
    backend: str | None,
    report: Report,
) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    S, H = sum(counts), cfg.hidden_size
    start = sum(counts[:rank])
    rows = slice(start, start + counts[rank])

    torch.manual_seed(0)
    ref = mr.MoE(cfg, backend=backend, device=device, dtype=dtype)
    with torch.no_grad():
        for tensor in ref.state_dict().values():
            dist.broadcast(tensor, src=0)
    gen = torch.Generator().manual_seed(1)
    x_SH = torch.randn(S, H, generator=gen).to(device, dtype)
    grad_SH = torch.randn(S, H, generator=gen).to(device, dtype)
    forced_SK = uniform_ids(S, cfg, seed=2).to(device)

    x_ref = x_SH.clone().requires_grad_()
    y_ref = ref(x_ref, forced_expert_ids=forced_SK)
    y_ref.backward(grad_SH)

    for case in cases:
        ep = mr.MoE(
            cfg, backend=backend, device=device, dtype=dtype, ep_group=dist.group.WORLD, ep=ep_config(case)
        )
        ep.load_state_dict(ref.state_dict())
        x = x_SH[rows].clone().requires_grad_()
        y = ep(x, forced_expert_ids=forced_SK[rows])
        y.backward(grad_SH[rows])
        router_grad = ep.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        first, count = ep.local_experts
        errors = {
            "y": rel_err(y, y_ref[rows].detach()),
            "grad_x": rel_err(x.grad, x_ref.grad[rows]),
            "grad_router": rel_err(router_grad, ref.router.weight.grad),
            "grad_gate_up": rel_err(
                ep.experts.gate_up_proj.grad, ref.experts.gate_up_proj.grad[first : first + count]
            ),
            "grad_down": rel_err(
                ep.experts.down_proj.grad, ref.experts.down_proj.grad[first : first + count]
            ),
        }
        per_rank: list[dict[str, float]] = [{} for _ in range(world)]
        dist.all_gather_object(per_rank, errors)
        worst = {key: max(r[key] for r in per_rank) for key in errors}
        passed = all(value <= tol for value in worst.values())
        report.ok &= passed
        report.add(
            "equality",
            {
                "case": name,
                "mode": case,
                "dtype": str(dtype).removeprefix("torch."),
                "shape": dataclasses.asdict(cfg),
                "tokens_per_rank": counts,
                "max_rel_err": worst,
                "tol": tol,
                "passed": passed,
            },
        )
        say(
            f"equality {name:<10} {case:<17} {'PASS' if passed else 'FAIL'}  "
            + "  ".join(f"{k}={v:.2e}" for k, v in worst.items())
            + f"  (tol {tol:g})"
        )
        del ep


def run_equality(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    world = dist.get_world_size()
    uneven = [64 * (r + 1) for r in range(world - 1)] + [0]  # the last rank has no tokens
    if world == 1:
        uneven = [96]
    if args.small:
        cases = [("small-f32", SMALL, torch.float32, 1e-4, 1)]
    else:
        cases = [
            ("f32", EQUALITY_F32, torch.float32, 1e-4, 4),
            ("qwen3-bf16", QWEN3, torch.bfloat16, 3e-2, 8),
        ]
    for name, shape, dtype, tol, scale in cases:
        cfg = mr.MoEConfig(**shape, scoring="softmax", norm_topk_prob=True)
        try:
            counts = [c * scale for c in uneven]
            cases = ep_cases(list(MODES), args)
            equality_case(name, cfg, counts, dtype, tol, device, cases, args.backend, report)
        except Exception:
            report.ok = False
            report.add("equality", {"case": name, "error": traceback.format_exc()})
            print(
                f"rank {dist.get_rank()}: equality {name}: ERROR\n{traceback.format_exc()}", file=sys.stderr
            )
            raise  # ranks may be out of step now: stop rather than hang in the next collective


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_iterations(
    fn: Callable[[], None], before: Callable[[], None], args: argparse.Namespace, device: torch.device
) -> tuple[float, float, float]:
    """(isolated, steady, slowest steady) milliseconds per call of ``fn`` (module docstring): the
    median over ``args.iters`` runs each after ``before()``, a barrier and a device sync;
    ``args.iters`` runs back to back (``before()`` between them) after one barrier, divided by
    ``args.iters``; and the longest of those back-to-back runs (by events between them: a stall
    in one run, or every run slow)."""
    times = []
    for i in range(args.warmup + args.iters):
        before()
        dist.barrier()
        sync(device)
        elapsed = _elapsed_ms(fn, device)
        if i >= args.warmup:
            times.append(elapsed)

    marks: list = []

    def mark() -> None:
        if device.type == "cuda":
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())

    def back_to_back() -> None:
        mark()
        for _ in range(args.iters):
            before()
            fn()
            mark()

    dist.barrier()
    sync(device)
    steady = _elapsed_ms(back_to_back, device) / args.iters
    if device.type == "cuda":
        runs = [a.elapsed_time(b) for a, b in itertools.pairwise(marks)]
    else:
        runs = [(b - a) * 1e3 for a, b in itertools.pairwise(marks)]
    return statistics.median(times), steady, max(runs)


def timing_config(args: argparse.Namespace, device: torch.device) -> tuple[dict, mr.MoEConfig, torch.dtype]:
    """(shape, config, dtype) of the timed layer: float32 on the CPU, bf16 on GPUs."""
    shape = SMALL if args.small else QWEN3
    cfg = mr.MoEConfig(**shape, scoring="softmax", norm_topk_prob=True)
    return shape, cfg, torch.float32 if device.type == "cpu" else torch.bfloat16


def rank_inputs(
    T: int, cfg: mr.MoEConfig, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, mr.RoutingTrace]:
    """This rank's T tokens, an output gradient for them, and their routing (seeded by the rank),
    as a trace for ``mr.replay`` of ``nn.Sequential(layer)``."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(T, cfg.hidden_size, generator=gen).to(device, dtype)
    grad = torch.randn(T, cfg.hidden_size, generator=gen).to(device, dtype)
    trace = mr.RoutingTrace(
        {"0": uniform_ids(T, cfg, seed=rank).to(device)}, num_experts=cfg.num_experts, top_k=cfg.top_k
    )
    return x, grad, trace


def time_layer(
    layer: mr.MoE, T: int, cfg: mr.MoEConfig, args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, float | None]]:
    """{pass: {"ms": median, "peak_gb": peak memory}} for this rank's T tokens, routing replayed."""
    x, grad, trace = rank_inputs(T, cfg, layer.experts.gate_up_proj.dtype, device)
    model = nn.Sequential(layer)
    params = list(layer.parameters())

    x_train = x.clone().requires_grad_()

    def reset_grads() -> None:
        for p in [*params, x_train]:
            p.grad = None

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        model(x_train).backward(grad)

    results = {}
    with mr.replay(model, trace):
        for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            isolated, steady, slowest = time_iterations(fn, reset_grads, args, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            results[name] = {"ms": steady, "ms_isolated": isolated, "ms_slowest": slowest, "peak_gb": peak}
    reset_grads()
    return results


def run_timing(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    world = dist.get_world_size()
    shape, cfg, dtype = timing_config(args, device)
    say(
        f"\ntiming: {shape}, {str(dtype).removeprefix('torch.')}, {world} ranks, backend "
        f"{get_backend(args.backend, device).name}, median of {args.iters} after {args.warmup} warm-up"
    )
    say(
        f"{'T/rank':>7} {'case':<20} {'fwd ms':>9} {'fwd+bwd ms':>11} {'eff fwd':>8} {'eff f+b':>8}  "
        f"{'isolated: fwd':>8} {'f+b':>8}  per-rank fwd+bwd ms (steady), slowest f+b run"
    )
    cases = ["1gpu", *ep_cases(args.modes, args)]
    for T in args.tokens:
        baseline: dict[str, float] = {}
        for case in cases:
            try:
                torch.manual_seed(0)
                if case == "1gpu":
                    layer = mr.MoE(cfg, backend=args.backend, device=device, dtype=dtype)
                else:
                    layer = mr.MoE(
                        cfg,
                        backend=args.backend,
                        device=device,
                        dtype=dtype,
                        ep_group=dist.group.WORLD,
                        ep=ep_config(case),
                    )
                mine = time_layer(layer, T, cfg, args, device)
                del layer
                per_rank: list[dict[str, dict[str, float]]] = [{} for _ in range(world)]
                dist.all_gather_object(per_rank, mine)
            except Exception:
                report.ok = False
                report.add("timings", {"tokens_per_rank": T, "case": case, "error": traceback.format_exc()})
                print(
                    f"rank {dist.get_rank()}: T={T} {case}: ERROR\n{traceback.format_exc()}", file=sys.stderr
                )
                raise  # ranks may be out of step now: stop rather than hang in the next collective
            record: dict[str, Any] = {
                "tokens_per_rank": T,
                "case": case,
                "world_size": 1 if case == "1gpu" else world,
            }
            for name in ("fwd", "fwd+bwd"):
                ms_ranks = [r[name]["ms"] for r in per_rank]
                isolated_ranks = [r[name]["ms_isolated"] for r in per_rank]
                entry = {
                    "ms_per_rank": ms_ranks,
                    "ms_max": max(ms_ranks),
                    "ms_median": statistics.median(ms_ranks),
                    "ms_isolated_per_rank": isolated_ranks,
                    "ms_isolated_max": max(isolated_ranks),
                    "ms_slowest_run_per_rank": [r[name]["ms_slowest"] for r in per_rank],
                    "peak_gb_per_rank": [r[name]["peak_gb"] for r in per_rank],
                }
                if case == "1gpu":
                    baseline[name] = entry["ms_median"]
                    entry["efficiency"] = 1.0
                else:
                    entry["efficiency"] = baseline[name] / entry["ms_max"] if name in baseline else None
                record[name] = entry
            report.add("timings", record)
            f, fb = record["fwd"], record["fwd+bwd"]
            ms_col = f["ms_max"] if case != "1gpu" else f["ms_median"]
            msb_col = fb["ms_max"] if case != "1gpu" else fb["ms_median"]
            say(
                f"{T:>7} {case:<20} {ms_col:>9.3f} {msb_col:>11.3f} {f['efficiency']:>8.2f} "
                f"{fb['efficiency']:>8.2f}  {f['ms_isolated_max']:>8.3f} {fb['ms_isolated_max']:>8.3f}  "
                + " ".join(f"{v:.2f}" for v in fb["ms_per_rank"])
                + f", {max(fb['ms_slowest_run_per_rank']):.2f}"
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run_profile(T: int, args: argparse.Namespace, device: torch.device) -> None:
    """torch.profiler over two alltoall forwards and forward+backwards at T tokens per rank; rank 0
    prints the ops by host time and by device time (the dispatcher's phases appear as
    ``moe_replay.alltoall.*`` ranges)."""
    _, cfg, dtype = timing_config(args, device)
    case = ep_cases(["alltoall"], args)[0]  # the first of --chunks or --transports
    layer = mr.MoE(
        cfg, backend=args.backend, device=device, dtype=dtype, ep_group=dist.group.WORLD, ep=ep_config(case)
    )
    x, _, trace = rank_inputs(T, cfg, dtype, device)
    x.requires_grad_()
    model = nn.Sequential(layer)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with mr.replay(model, trace):
        for _ in range(args.warmup):
            model(x).sum().backward()
        dist.barrier()
        sync(device)
        if args.a2a_only:
            time_token_all_to_all(layer.ep.dispatcher.last_send_rows, cfg, dtype, device, args)
            return
        with torch.profiler.profile(activities=activities, with_stack=args.with_stack) as prof:
            for i in range(2):
                with torch.no_grad(), torch.profiler.record_function(f"bench.forward.{i}"):
                    model(x)
                with torch.profiler.record_function(f"bench.forward_backward.{i}"):
                    model(x).sum().backward()
            sync(device)
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace_dir) / f"trace_rank{dist.get_rank()}.json.gz"))
    if dist.get_rank() == 0:
        table = prof.key_averages()
        say(table.table(sort_by="self_cpu_time_total", row_limit=40))
        if device.type == "cuda":
            say(table.table(sort_by="self_device_time_total", row_limit=25))
    time_token_all_to_all(layer.ep.dispatcher.last_send_rows, cfg, dtype, device, args)


def time_token_all_to_all(
    send_rows: tuple[int, ...], cfg: mr.MoEConfig, dtype: torch.dtype, device: torch.device, args
) -> None:
    """The bare all-to-all of the token rows the layer just sent (this rank's ``send_rows``),
    timed alone: the bandwidth the dispatcher's two big all-to-alls get at best."""
    world = dist.get_world_size()
    send = torch.tensor(send_rows, dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    recv_rows = recv.tolist()
    x = torch.randn(sum(send_rows), cfg.hidden_size, device=device).to(dtype)
    out = x.new_empty(sum(recv_rows), cfg.hidden_size)

    def call() -> None:
        dist.all_to_all_single(out, x, recv_rows, list(send_rows))

    for _ in range(args.warmup):
        call()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        sync(device)
        times.append(_elapsed_ms(call, device))
    ms = statistics.median(times)
    rank = dist.get_rank()
    remote = sum(n for r, n in enumerate(send_rows) if r != rank) * cfg.hidden_size * x.element_size()
    gathered = [None] * world
    dist.all_gather_object(gathered, (ms, remote / ms / 1e6, list(send_rows)))
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")}
    say(f"token all-to-all alone, NCCL settings {settings}")
    for r, (ms_r, gbps, rows) in enumerate(gathered):
        say(
            f"token all-to-all alone, rank {r}: {ms_r:.3f} ms, {gbps:.0f} GB/s sent to other ranks, rows {rows}"
        )


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = init_distributed(args.device, args.timeout_s, args.nccl_priority == "high")
    meta = {
        "script": "benchmarks/bench_ep.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "world_size": dist.get_world_size(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dist_backend": str(dist.get_backend()),
        "torch": torch.__version__,
        "moe_replay_backend": get_backend(args.backend, device).name,
        "nccl": _nccl_version() if device.type == "cuda" else None,
        "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")},
        "nccl_priority": args.nccl_priority,
        "moe_replay_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MOE_REPLAY_")},
        "efficiency": "time_1gpu(T) / time_ep(T per rank): median over ranks of the 1gpu medians "
        "over the max over ranks of the EP medians",
        "fwd": "under torch.no_grad()",
        "fwd+bwd": "forward with autograd, then backward of a fixed output gradient",
    }
    report = Report(args.json, meta)
    say(
        f"bench_ep: {meta['world_size']} ranks on {meta['device']} ({meta['dist_backend']}), "
        f"torch {meta['torch']}, moe_replay backend {meta['moe_replay_backend']}"
    )
    if args.profile is not None:
        run_profile(args.profile, args, device)
        dist.barrier()
        dist.destroy_process_group()
        return 0
    try:
        if not args.skip_equality:
            run_equality(args, device, report)
        run_timing(args, device, report)
    except Exception as error:
        # Ranks may be out of step: no further collective (torchrun stops the other workers).
        report.data["status"] = (
            f"failed on rank {dist.get_rank()}: {type(error).__name__}: {error} (a lost connection "
            "means another rank failed first: its stderr has the cause)"
        )
        report.write()
        print(f"rank {dist.get_rank()}: {report.data['status']}", file=sys.stderr, flush=True)
        return 1
    report.data["status"] = "done" if report.ok else "done, with failed equality checks"
    report.write()
    say(f"\nstatus: {report.data['status']}" + (f"; results in {args.json}" if args.json else ""))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
