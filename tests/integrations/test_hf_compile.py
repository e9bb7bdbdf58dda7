"""torch.compile of attached Hugging Face models (integrations/hf.py through ops.py): fullgraph,
equal to eager with and without a replay scope, no recompile when a scope opens or closes."""

from __future__ import annotations

import pytest
import torch

import moe_replay as mr

transformers = pytest.importorskip("transformers")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from moe_replay.integrations.hf_configs import small_config  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def foreign_trace(own: mr.RoutingTrace, seed: int = 5) -> mr.RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    B, S = own.token_shape
    E, K = own.num_experts, own.top_k
    layers = {n: torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * S)]) for n in own}
    return mr.RoutingTrace({n: v.reshape(B, S, K) for n, v in layers.items()}, num_experts=E, top_k=K)


def loss_and_grads(model: torch.nn.Module, fn, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    loss = fn(ids, labels=ids).loss
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("arch", "experts"),
    [
        ("qwen3_moe", None),  # softmax top-k
        ("qwen3_moe", "moe_replay"),  # moe_replay's experts through the moe_replay::experts op
        ("deepseek_v3", None),  # sigmoid scores, selection bias, groups
        ("gpt_oss", None),  # top-k of logits, then softmax
    ],
)
def test_attached_model_compiles_fullgraph_and_replays_like_eager(arch, experts):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(small_config(arch)).float()
    mr.hf.attach(model, experts=experts, backend="torch" if experts else None)
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with mr.record(model) as own:
        eager = loss_and_grads(model, model, ids)
    plain = loss_and_grads(model, compiled, ids)
    trace = foreign_trace(own)
    with mr.replay(compiled, trace), mr.record(compiled) as used:
        replayed = loss_and_grads(model, compiled, ids)
    with mr.replay(model, trace):
        replayed_eager = loss_and_grads(model, model, ids)
    assert used == trace
    for got, want in ((plain, eager), (replayed, replayed_eager)):
        torch.testing.assert_close(got[0], want[0])
        for a, b in zip(got[1], want[1]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(replayed[0], plain[0])  # the trace changed the routing
    assert counter.frame_count == 1
