"""Cost of routing traces on the CPU: recording overhead, and trace file save / load times.

    python benchmarks/bench_trace.py --json bench_trace.json

(a) ``record``: a forward of a residual stack of ``mr.MoE`` layers (backend ``torch``, float32,
    ``torch.no_grad``) at T tokens, with and without ``mr.record``. The two variants alternate
    run by run (with a second copy of the baseline, an A/A test of the machine's noise) so drift
    on a shared machine hits all alike; the overhead is the ratio of the medians minus one (also
    of the minima, and the median of per-run ratios). On a loaded machine these differences of
    noisy timings scatter by several percent either way, as the A/A column shows, so the script
    also times what ``record`` adds without the forward (scope entry and exit, one recorder call
    per layer, routing precomputed) and reports it against the fastest forward.
    Target: under 2 %.
(b) ``save`` / ``load``: a trace of ``[tokens, layers, K]`` random ids (compact: int8 for 128
    experts), each timed as the median of several runs; ``save`` includes the fsync and the atomic
    rename. Target: under 1 s each for ``[32768, 48, 8]``.
(c) ``decode``: R SGLang responses of N tokens x L layers x K (``meta_info["routed_experts"]``,
    base64 of int32 ``[N - 1, L, K]``, as the server sends them) decoded into one packed trace
    (``engines.sglang_routes`` streamed through ``engines.batch_trace(..., packed=True)``), then
    saved. The responses are cycled from a pool of distinct payloads (``--decode-pool``), so the
    machine holds the pool and the trace, not R payloads; each response is decoded from its
    string as a client would. Run twice (``--decode-repeats``): on a VM the first run also pays
    for touching fresh memory (3 GB took ~8 s of page faults here), the second reuses it. A plain
    write+fsync of the same bytes beside each save shows the disk's floor. Target: R = 1000, N = 8192, L = 48, K = 8 under 10 s on a 2-core
    machine (a 3.1 GB int8 trace, 16.8 GB of base64). The base64 decoder matters most: pybase64
    (the ``engines`` extra) when installed, else the standard library.

Prints a table and appends the same numbers as JSON lines (``--json``, e.g.
``benchmarks/results/bench_trace.jsonl``): one record per part in the form every results file
has (commit, gpu, shape: the part, impl, figures), with the machine.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

import moe_replay as mr
from moe_replay.bench import append_records, current_commit
from moe_replay.routing.sites import route_at_site, site_of


class Stack(nn.Module):
    def __init__(self, cfg: mr.MoEConfig, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(mr.MoE(cfg, backend="torch") for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for moe in self.layers:
            x = x + moe(x)
        return x


def bench_record(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(0)
    cfg = mr.MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
    )
    model = Stack(cfg, args.layers)
    x = torch.randn(args.tokens, args.hidden)

    def plain() -> None:
        model(x)

    def recorded() -> None:
        with mr.record(model):
            model(x)

    # "plain_again" is a second copy of the baseline: plain vs plain_again (an A/A test) shows how
    # far two timings of the same work scatter on this machine now.
    variants = [("plain", plain), ("record", recorded), ("plain_again", plain)]
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    with torch.no_grad():
        for _, fn in variants:  # warm-up
            fn()
        for i in range(args.repeats):
            for name, fn in variants[i % 3 :] + variants[: i % 3]:  # rotate the order
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    def overhead(name: str) -> dict[str, float]:
        return {
            "medians": statistics.median(times[name]) / statistics.median(times["plain"]) - 1.0,
            "minima": min(times[name]) / min(times["plain"]) - 1.0,
            "paired": statistics.median(v / p for p, v in zip(times["plain"], times[name])) - 1.0,
        }

    plain_s = statistics.median(times["plain"])
    record_s = statistics.median(times["record"])
    cost_s = record_cost(model, args.tokens, args.top_k)
    return {
        "tokens": args.tokens,
        "layers": args.layers,
        "num_experts": args.experts,
        "top_k": args.top_k,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "forward_s_median": plain_s,
        "forward_record_s_median": record_s,
        "forward_s_min": min(times["plain"]),
        "forward_record_s_min": min(times["record"]),
        "overhead": overhead("record"),
        "noise_a_a": overhead("plain_again"),
        "record_cost_s": cost_s,
        "overhead_record_cost_over_min_forward": cost_s / min(times["plain"]),
        "forward_s_all": times["plain"],
        "forward_record_s_all": times["record"],
        "forward_again_s_all": times["plain_again"],
    }


def record_cost(model: Stack, tokens: int, top_k: int, repeats: int = 2000) -> float:
    """What ``record`` adds to one forward, without the forward: entering and leaving the scope
    and the recorder call of every layer, with routing precomputed. Robust to machine load, where
    the difference of two noisy forward timings is not."""
    routing = mr.Routing(torch.zeros(tokens, top_k, dtype=torch.int32), torch.zeros(tokens, top_k))
    site_list = [site_of(moe) for moe in model.layers]

    def route_fn(forced: torch.Tensor | None, validate: bool) -> mr.Routing:
        return routing

    def route_all() -> None:
        for site in site_list:
            route_at_site(site, route_fn, tokens, (tokens,), None)

    def recorded() -> None:
        with mr.record(model):
            route_all()

    medians = {}
    for name, fn in (("plain", route_all), ("record", recorded)):
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        medians[name] = statistics.median(samples)
    return max(medians["record"] - medians["plain"], 0.0)


def bench_files(args: argparse.Namespace) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    T, L, K, E = args.trace_tokens, args.trace_layers, args.trace_top_k, args.trace_experts
    ids_TLK = torch.rand(T, L, E, generator=g).topk(K, dim=2).indices.to(torch.int32)
    trace = mr.RoutingTrace.from_tensor(ids_TLK, [f"model.layers.{i}.mlp" for i in range(L)], num_experts=E)
    save_s, load_s = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "routes.safetensors")
        for _ in range(args.file_repeats):
            start = time.perf_counter()
            trace.save(path)
            save_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = mr.RoutingTrace.load(path)
            load_s.append(time.perf_counter() - start)
        size = os.path.getsize(path)
    if loaded != trace:
        raise RuntimeError("the loaded trace differs from the saved one")
    return {
        "tokens": T,
        "layers": L,
        "top_k": K,
        "num_experts": E,
        "file_bytes": size,
        "bytes_per_id": size / (T * L * K),
        "save_s_median": statistics.median(save_s),
        "load_s_median": statistics.median(load_s),
        "threads": torch.get_num_threads(),
        "save_s_all": save_s,
        "load_s_all": load_s,
    }


def bench_decode(args: argparse.Namespace) -> dict[str, object]:
    from moe_replay.routing import engines

    R, N, L, K, E = (
        args.decode_responses,
        args.decode_tokens,
        args.decode_layers,
        args.decode_top_k,
        args.decode_experts,
    )
    g = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(args.decode_pool):
        # ids need not be distinct within a row: the cost is the same
        ids = torch.randint(0, E, (N - 1, L, K), generator=g, dtype=torch.int32)
        pool.append(base64.b64encode(ids.numpy().tobytes()).decode())
    names = [f"model.layers.{i}.mlp" for i in range(L)]
    lengths = [N] * R
    payload_bytes = sum(len(pool[i % len(pool)]) for i in range(R))
    gc.collect()

    def responses():
        for i in range(R):
            response = {"meta_info": {"routed_experts": pool[i % len(pool)]}}
            yield engines.sglang_routes(response, num_tokens=N, num_layers=L, top_k=K, num_experts=E)

    runs = []
    for _ in range(args.decode_repeats):
        start, cpu = time.perf_counter(), time.process_time()
        trace = engines.batch_trace(responses(), layers=names, num_experts=E, packed=True, num_tokens=lengths)
        decode_s, decode_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        data = trace.to_tensor().numpy()
        saves, floors, save_cpu = [], [], []
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            path = os.path.join(tmp, "rollout_routes.safetensors")
            # Saves alternate with a plain write+fsync of the same bytes (the disk's floor), in the
            # order floor, save, save, floor: on a VM the first large write into page cache that
            # was never touched costs several times the later ones, whichever write it is.
            for what in ("floor", "save", "save", "floor"):
                start, cpu = time.perf_counter(), time.process_time()
                if what == "save":
                    trace.save(path)
                    save_cpu.append(time.process_time() - cpu)
                    size = os.path.getsize(path)
                else:
                    with open(path, "wb") as f:
                        f.write(memoryview(data.reshape(-1)))
                        f.flush()
                        os.fsync(f.fileno())
                (saves if what == "save" else floors).append(time.perf_counter() - start)
                os.unlink(path)
        runs.append(
            {
                "decode_s": decode_s,
                "decode_cpu_s": decode_cpu_s,
                "save_s": min(saves),
                "save_cpu_s": min(save_cpu),
                "write_floor_s": min(floors),
                "total_s": decode_s + min(saves),
                "save_s_all": saves,
                "write_floor_s_all": floors,
            }
        )
        nbytes, dtype = trace.nbytes, str(trace.dtype).removeprefix("torch.")
        del trace, data
        gc.collect()
    return {
        "responses": R,
        "tokens_per_response": N,
        "layers": L,
        "top_k": K,
        "num_experts": E,
        "pool": len(pool),
        "base64_decoder": "pybase64" if engines._fast_b64 is not None else "stdlib",
        "payload_bytes_base64": payload_bytes,
        "trace_bytes": nbytes,
        "trace_dtype": dtype,
        "file_bytes": size,
        "runs": runs,
        "load_average_1_min": os.getloadavg()[0],
    }


def print_decode(dec: dict) -> None:
    print(
        f"decode SGLang responses into a packed trace and save it: {dec['responses']} x "
        f"[{dec['tokens_per_response']} tokens, {dec['layers']} layers, {dec['top_k']}], "
        f"num_experts={dec['num_experts']}, base64 by {dec['base64_decoder']}; "
        f"{dec['payload_bytes_base64'] / 2**30:.2f} GiB of base64 -> {dec['trace_bytes'] / 2**30:.2f} GiB "
        f"{dec['trace_dtype']} trace"
    )
    print(
        f"  {'run':<6} {'decode+pack':>12} {'(cpu)':>8} {'save':>8} {'(cpu)':>8} {'total':>8} "
        f"{'plain write+fsync':>18}   (target: total < 10 s)"
    )
    for i, run in enumerate(dec["runs"]):
        label = "cold" if i == 0 else "warm"  # the first run touches the trace's memory for the first time
        print(
            f"  {label:<6} {run['decode_s']:11.2f}s {run['decode_cpu_s']:7.2f}s {run['save_s']:7.2f}s "
            f"{run['save_cpu_s']:7.2f}s {run['total_s']:7.2f}s {run['write_floor_s']:17.2f}s"
        )
    print(
        f"  (cpu: this process's CPU time, less sensitive to other load; load average {dec['load_average_1_min']:.1f})"
    )


def print_record(rec: dict) -> None:
    print(
        f"recording overhead: T={rec['tokens']}, {rec['layers']} x mr.MoE(E={rec['num_experts']}, "
        f"K={rec['top_k']}, H={rec['hidden_size']}, I={rec['intermediate_size']}), backend torch, CPU, "
        f"{rec['threads']} threads, median of {rec['repeats']}"
    )
    print(f"  {'forward':<22} {1e3 * rec['forward_s_median']:9.1f} ms")
    print(f"  {'forward inside record':<22} {1e3 * rec['forward_record_s_median']:9.1f} ms   (target +2 %)")
    print(f"  {'':<22} {'medians':>9} {'minima':>9} {'paired':>9}")
    for label, key in (("overhead of record", "overhead"), ("A/A noise (no record)", "noise_a_a")):
        o = rec[key]
        print(
            f"  {label:<22} {100 * o['medians']:+8.2f}% {100 * o['minima']:+8.2f}% {100 * o['paired']:+8.2f}%"
        )
    print(
        f"  {'record cost alone':<22} {1e6 * rec['record_cost_s']:9.1f} us = "
        f"{100 * rec['overhead_record_cost_over_min_forward']:.4f} % of the fastest forward"
    )


def print_files(files: dict, repeats: int) -> None:
    print(
        f"trace file: [{files['tokens']} tokens, {files['layers']} layers, {files['top_k']}], "
        f"num_experts={files['num_experts']}, {files['file_bytes'] / 2**20:.1f} MiB "
        f"({files['bytes_per_id']:.3f} bytes/id), median of {repeats}"
    )
    print(f"  {'save':<22} {1e3 * files['save_s_median']:9.1f} ms   (target < 1000 ms)")
    print(f"  {'load':<22} {1e3 * files['load_s_median']:9.1f} ms   (target < 1000 ms)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="T of the recording benchmark")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15, help="timed forwards per variant")
    p.add_argument("--trace-tokens", type=int, default=32768)
    p.add_argument("--trace-layers", type=int, default=48)
    p.add_argument("--trace-top-k", type=int, default=8)
    p.add_argument("--trace-experts", type=int, default=128)
    p.add_argument("--file-repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write the trace files (default: the temp dir)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--decode-responses", type=int, default=1000)
    p.add_argument("--decode-tokens", type=int, default=8192)
    p.add_argument("--decode-layers", type=int, default=48)
    p.add_argument("--decode-top-k", type=int, default=8)
    p.add_argument("--decode-experts", type=int, default=128)
    p.add_argument("--decode-pool", type=int, default=4, help="distinct payloads the responses cycle through")
    p.add_argument(
        "--decode-repeats", type=int, default=2, help="decode+save runs (the first touches cold memory)"
    )
    p.add_argument("--only", choices=("record", "files", "decode"), default=None, help="run one of the parts")
    p.add_argument("--json", default=None, help="append the results here as JSON lines")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rec = bench_record(args) if args.only in (None, "record") else None
    files = bench_files(args) if args.only in (None, "files") else None
    dec = bench_decode(args) if args.only in (None, "decode") else None
    if rec is not None:
        print_record(rec)
    if files is not None:
        print_files(files, args.file_repeats)
    if dec is not None:
        print_decode(dec)
    if args.json:
        machine = {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_1_5_15_min": os.getloadavg(),
        }
        # The common record of benchmarks/results/ (commit, gpu, shape, impl, figures).
        records = [
            {"commit": current_commit(), "gpu": "none (CPU)", "shape": part, "impl": "moe_replay",
             "machine": machine, "figures": result}
            for part, result in (("record", rec), ("files", files), ("decode", dec))
            if result is not None
        ]  # fmt: skip
        append_records(args.json, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
