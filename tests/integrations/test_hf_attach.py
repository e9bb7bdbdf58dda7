"""mr.hf.attach / detach in depth (generation, training replay with checkpointing, errors, the
Triton experts) on tiny random models of seven families (moe_replay/integrations/hf.py); every
other family's contract: test_hf_families.py.

Shape legend: B batch, P padded prompt length, N new tokens, L = P + N, K experts per token.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import pytest
import torch

import moe_replay as mr
from moe_replay.backends.registry import available_backends
from moe_replay.routing.sites import site_of

transformers = pytest.importorskip("transformers")  # the [hf] extra

E, K, H, V = 8, 2, 32, 64
B, N = 3, 4
PROMPT_LENGTHS = (6, 3, 5)  # left padding: rows 1 and 2 are padded
COMMON = {
    "vocab_size": V,
    "hidden_size": H,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": H**-0.5,  # unit-scale logits: routing is not a sea of near-ties
}


def _config(arch: str) -> transformers.PretrainedConfig:
    t = transformers
    if arch == "qwen3_moe":
        return t.Qwen3MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=E,
            num_experts_per_tok=K,
            head_dim=8,
            norm_topk_prob=True,
        )
    if arch == "qwen2_moe":  # shared expert with a sigmoid gate; norm_topk_prob=False (its default)
        return t.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=E,
            num_experts_per_tok=K,
        )
    if arch == "mixtral":
        return t.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=E, num_experts_per_tok=K)
    if arch == "olmoe":
        return t.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=E, num_experts_per_tok=K)
    if arch == "deepseek_v3":  # one leading dense layer, 4 groups of which 2 kept, shared expert, scaling 2.5
        return t.DeepseekV3Config(
            **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=E,
            num_experts_per_tok=K,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            n_shared_experts=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=2.5,
        )
    if arch == "glm4_moe":  # one leading dense layer, 2 groups of which 1 kept, shared expert
        return t.Glm4MoeConfig(
            **{**COMMON, "num_hidden_layers": 3},
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=E,
            num_experts_per_tok=K,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            head_dim=8,
        )
    if arch == "gpt_oss":  # router with a bias, top-k before softmax; sliding-window layers
        return t.GptOssConfig(
            **COMMON,
            intermediate_size=16,
            num_local_experts=E,
            num_experts_per_tok=K,
            head_dim=8,
            sliding_window=8,
        )
    raise AssertionError(arch)


ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss"]
SWIGLU_ARCHS = [a for a in ARCHS if a != "gpt_oss"]
ROUTER_ATTR = {"gpt_oss": "router"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and under `pytest -n 2` on 2 cores the
    # workers' threads oversubscribe the CPU (this part, on a busy 2-core machine: 26 s with one
    # thread per worker, ~5 min with torch's default).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _base_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch)).float().eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # non-zero, so the selection bias matters
                buf.normal_(0.0, 0.05)
    return model


def fresh(arch: str) -> torch.nn.Module:
    """A private copy of the arch's tiny random model (float32, eval mode, not attached)."""
    return copy.deepcopy(_base_model(arch))


def blocks(model: torch.nn.Module, arch: str) -> dict[str, torch.nn.Module]:
    """The MoE blocks: modules holding a router and experts."""
    router = ROUTER_ATTR.get(arch, "gate")
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "experts") and hasattr(getattr(m, router, None), "top_k")
    }


def routers(model: torch.nn.Module, arch: str) -> dict[str, torch.nn.Module]:
    return {name: getattr(m, ROUTER_ATTR.get(arch, "gate")) for name, m in blocks(model, arch).items()}


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts ``[B, P]`` and their attention mask."""
    gen = torch.Generator().manual_seed(1)
    P = max(PROMPT_LENGTHS)
    ids_BP = torch.zeros(B, P, dtype=torch.long)
    mask_BP = torch.zeros_like(ids_BP)
    for b, n in enumerate(PROMPT_LENGTHS):
        ids_BP[b, P - n :] = torch.randint(3, V, (n,), generator=gen)
        mask_BP[b, P - n :] = 1
    return ids_BP, mask_BP


def generate(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation of exactly N tokens from :func:`prompts`: sequences ``[B, L]`` and mask."""
    ids_BP, mask_BP = prompts()
    seq_BL = model.generate(
        ids_BP, attention_mask=mask_BP, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0
    )
    return seq_BL, torch.cat([mask_BP, torch.ones(B, N, dtype=torch.long)], dim=1)


def teacher_forced(model: torch.nn.Module, seq_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """The training forward of generated sequences: loss on the non-padding tokens."""
    pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)  # the position ids generate used
    labels = seq_BL.masked_fill(mask_BL == 0, -100)
    return model(seq_BL, attention_mask=mask_BL, position_ids=pos_BL, labels=labels).loss


def enable_checkpointing(model: torch.nn.Module) -> None:
    # transformers 5.24 renamed gradient_checkpointing_enable (deprecated, still there); 5.17 has
    # only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def tokens() -> torch.Tensor:
    return torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------------------------
# attach: transparent, sites under module names, state dict untouched
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_attach_is_bitwise_transparent(arch: str) -> None:
    model = fresh(arch)
    model.train()  # dropout is 0; exercise the training path and the backward too
    x = tokens()
    ref = model(x, labels=x)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = model.state_dict()
    model.zero_grad(set_to_none=True)

    names = mr.hf.attach(model)

    assert names == list(blocks(model, arch))
    if arch in ("deepseek_v3", "glm4_moe"):
        assert names == ["model.layers.1.mlp", "model.layers.2.mlp"]  # layer 0 is dense: not a site
    after = model(x, labels=x)
    after.loss.backward()
    assert torch.equal(after.logits, ref.logits)
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert torch.equal(p.grad, ref_grads[n]), n
    new_state = model.state_dict()
    assert list(new_state) == list(state)
    assert all(new_state[k] is state[k] or torch.equal(new_state[k], state[k]) for k in state)
    with mr.record(model) as trace:
        model(x)
    assert trace.layer_names == names


@pytest.mark.parametrize("arch", ARCHS)
def test_replaying_own_routes_is_bitwise_transparent(arch: str) -> None:
    # Rows forced to the router's own choice keep the model's own weights (hf.py Precision notes).
    model = fresh(arch)
    mr.hf.attach(model)
    x = tokens()
    ref = model(x).logits
    with mr.record(model) as trace:
        model(x)
    with mr.replay(model, trace):
        assert torch.equal(model(x).logits, ref)
    with mr.replay(model, None):  # frozen: first forward decides, a second one reuses
        assert torch.equal(model(x).logits, ref)
        assert torch.equal(model(x).logits, ref)


# --------------------------------------------------------------------------------------------
# generate: recorded routes line up with the sequences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_record_during_generate_gives_aligned_routes(arch: str) -> None:
    model = fresh(arch)
    names = mr.hf.attach(model)
    with mr.record(model) as trace:
        seq_BL, mask_BL = generate(model)
    L = seq_BL.shape[1]
    assert max(PROMPT_LENGTHS) + N == L
    assert trace.layer_names == names
    for name in names:
        ids = trace[name]
        assert ids.shape == (B, L - 1, K)  # the last sampled token is never forwarded
        assert int(ids.min()) >= 0 and int(ids.max()) < E
        assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all()  # K distinct experts per row

    # Alignment: position j of the trace is the routing of sequence token j. A full (no cache)
    # float32 forward of the sequences routes the same (up to rare near-ties); an off-by-one
    # alignment would agree only by chance (~K/E of the slots).
    with mr.record(model) as full:
        teacher_forced(model, seq_BL, mask_BL)
    aligned = mr.hf.align_generation_trace(trace, mask_BL)
    report = mr.compare(aligned, full)
    assert report.tokens_compared == int(mask_BL[:, :-1].sum())
    assert report.slot_mismatch <= 0.02


def test_align_generation_trace_marks_padding_and_last_token_free() -> None:
    ids = torch.arange(2 * 3 * K, dtype=torch.int32).reshape(2, 3, K) % E
    trace = mr.RoutingTrace({"a": ids, "b": ids + 0}, num_experts=E, top_k=K)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    out = mr.hf.align_generation_trace(trace, mask)
    assert out.token_shape == (2, 4) and out.layer_names == ["a", "b"]
    assert (out["a"][:, 3] == -1).all()  # never forwarded
    assert (out["a"][0, 0] == -1).all()  # padding
    assert torch.equal(out["a"][0, 1:3], ids[0, 1:3]) and torch.equal(out["a"][1, :3], ids[1])
    assert torch.equal(mr.hf.align_generation_trace(trace)["b"][:, :3], ids)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B=2, L=4\]"):
        mr.hf.align_generation_trace(trace, mask[:, :3])
    with pytest.raises(ValueError, match="token shape"):
        mr.hf.align_generation_trace(mr.RoutingTrace({"a": ids[0]}, num_experts=E, top_k=K))
    with pytest.raises(TypeError, match="RoutingTrace"):
        mr.hf.align_generation_trace({"a": ids})


# --------------------------------------------------------------------------------------------
# training replay
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_training_replay_reproduces_generation_routes(arch: str) -> None:
    trainer = fresh(arch)
    # Rollout: a bfloat16 copy of the weights generates. Training: float32, with slightly
    # perturbed routers (an optimizer step's worth), so routing differs without replay.
    engine = copy.deepcopy(trainer).to(torch.bfloat16)
    torch.manual_seed(3)
    with torch.no_grad():
        for router in routers(trainer, arch).values():
            router.weight.add_(0.05 * router.weight.std() * torch.randn_like(router.weight))
    names = mr.hf.attach(trainer)
    mr.hf.attach(engine)
    with mr.record(engine) as rollout:
        seq_BL, mask_BL = generate(engine)
    forced = mr.hf.align_generation_trace(rollout, mask_BL)
    decided_BL = mask_BL.bool().clone()
    decided_BL[:, -1] = False  # routed during generation: non-padding, not the last token

    trainer.train()
    with mr.record(trainer) as unreplayed:
        teacher_forced(trainer, seq_BL, mask_BL)
    assert mr.compare(forced, unreplayed).slot_mismatch > 0  # the replay below has work to do

    enable_checkpointing(trainer)
    trainer.zero_grad(set_to_none=True)
    with mr.replay(trainer, forced):
        with mr.record(trainer) as replayed:
            loss = teacher_forced(trainer, seq_BL, mask_BL)
        loss.backward()  # recompute of checkpointed layers inside the scope
    for name in names:
        ids = replayed[name]
        assert ids.shape == (B, seq_BL.shape[1], K)  # recompute is not recorded twice
        assert torch.equal(ids[decided_BL], rollout[name][decided_BL[:, :-1]])
        free = ids[~decided_BL]  # padding and the last position: the router's own distinct choice
        assert int(free.min()) >= 0 and (free.sort(dim=-1).values.diff(dim=-1) > 0).all()
    for name, router in routers(trainer, arch).items():
        assert router.weight.grad is not None, name
        assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0, name


def test_replay_gradients_do_not_depend_on_checkpointing() -> None:
    # Recompute routes exactly as the forward did, so gradients match without checkpointing.
    grads = []
    for checkpointing in (False, True):
        model = fresh("qwen3_moe")
        mr.hf.attach(model)
        model.train()
        if checkpointing:
            enable_checkpointing(model)
        x = tokens()
        with mr.replay(model, None):
            model(x, labels=x).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_partially_forced_rows_follow_route_semantics(arch: str) -> None:
    model = fresh(arch)
    names = mr.hf.attach(model)
    x = tokens()
    logits: dict[str, torch.Tensor] = {}
    for name, router in routers(model, arch).items():
        router.register_forward_hook(lambda m, i, out, name=name: logits.__setitem__(name, out[0].detach()))
    # Force slot 0 to the expert each token's router likes least; slot 1 (and beyond) free.
    with torch.no_grad():
        model(x)
    layers = {}
    for name in names:
        ids = torch.full((*x.shape, K), -1, dtype=torch.int32)
        ids[..., 0] = logits[name].argmin(dim=-1).reshape(x.shape)
        layers[name] = ids
    with mr.replay(model, mr.RoutingTrace(layers, num_experts=E, top_k=K)), mr.record(model) as used:
        model(x)
    cfg_of = {name: site_of(m) for name, m in blocks(model, arch).items()}
    for name in names:
        got = used[name].reshape(-1, K).long()
        forced = layers[name].reshape(-1, K).long()
        assert torch.equal(got[:, 0], forced[:, 0])  # forced slot kept
        # free slots: the router's best remaining experts, in order
        l_TE = logits[name].float()
        if arch in ("deepseek_v3", "glm4_moe"):
            block = blocks(model, arch)[name]
            cfg = mr.MoEConfig(
                num_experts=E,
                top_k=K,
                hidden_size=H,
                intermediate_size=16,
                scoring="sigmoid",
                norm_topk_prob=True,
                n_group=block.gate.num_group,
                topk_group=block.gate.topk_group,
                score_bias=True,
                routed_scaling_factor=block.gate.routed_scaling_factor,
            )
            want = mr.route(l_TE, cfg, forced, bias=block.gate.e_score_correction_bias).expert_ids.long()
        else:  # softmax routers and gpt-oss: descending logits (ties improbable), forced one skipped
            order = l_TE.scatter(1, forced[:, :1], float("-inf")).argsort(dim=1, descending=True)
            want = torch.cat([forced[:, :1], order[:, : K - 1]], dim=1)
        assert torch.equal(got, want), name
        assert cfg_of[name].top_k == K


# --------------------------------------------------------------------------------------------
# detach, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_detach_restores_original_modules(arch: str) -> None:
    model = fresh(arch)
    x = tokens()
    ref = model(x).logits
    touched = [
        m
        for b in blocks(model, arch).values()
        for m in (b, getattr(b, ROUTER_ATTR.get(arch, "gate")), b.experts)
    ]
    before = [dict(vars(m)) for m in touched]
    experts = None if arch == "gpt_oss" else "moe_replay"
    mr.hf.attach(model, experts=experts)
    mr.hf.detach(model)
    for m, d in zip(touched, before):
        assert dict(vars(m)) == d  # same attributes, same objects: no forward, state or site left
        assert site_of(m) is None
    assert torch.equal(model(x).logits, ref)
    with pytest.raises(ValueError, match="no routing sites"), mr.record(model):
        pass
    with pytest.raises(ValueError, match="not attached"):
        mr.hf.detach(model)
    assert mr.hf.attach(model) == list(blocks(model, arch))  # attach again


def test_unsupported_model_raises_listing_supported_types() -> None:
    dense = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
        )
    )
    with pytest.raises(ValueError, match="'llama'") as err:
        mr.hf.attach(dense)
    for model_type in mr.hf.SUPPORTED_MODEL_TYPES:
        assert repr(model_type) in str(err.value)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        mr.hf.attach("qwen3_moe")


def test_attach_argument_errors() -> None:
    model = fresh("qwen3_moe")
    with pytest.raises(ValueError, match=r"experts must be None .* got 'triton'"):
        mr.hf.attach(model, experts="triton")
    with pytest.raises(ValueError, match="only applies with experts='moe_replay'"):
        mr.hf.attach(model, backend="torch")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        mr.hf.attach(model, experts="moe_replay", backend="cuda")
    assert not any(site_of(m) for m in model.modules())  # failed attaches changed nothing
    mr.hf.attach(model)
    with pytest.raises(ValueError, match="already attached"):
        mr.hf.attach(model)
    with pytest.raises(ValueError, match="SwiGLU"):
        mr.hf.attach(fresh("gpt_oss"), experts="moe_replay")


def test_replaced_block_forward_is_an_error_not_a_silent_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hub kernel replacing the block's forward at class level would route without the router
    # attach wrapped: replay would be silently ignored. The block wrapper refuses instead.
    model = fresh("qwen3_moe")
    mr.hf.attach(model)
    block_class = type(model.model.layers[0].mlp)
    monkeypatch.setattr(block_class, "forward", lambda self, h: torch.zeros_like(h))
    with pytest.raises(RuntimeError, match="did not call its router 'gate'"):
        model(tokens())


def test_deepcopy_of_an_attached_model_routes_through_the_copy() -> None:
    model = fresh("mixtral")
    names = mr.hf.attach(model)
    twin = copy.deepcopy(model)
    with mr.record(twin) as trace:
        twin(tokens())
    assert trace.layer_names == names
    mr.hf.detach(twin)
    with mr.record(model) as trace:  # the original is still attached
        model(tokens())
    assert trace.layer_names == names


# --------------------------------------------------------------------------------------------
# experts="moe_replay"
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", SWIGLU_ARCHS)
def test_moe_replay_experts_match_forward_and_backward(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = fresh(arch).train()
    ours = copy.deepcopy(reference)
    mr.hf.attach(ours, experts="moe_replay", backend="torch")
    experts_class = type(blocks(ours, arch)["model.layers.1.mlp"].experts)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model's own experts ran")

    x = tokens()
    ref = reference(x, labels=x)
    ref.loss.backward()
    monkeypatch.setattr(experts_class, "forward", refuse)
    with mr.record(ours):  # also under a routing context
        out = ours(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for b in blocks(ours, arch).values():  # the model's own tensors, not copies
        assert b.experts.gate_up_proj.grad is not None


@pytest.mark.skipif(
    "triton" not in available_backends("cpu"), reason="needs triton (its interpreter runs on the CPU)"
)
def test_moe_replay_experts_on_the_triton_backend() -> None:
    # The Triton kernels read the model's own weight tensors (here under TRITON_INTERPRET=1).
    reference = fresh("qwen3_moe").train()
    ours = copy.deepcopy(reference)
    mr.hf.attach(ours, experts="moe_replay", backend="triton")
    x = tokens()
    ref, out = reference(x, labels=x), ours(x, labels=x)
    ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for p, q in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_moe_replay_experts_in_bfloat16_forward_backward() -> None:
    """The Triton kernels on a GPU in bf16 (on Hopper the backward's GEMMs are torch._grouped_mm)
    on the model's own tensors: the loss's gradients match the model's own experts within bf16."""
    reference = fresh("qwen3_moe").to("cuda", torch.bfloat16).train()
    ours = copy.deepcopy(reference)
    mr.hf.attach(ours, experts="moe_replay", backend="triton")
    x = tokens().cuda()
    ref, out = reference(x, labels=x), ours(x, labels=x)
    ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.logits.float(), ref.logits.float(), rtol=2e-2, atol=5e-2)
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        error = (q.grad.float() - p.grad.float()).norm() / p.grad.float().norm().clamp_min(1e-12)
        assert error < 5e-2, (name, error.item())


def test_moe_replay_experts_in_bfloat16_within_tolerance() -> None:
    reference = fresh("qwen3_moe").to(torch.bfloat16)
    ours = copy.deepcopy(reference)
    mr.hf.attach(ours, experts="moe_replay", backend="torch")
    x = tokens()
    with torch.no_grad():
        ref, out = reference(x).logits.float(), ours(x).logits.float()
    # bfloat16 has 8 mantissa bits; ours accumulates the experts in float32, the model in bf16.
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=5e-2)
