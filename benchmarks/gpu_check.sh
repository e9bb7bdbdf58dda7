#!/usr/bin/env bash
# One device call: the GPU tests, then the layer's timings that the replay and compile work must keep.
# Usage (on the GPU machine, repository root): bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -15 | tee "$out/gpu_tests.txt"
timeout 240 python3 -c "import sys; from moe_replay.cli import main; sys.argv = ['moe-replay', 'bench', '--shapes', 'qwen3-30b-a3b', '--tokens', '4096,16384', '--routing', 'router', '--impls', 'triton,triton-router', '--json', '$out/bench_forced.json']; main()" 2>&1 | tail -25 | tee "$out/bench_forced.txt"
timeout 200 python3 benchmarks/compile_check.py 2>&1 | tail -15 | tee "$out/compile.txt"
