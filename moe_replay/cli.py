"""``moe-replay``: the command line. Each subcommand lives in the module that owns its work."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help). A module provides add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "demo": ("moe_replay.demo", "the R3 story on a small model: routing mismatch without and with replay"),
    "diff": ("moe_replay.routing.commands", "compare two trace files: per-layer and per-token mismatch"),
    "info": ("moe_replay.routing.commands", "summarise a trace file: layers, tokens, top_k, expert load"),
    "bench": ("moe_replay.bench", "time the MoE layer against its baselines (GPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-replay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        getattr(mod, f"add_{name}_arguments")(command)
        command.set_defaults(run=getattr(mod, f"run_{name}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
