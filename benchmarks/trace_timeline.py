"""Device timelines of one pass on every rank, from ``bench_ep.py --profile T --trace-dir DIR``.

    python benchmarks/trace_timeline.py DIR --pass bench.forward.1 [--out timeline.txt]

For each rank's Chrome trace (``trace_rank<r>.json.gz``), the GPU work (kernels, copies, memsets)
that the host launched inside the named ``record_function`` range (``bench.forward.<i>`` or
``bench.forward_backward.<i>``: the backward's launches from autograd's threads count, by their
launch time), in start order, on one clock for all ranks (the profiler's host clock; the ranks
share a host). Printed per rank: the pass's device span, how much of it some stream was busy, and
its idle gaps of at least ``--gap-us``, each with the op that ends it. ``--out`` also writes every
op (start, duration, stream, name) to a file.
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


@dataclass(frozen=True)
class Op:
    start: float  # µs, host clock
    dur: float
    stream: int
    name: str

    @property
    def end(self) -> float:
        return self.start + self.dur


def load(path: Path) -> list[dict]:
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        return json.load(f)["traceEvents"]


LAUNCH_CATS = ("cuda_runtime", "cuda_driver")  # the host's launches (Triton's go through the driver)


def pass_range(events: list[dict], name: str) -> tuple[float, float]:
    """``(start, end)`` on the host clock of the first ``record_function`` range ``name``."""
    for e in events:
        if e.get("ph") == "X" and e.get("name") == name and e.get("cat") == "user_annotation":
            return e["ts"], e["ts"] + e["dur"]
    raise SystemExit(f"no host range {name!r} in the trace")


def pass_ops(events: list[dict], name: str) -> list[Op]:
    """The device ops launched inside the host range ``name`` (every thread's launches)."""
    start, end = pass_range(events, name)
    launched = {
        e["args"]["correlation"]
        for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {}) and start <= e["ts"] <= end
    }
    ops = [
        Op(e["ts"], e.get("dur", 0.0), e["args"].get("stream", -1), e["name"])
        for e in events
        if e.get("cat") in DEVICE_CATS and e.get("args", {}).get("correlation") in launched
    ]
    return sorted(ops, key=lambda op: op.start)


def busy_us(ops: list[Op]) -> float:
    """Time some stream was busy (the union of the ops' intervals)."""
    total, until = 0.0, float("-inf")
    for op in ops:
        if op.end > until:
            total += op.end - max(op.start, until)
            until = op.end
    return total


def gaps(ops: list[Op], min_us: float) -> list[tuple[float, float, Op]]:
    """Idle stretches (no stream busy) of at least ``min_us``: (start, length, the op after)."""
    found, until = [], float("-inf")
    for op in ops:
        if until != float("-inf") and op.start - until >= min_us:
            found.append((until, op.start - until, op))
        until = max(until, op.end)
    return found


def host_window(
    events: list[dict], pass_name: str, after: str, until: str, min_us: float, depth: int
) -> list[str]:
    """The host's calls (``--with-stack`` traces: Python functions; torch ops otherwise) from the
    end of the pass's first event named ``after`` (by default the count sync; the pass's own name:
    its start) to the launch of the first kernel named ``until`` (empty: the pass's end), on the
    thread of ``after``: one line per call of at least ``min_us``, indented by nesting, ``depth``
    levels at most."""
    lo, hi = pass_range(events, pass_name)
    syncs = [e for e in events if e.get("name") == after and e.get("ph") == "X" and lo <= e["ts"] <= hi]
    if not syncs:
        return [f"no {after} in the pass"]
    sync = min(syncs, key=lambda e: e["ts"])
    start, tid = sync["ts"] + (0 if after == pass_name else sync["dur"]), sync["tid"]
    kernels = {e["args"]["correlation"] for e in events if e.get("cat") == "kernel" and e["name"] == until}
    launches = [
        e["ts"]
        for e in events
        if e.get("cat") in LAUNCH_CATS and e.get("args", {}).get("correlation") in kernels and e["ts"] > start
    ]
    end = min(launches) if launches else hi
    calls = sorted(
        (
            e
            for e in events
            if e.get("ph") == "X"
            and e.get("tid") == tid
            and e.get("cat") in ("python_function", "cpu_op", "user_annotation", *LAUNCH_CATS)
            and start <= e["ts"] < end
        ),
        key=lambda e: (e["ts"], -e.get("dur", 0)),
    )
    since = "the pass's start" if after == pass_name else f"{after}'s end"
    to = f"{until}'s launch" if until else "the pass's end"
    lines, open_ends = [f"host from {since} to {to}: {end - start:.1f} µs"], []
    for e in calls:
        while open_ends and e["ts"] >= open_ends[-1]:
            open_ends.pop()
        level = len(open_ends)
        open_ends.append(e["ts"] + e.get("dur", 0))
        if level < depth and e.get("dur", 0) >= min_us:
            lines.append(f"{e['ts'] - start:9.1f} {e['dur']:8.1f} {'  ' * level}{e['name'][:100]}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace_dir")
    p.add_argument("--pass", dest="pass_name", default="bench.forward.1")
    p.add_argument("--gap-us", type=float, default=20.0)
    p.add_argument("--out", default=None, help="every op of every rank, one line each")
    p.add_argument(
        "--host",
        type=int,
        default=None,
        metavar="RANK",
        help="instead: RANK's host calls from --after's end to --until's launch (host_window)",
    )
    p.add_argument(
        "--after",
        default="cudaEventSynchronize",
        help="with --host: where the window starts (--pass's name: its start)",
    )
    p.add_argument(
        "--until",
        default="_gate_up_kernel",
        help="with --host: the kernel whose launch ends it ('': the pass's end)",
    )
    p.add_argument("--min-us", type=float, default=10.0)
    p.add_argument("--depth", type=int, default=12)
    args = p.parse_args()
    if args.host is not None:
        events = load(Path(args.trace_dir) / f"trace_rank{args.host}.json.gz")
        lines = host_window(events, args.pass_name, args.after, args.until, args.min_us, args.depth)
        print("\n".join(lines))
        return
    paths = sorted(
        Path(args.trace_dir).glob("trace_rank*.json*"), key=lambda q: int(q.name[10:].split(".")[0])
    )
    per_rank = [pass_ops(load(q), args.pass_name) for q in paths]
    if not any(per_rank):
        raise SystemExit(f"no device ops in {args.pass_name!r} (a CPU run's trace has none)")
    origin = min(ops[0].start for ops in per_rank if ops)
    lines = []
    for r, ops in enumerate(per_rank):
        if not ops:
            print(f"rank {r}: no device ops")
            continue
        first, last = ops[0].start - origin, max(op.end for op in ops) - origin
        print(
            f"rank {r}: {args.pass_name} on the device {first:8.1f} .. {last:8.1f} µs "
            f"(span {last - first:7.1f}, busy {busy_us(ops):7.1f}, {len(ops)} ops)"
        )
        for at, length, op in gaps(ops, args.gap_us):
            print(f"    idle {length:7.1f} µs from {at - origin:8.1f}, then {op.name[:70]}")
        for op in ops:
            lines.append(f"{r} {op.start - origin:9.1f} {op.dur:8.1f} s{op.stream:<3} {op.name[:110]}")
    if args.out:
        Path(args.out).write_text("rank start_us dur_us stream name\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
