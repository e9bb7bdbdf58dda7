"""Framework bridges (routing/bridges.py): routed_experts [B, S, L, K] as verl, slime, NeMo-RL hold them.

Shape legend: B batch, S padded length, T packed tokens, L tensor layers, K experts per token.
The tensors are written as the frameworks fill them: every position the engine did not route
(padding, each sequence's last token) holds the framework's fill.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay.routing import bridges

E, K = 8, 2


def routes(B: int, S: int, L: int, seed: int = 0) -> torch.Tensor:
    """[B, S, L, K] int64: K distinct experts per (token, layer), none of them the all-zero row."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, S, L, E, generator=g).topk(K, dim=-1).indices


def framework_tensor(fill: str, lengths: list[int], S: int, L: int, padding: str = "right"):
    """(routed_experts, attention_mask, engine routes): fill outside the mask and at each last token."""
    engine = routes(len(lengths), S, L)
    pos = torch.arange(S)
    lens = torch.tensor(lengths)[:, None]
    mask = pos < lens if padding == "right" else pos >= S - lens
    last = torch.zeros_like(mask)
    for b, n in enumerate(lengths):
        if n:
            last[b, n - 1 if padding == "right" else S - 1] = True
    unrouted = ~mask | last
    fill_row = torch.zeros(K, dtype=torch.long) if fill == "zeros" else torch.arange(K) % E
    tensor = torch.where(unrouted[..., None, None], fill_row, engine)
    return tensor, mask, engine, unrouted


@pytest.mark.parametrize(
    ("fill", "padding"),
    [
        ("zeros", "right"),  # verl
        ("zeros", "left"),  # verl, left-padded prompts
        ("arange", "right"),  # slime
        ("none", "right"),  # NeMo-RL: the mask alone
    ],
)
def test_unrouted_rows_become_free_and_routes_stay(fill, padding):
    tensor, mask, engine, unrouted = framework_tensor(
        fill if fill != "none" else "zeros", [4, 6, 1], 6, 3, padding
    )
    trace = bridges.from_routed_experts(
        tensor, layers=["a", "b", "c"], num_experts=E, fill=fill, attention_mask=mask
    )
    assert trace.token_shape == (3, 6) and trace.dtype == torch.int8
    for l, name in enumerate(trace):
        ids = trace[name]
        assert (ids[unrouted] == -1).all()
        assert torch.equal(ids[~unrouted], engine[..., l, :][~unrouted].to(torch.int8))


def test_verl_zeros_that_fail_replay_replay_after_the_bridge():
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cfg = mr.MoEConfig(num_experts=E, top_k=K, hidden_size=8, intermediate_size=8)
            self.layers = nn.ModuleList(mr.MoE(cfg, backend="torch") for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for moe in self.layers:
                x = x + moe(x)
            return x

    torch.manual_seed(0)
    model = Stack()
    tensor, mask, engine, unrouted = framework_tensor("zeros", [3, 5], 5, 2)
    names = ["layers.0", "layers.1"]
    raw = mr.RoutingTrace({n: tensor[..., l, :] for l, n in enumerate(names)}, num_experts=E, top_k=K)
    with pytest.raises(ValueError, match="repeated"), mr.replay(model, raw):  # the zero rows, as is
        model(torch.randn(2, 5, 8))
    trace = bridges.from_routed_experts(
        tensor, layers=model, num_experts=E, fill="zeros", attention_mask=mask
    )
    with mr.replay(model, trace), mr.record(model) as used:
        model(torch.randn(2, 5, 8))
    for l, name in enumerate(names):
        assert torch.equal(used[name][~unrouted], engine[..., l, :][~unrouted].to(torch.int32))


def test_zero_rows_inside_the_mask_are_free_and_arange_rows_are_kept():
    tensor, mask, _, _ = framework_tensor("zeros", [5], 5, 1)
    tensor[0, 0] = 0  # a prompt token before routed_experts_start_len: verl left it 0
    trace = bridges.from_routed_experts(
        tensor, layers=["a"], num_experts=E, fill="zeros", attention_mask=mask
    )
    assert (trace["a"][0, 0] == -1).all()
    tensor, mask, _, _ = framework_tensor("arange", [5], 5, 1)
    tensor[0, 1, 0] = torch.arange(K)  # a real route that happens to equal slime's fill
    trace = bridges.from_routed_experts(
        tensor, layers=["a"], num_experts=E, fill="arange", attention_mask=mask
    )
    assert trace["a"][0, 1].tolist() == list(range(K))


def test_last_token_routed_keeps_the_last_row():
    tensor, mask, engine, _ = framework_tensor("zeros", [4], 4, 1)
    tensor[0, 3] = engine[0, 3]  # a framework that did fill in the last token
    kept = bridges.from_routed_experts(
        tensor, layers=["a"], num_experts=E, fill="zeros", attention_mask=mask, last_token_routed=True
    )
    assert torch.equal(kept["a"][0, 3], engine[0, 3, 0].to(torch.int8))
    dropped = bridges.from_routed_experts(
        tensor, layers=["a"], num_experts=E, fill="zeros", attention_mask=mask
    )
    assert (dropped["a"][0, 3] == -1).all()


def test_a_mask_of_the_other_padding_side_is_refused():
    tensor, _, _, _ = framework_tensor("zeros", [2, 4], 4, 1, padding="left")
    right = torch.arange(4) < torch.tensor([[2], [4]])
    with pytest.raises(
        ValueError, match=r"position \(0, 2\), layer 'a' is padding in attention_mask but holds"
    ):
        bridges.from_routed_experts(tensor, layers=["a"], num_experts=E, fill="zeros", attention_mask=right)


def test_packed_tensors_with_cu_seqlens():
    engine = routes(1, 7, 2)[0]  # [T, L, K]: sequences of 3 and 4 tokens
    tensor = engine.clone()
    tensor[[2, 6]] = 0  # each sequence's last token
    cu = torch.tensor([0, 3, 7])
    trace = bridges.from_routed_experts(
        tensor.unsqueeze(0), layers=["a", "b"], num_experts=E, fill="zeros", cu_seqlens=cu
    )
    assert trace.is_packed and trace.seq_lens == [3, 4]
    assert (trace["b"][[2, 6]] == -1).all() and torch.equal(
        trace["b"][[0, 1, 3, 4, 5]], engine[[0, 1, 3, 4, 5], 1].to(torch.int8)
    )
    back = bridges.to_routed_experts(trace, num_layers=2, fill="zeros")
    assert back.shape == (7, 2, K) and torch.equal(back, tensor.to(torch.int32))


@pytest.mark.parametrize("fill", ["zeros", "arange", "none"])
def test_to_routed_experts_round_trips_with_dense_layers(fill):
    tensor, mask, engine, unrouted = framework_tensor("zeros" if fill == "none" else fill, [3, 5], 5, 4)
    layers = {1: "model.layers.1.mlp", 3: "model.layers.3.mlp"}  # 0 and 2 are dense
    trace = bridges.from_routed_experts(tensor, layers=layers, num_experts=E, fill=fill, attention_mask=mask)
    assert trace.layer_names == list(layers.values())
    back = bridges.to_routed_experts(trace, num_layers=4, fill=fill, dtype=torch.int64)
    assert back.shape == (2, 5, 4, K) and back.dtype == torch.int64
    again = bridges.from_routed_experts(back, layers=layers, num_experts=E, fill=fill, attention_mask=mask)
    assert again == trace
    fill_row = {"zeros": [0] * K, "arange": list(range(K)), "none": [-1] * K}[fill]
    assert back[0, 0, 0].tolist() == fill_row  # a dense layer holds the fill
    assert torch.equal(back[..., 3, :][~unrouted], engine[..., 3, :][~unrouted])


def test_bridge_errors():
    tensor, mask, _, _ = framework_tensor("zeros", [3], 3, 2)
    call = dict(layers=["a", "b"], num_experts=E)
    with pytest.raises(ValueError, match="fill must be one of"):
        bridges.from_routed_experts(tensor, fill="ones", attention_mask=mask, **call)
    with pytest.raises(ValueError, match=r"pass attention_mask .* or cu_seqlens .*exactly one"):
        bridges.from_routed_experts(tensor, fill="zeros", **call)
    with pytest.raises(TypeError, match=r"integer torch.Tensor"):
        bridges.from_routed_experts(tensor.float(), fill="zeros", attention_mask=mask, **call)
    with pytest.raises(ValueError, match=r"must be \[B, S, L, K\] with attention_mask"):
        bridges.from_routed_experts(tensor[0], fill="zeros", attention_mask=mask, **call)
    with pytest.raises(ValueError, match="top_k=1 cannot tell fill from expert 0"):
        bridges.from_routed_experts(tensor[..., :1], fill="zeros", attention_mask=mask, **call)
    with pytest.raises(ValueError, match=r"outside -1|ids must be -1"):
        bridges.from_routed_experts(tensor + 2**32, fill="none", attention_mask=mask, **call)  # never wrapped
    trace = bridges.from_routed_experts(tensor, fill="zeros", attention_mask=mask, **call)
    partial = trace._like({n: ids.clone() for n, ids in trace.items()})
    partial["a"][0, 0, 1] = -1
    with pytest.raises(
        ValueError, match=r"layer 'a' at token position \[0, 0\] holds .* some free \(-1\) slots"
    ):
        bridges.to_routed_experts(partial, num_layers=2, fill="zeros")
    with pytest.raises(ValueError, match="cannot hold ids -1"):
        bridges.to_routed_experts(trace, num_layers=2, fill="none", dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"names \['c'\] that the trace does not hold"):
        bridges.to_routed_experts(trace, num_layers=2, fill="zeros", layers={0: "a", 1: "c"})


def test_vllm_uint16_tensors():
    tensor, mask, _, unrouted = framework_tensor("zeros", [3, 4], 4, 2)
    as_uint16 = bridges.from_routed_experts(
        torch.from_numpy(tensor.numpy().astype("uint16")),
        layers=["a", "b"],
        num_experts=E,
        fill="zeros",
        attention_mask=mask,
    )
    assert as_uint16 == bridges.from_routed_experts(
        tensor, layers=["a", "b"], num_experts=E, fill="zeros", attention_mask=mask
    )
    assert as_uint16.dtype == torch.int8 and (as_uint16["b"][unrouted] == -1).all()
