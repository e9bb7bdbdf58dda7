"""The worked examples (examples/) run at their CI sizes and pass their own checks.

``examples/grpo_replay.py`` asserts, on every rank, that the routes replayed in training equal the
rollout's and that the step's gradients equal a plain single-process step; a failed check exits
non-zero. It runs in a subprocess: it starts its own processes (or torchrun starts them).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import moe_replay as mr

pytest.importorskip("transformers")  # the [hf] extra

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HANG_GUARD_S = 300  # the run takes ~10-25 s on 2 busy cores; this only stops a hung world


def run_example(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # A clean launch: no inherited torchrun variables (they would make the script join that world),
    # one thread per process (2 ranks on 2 cores).
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.mark.parametrize(
    "launcher",
    [
        "itself",  # the script starts its 2 processes (torch.multiprocessing), non-reentrant checkpointing
        "torchrun",  # torchrun starts them (env:// rendezvous), reentrant checkpointing
    ],
)
def test_grpo_replay_example(launcher: str, tmp_path: Path) -> None:
    script = [str(EXAMPLES / "grpo_replay.py"), "--out", str(tmp_path)]
    if launcher == "itself":
        cmd = [sys.executable, *script]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        cmd = [*torchrun, *script, "--reentrant"]
    result = run_example(cmd, tmp_path)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "checks passed" in result.stdout, result.stdout
    assert "without replay: 0.0% of routed slots" not in result.stdout  # replay had work to do
    assert "with replay:    0.0% of routed slots differ, 0.0% of tokens" in result.stdout
    # The rollout's trace file: 2 prompts x 4 completions of 6 + 6 tokens, aligned ([B, L, K]).
    routes = mr.RoutingTrace.load(tmp_path / "routes.safetensors")
    assert routes.layer_names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert routes.token_shape == (8, 12) and routes.top_k == 2 and routes.num_experts == 8


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompts", "3", "--group", "3"], "9 sequences must split evenly over 2 ranks"),  # 9 % (2*2)
        (["--micro-batches", "0"], "--micro-batches must be >= 1, got 0"),
        (["--group", "1"], "--group must be >= 2"),  # one completion: no group to normalise within
        (["--top-k", "9"], "--top-k must be <= --experts=8, got 9"),
    ],
    ids=["uneven-split", "no-micro-batch", "group-of-one", "top-k-above-experts"],
)
def test_grpo_replay_example_rejects_bad_sizes(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    example = load_example("grpo_replay")
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
