"""mr.hf.attach on every supported transformers MoE family, each a tiny random model
(moe_replay/integrations/hf.py, hf_router.py, hf_families.py, hf_configs.py).

Per family: attach is bitwise neutral outside scopes (forward and backward); recorded ids are the
ids the model's experts receive; the rule read from the router reproduces the router's own
routing (a replay with every slot free routes the same experts and gives the same output); replay
after perturbing the routers reproduces the trace exactly, with gradients reaching the routers;
detach restores; and, for a subset with distinct routing layouts, ``generate`` capture lines up.

Shape legend: B batch, S sequence, L sequence of a generation, K experts per token.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Iterator

import pytest
import torch

import moe_replay as mr
from moe_replay.integrations.hf_configs import SmallShape, small_config
from moe_replay.integrations.hf_families import FAMILIES, Family
from moe_replay.integrations.hf_router import router_weight
from moe_replay.routing.sites import site_of

transformers = pytest.importorskip("transformers")  # the [hf] extra

SHAPE = SmallShape()
K, V = SHAPE.top_k, SHAPE.vocab
WRAPPERS = {  # vision-language wrappers: tested through their text models (same blocks)
    "qwen3_5_moe": "qwen3_5_moe_text",
    "qwen3_vl_moe": "qwen3_vl_moe_text",
    "glm4v_moe": "glm4v_moe_text",
    "kimi_k25": "deepseek_v3",
    "llama4": "llama4_text",
}
TESTED = [t for t in mr.hf.SUPPORTED_MODEL_TYPES if t not in WRAPPERS and t != "dbrx"] + ["dbrx"]
NOT_SWIGLU = {  # experts="moe_replay" must refuse these
    "gpt_oss": "interleaved gate/up with biases, clamped GLU",
    "llama4_text": "weights scale the experts' input; transposed layout",
    "deepseek_v4": "clamped SwiGLU (swiglu_limit)",
    "nemotron_h": "non-gated relu2 experts",
    "dbrx": "w1/v1/w2 expert weights",
}
GENERATE = [  # one per routing layout the wrapper reads
    "llama4_text",  # dense [T, E] scores, weights scale the input
    "dbrx",  # routing by a block method on the router's logits, p-norm
    "granitemoe",  # top-k of logits, (logits, weights, ids) or (ids, weights, logits) by version
    "phimoe",  # sparsemixer
    "deepseek_v4",  # a hash layer (not a site), sqrtsoftplus scores
    "longcat_flash",  # zero (identity) experts
    "minimax_m2",  # selection bias on the block
    "qwen3_next",  # linear-attention cache, shared expert
]
B, PROMPT_LENGTHS, N = 2, (5, 3), 3


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only oversubscribe the 2 CI cores
    yield
    torch.set_num_threads(threads)


def _require(model_type: str) -> None:
    module = FAMILIES[model_type].module
    if importlib.util.find_spec(f"transformers.models.{module}") is None:  # an older transformers
        pytest.skip(f"{model_type}: transformers {transformers.__version__} has no models.{module}")


@functools.cache
def _base(model_type: str) -> torch.nn.Module:
    config = small_config(model_type, SHAPE)
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:  # a text model without an LM head class of its own
        model = transformers.AutoModel.from_config(config)
    model = model.float().eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):  # as after load balancing
                buf.normal_(0.0, 0.05)
        for name, param in model.named_parameters():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                param.normal_(0.0, 0.05)
    return model


def fresh(model_type: str) -> torch.nn.Module:
    _require(model_type)
    return copy.deepcopy(_base(model_type))


def output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def tokens() -> torch.Tensor:
    return torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(2))


def blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if site_of(m) is not None}


def routers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The attached blocks' routers (``gate`` or ``router``)."""
    found = {}
    for name, block in blocks(model).items():
        found[name] = next(getattr(block, n) for n in ("gate", "router") if hasattr(block, n))
    return found


def free_trace(trace: mr.RoutingTrace) -> mr.RoutingTrace:
    layers = {name: torch.full_like(ids, -1) for name, ids in trace.items()}
    return mr.RoutingTrace(layers, num_experts=trace.num_experts, top_k=trace.top_k)


def as_sets(ids: torch.Tensor) -> torch.Tensor:
    return ids.sort(dim=-1).values


@pytest.mark.parametrize("model_type", TESTED)
def test_family_contract(model_type: str) -> None:
    model = fresh(model_type)
    x = tokens()
    ref = output(model, x)
    ref.float().square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # Ids the unattached model's experts receive, where the experts take them (Llama 4's take
    # pre-scaled tokens; LongCat's block renumbers its zero experts before its experts see them).
    seen: dict[str, torch.Tensor] = {}
    names = mr.hf.attach(model)
    assert names and names == list(blocks(model))
    hooks = []
    for name, block in blocks(model).items():
        if model_type not in ("llama4_text", "longcat_flash"):
            hooks.append(
                block.experts.register_forward_pre_hook(
                    lambda m, args, name=name: seen.__setitem__(name, args[1].detach().clone())
                )
            )

    # Neutral outside scopes, forward and backward (the wrapper's autograd path runs).
    after = output(model, x)
    after.float().square().mean().backward()
    assert torch.equal(after, ref)
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert torch.equal(p.grad, ref_grads[n]), n
    model.zero_grad(set_to_none=True)

    # Recorded ids are the ids the model routed with.
    with torch.no_grad(), mr.record(model) as trace:
        output(model, x)
    for handle in hooks:
        handle.remove()
    assert trace.layer_names == names
    for name in names:
        assert trace[name].shape == (*x.shape, K)
        if name in seen:
            assert torch.equal(trace[name].reshape(-1, K).long(), seen[name].long()), name

    # The rule read from the router is the router's: with every slot free, replay routes the same
    # experts and computes the same output (weights up to rounding).
    with torch.no_grad(), mr.replay(model, free_trace(trace)), mr.record(model) as free:
        routed_free = output(model, x)
    for name in names:
        assert torch.equal(as_sets(free[name]), as_sets(trace[name])), name
    torch.testing.assert_close(routed_free, ref, rtol=1e-4, atol=1e-5)
    # The same experts in reversed slots: no row agrees slot for slot with the model's own, so
    # every weight is moe_replay's; the output sums the same weighted experts. (PhiMoE's
    # sparsemixer weighs a slot by its position: tests/routing/test_hf_router_equivalence.py.)
    if model_type != "phimoe":
        reversed_slots = {name: ids.flip(-1) for name, ids in trace.items()}
        with (
            torch.no_grad(),
            mr.replay(model, mr.RoutingTrace(reversed_slots, num_experts=trace.num_experts, top_k=K)),
        ):
            torch.testing.assert_close(output(model, x), ref, rtol=1e-4, atol=1e-5)

    # Replay on perturbed routers: exactly the trace's ids, weights from the current router.
    perturbed = copy.deepcopy(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for router in routers(perturbed).values():
            weight = router_weight(router)
            weight.add_(0.5 * SHAPE.hidden**-0.5 * torch.randn_like(weight))
    with torch.no_grad(), mr.record(perturbed) as unreplayed:
        output(perturbed, x)
    assert mr.compare(trace, unreplayed).slot_mismatch > 0  # the replay below has work to do
    with mr.replay(perturbed, trace), mr.record(perturbed) as replayed:
        y = output(perturbed, x)
        y.float().square().mean().backward()
    for name in names:
        assert torch.equal(replayed[name], trace[name]), name
    assert not torch.equal(y, ref)  # same experts, the perturbed routers' weights
    for name, router in routers(perturbed).items():
        grad = router_weight(router).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    # detach restores.
    touched = [m for b in blocks(model).values() for m in (b, *b.children())]
    mr.hf.detach(model)
    assert all(
        site_of(m) is None and not {"forward", "route_tokens_to_experts"} & set(vars(m)) for m in touched
    )
    assert not any(k.startswith("_moe_replay") for m in touched for k in vars(m))
    with torch.no_grad():
        assert torch.equal(output(model, x), ref)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    P = max(PROMPT_LENGTHS)
    ids_BP = torch.zeros(B, P, dtype=torch.long)
    mask_BP = torch.zeros_like(ids_BP)
    for b, n in enumerate(PROMPT_LENGTHS):
        ids_BP[b, P - n :] = torch.randint(3, V, (n,), generator=gen)
        mask_BP[b, P - n :] = 1
    return ids_BP, mask_BP


@pytest.mark.parametrize("model_type", GENERATE)
def test_generate_capture_lines_up(model_type: str) -> None:
    model = fresh(model_type)
    names = mr.hf.attach(model)
    ids_BP, mask_BP = prompts()
    with mr.record(model) as trace:
        seq_BL = model.generate(
            ids_BP,
            attention_mask=mask_BP,
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            pad_token_id=0,
        )
    L = seq_BL.shape[1]
    mask_BL = torch.cat([mask_BP, torch.ones(B, N, dtype=torch.long)], dim=1)
    assert trace.layer_names == names
    for name in names:
        assert trace[name].shape == (B, L - 1, K)  # the last sampled token is never forwarded
    # Position j of the aligned trace routes sequence token j: a full forward agrees (up to rare
    # near-ties); an off-by-one alignment would agree only by chance.
    with torch.no_grad(), mr.record(model) as full:
        pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
        model(seq_BL, attention_mask=mask_BL, position_ids=pos_BL)
    report = mr.compare(mr.hf.align_generation_trace(trace, mask_BL), full)
    assert report.tokens_compared == int(mask_BL[:, :-1].sum())
    assert report.slot_mismatch <= 0.05


@pytest.mark.parametrize("model_type", TESTED)
def test_moe_replay_experts_or_a_clear_error(model_type: str) -> None:
    reference = fresh(model_type)
    ours = copy.deepcopy(reference)
    # transformers 5.17's LongCat-Flash experts module runs the zero experts itself.
    zero_inside = any(
        getattr(m, "zero_expert_num", 0) for m in ours.modules() if m.__class__.__name__.endswith("Experts")
    )
    if model_type in NOT_SWIGLU or zero_inside:
        with pytest.raises(ValueError, match="needs plain SwiGLU experts"):
            mr.hf.attach(ours, experts="moe_replay", backend="torch")
        assert not blocks(ours)  # nothing attached
        return
    mr.hf.attach(ours, experts="moe_replay", backend="torch")
    x = tokens()
    ref, out = output(reference, x), output(ours, x)
    ref.float().square().mean().backward()
    out.float().square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)


TINY_VISION = {  # the keys each wrapper's vision config reads, all tiny
    "depth": 1,
    "num_hidden_layers": 1,
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_heads": 2,
    "num_attention_heads": 2,
    "out_hidden_size": SHAPE.hidden,
    "vision_output_dim": SHAPE.hidden,
    "projector_input_dim": SHAPE.hidden,
    "projector_output_dim": SHAPE.hidden,
    "patch_size": 2,
    "image_size": 8,
    "num_position_embeddings": 16,
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_vision_language_wrapper_routes_its_text_blocks(wrapper: str) -> None:
    _require(wrapper)
    text = small_config(WRAPPERS[wrapper], SHAPE).to_dict()
    config = transformers.AutoConfig.for_model(wrapper, text_config=text, vision_config=TINY_VISION)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config).float().eval()
    x = tokens()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    names = mr.hf.attach(model)
    assert names and all("language_model" in name for name in names)  # vision towers route nothing
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)
        with mr.record(model) as trace:
            model(input_ids=x)
        with mr.replay(model, free_trace(trace)), mr.record(model) as free:
            torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-4, atol=1e-5)
    assert trace.layer_names == names
    for name in names:
        assert torch.equal(as_sets(free[name]), as_sets(trace[name])), name
    mr.hf.detach(model)
    assert not blocks(model)


def test_every_family_has_a_tested_model() -> None:
    assert set(TESTED) | set(WRAPPERS) == set(mr.hf.SUPPORTED_MODEL_TYPES)
    assert all(text in TESTED for text in WRAPPERS.values())


def test_mtp_blocks_are_skipped_unless_asked() -> None:
    model = fresh("qwen3_moe")
    model.model.mtp = torch.nn.ModuleList([copy.deepcopy(model.model.layers[0].mlp)])
    names = mr.hf.attach(model)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    mr.hf.detach(model)
    names = mr.hf.attach(model, mtp=True)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp", "model.mtp.0"]
    hidden = torch.randn(2, 3, SHAPE.hidden)
    with torch.no_grad(), mr.record(model) as trace:
        model.model.mtp[0](hidden)
    assert trace.layer_names == ["model.mtp.0"] and trace["model.mtp.0"].shape == (2, 3, K)
    with pytest.raises(TypeError, match="mtp must be a bool"):
        mr.hf.attach(fresh("qwen3_moe"), mtp=1)


def test_unsupported_family_names_its_reason() -> None:
    class Fake(torch.nn.Module):
        config = transformers.PretrainedConfig()

    model = Fake()
    model.config.model_type = "switch_transformers"
    with pytest.raises(ValueError, match="expert capacity"):
        mr.hf.attach(model)
    assert "switch_transformers" in mr.hf.UNSUPPORTED_MODEL_TYPES


def test_a_family_missing_from_the_installed_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    model = fresh("qwen3_moe")
    monkeypatch.setitem(FAMILIES, "qwen3_moe", Family(module="not_in_this_transformers", rule="-"))
    with pytest.raises(ValueError, match=rf"transformers {transformers.__version__} does not have"):
        mr.hf.attach(model)
