"""Time ``mr.QuantMoE`` (int8 / int4 / fp8 experts) against the bf16 ``mr.MoE`` layer on one GPU.

    python benchmarks/bench_quant.py --json quant.json
    python benchmarks/bench_quant.py --tokens 1,64,4096 --impls bf16,int8-triton,int4-triton
    TRITON_INTERPRET=1 python benchmarks/bench_quant.py --shape tiny   # smoke run on the CPU

Implementations (``--impls``), every one the whole layer on the same bf16 input and forced ids:
  bf16          mr.MoE, triton backend, bf16 weights
  int8-triton   mr.QuantMoE int8 (per output channel), triton kernels
  int4-triton   mr.QuantMoE int4, groups of ``--group-size`` inputs, triton kernels
  fp8-triton    mr.QuantMoE fp8 (e4m3, 128 x 128 weight blocks), triton kernels (sm89+)
  int8-torch    the same layers on the torch reference backend (a Python loop over experts,
  int4-torch    float64 matmuls, host reads of the bucket offsets: timed eagerly)
  fp8-torch

Method: warm-up first (compilation excluded); for T <= ``--graph-max-tokens`` ten calls with ten
different routings are captured in one CUDA graph and its replays timed (per-call time reported),
else CUDA-event medians of single calls (``triton.testing.do_bench``). ``rel err`` is the relative
Frobenius difference of the first routing's output (bf16, so it includes that rounding): quantized
triton against the torch reference of the same format; ``vs bf16``: against the bf16 layer.
``x bf16``: time over the bf16 layer's. No assertions: numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import moe_replay as mr
from moe_replay.bench import SHAPES, graph_ms, make_ids, write_json

QUANT_SHAPES = {
    **SHAPES,
    "tiny": {"hidden_size": 128, "num_experts": 8, "top_k": 2, "intermediate_size": 128},
}
IMPLS = ("bf16", "int8-triton", "int4-triton", "fp8-triton", "int8-torch", "int4-torch", "fp8-torch")
GRAPH_CALLS = 10


@dataclass
class Result:
    shape: str
    tokens: int
    impl: str
    ms: float | None = None
    x_bf16: float | None = None
    rel_err_vs_reference: float | None = None
    rel_err_vs_bf16: float | None = None
    timing: str = ""
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def build_layer(impl: str, moe: mr.MoE, group_size: int) -> torch.nn.Module:
    if impl == "bf16":
        return moe
    weight_dtype, backend = impl.split("-")
    layer = mr.MoE(moe.cfg, backend=backend, device=moe.router.weight.device, dtype=torch.bfloat16)
    layer.load_state_dict(moe.state_dict())
    return mr.QuantMoE.from_float(layer, weight_dtype, group_size if weight_dtype == "int4" else None)


def time_ms(fn: Callable[[], object], calls: int, graph: bool) -> tuple[float, str]:
    """Median ms per layer call (``fn`` runs ``calls`` of them)."""
    if not torch.cuda.is_available():  # the interpreter: a smoke run, wall time of one call
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start) / calls, "cpu wall (interpreter)"
    import triton.testing

    if graph:
        try:
            return graph_ms(fn) / calls, "cuda-graph"
        except Exception as error:  # whatever syncs with the host cannot be captured
            torch.cuda.synchronize()
            note = f"eager (capture failed: {type(error).__name__})"
    else:
        note = "eager"
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / calls, note


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def measure(
    shape: str, T: int, impls: list[str], group_size: int, graph_max_tokens: int, seed: int
) -> list[Result]:
    cfg = mr.MoEConfig(**QUANT_SHAPES[shape])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    moe = mr.MoE(cfg, backend="triton", device=device, dtype=torch.bfloat16)
    graphed = graph_max_tokens >= T
    calls = GRAPH_CALLS if graphed else 1
    xs = [torch.randn(T, cfg.hidden_size, device=device, dtype=torch.bfloat16) for _ in range(calls)]
    id_sets = [make_ids(T, cfg.num_experts, cfg.top_k, "uniform", gen).to(device) for _ in range(calls)]
    outputs: dict[str, torch.Tensor] = {}
    results = []
    for impl in impls:
        r = Result(shape=shape, tokens=T, impl=impl)
        results.append(r)
        try:
            layer = build_layer(impl, moe, group_size)

            def run(layer: torch.nn.Module = layer) -> list[torch.Tensor]:
                with torch.no_grad():  # forced ids are checked on the device: no host sync
                    return [layer(x, forced_expert_ids=ids) for x, ids in zip(xs, id_sets)]

            outputs[impl] = run()[0]
            # The reference reads bucket offsets on the host: never captured.
            r.ms, r.timing = time_ms(run, calls, graphed and not impl.endswith("-torch"))
            del layer
        except Exception as error:
            r.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    base = next((r.ms for r in results if r.impl == "bf16"), None)
    for r in results:
        if r.ms is not None and base:
            r.x_bf16 = r.ms / base
        if r.impl in outputs and "bf16" in outputs and r.impl != "bf16":
            r.rel_err_vs_bf16 = rel(outputs[r.impl], outputs["bf16"])
        reference = r.impl.replace("-triton", "-torch")
        if r.impl.endswith("-triton") and reference in outputs:
            r.rel_err_vs_reference = rel(outputs[r.impl], outputs[reference])
    return results


def _fmt(v: float | None, spec: str) -> str:
    width = spec.split(".")[0]
    return format("-", f">{width}") if v is None else format(v, spec)


def print_table(results: list[Result]) -> None:
    head = f"{'shape':<14}{'T':>6} {'impl':<13}{'ms':>10}{'x bf16':>8}{'rel err':>10}{'vs bf16':>10}  timing"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.shape:<14}{r.tokens:>6} {r.impl:<13}{_fmt(r.ms, '10.4f')}{_fmt(r.x_bf16, '8.2f')}"
            f"{_fmt(r.rel_err_vs_reference, '10.2e')}{_fmt(r.rel_err_vs_bf16, '10.2e')}  {r.timing}"
            f" {' '.join(r.notes)} {r.error or ''}"
        )


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="qwen3-30b-a3b", choices=list(QUANT_SHAPES))
    parser.add_argument("--tokens", type=_csv, default=["1", "4096"], help="comma-separated token counts")
    parser.add_argument("--impls", type=_csv, default=list(IMPLS), help=f"comma-separated, of {IMPLS}")
    parser.add_argument("--group-size", type=int, default=None, help="int4 inputs per scale (128; tiny: 32)")
    parser.add_argument("--graph-max-tokens", type=int, default=64, help="time T up to this in CUDA graphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write results as JSON here (rewritten after each T)")
    args = parser.parse_args()
    if args.group_size is None:
        args.group_size = 32 if args.shape == "tiny" else 128
    for impl in args.impls:
        if impl not in IMPLS:
            raise SystemExit(f"--impls: unknown implementation {impl!r}; known: {list(IMPLS)}")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench_quant needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke run)")
    env = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "shape": args.shape,
        "group_size": args.group_size,
    }
    print(json.dumps(env))
    results: list[Result] = []
    for T in (int(t) for t in args.tokens):
        case = measure(args.shape, T, args.impls, args.group_size, args.graph_max_tokens, args.seed)
        results.extend(case)
        print_table(case)
        if args.json:
            write_json(args.json, {"env": env, "results": [asdict(r) for r in results]})
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
