"""mr.compare (routing/compare.py) against counts worked out by hand.

Shape legend: T tokens, K experts per token.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import moe_replay as mr


def trace(layers: dict[str, list[list[int]]], E: int = 8) -> mr.RoutingTrace:
    return mr.RoutingTrace({n: torch.tensor(ids) for n, ids in layers.items()}, num_experts=E, top_k=2)


# Four tokens, two layers, K = 2. Per token, differing slots = K - |set(a) & set(b)|:
#   l0: [0,1]/[1,0] -> 0 (same set, other order); [2,3]/[2,4] -> 1; [4,5]/[4,5] -> 0; [6,7]/[0,1] -> 2
#   l1: [0,1]/[0,1] -> 0; [0,1]/[0,1] -> 0; [0,1]/[0,2] -> 1; [0,1]/[0,1] -> 0
A = {"l0": [[0, 1], [2, 3], [4, 5], [6, 7]], "l1": [[0, 1], [0, 1], [0, 1], [0, 1]]}
B = {"l0": [[1, 0], [2, 4], [4, 5], [0, 1]], "l1": [[0, 1], [0, 1], [0, 2], [0, 1]]}


def test_hand_counted_example():
    report = mr.compare(trace(A), trace(B))
    l0, l1 = report.layers
    assert (l0.name, l0.slots_compared, l0.slots_differing, l0.tokens_differing) == ("l0", 8, 3, 2)
    assert (l1.name, l1.slots_compared, l1.slots_differing, l1.tokens_differing) == ("l1", 8, 1, 1)
    assert l0.fraction == 3 / 8 and l1.fraction == 1 / 8
    assert report.slot_mismatch == 4 / 16
    # Tokens differing per layer count: 0, 1 (l0), 1 (l1), 1 (l0) -> 3 of 4 tokens, 3/4 layers on average.
    assert report.token_mismatch == 3 / 4 and report.mean_layers_differing == 3 / 4
    assert (report.num_tokens, report.tokens_compared, report.top_k, report.num_experts) == (4, 4, 2, 8)


def test_minus_one_slots_are_not_compared():
    # Token 4 is padding in a (all -1); token 5 is unrouted in a's l1 only; token 6 differs in l0 fully.
    a = {"l0": [*A["l0"], [-1, -1], [2, 3], [5, 6]], "l1": [*A["l1"], [-1, -1], [-1, 3], [0, 1]]}
    b = {"l0": [*B["l0"], [0, 1], [2, 4], [1, 2]], "l1": [*B["l1"], [0, 1], [0, 1], [0, 1]]}
    report = mr.compare(trace(a), trace(b))
    l0, l1 = report.layers
    # l0 compares tokens 0-3, 5, 6: 3 + 1 + 2 = 6 differing of 12 slots. l1 compares 0-3, 6: 1 of 10.
    assert (l0.slots_compared, l0.slots_differing, l0.tokens_differing) == (12, 6, 4)
    assert (l1.slots_compared, l1.slots_differing, l1.tokens_differing) == (10, 1, 1)
    assert report.slot_mismatch == 7 / 22
    # Token metrics over tokens routed in every layer of both: 0, 1, 2, 3, 6 -> differing 1, 1, 1, 1 of 5.
    assert report.tokens_compared == 5
    assert report.token_mismatch == 4 / 5 and report.mean_layers_differing == 4 / 5


def test_identical_traces_and_nothing_to_compare():
    same = mr.compare(trace(A), trace(A))
    assert same.slot_mismatch == same.token_mismatch == same.mean_layers_differing == 0.0
    free = {"l0": [[-1, -1]], "l1": [[-1, -1]]}
    empty = mr.compare(trace(free), trace(free))
    assert (
        empty.tokens_compared == 0
        and math.isnan(empty.token_mismatch)
        and math.isnan(empty.layers[0].fraction)
    )
    assert empty.to_dict()["token_mismatch"] is None and "n/a" in str(empty)


def test_batched_and_flat_traces_compare_in_row_major_order():
    a = trace(A)
    batched = mr.RoutingTrace(
        {n: ids.reshape(2, 2, 2) for n, ids in trace(B).items()}, num_experts=8, top_k=2
    )
    assert mr.compare(a, batched) == mr.compare(a, trace(B))


def test_str_table_and_json():
    report = mr.compare(trace(A), trace(B))
    text = str(report)
    assert "2 layers, 4 tokens" in text
    assert "l0" in text and "37.50%" in text and "12.50%" in text and "25.00%" in text
    assert "tokens differing in >= 1 layer: 75.00%" in text
    assert "mean differing layers per token: 0.750 of 2" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["token_mismatch"] == 0.75 and data["layers"][0] == {
        "name": "l0",
        "slots_compared": 8,
        "slots_differing": 3,
        "tokens_differing": 2,
        "fraction": 0.375,
    }


def test_report_is_frozen():
    report = mr.compare(trace(A), trace(B))
    with pytest.raises(AttributeError):
        report.token_mismatch = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("b", "error", "match"),
    [
        (trace(B, E=16), ValueError, "num_experts=16"),
        (trace({"l0": B["l0"]}), ValueError, r"only in a \['l1'\]"),
        (trace({n: ids[:3] for n, ids in B.items()}), ValueError, r"token shape \[4\], b \[3\]"),
        ({"l0": B["l0"]}, TypeError, "b must be a moe_replay.RoutingTrace"),
    ],
)
def test_incomparable_traces(b, error, match):
    with pytest.raises(error, match=match):
        mr.compare(trace(A), b)
