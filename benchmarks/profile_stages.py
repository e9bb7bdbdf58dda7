"""Where the triton backend's time goes, stage by stage, and which tile shapes are fastest.

    python benchmarks/profile_stages.py --tokens 4096,16384 --json stages.json

For one shape of ``moe_replay.bench.SHAPES`` (``--shape``, default Qwen3-30B-A3B; bf16, uniform routing): each
stage alone (CUDA-graph timing for the
small kernels, whose launch would otherwise dominate), a sweep of tile shapes for every grouped
GEMM kernel with ``torch._grouped_mm`` on the same problem as the yardstick, and decode-size
(T=1) tile shapes timed in CUDA graphs over rotating routings. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton.testing

import moe_replay as mr
from moe_replay.backends.triton import combine, dispatch, experts, route
from moe_replay.bench import SHAPES, graph_ms

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, TMA): the best pointer-load shapes of the
# first sweep (RESULTS.md), each also with TMA descriptors for the weights / unpermuted rows.
GATE_UP_TILES = [
    (128, 64, 64, 8, 3, 0),
    (128, 64, 64, 8, 3, 1),
    (128, 128, 64, 8, 3, 0),
    (128, 128, 64, 8, 3, 1),
    (128, 64, 64, 8, 4, 1),
]
DOWN_TILES = [
    (128, 256, 64, 8, 3, 0),
    (128, 256, 64, 8, 3, 1),
    (128, 128, 64, 8, 3, 0),
    (128, 128, 64, 8, 3, 1),
    (256, 128, 64, 8, 3, 1),
]
DGRAD_DOWN_TILES = [
    (128, 128, 64, 8, 4, 0),
    (128, 128, 64, 8, 3, 0),
    (64, 128, 64, 4, 4, 0),
    (128, 64, 64, 8, 4, 0),
    (128, 64, 64, 4, 4, 0),
    (64, 64, 64, 4, 4, 0),
    (128, 64, 128, 8, 3, 0),
    (64, 256, 64, 8, 3, 0),
]
DGRAD_GATE_UP_TILES = [
    (128, 256, 64, 8, 3, 0),
    (128, 256, 64, 8, 3, 1),
    (128, 128, 64, 8, 3, 0),
    (128, 128, 64, 8, 3, 1),
]
WGRAD_TILES = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 5),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 256, 32, 8, 4),
]
DECODE_TILES = [
    (16, 64, 128, 4, 4, 0),
    (16, 64, 128, 4, 4, 1),
    (16, 32, 128, 4, 4, 0),
    (16, 32, 128, 4, 4, 1),
    (16, 64, 256, 4, 3, 1),
]


def row_cfg(t: tuple) -> dict:
    cfg = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), t))
    cfg["TMA"] = bool(t[5])
    return cfg


def wgrad_cfg(t: tuple) -> dict:
    return dict(zip(("BLOCK_P", "BLOCK_Q", "BLOCK_K", "num_warps", "num_stages"), t))


def bench(fn) -> float:  # type: ignore[no-untyped-def]
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def graph_bench(fns: list) -> float:  # type: ignore[type-arg]
    """Median ms per call of the ``fns`` (run in turn), captured in one CUDA graph."""
    return graph_ms(lambda: [fn() for fn in fns]) / len(fns)


def safe(name: str, fn, out: dict) -> None:  # type: ignore[no-untyped-def]
    try:
        out[name] = round(fn(), 4)
    except Exception as error:  # a tile shape that does not fit (shared memory, registers)
        out[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    print(f"  {name:<48} {out[name]}", flush=True)


def profile(T: int, shape: str, sweeps: list[str] | None) -> dict:
    cfg = mr.MoEConfig(**SHAPES[shape])
    H, E, K, I = cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.intermediate_size
    torch.manual_seed(0)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    router = torch.randn(E, H, device="cuda") / H**0.5
    w1 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    ids = torch.rand(T, E, device="cuda").argsort(1)[:, :K].to(torch.int32)
    logits = F.linear(x.float(), router)
    _, weights = route.route_fwd(logits, cfg, ids, None)
    b = dispatch.dispatch(ids, E)
    h, gu = experts.gate_up_fwd(x, b, w1, True)
    y, _, _ = experts.grouped_linear(h, b, w2, w2.stride(), H)
    dy_N = torch.randn_like(y)
    dgu, _, _ = experts.grouped_linear(dy_N, b, w2, (w2.stride(0), w2.stride(2), w2.stride(1)), I, gu_N2I=gu)
    flops_gate_up, flops_down = 2 * T * K * H * 2 * I, 2 * T * K * H * I
    res: dict = {"shape": shape, "tokens": T, "stages_ms": {}, "sweeps": {}}
    st = res["stages_ms"]
    print(f"{shape} T={T}")
    safe("router_gemm_fp32", lambda: bench(lambda: F.linear(x.float(), router)), st)
    safe("route_kernel (graph)", lambda: graph_bench([lambda: route.route_fwd(logits, cfg, None, None)]), st)
    safe(
        "route_kernel_forced (graph)",
        lambda: graph_bench([lambda: route.route_fwd(logits, cfg, ids, None)]),
        st,
    )
    for label, forced in (("route_kernel", None), ("route_kernel_forced", ids)):
        for block_t in (4, 8, 16, 32):
            for warps in (1, 2, 4, 8):
                tiles = {"BLOCK_T": block_t, "num_warps": warps}
                safe(
                    f"{label} {tiles} (graph)",
                    lambda t=tiles, f=forced: graph_bench(
                        [lambda: route.route_fwd(logits, cfg, f, None, tiles=t)]
                    ),
                    st,
                )
    safe("torch_softmax_topk", lambda: bench(lambda: torch.softmax(logits, -1).topk(K)), st)
    safe("dispatch (graph)", lambda: graph_bench([lambda: dispatch.dispatch(ids, E)]), st)
    safe(
        "torch_argsort_bincount",
        lambda: bench(lambda: (ids.view(-1).argsort(stable=True), ids.view(-1).bincount(minlength=E))),
        st,
    )
    safe("gate_up_swiglu", lambda: bench(lambda: experts.gate_up_fwd(x, b, w1, False)), st)
    safe("gate_up_swiglu_save_gu", lambda: bench(lambda: experts.gate_up_fwd(x, b, w1, True)), st)
    safe("down", lambda: bench(lambda: experts.grouped_linear(h, b, w2, w2.stride(), H)), st)
    safe("combine", lambda: bench(lambda: combine.gather_sum(y, b.slot_of_row_MR, weights, x.dtype)), st)
    y_req = y.detach()
    safe(
        "combine_bwd (unfused path)",
        lambda: bench(lambda: combine._Combine.backward(_Ctx(y_req, weights, b.slot_of_row_MR), x)),
        st,
    )
    s_e, s_2i, s_h = w1.stride()
    safe("dgrad_gate_up", lambda: bench(lambda: experts.grouped_linear(dgu, b, w1, (s_e, s_h, s_2i), H)), st)
    safe("dx_gather_sum", lambda: bench(lambda: combine.gather_sum(y, b.slot_of_row_MR, None, x.dtype)), st)
    safe("wgrad_gate_up", lambda: bench(lambda: experts.grouped_wgrad(dgu, x, b, False, True, w1.dtype)), st)
    safe("wgrad_down", lambda: bench(lambda: experts.grouped_wgrad(dy_N, h, b, False, False, w2.dtype)), st)
    offs = b.offsets_E1[1:].contiguous()
    xs = x[b.row_of_slot_N.long()]
    safe(
        "torch_grouped_mm_gate_up (no gather/swiglu)",
        lambda: bench(lambda: torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)),
        st,
    )
    safe(
        "torch_grouped_mm_down",
        lambda: bench(lambda: torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)),
        st,
    )
    safe("torch_gather_rows", lambda: bench(lambda: x[b.row_of_slot_N.long()]), st)
    # The backward GEMMs as torch._grouped_mm (CUTLASS) runs them, on materialised operands.
    safe("torch_grouped_mm_dgrad_down", lambda: bench(lambda: torch._grouped_mm(dy_N, w2, offs=offs)), st)
    safe("torch_grouped_mm_dgrad_gate_up", lambda: bench(lambda: torch._grouped_mm(dgu, w1, offs=offs)), st)
    safe(
        "torch_grouped_mm_wgrad_gate_up",
        lambda: bench(lambda: torch._grouped_mm(dgu.t(), xs, offs=offs)),
        st,
    )
    safe("torch_grouped_mm_wgrad_down", lambda: bench(lambda: torch._grouped_mm(dy_N.t(), h, offs=offs)), st)

    w_slot = torch.rand(T * K, device="cuda")
    dgrad_args = dict(gu_N2I=gu, gather_a=True, row_scale_N=w_slot)
    safe(
        "dgrad_down_fused (gather, scale, d weight)",
        lambda: bench(
            lambda: experts.grouped_linear(
                x, b, w2, (w2.stride(0), w2.stride(2), w2.stride(1)), I, **dgrad_args
            )
        ),
        st,
    )
    safe(
        "wgrad_down_fused (gathered dy, weighted h)",
        lambda: bench(lambda: experts.grouped_wgrad(x, h, b, True, False, w2.dtype)),
        st,
    )
    sw = res["sweeps"]
    for name, tiles, fn, flops in [
        (
            "gate_up",
            GATE_UP_TILES,
            lambda c: experts.gate_up_fwd(x, b, w1, False, tiles=row_cfg(c)),
            flops_gate_up,
        ),
        (
            "down",
            DOWN_TILES,
            lambda c: experts.grouped_linear(h, b, w2, w2.stride(), H, tiles=row_cfg(c)),
            flops_down,
        ),
        (
            "dgrad_down_fused",
            DGRAD_DOWN_TILES,
            lambda c: experts.grouped_linear(
                x, b, w2, (w2.stride(0), w2.stride(2), w2.stride(1)), I, **dgrad_args, tiles=row_cfg(c)
            ),
            flops_down,
        ),
        (
            "dgrad_gate_up",
            DGRAD_GATE_UP_TILES,
            lambda c: experts.grouped_linear(dgu, b, w1, (s_e, s_h, s_2i), H, tiles=row_cfg(c)),
            flops_gate_up,
        ),
        (
            "wgrad_gate_up",
            WGRAD_TILES,
            lambda c: experts.grouped_wgrad(dgu, x, b, False, True, w1.dtype, tiles=wgrad_cfg(c)),
            flops_gate_up,
        ),
        (
            "wgrad_down_fused",
            WGRAD_TILES,
            lambda c: experts.grouped_wgrad(x, h, b, True, False, w2.dtype, tiles=wgrad_cfg(c)),
            flops_down,
        ),
    ]:
        if sweeps is not None and name not in sweeps:
            continue
        print(f" sweep {name}")
        sw[name] = {}
        for c in tiles:
            out: dict = {}
            safe(str(c), lambda c=c, fn=fn: bench(lambda: fn(c)), out)
            ms = out[str(c)]
            sw[name][str(c)] = {
                "ms": ms,
                "tflops": round(flops / (ms * 1e-3) / 1e12, 1) if isinstance(ms, float) else None,
            }
    return res


class _Ctx:  # stands in for autograd's ctx to time _Combine.backward alone
    def __init__(self, *saved: torch.Tensor) -> None:
        self.saved_tensors = saved
        self.weights_dtype = torch.float32


def profile_decode(shape: str, rotations: int = 16) -> dict:
    cfg = mr.MoEConfig(**SHAPES[shape])
    H, E, K, I = cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.intermediate_size
    torch.manual_seed(0)
    w1 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    xs = [torch.randn(1, H, device="cuda", dtype=torch.bfloat16) for _ in range(rotations)]
    bs = [
        dispatch.dispatch(torch.randperm(E, device="cuda")[:K].view(1, K).int(), E) for _ in range(rotations)
    ]
    hs = [experts.gate_up_fwd(x, b, w1, False)[0] for x, b in zip(xs, bs)]
    res: dict = {"gate_up": {}, "down": {}, "layer": {}}
    print("T=1 (graphs over rotating routings)")
    for c in DECODE_TILES:
        safe(
            f"gate_up {c}",
            lambda c=c: graph_bench(
                [
                    lambda x=x, b=b: experts.gate_up_fwd(x, b, w1, False, tiles=row_cfg(c))
                    for x, b in zip(xs, bs)
                ]
            ),
            res["gate_up"],
        )
        safe(
            f"down {c}",
            lambda c=c: graph_bench(
                [
                    lambda h=h, b=b: experts.grouped_linear(h, b, w2, w2.stride(), H, tiles=row_cfg(c))
                    for h, b in zip(hs, bs)
                ]
            ),
            res["down"],
        )
    layers = []
    for _ in range(rotations):
        layer = mr.MoE(cfg, backend="triton", device="meta")
        layer.router = mr.layers.moe.Router(cfg, device="cuda")
        layer.experts = mr.layers.moe.Experts(E, H, I, device="meta")
        layer.experts.gate_up_proj, layer.experts.down_proj = torch.nn.Parameter(w1), torch.nn.Parameter(w2)
        layers.append(layer)
    with torch.no_grad():
        safe(
            "layer forward, router's choice",
            lambda: graph_bench([lambda layer=layer, x=x: layer(x) for layer, x in zip(layers, xs)]),
            res["layer"],
        )
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--no-sweep", action="store_true", help="stage times only, no tile sweeps")
    parser.add_argument("--sweeps", default=None, help="comma-separated kernels to sweep (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "runs": [],
    }

    def dump() -> None:
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(out, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    if not args.no_decode:
        out["decode"] = profile_decode(args.shape)
        dump()
    for T in (int(t) for t in args.tokens.split(",")):
        sweeps = [] if args.no_sweep else args.sweeps.split(",") if args.sweeps else None
        out["runs"].append(profile(T, args.shape, sweeps))
        dump()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
