"""Time the MoE layer against its baselines: the script behind ``moe-replay bench``.

    python benchmarks/bench_layer.py --shapes qwen3-30b-a3b --tokens 1,4096,16384 --json out.json

See ``moe_replay/bench.py`` for the implementations, the method and the columns.
"""

from moe_replay.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
