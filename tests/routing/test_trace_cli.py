"""``moe-replay info`` and ``moe-replay diff`` (routing/commands.py), on hand-made trace files."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import moe_replay as mr
from moe_replay.routing import commands


def run(name: str, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog=f"moe-replay {name}")
    getattr(commands, f"add_{name}_arguments")(parser)
    return getattr(commands, f"run_{name}")(parser.parse_args(list(argv)))


@pytest.fixture
def files(tmp_path):
    # E = 4, K = 2, 3 tokens. Layer "a": experts 0,1 / 0,2 / 0,-1 -> loads [3, 1, 1, 0].
    # Layer "b": 2,3 / 2,3 / 2,3 -> loads [0, 0, 3, 3].
    a = mr.RoutingTrace(
        {"a": torch.tensor([[0, 1], [0, 2], [0, -1]]), "b": torch.tensor([[2, 3], [2, 3], [2, 3]])},
        num_experts=4,
        top_k=2,
    )
    b = mr.RoutingTrace(
        {"a": torch.tensor([[1, 0], [0, 3], [0, 1]]), "b": torch.tensor([[2, 3], [2, 3], [2, 3]])},
        num_experts=4,
        top_k=2,
    )
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.save(pa)
    b.save(pb)
    return a, b, str(pa), str(pb)


def test_info_table(files, capsys):
    _, _, pa, _ = files
    assert run("info", pa) == 0
    out = capsys.readouterr().out
    assert "2 layers, 3 tokens" in out and "top_k=2, num_experts=4, 1 free (-1) slots" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    # min, max, mean, max/mean, idle
    assert lines["a"] == ["0", "3", "1.25", "2.40", "1"]
    assert lines["b"] == ["0", "3", "1.50", "2.00", "2"]


def test_info_json(files, capsys):
    _, _, pa, _ = files
    assert run("info", pa, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["layers"], data["tokens"], data["top_k"], data["num_experts"]) == (2, 3, 2, 4)
    assert data["load"][0] == {
        "layer": "a",
        "routed_slots": 5,
        "min_load": 0,
        "max_load": 3,
        "mean_load": 1.25,
        "max_over_mean": 2.4,
        "idle_experts": 1,
    }


def test_diff_prints_the_compare_report(files, capsys):
    a, b, pa, pb = files
    assert run("diff", pa, pb) == 0
    assert capsys.readouterr().out.strip() == str(mr.compare(a, b))
    assert run("diff", pa, pb, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    # Layer a: token 0 same set, token 1 differs by one, token 2 is not compared (-1 in a).
    assert data == mr.compare(a, b).to_dict() and data["layers"][0]["slots_differing"] == 1


def test_bad_files_exit_1_with_the_reason(files, tmp_path, capsys):
    _, _, pa, _ = files
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a trace")
    assert run("info", str(junk)) == 1
    assert f"moe-replay: error: {junk}: truncated or not a safetensors file" in capsys.readouterr().err
    assert run("diff", pa, str(tmp_path / "missing.safetensors")) == 1
    assert "No such file" in capsys.readouterr().err
    other = mr.RoutingTrace({"a": torch.tensor([[0, 1]])}, num_experts=4, top_k=2)
    other.save(tmp_path / "other.safetensors")
    assert run("diff", pa, str(tmp_path / "other.safetensors")) == 1
    assert "cannot compare" in capsys.readouterr().err


def test_info_of_a_packed_trace_names_its_sequences_and_dtype(tmp_path, capsys):
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, -1], [-1, -1]])
    packed = mr.RoutingTrace({"a": ids}, num_experts=4, top_k=2, cu_seqlens=torch.tensor([0, 2, 5]))
    path = tmp_path / "packed.safetensors"
    packed.save(path)
    assert run("info", str(path)) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "5 tokens (token shape [5])" in first and first.endswith("ids int8, packed: 2 sequences")
    assert run("info", str(path), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["dtype"], data["packed_sequences"], data["free_slots"]) == ("int8", 2, 3)


def test_info_refuses_tiny_huge_claiming_and_device_files_quickly(tmp_path, capsys):
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes((2**62).to_bytes(8, "little") + b"{}" * 8)  # 24 bytes claiming a 4 EiB header
    assert run("info", str(tiny)) == 1
    assert "the header claims 4611686018427387904 bytes, only 16 follow" in capsys.readouterr().err
    assert run("info", "/dev/zero") == 1
    assert "not a regular file" in capsys.readouterr().err
