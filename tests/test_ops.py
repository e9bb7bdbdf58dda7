"""torch.compile of moe_replay layers (ops.py): fullgraph, with and without scopes, no recompiles.

Shape legend: B batch, S sequence, H hidden, K experts per token.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

import moe_replay as mr

E, K, H, I = 8, 2, 16, 24
CFG = mr.MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe = mr.MoE(CFG, backend="torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        return x


NAMES = ["blocks.0.moe", "blocks.1.moe"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def inputs() -> torch.Tensor:
    return torch.randn(2, 5, H, generator=torch.Generator().manual_seed(1)).requires_grad_()


def foreign_trace() -> mr.RoutingTrace:
    g = torch.Generator().manual_seed(11)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(10)]).reshape(2, 5, K)
    return mr.RoutingTrace({n: ids.roll(i, -1) for i, n in enumerate(NAMES)}, num_experts=E, top_k=K)


def run(model: nn.Module, x: torch.Tensor, **kw: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    y = model(x, **kw)
    y.square().sum().backward()
    grads = [x.grad, *(p.grad.clone() for p in model.parameters())]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def assert_same(
    a: tuple[torch.Tensor, list[torch.Tensor]], b: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


def test_fullgraph_compile_equals_eager_with_and_without_scopes_and_never_recompiles():
    net, x, trace = make_net(), inputs(), foreign_trace()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, fullgraph=True, backend=counter)
    assert_same(run(compiled, x), run(net, x))
    with mr.replay(compiled, trace), mr.record(compiled) as used:
        replayed = run(compiled, x)
    assert used == trace
    with mr.replay(net, trace):
        assert_same(replayed, run(net, x))
    with mr.replay(compiled, None), mr.record(compiled) as frozen:
        run(compiled, x)
    with mr.record(net) as own:
        net(x)
    assert frozen == own
    assert_same(run(compiled, x), run(net, x))  # scope closed again
    assert counter.frame_count == 1  # opening and closing scopes recompiled nothing


def test_compiled_layer_with_forced_ids_and_return_routing():
    moe = make_net().blocks[0].moe
    x = inputs()
    forced = foreign_trace()["blocks.0.moe"]
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    y, routing = compiled(x, forced_expert_ids=forced, return_routing=True)
    y_eager, routing_eager = moe(x, forced_expert_ids=forced, return_routing=True)
    assert torch.equal(routing.expert_ids, forced.to(torch.int32))
    torch.testing.assert_close(routing.weights, routing_eager.weights)
    torch.testing.assert_close(y, y_eager)
    bad = forced.clone()
    bad[0, 1, 1] = bad[0, 1, 0]
    with pytest.raises(ValueError, match="row 1 holds"):
        compiled(x, forced_expert_ids=bad)


def test_checkpointing_compiled_blocks_recomputes_the_forwards_routes_after_the_scope():
    net, x, trace = make_net(), inputs(), foreign_trace()
    for block in net.blocks:
        block.compile(fullgraph=True, backend="aot_eager")  # compiled blocks, checkpointed outside
    with mr.replay(net, trace):
        expected = run(net, x)
    x2 = x.detach().clone().requires_grad_()
    with mr.replay(net, trace):
        y = net(x2, ckpt=True)
    y.square().sum().backward()  # recompute after the scope: the region's stored routes
    assert_same((y.detach(), [x2.grad, *(p.grad for p in net.parameters())]), expected)


def test_checkpointing_inside_the_compiled_graph_is_an_error_not_a_silent_reroute():
    net, x = make_net(), inputs()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with mr.replay(compiled, foreign_trace()):
        y = compiled(x, ckpt=True)
    with pytest.raises(RuntimeError, match="recomputes this layer's routing inside its backward graph"):
        y.sum().backward()


def test_a_deep_copy_is_a_site_of_its_own_under_compile():
    import copy

    net = make_net()
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for block in twin.blocks:
            block.moe.router.weight.mul_(-1.0)  # the copy routes differently
    x = inputs()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    with mr.record(twin) as eager_routes:
        twin(x)
    with mr.record(compiled) as compiled_routes:
        compiled(x)
    with mr.record(net) as original_routes:
        net(x)
    assert compiled_routes == eager_routes != original_routes
