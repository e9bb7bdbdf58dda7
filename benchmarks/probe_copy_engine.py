"""Probe: token rows moved between GPUs by copy engines (``cudaMemcpyAsync`` from and to peers'
symmetric memory), against NCCL's all-to-all, alone and next to the experts' gate_up GEMM.

    torchrun --nproc-per-node 4 benchmarks/probe_copy_engine.py --json probe.json

Each rank holds ``--rows`` bf16 rows of ``--hidden`` for every rank, in rank order, in its
symmetric memory (as an origin whose send list is ordered by rank). Timed with CUDA events, the
slowest rank's median:

* NCCL's ``all_to_all_single`` of those rows;
* ``pull``: each rank copies its block from every other rank's memory (``Tensor.copy_``, which
  is a ``cudaMemcpyAsync``: a copy engine, no SMs), on one stream or one stream per peer;
* ``push``: each rank copies its blocks into the other ranks' memory, likewise;
* the gate_up GEMM of the experts (Triton, 131k routed rows over 32 experts, ``--pairs``) alone,
  and with each transfer started next to it on another stream: the GEMM's own time and the
  wall time of both.

Each transfer's rows are checked against the expected ones. GPU only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_replay.backends.triton import TritonBackend
from moe_replay.backends.triton.experts import gate_up_fwd
from moe_replay.bench import write_json
from moe_replay.parallel.peers import peer_memory


def timed(fn: Callable[[], None], iters: int, side: Callable[[], None] | None = None) -> tuple[float, float]:
    """``(fn's ms, wall ms)``: the slowest rank's medians, each run after a barrier; ``side`` runs
    on other streams at the same time (its wall time counts)."""
    main = torch.cuda.current_stream()
    own, wall = [], []
    for _ in range(iters + 2):
        dist.barrier()
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record(main)
        if side is not None:
            side()
        fn()
        ev[1].record(main)
        for stream in STREAMS:
            main.wait_stream(stream)
        ev[2].record(main)
        torch.cuda.synchronize()
        own.append(ev[0].elapsed_time(ev[1]))
        wall.append(ev[0].elapsed_time(ev[2]))
    out = torch.tensor([statistics.median(own[2:]), statistics.median(wall[2:])], device="cuda")
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out[0].item(), out[1].item()


STREAMS: list[torch.cuda.Stream] = []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=14900, help="rows each rank sends each rank")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=131072, help="routed rows of the GEMM")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    me, W = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    n, H = args.rows, args.hidden
    memory = peer_memory(dist.group.WORLD, device, 2 * W * n * H * 2 + 4096)
    stage = memory.area(0, (W * n, H), torch.bfloat16)  # this rank's rows for every rank
    back = memory.area(-(-W * n * H * 2 // 256) * 256, (W * n, H), torch.bfloat16)  # what others push here
    gen = torch.Generator(device=device).manual_seed(me)
    stage.views[me].copy_(torch.randn(W * n, H, generator=gen, device=device).to(torch.bfloat16))
    memory.barrier()
    torch.cuda.synchronize()
    remote_gb = (W - 1) * n * H * 2 / 1e9
    say = print if me == 0 else (lambda *a: None)
    results: dict = {"rows_per_peer": n, "hidden": H, "world_size": W, "device": torch.cuda.get_device_name()}
    peers = [(me + j) % W for j in range(1, W)]
    STREAMS.extend(torch.cuda.Stream(device=device) for _ in peers)
    blocks = lambda t, r: t[r * n : (r + 1) * n]

    recv = torch.empty(W * n, H, dtype=torch.bfloat16, device=device)
    expected = torch.cat([blocks(stage.views[s], me) for s in range(W)])

    def pull(streams: int) -> Callable[[], None]:
        def run() -> None:
            main = torch.cuda.current_stream()
            blocks(recv, me).copy_(blocks(stage.views[me], me))
            for j, o in enumerate(peers):
                stream = STREAMS[j % streams]
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    blocks(recv, o).copy_(blocks(stage.views[o], me))

        return run

    def push(streams: int) -> Callable[[], None]:
        def run() -> None:
            main = torch.cuda.current_stream()
            for j, d in enumerate(peers):
                stream = STREAMS[j % streams]
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    blocks(back.views[d], me).copy_(blocks(stage.views[me], d))

        return run

    # Does a copy from a peer's memory return before it runs? The call's host time, queued behind
    # a kernel that keeps the stream busy for about 50 ms.
    host_ms = []
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        start = time.perf_counter()
        blocks(recv, peers[0] if peers else me).copy_(blocks(stage.views[peers[0] if peers else me], me))
        host_ms.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    results["host_ms_per_copy_call_behind_busy_stream"] = host_ms
    say(
        f"host ms of a peer copy's call, the stream busy for ~50 ms: {', '.join(f'{t:.3f}' for t in host_ms)}"
    )

    send = stage.views[me].clone()
    transfers = {
        "nccl_all_to_all": lambda: dist.all_to_all_single(recv, send),
        "ce_pull_1_stream": pull(1),
        f"ce_pull_{W - 1}_streams": pull(W - 1),
        "ce_push_1_stream": push(1),
        f"ce_push_{W - 1}_streams": push(W - 1),
    }
    results["transfers"] = {}
    for name, fn in transfers.items():
        recv.zero_()
        fn()
        for stream in STREAMS:
            torch.cuda.current_stream().wait_stream(stream)
        memory.barrier()
        torch.cuda.synchronize()
        if "push" in name:
            ok = all(torch.equal(blocks(back.views[me], s), blocks(stage.views[s], me)) for s in peers)
        else:
            ok = torch.equal(recv, expected)
        _, ms = timed(lambda: None, args.iters, side=fn) if "nccl" not in name else timed(fn, args.iters)
        results["transfers"][name] = {"ms": ms, "gb_per_s": remote_gb / ms * 1e3, "ok": ok}
        say(f"{name:<22} {ms:.3f} ms  {remote_gb / ms * 1e3:5.0f} GB/s to the other ranks  {ok=}")

    # The forward's gate_up GEMM: --pairs routed rows over 32 experts (2 per row).
    E, I = 32, 768
    rows = args.pairs // 2
    x = torch.randn(rows, H, generator=gen, device=device).to(torch.bfloat16)
    ids = torch.randint(0, E, (rows, 2), generator=gen, device=device, dtype=torch.int32)
    buckets = TritonBackend().dispatch(ids, E)
    w = (torch.randn(E, 2 * I, H, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    gemm = lambda: gate_up_fwd(x, buckets, w, False)
    gemm_ms, _ = timed(gemm, args.iters)
    results["gemm_alone_ms"] = gemm_ms
    say(f"gate_up GEMM alone      {gemm_ms:.3f} ms  ({args.pairs} rows, E={E}, I={I})")
    results["next_to_gemm"] = {}
    for name, fn in transfers.items():
        if "nccl" in name:
            comm = STREAMS[0]

            def side(comm: torch.cuda.Stream = comm) -> None:
                comm.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(comm):
                    dist.all_to_all_single(recv, send)

            own, wall = timed(gemm, args.iters, side=side)
        else:
            own, wall = timed(gemm, args.iters, side=fn)
        alone = results["transfers"][name]["ms"]
        results["next_to_gemm"][name] = {"gemm_ms": own, "wall_ms": wall, "serial_ms": alone + gemm_ms}
        say(
            f"GEMM + {name:<22} GEMM {own:.3f} ms, wall {wall:.3f} (one after the other {alone + gemm_ms:.3f})"
        )
    if me == 0 and args.json:
        write_json(args.json, results)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
