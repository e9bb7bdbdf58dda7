"""``moe-replay demo --model`` on families beyond the demo's first four (moe_replay/demo.py with
moe_replay/integrations/hf_configs.py): replay removes every routing mismatch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moe_replay import cli
from moe_replay.demo import FAMILY_MODELS

pytest.importorskip("transformers")  # the [hf] extra
pytest.importorskip("tqdm")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only oversubscribe the 2 CI cores
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "model",
    [
        "qwen3_next",  # linear attention and a gated shared expert
        "glm4_moe",  # grouped sigmoid routing with a selection bias
        "gpt_oss",  # top-k of biased logits, softmax over the k
        "llama4",  # dense sigmoid scores scaling the experts' input
        "minimax_m2",  # the selection bias on the block
    ],
)
def test_demo_replay_removes_the_routing_mismatch(model: str, tmp_path: Path) -> None:
    assert model in FAMILY_MODELS
    out = tmp_path / "demo.json"
    assert cli.main(["demo", "--small", "--model", model, "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    without, with_ = summary["results"]["without_replay"], summary["results"]["with_replay"]
    assert summary["model"] == model and summary["moe_layers"] == len(summary["layers"]) > 0
    assert without["slot_mismatch"] > 0  # bf16 rollout vs fp32 training (seed 0)
    assert with_["slot_mismatch"] == 0 and with_["layer_mismatch"] == [0.0] * summary["moe_layers"]
