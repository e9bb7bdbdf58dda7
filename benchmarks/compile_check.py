"""Compiled (inductor, fullgraph) against eager MoE layer on the GPU: equality and time.

Qwen3-30B-A3B layer shape, bf16, T tokens; prints forward and forward+backward ms of both.
Run: python benchmarks/compile_check.py [--tokens 4096]
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

import moe_replay as mr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    cfg = mr.MoEConfig(num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768)
    moe = mr.MoE(cfg, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(args.tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True)
    with mr.record(moe) as trace:
        y_eager = moe(x)
    with mr.replay(compiled, trace):
        y_comp = compiled(x)
    err = ((y_comp.float() - y_eager.float()).norm() / y_eager.float().norm()).item()
    print(f"compiled vs eager rel. error {err:.2e}")
    for name, layer in (("eager", moe), ("compiled", compiled)):
        fwd = triton.testing.do_bench(lambda: layer(x), return_mode="median")  # noqa: B023
        fb = triton.testing.do_bench(lambda: layer(x).sum().backward(), return_mode="median")  # noqa: B023
        print(f"{name:9s} T={args.tokens} fwd {fwd:.3f} ms  fwd+bwd {fb:.3f} ms")


if __name__ == "__main__":
    main()
