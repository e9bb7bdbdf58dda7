"""Probe: the peer transport's row kernels against NCCL's all-to-all, tile by tile.

    torchrun --nproc-per-node 4 benchmarks/probe_peer_rows.py --json probe.json

On the dispatcher's sizes at T = 16384 per rank (``--rows`` bf16 rows of ``--hidden`` from each
rank to each rank, itself included, as the peer transport moves them), times with CUDA events:
NCCL's ``all_to_all_single`` of the same rows and ``pull_rows`` (by token) for each tile setting
of the sweep, after checking that each delivers the same rows. Prints the slowest rank's time and
the GB/s each rank sends the others at that time; then the forward's combine writing its rows
home (``PeerRows.write``: ``triton_ops.combine_to_peers``) for each tile setting, against the local combine. GPU
only. (The way back, ``push_rows``, is
copies: ``benchmarks/probe_copy_engine.py``.)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics

import torch
import torch.distributed as dist

from moe_replay.backends.triton import combine
from moe_replay.bench import write_json
from moe_replay.parallel.peers import peer_memory
from moe_replay.parallel.peers import triton_ops as kernels
from moe_replay.parallel.peers.rows import PeerExchange, PeerRows


def device_ms(fn, iters: int) -> float:  # type: ignore[no-untyped-def]
    """The slowest rank's median device ms of ``fn``, each call after a barrier (all ranks start
    together)."""
    times = []
    for _ in range(iters + 2):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    slowest = torch.tensor([statistics.median(times[2:])], device="cuda")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=14900, help="rows each rank sends each rank")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per rank (rows are read by token)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    rank, W = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    group, n, T, H = dist.group.WORLD, args.rows, args.tokens, args.hidden
    rows = tuple(tuple(n for _ in range(W)) for _ in range(W))
    counts = torch.zeros(W, W, 3, dtype=torch.int32, device=device)
    counts[:, :, 0] = n
    exchange = PeerExchange(rank=rank, rows=rows, counts_WW3=counts)
    memory = peer_memory(group, device, max(T, W * n) * H * 2 + 4096)
    x_area = memory.area(0, (T, H), torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(rank)
    x_area.views[rank].copy_(torch.randn(T, H, generator=gen, device=device).to(torch.bfloat16))
    token_M = torch.randint(0, T, (W * n,), generator=torch.Generator(device=device).manual_seed(7), device=device,
                            dtype=torch.int32)  # fmt: skip
    memory.barrier()
    remote_gb = (W - 1) * n * H * 2 / 1e9
    results: dict = {"rows_per_peer": n, "hidden": H, "world_size": W, "device": torch.cuda.get_device_name()}

    # NCCL: rank s's rows for every rank, as the pull reads them (each origin's tokens).
    send = x_area.views[rank][token_M[:n].long()].repeat(W, 1)
    recv = torch.empty_like(send)
    ms = device_ms(lambda: dist.all_to_all_single(recv, send), args.iters)
    results["nccl_all_to_all"] = {"ms": ms, "gb_per_s": remote_gb / ms * 1e3}
    say = print if rank == 0 else (lambda *a: None)
    say(f"nccl all_to_all_single: {ms:.3f} ms, {remote_gb / ms * 1e3:.0f} GB/s to the other ranks")

    expected = torch.cat([x_area.views[s][token_M[s * n : (s + 1) * n].long()] for s in range(W)])
    results["pull"] = []
    for block_m, block_x, warps in itertools.product((4, 16), (1024, 2048), (4, 8)):
        kernels.PULL.update(BLOCK_M=block_m, BLOCK_X=block_x, num_warps=warps)
        out = kernels.pull_rows(x_area, exchange, token_M)
        ok = torch.equal(out, expected)
        ms = device_ms(lambda: kernels.pull_rows(x_area, exchange, token_M), args.iters)
        results["pull"].append({"block_m": block_m, "block_x": block_x, "warps": warps, "ms": ms, "ok": ok,
                                "gb_per_s": remote_gb / ms * 1e3})  # fmt: skip
        say(
            f"pull  {block_m:>3} x {block_x:>4}, {warps} warps: {ms:.3f} ms, {remote_gb / ms * 1e3:.0f} GB/s, {ok=}"
        )

    # The forward's combine writing each received row's partial sum home (PeerRows.write),
    # against the same combine into a local tensor: R = 2K slots a row, about 2.2 of them routed
    # here (E = 128, K = 8 on 4 ranks), as at T = 16384 per rank.
    M, K = W * n, 8
    slot_MR = torch.full((M, 2 * K), -1, dtype=torch.int32, device=device)
    routed = torch.rand(M, K, generator=gen, device=device) < 2.2 / K
    routed[:, 0] = True
    P = int(routed.sum())
    slot_MR[:, :K][routed] = torch.randperm(P, generator=gen, device=device).to(torch.int32)
    weights_MR = torch.rand(M, 2 * K, generator=gen, device=device)
    y_NH = torch.randn(P, H, generator=gen, device=device).to(torch.bfloat16)
    back = memory.area(0, (M, H), torch.bfloat16)  # reuses x's rows: the pull is done
    home = PeerRows(back, exchange, kernels=True)
    local = combine.gather_sum(y_NH, slot_MR, weights_MR, torch.bfloat16)
    ms = device_ms(lambda: combine.gather_sum(y_NH, slot_MR, weights_MR, torch.bfloat16), args.iters)
    results["combine_local"] = {"ms": ms}
    say(f"combine, local rows: {ms:.3f} ms")
    results["combine_to_peers"] = []
    for block_m, block_h, warps in itertools.product((2, 4, 8, 16), (1024, 2048), (4, 8, 16)):
        kernels.TO_PEERS.update(BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps)
        memory.barrier()
        home.write(y_NH, slot_MR, weights_MR, torch.bfloat16)
        memory.barrier()
        # Receiver d's row m from origin s sits at s's place: check this rank's own block.
        mine = exchange.blocks()[0]
        ok = torch.equal(back.views[rank][mine[2]], local[mine[1]])
        ms = device_ms(lambda: home.write(y_NH, slot_MR, weights_MR, torch.bfloat16), args.iters)
        results["combine_to_peers"].append({"block_m": block_m, "block_h": block_h, "warps": warps, "ms": ms,
                                            "ok": ok, "gb_per_s": remote_gb / ms * 1e3})  # fmt: skip
        say(f"combine home {block_m:>3} x {block_h:>4}, {warps:>2} warps: {ms:.3f} ms, {ok=}")
    # The alternative: the combine origin by origin into local rows, each block copied home by a
    # copy engine while the next block combines (the others' blocks first, this rank's last).
    copies = torch.cuda.Stream(device=device)
    order = exchange.blocks()[1:] + exchange.blocks()[:1]

    def by_origin() -> None:
        for s, received, places in order:
            part = combine.gather_sum(y_NH, slot_MR[received], weights_MR[received], torch.bfloat16)
            copies.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(copies):
                back.views[s][places].copy_(part)
                part.record_stream(copies)
        torch.cuda.current_stream().wait_stream(copies)

    memory.barrier()
    by_origin()
    memory.barrier()
    ok = torch.equal(back.views[rank][mine[2]], local[mine[1]])
    ms = device_ms(by_origin, args.iters)
    results["combine_by_origin_copies"] = {"ms": ms, "ok": ok}
    say(f"combine by origin, copies home: {ms:.3f} ms, {ok=}")
    if rank == 0 and args.json:
        write_json(args.json, results)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
