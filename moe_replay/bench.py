"""``moe-replay bench``: time the MoE layer against its baselines on one GPU.

Every implementation runs the whole layer on the same bf16 weights, input and expert ids:
router GEMM (float32) -> routing with the ids forced (our layers through ``forced_expert_ids``,
checked on the device without a host sync; the baselines gather the softmax at the forced ids in
plain PyTorch) -> experts -> combine.

Implementations (``--impls``):
  triton        moe_replay, triton backend, every slot forced (``forced_expert_ids``)
  triton-router moe_replay, triton backend, the router's own choice (no replay): ``--routing router``
                measures both on the same ids, which is the replay overhead
  torch         moe_replay, torch reference backend
  hf-eager      transformers ``Qwen3MoeExperts``, experts_implementation="eager"
  hf-grouped_mm transformers ``Qwen3MoeExperts``, experts_implementation="grouped_mm"
  grouped_mm    plain PyTorch: argsort -> torch._grouped_mm -> SwiGLU -> torch._grouped_mm -> index_add_
  liger         Liger-Kernel's LigerFusedMoEFunction (needs liger-kernel; LIGER_FUSED_MOE_AUTOTUNE=0)

Method (``benchmarks/RESULTS.md``): warm-up first (compilation excluded), CUDA-event medians through
``triton.testing.do_bench``; for T <= 64 ten calls with ten different routings are captured in a
CUDA graph and its replays are timed (so weights are not re-read from L2). FLOPs are 6*T*K*H*I per
forward and three times that for forward+backward; the floor is max(FLOPs / 790e12,
bytes / 3.0e12) with bytes = active experts' weights + input + output (x3 for forward+backward).
Max error is against the torch reference (float32 accumulation) on the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import moe_replay as mr

PEAK_FLOPS = 790e12  # bf16 dense, measured on these H100s (benchmarks/RESULTS.md)
PEAK_BYTES = 3.0e12  # device copy, read + write

SHAPES: dict[str, dict] = {
    "qwen3-30b-a3b": {"hidden_size": 2048, "num_experts": 128, "top_k": 8, "intermediate_size": 768},
    "olmoe-1b-7b": {
        "hidden_size": 2048, "num_experts": 64, "top_k": 8, "intermediate_size": 1024,
        "norm_topk_prob": False,
    },
    "mixtral-8x7b": {"hidden_size": 4096, "num_experts": 8, "top_k": 2, "intermediate_size": 14336},
    "deepseek-v3": {
        "hidden_size": 7168, "num_experts": 256, "top_k": 8, "intermediate_size": 2048, "scoring": "sigmoid",
        "score_bias": True, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    },
}  # fmt: skip
TOKENS = (1, 64, 512, 4096, 16384)
IMPLS = ("triton", "triton-router", "torch", "hf-eager", "hf-grouped_mm", "grouped_mm", "liger")
GRAPH_MAX_TOKENS = 64
GRAPH_CALLS = 10
# Implementations free of host synchronisation, hence capturable; the others are timed eagerly.
GRAPH_SAFE = ("triton", "triton-router", "hf-grouped_mm")


@dataclass
class Result:
    shape: str
    tokens: int
    routing: str
    impl: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_tflops: float | None = None
    fwdbwd_tflops: float | None = None
    fwd_floor_pct: float | None = None
    fwdbwd_floor_pct: float | None = None
    peak_mem_gib: float | None = None
    max_abs_err: float | None = None
    rel_err: float | None = None
    timing: str = ""
    error: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Routing inputs


def write_json(path: str | os.PathLike, data: object) -> None:
    """``data`` as JSON at ``path``, atomically (a temporary file beside it, then a rename): a
    benchmark stopped halfway leaves the last complete results, never a torn file."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def current_commit() -> str:
    """The short hash of the checkout being measured (``"unknown"`` outside a git checkout); a
    ``+`` marks uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, check=True)
        commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+" if dirty else "")


def append_records(path: str | os.PathLike, records: list[dict]) -> None:
    """Append ``records`` to the JSON-lines file at ``path`` (one record a line; the file is
    rewritten atomically with the old lines first, so a failed append leaves it as it was)."""
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old and not old.endswith("\n"):
            old += "\n"
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        f.write(old + "".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def make_ids(T: int, E: int, K: int, routing: str, generator: torch.Generator) -> torch.Tensor:
    """``[T, K]`` distinct expert ids per row: uniform, or Zipf(s=1.2) over experts."""
    if routing == "uniform":
        probs = torch.ones(E)
    elif routing == "zipf":
        probs = 1.0 / torch.arange(1, E + 1, dtype=torch.float64).pow(1.2)
        probs = probs[torch.randperm(E, generator=generator)].float()
    else:
        raise ValueError(f"routing must be 'uniform' or 'zipf', got {routing!r}")
    return torch.multinomial(probs.expand(max(T, 1), E), K, replacement=False, generator=generator)[:T]


# --------------------------------------------------------------------------------------------
# Implementations: each returns a callable running one layer forward per routing set


def _baseline_routing(
    x: torch.Tensor, router_w: torch.Tensor, ids: torch.Tensor, cfg: mr.MoEConfig
) -> torch.Tensor:
    """Gate weights at forced ``ids`` in plain PyTorch (the baselines' router + replay)."""
    logits = F.linear(x.float(), router_w)
    scores = torch.softmax(logits, -1) if cfg.scoring == "softmax" else torch.sigmoid(logits)
    w = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return w * cfg.routed_scaling_factor


def _grouped_mm_pipeline(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    K = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // K]
    h = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    g, u = h.chunk(2, dim=-1)
    a = F.silu(g) * u
    y = torch._grouped_mm(a, down.transpose(1, 2), offs=offs)
    y = y * w.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    out = torch.zeros_like(x)
    return out.index_add(0, order // K, y)


def build_impl(impl: str, cfg: mr.MoEConfig, moe: mr.MoE, id_sets: list[torch.Tensor]) -> Callable:
    """``run(xs) -> list of outputs``, one layer forward per routing set (all sharing weights)."""
    if impl in ("triton", "torch", "triton-router"):
        backend = "torch" if impl == "torch" else "triton"
        layers = torch.nn.ModuleList()
        for _ in id_sets:
            layer = mr.MoE(cfg, backend=backend, device="meta")
            layer.router, layer.experts = moe.router, moe.experts  # shared weights, separate routing sites
            layers.append(layer)
        if impl == "triton-router":
            return lambda xs: [layer(x) for layer, x in zip(layers, xs)]
        # Forced ids checked on the device (the layer's default validate=None): no host sync.
        return lambda xs: [layer(x, forced_expert_ids=ids) for layer, x, ids in zip(layers, xs, id_sets)]
    router_w, gate_up, down = moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj
    if impl in ("hf-eager", "hf-grouped_mm"):
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        hf_cfg = Qwen3MoeConfig(
            hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.intermediate_size,
            num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
        )  # fmt: skip
        hf_cfg._experts_implementation = impl.removeprefix("hf-")
        with torch.device("meta"):
            experts = Qwen3MoeExperts(hf_cfg)
        experts.gate_up_proj, experts.down_proj = gate_up, down
        return lambda xs: [
            experts(x, ids, _baseline_routing(x, router_w, ids, cfg).to(x.dtype))
            for x, ids in zip(xs, id_sets)
        ]
    if impl == "grouped_mm":
        return lambda xs: [
            _grouped_mm_pipeline(x, gate_up, down, ids, _baseline_routing(x, router_w, ids, cfg))
            for x, ids in zip(xs, id_sets)
        ]
    if impl == "liger":
        os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        ids32 = [ids.to(torch.int32) for ids in id_sets]
        return lambda xs: [
            LigerFusedMoEFunction.apply(
                x, gate_up, down, ids, _baseline_routing(x, router_w, ids, cfg).to(x.dtype)
            )
            for x, ids in zip(xs, ids32)
        ]
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# --------------------------------------------------------------------------------------------
# Timing


def graph_ms(fn: Callable[[], object]) -> float:
    """Median ms of ``fn`` captured in one CUDA graph (warmed up on a side stream first, as
    capture requires), timed by replaying the graph."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def _time(fn: Callable[[], object], use_graph: bool, calls: int) -> tuple[float, str]:
    """Median ms of one call of ``fn`` (``fn`` itself runs ``calls`` layer forwards)."""
    import triton.testing

    if use_graph:
        try:
            return graph_ms(fn) / calls, "cuda-graph"
        except Exception as error:  # a baseline with host syncs cannot be captured: time it eagerly
            torch.cuda.synchronize()
            note = f"eager (graph capture failed: {type(error).__name__})"
    else:
        note = "eager"
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms / calls, note


def measure(
    shape: str,
    T: int,
    routing: str,
    impls: list[str],
    seed: int = 0,
    check: bool = True,
    graph_max_tokens: int = GRAPH_MAX_TOKENS,
) -> list[Result]:
    spec = SHAPES[shape]
    cfg = mr.MoEConfig(**spec)
    H, E, K, I = cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.intermediate_size
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda")
    moe = mr.MoE(cfg, backend="triton", device=device, dtype=torch.bfloat16)
    if moe.router.bias is not None:  # cfg.score_bias
        moe.router.bias.normal_(0, 0.01)
    graphed = graph_max_tokens >= T  # ten calls over ten routings, in a graph where capturable
    calls = GRAPH_CALLS if graphed else 1
    xs = [torch.randn(T, H, device=device, dtype=torch.bfloat16) for _ in range(calls)]
    dys = [torch.randn(T, H, device=device, dtype=torch.bfloat16) for _ in range(calls)]
    if routing == "router":  # the router's own choice, recorded, so every impl sees those ids
        with torch.no_grad():
            id_sets = [moe(x, return_routing=True)[1].expert_ids.long() for x in xs]
    else:
        id_sets = [make_ids(T, E, K, routing, gen).to(device) for _ in range(calls)]
    flops = 6.0 * T * K * H * I
    active = sum(torch.unique(ids).numel() for ids in id_sets) / calls if T else 0  # per call
    weight_bytes = min(active * 3 * H * I * 2, E * 3 * H * I * 2)
    floor_s = max(flops / PEAK_FLOPS, (weight_bytes + 2 * T * H * 2) / PEAK_BYTES)

    reference = None
    if check:
        with torch.no_grad():
            ref_layer = mr.MoE(cfg, backend="torch", device="meta")
            ref_layer.router, ref_layer.experts = moe.router, moe.experts
            reference = ref_layer(xs[0], forced_expert_ids=id_sets[0])

    results = []
    for impl in impls:
        r = Result(shape=shape, tokens=T, routing=routing, impl=impl)
        results.append(r)
        if impl == "triton-router" and routing != "router":
            r.error = "skipped: only with --routing router"
            continue
        # DeepSeek-V3's weights are 21 GiB and their gradients as much again: at decode sizes the
        # graphs of ten forward+backward calls do not fit an 80 GB card, so time the forward only.
        backward = not (shape == "deepseek-v3" and graphed)
        if not backward:
            r.notes.append("forward only: forward+backward graphs of this shape exceed 80 GB")
        try:
            _measure_impl(r, cfg, moe, id_sets, xs, dys, reference, calls, graphed, backward)
        except Exception as error:
            r.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            traceback.print_exc()
            torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if T and r.fwd_ms:
            r.fwd_tflops = flops / (r.fwd_ms * 1e-3) / 1e12
            r.fwd_floor_pct = 100 * floor_s / (r.fwd_ms * 1e-3)
        if T and r.fwdbwd_ms:
            r.fwdbwd_tflops = 3 * flops / (r.fwdbwd_ms * 1e-3) / 1e12
            r.fwdbwd_floor_pct = 100 * 3 * floor_s / (r.fwdbwd_ms * 1e-3)
    return results


def _measure_impl(
    r: Result,
    cfg: mr.MoEConfig,
    moe: mr.MoE,
    id_sets: list[torch.Tensor],
    xs: list[torch.Tensor],
    dys: list[torch.Tensor],
    reference: torch.Tensor | None,
    calls: int,
    graphed: bool,
    backward: bool = True,
) -> None:
    """Fill ``r``'s error, times and memory for one implementation."""
    run = build_impl(r.impl, cfg, moe, id_sets)
    params = [moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj]
    with torch.no_grad():
        outs = run(xs)
    if reference is not None:
        diff = (outs[0].float() - reference.float()).abs()
        r.max_abs_err = diff.max().item() if diff.numel() else 0.0
        r.rel_err = (diff.norm() / reference.float().norm().clamp_min(1e-30)).item()
    del outs
    xs_grad = [x.detach().requires_grad_() for x in xs]

    def fwd() -> None:
        with torch.no_grad():
            run(xs)

    def fwdbwd() -> None:
        torch.autograd.backward(run(xs_grad), dys, inputs=[*params, *xs_grad])

    use_graph = graphed and r.impl in GRAPH_SAFE
    r.fwd_ms, r.timing = _time(fwd, use_graph, calls)
    if not backward:
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwdbwd()
    torch.cuda.synchronize()
    r.peak_mem_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    for p in params:
        p.grad = None
    r.fwdbwd_ms, timing_bwd = _time(fwdbwd, use_graph, calls)
    if timing_bwd != r.timing:
        r.notes.append(f"fwd+bwd timed {timing_bwd}")
    for t in [*params, *xs_grad]:
        t.grad = None


def bench_routing_kernel(T: int = 4096, shape: str = "qwen3-30b-a3b") -> dict:
    """The routing stage alone (logits -> ids, weights), triton kernel vs the torch reference:
    ``<case>_us`` timed call by call (do_bench, L2 flushed; the host's launch time shows where it
    exceeds the flush), ``<case>_graph_us`` per call of ten captured in one CUDA graph (device time)."""
    import triton.testing

    cfg = mr.MoEConfig(**SHAPES[shape])
    logits = torch.randn(T, cfg.num_experts, device="cuda")
    bias = torch.randn(cfg.num_experts, device="cuda") * 0.01 if cfg.score_bias else None
    out = {"shape": shape, "tokens": T}
    gen = torch.Generator().manual_seed(0)
    # Replay: every slot forced, int32 as a replay scope holds them (no conversion in the timing).
    forced = make_ids(T, cfg.num_experts, cfg.top_k, "uniform", gen).to("cuda", torch.int32)
    cases = (("triton", "triton", None), ("triton_forced", "triton", forced), ("torch", "torch", None))
    for name, backend, ids in cases:
        fn = lambda: mr.route(logits, cfg, ids, bias=bias, validate=False, backend=backend)  # noqa: B023
        fn()
        out[f"{name}_us"] = 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        if backend == "triton":  # capturable (no host sync)
            out[f"{name}_graph_us"] = 1e3 * graph_ms(lambda: [fn() for _ in range(10)]) / 10  # noqa: B023
    return out


# --------------------------------------------------------------------------------------------
# Command line


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: list[Result]) -> None:
    head = (
        f"{'shape':<14}{'T':>6} {'routing':<8}{'impl':<14}{'fwd ms':>9}{'f+b ms':>9}{'fwd TF/s':>9}"
        f"{'f+b TF/s':>9}{'fwd %fl':>8}{'f+b %fl':>8}{'mem GiB':>8}{'max err':>9}  timing"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if r.error and r.fwd_ms is None:
            print(f"{r.shape:<14}{r.tokens:>6} {r.routing:<8}{r.impl:<14}  {r.error}")
            continue
        print(
            f"{r.shape:<14}{r.tokens:>6} {r.routing:<8}{r.impl:<14}"
            f"{_fmt(r.fwd_ms, '9.3f')}{_fmt(r.fwdbwd_ms, '9.3f')}{_fmt(r.fwd_tflops, '9.0f')}"
            f"{_fmt(r.fwdbwd_tflops, '9.0f')}{_fmt(r.fwd_floor_pct, '8.0f')}"
            f"{_fmt(r.fwdbwd_floor_pct, '8.0f')}{_fmt(r.peak_mem_gib, '8.2f')}"
            f"{_fmt(r.max_abs_err, '9.2e')}  {r.timing} {' '.join(r.notes)} {r.error or ''}"
        )


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes", type=_csv, default=list(SHAPES), help=f"comma-separated, from {list(SHAPES)}"
    )
    parser.add_argument(
        "--tokens", type=_csv, default=[str(t) for t in TOKENS], help="comma-separated token counts"
    )
    parser.add_argument("--routing", type=_csv, default=["uniform", "zipf"], help="uniform,zipf,router")
    parser.add_argument(
        "--impls", type=_csv, default=list(IMPLS), help=f"comma-separated, from {list(IMPLS)}"
    )
    parser.add_argument("--routing-kernel", action="store_true", help="also time the routing stage alone")
    parser.add_argument("--no-check", action="store_true", help="skip the error check against the reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--graph-max-tokens", type=int, default=GRAPH_MAX_TOKENS, help="time T up to this in CUDA graphs"
    )
    parser.add_argument(
        "--json", default=None, help="write results as JSON to this path (rewritten after each case)"
    )
    parser.add_argument(
        "--append",
        default=None,
        help="at the end, append one record per result to this JSON-lines file "
        "(benchmarks/results/bench_layer.jsonl: commit, gpu, shape, tokens, routing, impl, figures)",
    )


def run_bench(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("moe-replay bench needs a CUDA GPU")
    for name in args.shapes:
        if name not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {name!r}; known: {list(SHAPES)}")
    for impl in args.impls:
        if impl not in IMPLS:
            raise SystemExit(f"--impls: unknown implementation {impl!r}; known: {list(IMPLS)}")
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "cuda": torch.version.cuda,
    }
    with contextlib.suppress(ImportError):
        env["transformers"] = __import__("transformers").__version__
    print(json.dumps(env))
    results: list[Result] = []
    extra: dict = {}
    t0 = time.time()

    def dump() -> None:
        if args.json:
            write_json(args.json, {"env": env, "results": [asdict(r) for r in results], **extra})

    if args.routing_kernel:
        extra["routing_kernel"] = [bench_routing_kernel(int(T), s) for s in args.shapes for T in (4096,)]
        print(json.dumps(extra["routing_kernel"]))
        dump()
    for shape in args.shapes:
        for T in (int(t) for t in args.tokens):
            for routing in args.routing:
                case = measure(
                    shape, T, routing, args.impls, args.seed, not args.no_check, args.graph_max_tokens
                )
                results.extend(case)
                print_table(case)
                print(f"  [{time.time() - t0:.0f}s]", flush=True)
                dump()
    print()
    print_table(results)
    if args.append:
        commit, records = current_commit(), []
        for r in results:
            figures = asdict(r)
            keys = {k: figures.pop(k) for k in ("shape", "tokens", "routing", "impl")}
            records.append({"commit": commit, "gpu": env["device"], **keys, "figures": figures})
        append_records(args.append, records)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_arguments(parser)
    return run_bench(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
