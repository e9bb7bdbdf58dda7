"""Probe: the token all-to-all through NCCL against PyTorch's NVSHMEM ``all_to_all_vdev``.

    torchrun --nproc-per-node 4 benchmarks/probe_symm_a2a.py --rows 14900 --json probe.json

The ``alltoall`` dispatcher waits on the host for the row counts (one sync per call) because
``all_to_all_single`` takes them as host ints; after that sync the call is bound by the host's
launches (benchmarks/RESULTS.md, expert parallelism). ``torch.ops.symm_mem.all_to_all_vdev`` takes
the splits as a device tensor and writes the received splits and offsets on the device, so a
dispatcher built on it needs no host sync at all. This script measures what that transport gets
on the machine, on the dispatcher's sizes (``--rows`` bf16 rows of ``--hidden`` values from each
rank to every other rank, none to itself), checks that both transports deliver the same rows,
and reports each call's device time (CUDA events) and host time. GPU only; it changes nothing in
the library. Keep NVLink multicast off (NVSHMEM_DISABLE_NVLS=1) on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from moe_replay.bench import write_json


def timed(fn, iters: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(median device ms, median host ms) of ``fn`` over ``iters`` calls, each after a barrier."""
    device_ms, host_ms = [], []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        device_ms.append(start.elapsed_time(end))
    return statistics.median(device_ms), statistics.median(host_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=14900, help="rows sent to each other rank")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    H, R = args.hidden, args.rows
    send_rows = [0 if r == rank else R for r in range(world)]
    recv_rows = [0 if r == rank else R for r in range(world)]
    x = torch.randn(sum(send_rows), H, device=device).to(torch.bfloat16)
    remote_bytes = sum(send_rows) * H * x.element_size()
    out: dict = {"rank_count": world, "rows_per_peer": R, "hidden": H, "torch": torch.__version__}

    expected = x.new_empty(sum(recv_rows), H)
    nccl = lambda: dist.all_to_all_single(expected, x, recv_rows, send_rows)
    nccl()
    ms, host = timed(nccl, args.iters)
    out["nccl"] = {"device_ms": ms, "host_ms": host, "GB_per_s": remote_bytes / ms / 1e6}

    try:
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "set_backend"):
            symm_mem.set_backend("NVSHMEM")
        group_name = dist.group.WORLD.group_name
        symm_mem.enable_symm_mem_for_group(group_name)
        capacity = (world - 1) * R * H  # elements: every peer's rows at most
        inp = symm_mem.empty(capacity, dtype=torch.bfloat16, device=device)
        recv = symm_mem.empty(capacity, dtype=torch.bfloat16, device=device)
        in_splits = symm_mem.empty(world, dtype=torch.int64, device=device)
        out_splits_offsets = symm_mem.empty((2, world), dtype=torch.int64, device=device)
        inp[: x.numel()].copy_(x.view(-1))
        in_splits.copy_(torch.tensor(send_rows, device=device) * H)
        dist.barrier()

        def vdev() -> None:
            torch.ops.symm_mem.all_to_all_vdev(inp, recv, in_splits, out_splits_offsets, group_name)

        vdev()
        torch.cuda.synchronize()
        same = torch.equal(recv[: expected.numel()].view(-1, H), expected)
        ms, host = timed(vdev, args.iters)
        out["nvshmem_all_to_all_vdev"] = {
            "device_ms": ms,
            "host_ms": host,
            "GB_per_s": remote_bytes / ms / 1e6,
            "same_rows_as_nccl": same,
        }
    except Exception as error:  # not built with NVSHMEM, or the API differs in this torch
        out["nvshmem_all_to_all_vdev"] = {"error": f"{type(error).__name__}: {error}"[:400]}

    gathered: list = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        for r, result in enumerate(gathered):
            print(f"rank {r}: {json.dumps(result)}", flush=True)
        if args.json:
            env = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "NVSHMEM_"))}
            write_json(args.json, {"ranks": gathered, "nccl_env": env})
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
