"""``moe-replay demo`` at its CI size (moe_replay/demo.py), through the command line entry point."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moe_replay import cli

pytest.importorskip("transformers")  # the [hf] extra
pytest.importorskip("tqdm")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and under `pytest -n 2` on 2 cores the
    # workers' threads oversubscribe the CPU (this part, on a busy 2-core machine: 26 s with one
    # thread per worker, ~5 min with torch's default).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model", ["qwen3", "mixtral", "deepseek-v3", "olmoe"])
def test_demo_replay_removes_the_routing_mismatch(model: str, tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    assert cli.main(["demo", "--small", "--model", model, "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    without, with_ = summary["results"]["without_replay"], summary["results"]["with_replay"]
    assert summary["model"] == model and summary["moe_layers"] == len(summary["layers"]) > 0
    # bf16 rollout vs fp32 training: some routes differ (seed 0, every model) ...
    assert without["slot_mismatch"] > 0
    # ... and replay removes every one of them, in every layer.
    assert with_["slot_mismatch"] == 0 and with_["token_mismatch"] == 0
    assert with_["layer_mismatch"] == [0.0] * summary["moe_layers"]
    for result in (without, with_):
        assert len(result["layer_mismatch"]) == summary["moe_layers"]
        assert 0 <= result["mean_abs_dlogp"] <= result["max_abs_dlogp"] and result["k3_kl"] >= 0


def test_demo_is_deterministic_and_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for _ in range(2):
        assert cli.main(["demo", "--small", "--seed", "3"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    table = outputs[0]
    assert "without replay" in table and "with replay" in table
    assert "model.layers.0.mlp" in table and "mean |Δ log p|" in table and "KL (k3)" in table


def test_demo_json_to_stdout_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "demo.png"
    assert cli.main(["demo", "--small", "--json", "-", "--plot", str(png)]) == 0
    summary = json.loads(capsys.readouterr().out)  # stdout holds the JSON only
    assert summary["results"]["with_replay"]["slot_mismatch"] == 0
    assert png.read_bytes().startswith(b"\x89PNG")
