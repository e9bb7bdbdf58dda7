"""record / replay over a model of several mr.MoE layers (routing/context.py, routing/sites.py).

Shape legend: B batch, S sequence, H hidden, K experts per token.
"""

from __future__ import annotations

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

    def __init__(self, cfg: mr.MoEConfig = CFG) -> None:
        super().__init__()
        self.moe = mr.MoE(cfg, backend="torch")
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, routing = self.moe(x, return_routing=True)
        self.seen.append(routing.expert_ids.detach().clone())
        return x + y


class Net(nn.Module):
    """A residual stack of MoE blocks, each optionally under activation checkpointing."""

    def __init__(self, layers: int = 3, use_reentrant: bool | None = None, cfg: mr.MoEConfig = CFG) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(layers))
        self.use_reentrant = use_reentrant  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.use_reentrant)
        return x

    def clear(self) -> None:
        for block in self.blocks:
            block.seen.clear()


def make_net(seed: int = 0, **kw: object) -> Net:
    torch.manual_seed(seed)
    return Net(**kw)


def batch(seed: int = 1, B: int = 3, S: int = 5) -> torch.Tensor:
    return torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed))


def names(net: Net) -> list[str]:
    return [f"blocks.{i}.moe" for i in range(len(net.blocks))]


def perturb_routers(net: Net, scale: float = 0.3, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in net.blocks:
            w = block.moe.router.weight
            w.add_(scale * w.abs().mean() * torch.randn(w.shape, generator=g))


def assert_no_state(net: Net) -> None:
    scopes = sites.open_scopes()
    for block in net.blocks:
        site = sites.site_of(block.moe)
        assert site not in scopes.replays and site not in scopes.recorders


# ----------------------------------------------------------------------------- record


def test_record_keys_by_module_name_and_keeps_batch_axis():
    net = make_net()
    x = batch()
    with mr.record(net) as trace:
        net(x)
    assert trace.layer_names == names(net)
    assert (trace.num_experts, trace.top_k, trace.token_shape) == (E, K, (3, 5))
    for i, name in enumerate(trace):
        assert torch.equal(trace[name], net.blocks[i].seen[0].to(torch.int32))
    assert_no_state(net)


def test_record_appends_calls_along_the_token_axis():
    # prefill of 4 tokens, then two decode steps of one token: [B, 6, K] per layer.
    net = make_net()
    x = batch(S=6)
    with mr.record(net) as trace:
        net(x[:, :4])
        net(x[:, 4:5])
        net(x[:, 5:6])
    assert trace.token_shape == (3, 6)
    for i, name in enumerate(trace):
        assert torch.equal(trace[name], torch.cat(net.blocks[i].seen, dim=1).to(torch.int32))


def test_record_refuses_calls_with_different_batch_shapes():
    net = make_net()
    with pytest.raises(ValueError, match="batch shapes"), mr.record(net):
        net(batch(B=3))
        net(batch(B=2))
    assert_no_state(net)


@pytest.mark.parametrize("context", ["record", "replay", "both"])
def test_state_is_removed_when_the_body_raises(context):
    net = make_net()
    with pytest.raises(RuntimeError, match="boom"):
        if context == "record":
            with mr.record(net):
                net(batch())
                raise RuntimeError("boom")
        elif context == "replay":
            with mr.replay(net, None):
                net(batch())
                raise RuntimeError("boom")
        else:
            with mr.replay(net, None), mr.record(net):
                net(batch())
                raise RuntimeError("boom")
    assert_no_state(net)
    # Outside any scope the layer routes on its own again: a perturbed router changes the ids.
    net.clear()
    net(batch())
    perturb_routers(net, scale=3.0)
    net(batch())
    assert any(not torch.equal(b.seen[0], b.seen[1]) for b in net.blocks)


def test_model_without_routing_sites_is_an_error():
    with pytest.raises(ValueError, match="no routing sites"), mr.record(nn.Linear(2, 2)):
        pass
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"), mr.replay(object(), None):  # type: ignore[arg-type]
        pass


# ----------------------------------------------------------------------------- replay


def test_replay_reproduces_recorded_ids_after_router_perturbation_and_grads_reach_every_router():
    net = make_net()
    x = batch(B=4, S=8)
    with mr.record(net) as recorded:
        net(x)
    perturb_routers(net)

    with mr.record(net) as free:  # the same forward without replay routes differently
        net(x)
    assert any(not torch.equal(free[n], recorded[n]) for n in recorded)

    with mr.replay(net, recorded), mr.record(net) as used:
        loss = net(x).square().mean()
        loss.backward()
    assert used == recorded  # every layer, every token
    for block in net.blocks:
        grad = block.moe.router.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert_no_state(net)


def test_record_inside_replay_records_the_ids_actually_used_for_free_slots():
    # Force slot 0 of every token to expert 7 and leave slot 1 to the router.
    net = make_net()
    x = batch()
    forced = torch.full((3, 5, K), -1, dtype=torch.int32)
    forced[..., 0] = 7
    trace = mr.RoutingTrace({n: forced for n in names(net)}, num_experts=E, top_k=K)
    with mr.replay(net, trace), mr.record(net) as used:
        net(x)
    for name in used:
        ids = used[name]
        assert (ids[..., 0] == 7).all() and (ids >= 0).all() and (ids[..., 1] != 7).all()


def test_free_slots_take_the_routers_own_choice_no_pile_up_on_expert_0():
    # An all -1 trace is the router's own choice in every layer.
    net = make_net()
    x = batch()
    with mr.record(net) as own:
        net(x)
    empty = mr.RoutingTrace({n: torch.full((3, 5, K), -1) for n in names(net)}, num_experts=E, top_k=K)
    with mr.replay(net, empty), mr.record(net) as used:
        net(x)
    assert used == own


def test_replay_none_lets_the_router_decide_every_new_forward():
    # Freeze around a gradient-accumulation loop: each micro-batch is routed by the router on its
    # own tokens, never with an earlier micro-batch's ids (same token count included).
    net = make_net()
    x1, x2 = batch(seed=1), batch(seed=2)
    with mr.record(net) as own1:
        net(x1)
    with mr.record(net) as own2:
        net(x2)
    assert own1 != own2
    with mr.replay(net, None), mr.record(net) as used:
        net(x1).sum().backward()
        net(x2).sum().backward()
    assert used.slice(0, 5, dim=1) == own1 and used.slice(5, 10, dim=1) == own2
    with mr.replay(net, None):
        net(batch(S=5))
        net(batch(S=4))  # another token count is just another forward


def test_a_second_forward_with_one_trace_is_an_error_that_explains_micro_batches():
    net = make_net()
    x = batch()
    with mr.record(net) as trace:
        net(x)
    with mr.replay(net, trace):
        net(x)
        with pytest.raises(ValueError, match=r"blocks\.0\.moe.*forward 2.*trace\.split"):
            net(x)
    assert_no_state(net)


def test_strict_missing_and_extra_layers():
    net = make_net()
    x = batch()
    with mr.record(net) as trace:
        net(x)
    partial = mr.RoutingTrace({n: trace[n] for n in names(net)[:2]}, num_experts=E, top_k=K)
    with (
        pytest.raises(ValueError, match=r"missing from the trace: \['blocks\.2\.moe'\]"),
        mr.replay(net, partial),
    ):
        pass
    perturb_routers(net)
    with mr.replay(net, partial, strict=False), mr.record(net) as used:
        net(x)  # blocks.2 is frozen: the router decides
    assert all(torch.equal(used[n], partial[n]) for n in partial)
    first_two = mr.RoutingTrace({n: used[n] for n in partial}, num_experts=E, top_k=K)
    with mr.replay(net, first_two, strict=False), mr.record(net) as again:
        net(x)
    assert again == used  # blocks.2 routed by the router from the same inputs both times
    extra = mr.RoutingTrace({**trace, "blocks.9.moe": trace["blocks.0.moe"]}, num_experts=E, top_k=K)
    with pytest.raises(ValueError, match=r"not in the model: \['blocks\.9\.moe'\]"), mr.replay(net, extra):
        pass
    foreign = mr.RoutingTrace({"other.moe": trace["blocks.0.moe"]}, num_experts=E, top_k=K)
    with pytest.raises(ValueError, match="no layer of the trace"), mr.replay(net, foreign, strict=False):
        pass
    assert_no_state(net)


@pytest.mark.parametrize(
    ("trace_shape", "match"),
    [
        ((3, 4), r"blocks\.0\.moe.*\[3, 4, 2\].*\[3, 5\]"),  # too few tokens
        ((5, 3), r"blocks\.0\.moe.*\[5, 3, 2\].*\[3, 5\]"),  # same count, axes swapped
    ],
)
def test_trace_token_count_or_shape_mismatch_names_layer_and_both_shapes(trace_shape, match):
    net = make_net()
    ids = torch.full((*trace_shape, K), -1)
    trace = mr.RoutingTrace({n: ids for n in names(net)}, num_experts=E, top_k=K)
    with pytest.raises(ValueError, match=match), mr.replay(net, trace):
        net(batch())
    assert_no_state(net)


def test_flattened_trace_replays_a_batched_forward():
    # A [T] trace (e.g. RoutingTrace.from_tensor of an engine's [T, L, K]) fits a [B, S] forward.
    net = make_net()
    x = batch()
    with mr.record(net) as trace:
        net(x)
    perturb_routers(net)
    with mr.replay(net, trace.flatten()), mr.record(net) as used:
        net(x)
    assert used == trace


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (mr.MoEConfig(num_experts=E, top_k=3, hidden_size=H, intermediate_size=I), r"top_k=2.*\[3, 5, 3\]"),
        (mr.MoEConfig(num_experts=16, top_k=K, hidden_size=H, intermediate_size=I), r"num_experts=16"),
    ],
)
def test_trace_top_k_or_num_experts_mismatch_names_layer_and_both_shapes(other, match):
    recorder = make_net(cfg=other)
    with mr.record(recorder) as trace:
        recorder(batch())
    net = make_net()
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.moe'.*" + match), mr.replay(net, trace):
        pass


def test_invalid_trace_ids_are_refused_on_entry():
    net = make_net()
    ids = torch.full((3, 5, K), -1)
    ids[1, 2] = torch.tensor([4, 4])
    trace = mr.RoutingTrace({n: ids for n in names(net)}, num_experts=E, top_k=K)
    with (
        pytest.raises(ValueError, match=r"trace layer 'blocks\.0\.moe' row 7 .* repeated"),
        mr.replay(net, trace),
    ):
        pass


def test_replay_scopes_do_not_nest_and_forced_ids_inside_replay_are_refused():
    net = make_net()
    with mr.replay(net, None):
        with pytest.raises(ValueError, match="already inside"), mr.replay(net, None):
            pass
        with pytest.raises(ValueError, match=r"forced_expert_ids were passed inside mr\.replay"):
            net.blocks[0].moe(
                batch(), forced_expert_ids=torch.zeros(15, K, dtype=torch.long) + torch.arange(K)
            )
    assert_no_state(net)


def test_replay_rejects_a_non_trace():
    with pytest.raises(TypeError, match="RoutingTrace, a list of them"), mr.replay(make_net(), {"a": 1}):  # type: ignore[arg-type]
        pass


# ----------------------------------------------------------------------------- checkpointing


def near_tie_net(use_reentrant: bool | None) -> Net:
    """Layer 0's router ties experts 1 and 2 exactly and makes expert 0 every token's first choice.

    With inputs whose feature 0 is 1 and feature 1 lies in [1, 2), the logits are exact:
    ``l0 = 8``, ``l1 = l2 = x1``, ``l3.. = -8``; the tie goes to expert 1. Setting
    ``weight[2, 0] = 2**-23`` makes ``l2 = x1 + 1 ulp``: expert 2 then wins for every token.
    """
    net = make_net(use_reentrant=use_reentrant)
    with torch.no_grad():
        w = net.blocks[0].moe.router.weight
        w.zero_()
        w[0, 0] = 8.0
        w[1, 1] = w[2, 1] = 1.0
        w[3:, 0] = -8.0
    return net


def near_tie_input() -> torch.Tensor:
    x = batch(B=2, S=6)
    x[..., 0] = 1.0
    x[..., 1] = 1.0 + torch.rand(2, 6, generator=torch.Generator().manual_seed(3))
    return x.requires_grad_()


def flip_tie(net: Net) -> None:
    """What a non-deterministic recompute could do: move expert 2's logit one ulp above expert 1's."""
    with torch.no_grad():
        net.blocks[0].moe.router.weight[2, 0] = 2.0**-23


def trace_forcing_slot_0(net: Net) -> mr.RoutingTrace:
    ids = torch.full((2, 6, K), -1, dtype=torch.int32)
    ids[..., 0] = 0  # slot 1 is free: the router decides it between the tied experts 1 and 2
    return mr.RoutingTrace({n: ids for n in names(net)}, num_experts=E, top_k=K)


def run_with_flip(net: Net, trace: mr.RoutingTrace | None) -> None:
    x = near_tie_input()
    # Without early stop the non-reentrant recompute runs each block to its end, so Block.seen
    # gets the recompute's ids (early stop would cut it inside the experts, after routing).
    with mr.replay(net, trace), torch.utils.checkpoint.set_checkpoint_early_stop(False):
        y = net(x)
        flip_tie(net)  # between the forward and the recompute in backward
        y.square().mean().backward()


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("with_trace", [False, True], ids=["freeze", "trace"])
def test_checkpoint_recompute_routes_exactly_like_the_forward_on_near_ties(use_reentrant, with_trace):
    net = near_tie_net(use_reentrant)
    run_with_flip(net, trace_forcing_slot_0(net) if with_trace else None)
    for block in net.blocks:
        forward, recompute = block.seen  # one forward, one recompute per checkpointed block
        assert torch.equal(forward, recompute)
    assert (net.blocks[0].seen[0] == torch.tensor([0, 1], dtype=torch.int32)).all()  # the tie went to 1


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_near_tie_construction_flips_recompute_without_moe_replay(use_reentrant):
    # Control for the test above: without any site the same run routes the recompute differently
    # (or torch's non-reentrant checkpoint notices the change in a saved tensor's shape).
    net = near_tie_net(use_reentrant)
    x = near_tie_input()
    try:
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            for block in net.blocks:
                sites.unmark_site(block.moe)
            y = net(x)
            flip_tie(net)
            y.square().mean().backward()
    except torch.utils.checkpoint.CheckpointError:
        assert not use_reentrant
        return
    forward, recompute = net.blocks[0].seen
    assert (forward[..., 1] == 1).all() and (recompute[..., 1] == 2).all()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_a_recompute_whose_forward_stored_no_routes_is_an_error(use_reentrant, monkeypatch):
    # If the forward's checkpoint region is not found (e.g. hidden by another saved-tensor hook),
    # the recompute refuses to route afresh instead of silently differing from the forward.
    monkeypatch.setattr(sites, "_forward_region", lambda: None)
    net = make_net(use_reentrant=use_reentrant)
    x = batch().requires_grad_()
    with mr.replay(net, None):
        y = net(x)
    with pytest.raises(RuntimeError, match=r"recomputed by activation checkpointing.*call 1"):
        y.sum().backward()


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("with_trace", [False, True], ids=["freeze", "trace"])
def test_checkpointed_backward_equals_unchecked_backward(use_reentrant, with_trace):
    x0 = batch(B=2, S=6)
    grads = []
    for mode in (None, use_reentrant):
        net = make_net(use_reentrant=mode)
        trace = trace_forcing_slot_0(net) if with_trace else None
        x = x0.clone().requires_grad_()
        with mr.replay(net, trace):
            net(x).square().mean().backward()
        grads.append([x.grad, *(p.grad for p in net.parameters())])
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_recompute_inside_backward_is_not_recorded_again(use_reentrant):
    net = make_net(use_reentrant=use_reentrant)
    x = batch().requires_grad_()
    with (
        mr.replay(net, None),
        mr.record(net) as trace,
        torch.utils.checkpoint.set_checkpoint_early_stop(False),
    ):
        net(x).sum().backward()
    assert trace.token_shape == (3, 5)
    for i, name in enumerate(trace):
        assert len(net.blocks[i].seen) == 2  # forward + recompute ran, one was recorded
        assert torch.equal(trace[name], net.blocks[i].seen[0].to(torch.int32))


# ----------------------------------------------------------------------------- micro-batches


def test_micro_batches_of_a_trace_replay_like_the_full_batch():
    net = make_net()
    x = batch(B=5, S=4)
    with mr.record(net) as trace:
        net(x)
    perturb_routers(net)

    with mr.replay(net, trace), mr.record(net) as used_full:
        y_full = net(x)
        y_full.square().sum().backward()
    grads_full = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    outputs, used = [], []
    for start, piece in zip(range(0, 5, 2), trace.split(2)):
        with mr.replay(net, piece), mr.record(net) as used_piece:
            y = net(x[start : start + 2])
            y.square().sum().backward()  # gradient accumulation over micro-batches
        outputs.append(y.detach())
        used.append(used_piece)
    assert mr.RoutingTrace.cat(used) == used_full == trace
    torch.testing.assert_close(torch.cat(outputs), y_full.detach(), rtol=1e-5, atol=1e-6)
    for p, g in zip(net.parameters(), grads_full):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4)  # float32 sums in another order
