"""Replay in training loops (routing/sites.py): recompute tied to its forward's checkpoint region,
micro-batches in flight, backward after the scope, threads, wrapped modules.

Each test builds a trace whose ids differ from what the (perturbed) router would choose, so any
forward or recompute that routes by the live router instead of the trace shows up as a
difference in ids or gradients.

Shape legend: B batch, S sequence, H hidden, K experts per token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_replay as mr
from moe_replay.routing import sites

E, K, H, I = 8, 2, 16, 24
CFG = mr.MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)


class Block(nn.Module):
    """``x + moe(x)``; remembers the ids of every call (forward and checkpoint recompute)."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = mr.MoE(CFG, backend="torch")
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, routing = self.moe(x, return_routing=True)
        self.seen.append(routing.expert_ids.detach().clone())
        return x + y


class Net(nn.Module):
    def __init__(self, use_reentrant: bool | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.use_reentrant = use_reentrant  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.use_reentrant)
        return x


NAMES = ["blocks.0.moe", "blocks.1.moe"]
CHECKPOINTING = [None, True, False]
CKPT_IDS = ["plain", "reentrant", "non-reentrant"]


def make_net(use_reentrant: bool | None = None) -> Net:
    torch.manual_seed(0)
    return Net(use_reentrant)


def batch(seed: int, B: int = 2, S: int = 5) -> torch.Tensor:
    # requires grad: reentrant checkpointing gives no gradient otherwise
    return torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def foreign_trace(B: int = 2, S: int = 5, seed: int = 11) -> mr.RoutingTrace:
    """Random full rows (distinct ids): not what the router would pick."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * S)]).reshape(B, S, K)
    layers = {name: ids.roll(i, dims=-1).to(torch.int32) for i, name in enumerate(NAMES)}
    return mr.RoutingTrace(layers, num_experts=E, top_k=K)


def grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def reference_grads(xs: list[torch.Tensor], traces: list[mr.RoutingTrace]) -> list[torch.Tensor]:
    """Gradient accumulated over micro-batches without checkpointing, one scope each."""
    net = make_net(None)
    for x, trace in zip(xs, traces):
        with mr.replay(net, trace):
            net(x).square().sum().backward()
    return grads(net)


def assert_grads_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- recompute


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_backward_after_the_scope_closes_recomputes_with_the_traced_ids(use_reentrant):
    x, trace = batch(1), foreign_trace()
    net = make_net(use_reentrant)
    # Without early stop the non-reentrant recompute runs each block to its end (Block.seen).
    with mr.replay(net, trace), torch.utils.checkpoint.set_checkpoint_early_stop(False):
        y = net(x)
    y.square().sum().backward()  # the recompute runs here, no scope open
    for block, name in zip(net.blocks, NAMES):
        forward, recompute = block.seen
        assert torch.equal(forward, trace[name]) and torch.equal(recompute, trace[name])
    assert_grads_equal(grads(net), reference_grads([x], [trace]))


ORDERS = {
    "f1 f2 b2 b1": ["f0", "f1", "b1", "b0"],
    "f1 f2 b1 b2": ["f0", "f1", "b0", "b1"],
    "1F1B": ["f0", "f1", "b0", "f2", "b1", "b2"],
}


@pytest.mark.parametrize("use_reentrant", CHECKPOINTING, ids=CKPT_IDS)
@pytest.mark.parametrize("order", list(ORDERS))
def test_micro_batches_in_flight_replay_their_own_traces_in_any_backward_order(order, use_reentrant):
    steps = ORDERS[order]
    n = 1 + max(int(step[1:]) for step in steps)
    xs = [batch(seed) for seed in range(n)]
    traces = [foreign_trace(seed=20 + i) for i in range(n)]
    net = make_net(use_reentrant)
    outputs: dict[int, torch.Tensor] = {}
    with mr.replay(net, traces), torch.utils.checkpoint.set_checkpoint_early_stop(False):
        for step in steps:
            i = int(step[1:])
            if step[0] == "f":
                outputs[i] = net(xs[i])
            else:
                outputs.pop(i).square().sum().backward()
    assert_grads_equal(grads(net), reference_grads(xs, traces))
    # Each forward, and each recompute (one per backward step), routed with its micro-batch's ids.
    calls = steps if use_reentrant is not None else [step for step in steps if step[0] == "f"]
    for block, name in zip(net.blocks, NAMES):
        assert len(block.seen) == len(calls)
        for seen, step in zip(block.seen, calls):
            assert torch.equal(seen, traces[int(step[1:])][name]), step


def test_freeze_recompute_reuses_each_micro_batch_forward_after_the_router_changed():
    # Freeze, two micro-batches in flight, then the router changes before both backwards: each
    # recompute keeps its own forward's ids (the changed router would pick others).
    net = make_net(use_reentrant=False)
    xs = [batch(1), batch(2)]
    with mr.replay(net, None), torch.utils.checkpoint.set_checkpoint_early_stop(False):
        ys = [net(x) for x in xs]
        forwards = [[block.seen[i] for block in net.blocks] for i in range(2)]
        with torch.no_grad():
            for block in net.blocks:
                block.moe.router.weight.mul_(-1.0)
        ys[1].sum().backward()
        ys[0].sum().backward()
    recomputes = [[block.seen[3], block.seen[2]] for block in net.blocks]  # b1 ran before b0
    for layer, (r0, r1) in enumerate(recomputes):
        assert torch.equal(r0, forwards[0][layer]) and torch.equal(r1, forwards[1][layer])
        assert not torch.equal(net.blocks[layer].moe(xs[0], return_routing=True)[1].expert_ids, r0)


def test_list_of_traces_errors():
    net = make_net()
    traces = foreign_trace().split(1)
    with pytest.raises(ValueError, match=r"forward 3.*all 2 micro-batch traces"), mr.replay(net, traces):
        for x in (batch(1, B=1), batch(2, B=1), batch(3, B=1)):
            net(x)
    partial = r"2 micro-batch traces.*'blocks\.0\.moe' ran 1"
    with pytest.raises(ValueError, match=partial), mr.replay(net, traces):
        net(batch(1, B=1))
    with pytest.raises(ValueError, match=r"non-empty list"), mr.replay(net, []):
        pass
    with pytest.raises(TypeError, match=r"trace\[1\] must be"), mr.replay(net, [traces[0], "x"]):  # type: ignore[list-item]
        pass


def test_nested_scopes_in_one_context_are_refused_but_other_threads_are_independent():
    net = make_net()
    with mr.replay(net, None), pytest.raises(ValueError, match="already inside"), mr.replay(net, None):
        pass


# ----------------------------------------------------------------------------- threads


def run_in_thread(fn: Callable[[], object]) -> object:
    result: list[object] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def test_scopes_belong_to_the_thread_that_opened_them():
    net = make_net()
    x, trace = batch(1), foreign_trace()
    with mr.record(net) as own:
        y_own = net(x)
    with mr.replay(net, trace), mr.record(net) as used:
        # Another thread runs the same model while this thread's scopes are open: it routes by
        # its own router and its tokens are not recorded here.
        y_other = run_in_thread(lambda: net(x))
        net(x)
    torch.testing.assert_close(y_other, y_own, rtol=0, atol=0)
    assert used == trace  # one forward recorded: this thread's, with the trace's ids

    def replay_in_thread() -> mr.RoutingTrace:
        with mr.replay(net, trace), mr.record(net) as inner:
            net(x)
        return inner

    # And a scope opened in another thread leaves this one alone.
    assert run_in_thread(replay_in_thread) == trace
    with mr.record(net) as again:
        net(x)
    assert again == own


# ----------------------------------------------------------------------------- wrappers


def test_site_names_ignore_wrapper_prefixes():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    net = make_net()
    wrapped = nn.DataParallel(torch.compile(nn.Sequential(checkpoint_wrapper(net))))
    assert [name for name, _ in sites.find_sites(wrapped)] == ["0.blocks.0.moe", "0.blocks.1.moe"]
    holder = nn.Module()
    holder.module = net  # a user's own submodule named "module" keeps its name
    assert [name for name, _ in sites.find_sites(holder)] == ["module.blocks.0.moe", "module.blocks.1.moe"]


def test_trace_recorded_bare_replays_on_a_checkpoint_wrapped_model_and_back():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    x, trace = batch(1), foreign_trace()
    net = make_net()
    for block in net.blocks:
        block.moe = checkpoint_wrapper(block.moe)  # "blocks.0.moe._checkpoint_wrapped_module"
    with mr.replay(net, trace), mr.record(net) as used:
        y = net(x)
    assert used == trace and used.layer_names == NAMES
    y.square().sum().backward()  # the wrapper's recompute, after the scope
    assert_grads_equal(grads(net), reference_grads([x], [trace]))
    bare = make_net()
    with mr.replay(bare, used), mr.record(bare) as again:
        bare(x)
    assert again == trace


def test_ddp_prefix_is_ignored():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this worker")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        x, trace = batch(1), foreign_trace()
        ddp = nn.parallel.DistributedDataParallel(make_net())
        with mr.replay(ddp, trace), mr.record(ddp) as used:
            ddp(x).square().sum().backward()
        assert used == trace
        assert_grads_equal([p.grad for p in ddp.module.parameters()], reference_grads([x], [trace]))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- Hugging Face


def tiny_qwen3_moe() -> nn.Module:
    """The project's small random Qwen3-MoE (8 experts, top-2), attached."""
    transformers = pytest.importorskip("transformers")
    from moe_replay.integrations.hf_configs import SmallShape, small_config

    torch.manual_seed(0)
    config = small_config("qwen3_moe", SmallShape(experts=E, top_k=K))
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    mr.hf.attach(model)
    return model


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_hf_gradient_checkpointing_micro_batches_backward_after_the_scope(use_reentrant):
    torch.set_num_threads(1)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    reference = tiny_qwen3_moe().train()
    with mr.record(reference) as own:
        reference(ids)
    g = torch.Generator().manual_seed(5)
    forced = {name: torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(12)]) for name in own}
    trace = mr.RoutingTrace({n: v.reshape(2, 6, K) for n, v in forced.items()}, num_experts=E, top_k=K)
    pieces = trace.split(1)
    for piece, row in zip(pieces, ids.split(1)):  # reference: no checkpointing, one scope each
        with mr.replay(reference, piece):
            reference(row, labels=row).loss.backward()

    model = tiny_qwen3_moe().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    with mr.replay(model, pieces), mr.record(model) as used:
        losses = [model(row, labels=row).loss for row in ids.split(1)]  # both forwards in flight
    for loss in reversed(losses):  # backward after the scope, in reverse order
        loss.backward()
    assert used == mr.RoutingTrace.cat(pieces, dim=1)  # two [1, 6] calls appended: [1, 12]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.grad is None:  # e.g. inputs of reentrant checkpointing do not require grad
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
