"""``moe-replay info TRACE`` and ``moe-replay diff A B``: trace files on the command line.

``cli.py`` imports this module to build its parser, so heavy imports wait inside ``run_*``.

``info`` reads the file through :meth:`RoutingTrace.load`, which checks the header before the
body: a foreign, damaged or huge-claiming file is refused after reading its header.

Expert load (``info``): per layer, the number of routed slots each expert received (``-1``
slots are not counted). The summary gives min / max / mean load, the max/mean ratio (1.0 is a
perfectly balanced layer) and the number of idle experts (load 0).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="a routing trace file (RoutingTrace.save)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="first routing trace file")
    parser.add_argument("b", help="second routing trace file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _load(path: str):  # -> RoutingTrace | None (printed error)
    from moe_replay.routing.trace import RoutingTrace

    try:
        return RoutingTrace.load(path)
    except (OSError, ValueError) as e:
        print(f"moe-replay: error: {e}", file=sys.stderr)
        return None


def load_summary(trace) -> list[dict[str, object]]:  # trace: RoutingTrace
    """Per layer: min / max / mean expert load (routed slots per expert), max/mean, idle experts."""
    import torch

    rows = []
    for name, ids in trace.items():
        flat = ids.reshape(-1)
        flat = flat[flat >= 0].long()
        load_E = torch.bincount(flat, minlength=trace.num_experts)
        mean = float(load_E.float().mean())
        rows.append(
            {
                "layer": name,
                "routed_slots": int(flat.numel()),
                "min_load": int(load_E.min()),
                "max_load": int(load_E.max()),
                "mean_load": mean,
                "max_over_mean": float(load_E.max()) / mean if mean > 0 else None,
                "idle_experts": int((load_E == 0).sum()),
            }
        )
    return rows


def run_info(args: argparse.Namespace) -> int:
    trace = _load(args.trace)
    if trace is None:
        return 1
    free = sum(int((ids < 0).sum()) for ids in trace.values())
    summary = {
        "file": args.trace,
        "layers": trace.num_layers,
        "token_shape": list(trace.token_shape),
        "tokens": trace.num_tokens,
        "top_k": trace.top_k,
        "num_experts": trace.num_experts,
        "dtype": str(trace.dtype).removeprefix("torch."),
        "packed_sequences": trace.num_rows if trace.is_packed else None,
        "free_slots": free,
        "load": load_summary(trace),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{args.trace}: {trace.num_layers} layers, {trace.num_tokens} tokens "
        f"(token shape {list(trace.token_shape)}), top_k={trace.top_k}, num_experts={trace.num_experts}, "
        f"{free} free (-1) slots, ids {summary['dtype']}"
        + (f", packed: {trace.num_rows} sequences" if trace.is_packed else "")
    )
    if not trace.num_layers:
        return 0
    width = max(len("layer"), *(len(row["layer"]) for row in summary["load"]))
    print()
    print(f"{'layer':<{width}}  {'min':>8}  {'max':>8}  {'mean':>10}  {'max/mean':>8}  {'idle':>6}")
    for row in summary["load"]:
        ratio = "n/a" if row["max_over_mean"] is None else f"{row['max_over_mean']:.2f}"
        print(
            f"{row['layer']:<{width}}  {row['min_load']:>8}  {row['max_load']:>8}  "
            f"{row['mean_load']:>10.2f}  {ratio:>8}  {row['idle_experts']:>6}"
        )
    return 0


def run_diff(args: argparse.Namespace) -> int:
    from moe_replay.routing.compare import compare

    a = _load(args.a)
    b = _load(args.b)
    if a is None or b is None:
        return 1
    try:
        report = compare(a, b)
    except ValueError as e:
        print(f"moe-replay: error: cannot compare {args.a} and {args.b}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0
