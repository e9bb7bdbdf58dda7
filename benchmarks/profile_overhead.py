"""Host-side cost of one layer call: what launching from Python adds to the GPU's own time.

    python benchmarks/profile_overhead.py --tokens 1,512 --json overhead.json

For the Qwen3-30B-A3B shape (bf16, triton backend, routing replayed from a trace): the GPU time
(the forward captured in a CUDA graph), the eager time per call (calls back to back, one sync at
the end: when the host is slower than the GPU, this is the host's time per call), and a cProfile
of the eager calls, listing the functions where the host time goes. GPU only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
import triton.testing

import moe_replay as mr
from moe_replay.bench import SHAPES, graph_ms


def eager_ms(fn, calls: int) -> float:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def top_functions(fn, calls: int, limit: int, sort: str = "tottime") -> str:  # type: ignore[no-untyped-def]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(limit)
    return out.getvalue()


def profile(T: int, shape: str, calls: int, limit: int, sort: str = "tottime") -> dict:
    cfg = mr.MoEConfig(**SHAPES[shape])
    torch.manual_seed(0)
    layer = mr.MoE(cfg, backend="triton", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    with torch.no_grad(), mr.record(layer) as trace:
        layer(x)
    res: dict = {"shape": shape, "tokens": T}
    with mr.replay(layer, trace):
        with torch.no_grad():

            def fwd() -> None:
                layer(x)

            fwd()
            res["forward_graph_ms"] = graph_ms(fwd)
            res["forward_eager_ms"] = eager_ms(fwd, calls)
            res["forward_profile"] = top_functions(fwd, calls, limit, sort)
        xg = x.clone().requires_grad_()

        def fwd_bwd() -> None:
            layer(xg).backward(dy)

        fwd_bwd()
        res["fwd_bwd_eager_ms"] = eager_ms(fwd_bwd, calls)
        res["fwd_bwd_profile"] = top_functions(fwd_bwd, calls, limit, sort)
    print(
        f"{shape} T={T}: forward {res['forward_graph_ms']:.3f} ms in a graph, {res['forward_eager_ms']:.3f} eager"
    )
    print(res["forward_profile"])
    print(f"forward+backward {res['fwd_bwd_eager_ms']:.3f} ms eager")
    print(res["fwd_bwd_profile"])
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    parser.add_argument("--tokens", default="1,512")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--limit", type=int, default=30, help="functions listed per profile")
    parser.add_argument(
        "--dispatch-small-n",
        type=int,
        default=None,
        help="slots up to which dispatch is one launch (tuning; default: the library's SMALL_N)",
    )
    parser.add_argument(
        "--fused-scan-blocks",
        type=int,
        default=None,
        help="blocks up to which dispatch is two launches (tuning; default: the library's FUSED_SCAN_BLOCKS)",
    )
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"], help="profile order")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.dispatch_small_n is not None:
        from moe_replay.backends.triton import dispatch

        dispatch.SMALL_N = args.dispatch_small_n
    if args.fused_scan_blocks is not None:
        from moe_replay.backends.triton import dispatch

        dispatch.FUSED_SCAN_BLOCKS = args.fused_scan_blocks
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    out["runs"] = [
        profile(int(t), args.shape, args.calls, args.limit, args.sort) for t in args.tokens.split(",")
    ]
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
