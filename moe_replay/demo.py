"""``moe-replay demo``: the R3 story on a small, randomly initialised Hugging Face MoE model.

An RL step samples rollouts with an inference engine and then trains on them. Here:

* **rollout**: ``generate`` in bfloat16 with the KV cache, sampling, recording each MoE layer's
  routes (``mr.record`` on a model attached with ``mr.hf.attach``);
* **training**: one float32 teacher-forced forward (and backward) of the same sequences, once
  letting the router decide, once replaying the rollout's routes (``mr.replay``).

It prints, per layer, the fraction of routed slots whose expert differs between rollout and
training, and, over the generated tokens, how far the training log-probabilities are from the
rollout's: mean and max ``|Δ log p|`` and the k3 estimate of KL(rollout ‖ training). With replay
the routing mismatch must be zero (the command fails otherwise); what remains of ``Δ log p`` is
precision (bfloat16 vs float32, cached vs full attention), not routing.

Everything runs on the CPU from a config: no download. transformers, tqdm and matplotlib are
imported inside :func:`run_demo`, so ``moe-replay --help`` stays fast.

Shape legend: B prompts, P padded prompt length, N new tokens, L = P + N sequence length,
V vocabulary, K experts per token.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

import moe_replay as mr

MODELS = ("qwen3", "mixtral", "deepseek-v3", "olmoe")
FAMILY_MODELS = (
    "qwen3_next",
    "qwen3_5_moe",
    "glm4_moe",
    "glm4_moe_lite",
    "deepseek_v4",
    "kimi_linear",
    "gpt_oss",
    "llama4",
    "minimax_m2",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "granitemoe",
    "longcat_flash",
)
"""More architectures by transformers model type, from moe_replay.integrations.hf_configs."""
_TEXT_MODEL_TYPE = {"llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text"}  # no vision tower


@dataclass(frozen=True, kw_only=True)
class DemoSize:
    """Model and workload size."""

    layers: int
    """Decoder layers (DeepSeek-V3: the first is dense, the rest MoE)."""
    hidden: int
    """Hidden size H."""
    experts: int
    """Routed experts per MoE layer E."""
    top_k: int
    """Experts per token K."""
    expert_intermediate: int
    """Intermediate size I of one expert."""
    vocab: int
    """Vocabulary V (random token ids; 0 is padding)."""
    prompt_lengths: tuple[int, ...]
    """One prompt per entry, left-padded to the longest."""
    new_tokens: int
    """Tokens sampled per prompt N."""


SIZES = {
    "default": DemoSize(
        layers=6,
        hidden=128,
        experts=32,
        top_k=4,
        expert_intermediate=64,
        vocab=512,
        prompt_lengths=(12, 20, 7, 16, 24, 10),
        new_tokens=40,
    ),
    "small": DemoSize(
        layers=3,
        hidden=64,
        experts=16,
        top_k=4,
        expert_intermediate=32,
        vocab=256,
        prompt_lengths=(6, 11, 4, 9),
        new_tokens=12,
    ),
}


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", choices=MODELS + FAMILY_MODELS, default="qwen3", help="architecture (default: qwen3)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for weights, prompts and sampling (default: 0)"
    )
    parser.add_argument("--small", action="store_true", help="a tiny model and workload (CI, a few seconds)")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="save a figure: mismatch per layer, |Δ log p| histogram"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="write the results as JSON to FILE ('-': stdout, no table)"
    )


def _hf_config(model: str, size: DemoSize) -> Any:
    import transformers

    heads = 4
    common = {
        "vocab_size": size.vocab,
        "hidden_size": size.hidden,
        "intermediate_size": 2 * size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4 * (max(size.prompt_lengths) + size.new_tokens),
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        # Weights ~ N(0, 1/H): unit-scale activations and router logits, as in a trained model.
        # transformers' default (std 0.02) makes the experts' outputs and the router's preferences
        # so faint that routing hardly moves the log-probs, which would undersell the effect.
        "initializer_range": size.hidden**-0.5,
    }
    if model == "qwen3":
        return transformers.Qwen3MoeConfig(
            **common,
            # transformers' signature lists no head_dim; the config takes it through **kwargs
            head_dim=size.hidden // heads,  # type: ignore[call-arg]
            num_experts=size.experts,
            num_experts_per_tok=size.top_k,
            moe_intermediate_size=size.expert_intermediate,
            norm_topk_prob=True,
        )
    if model == "olmoe":
        return transformers.OlmoeConfig(
            **{**common, "intermediate_size": size.expert_intermediate},
            num_experts=size.experts,
            num_experts_per_tok=size.top_k,
        )
    if model == "mixtral":
        return transformers.MixtralConfig(
            **{**common, "intermediate_size": size.expert_intermediate},
            num_local_experts=size.experts,
            num_experts_per_tok=size.top_k,
        )
    # DeepSeek-V3: multi-head latent attention (all heads keep their keys), one leading dense
    # layer, group-limited sigmoid routing with a correction bias, and a shared expert.
    config = transformers.DeepseekV3Config(
        **{**common, "num_key_value_heads": heads},
        moe_intermediate_size=size.expert_intermediate,
        n_routed_experts=size.experts,
        num_experts_per_tok=size.top_k,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        n_shared_experts=1,
        q_lora_rank=size.hidden // 2,
        kv_lora_rank=size.hidden // 4,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        routed_scaling_factor=2.5,
    )
    return config


def _family_config(model: str, size: DemoSize) -> Any:
    from moe_replay.integrations.hf_configs import SmallShape, small_config

    shape = SmallShape(
        layers=size.layers,
        hidden=size.hidden,
        experts=size.experts,
        top_k=size.top_k,
        expert_intermediate=size.expert_intermediate,
        vocab=size.vocab,
        max_positions=4 * (max(size.prompt_lengths) + size.new_tokens),
    )
    return small_config(_TEXT_MODEL_TYPE.get(model, model), shape)


def _build_model(model: str, size: DemoSize, seed: int) -> Any:
    import transformers

    torch.manual_seed(seed)
    config = _hf_config(model, size) if model in MODELS else _family_config(model, size)
    hf_model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, buf in hf_model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # as after load balancing: not all zero
                buf.normal_(0.0, 0.01)
    return hf_model.float().eval()


def _prompts(size: DemoSize, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts ``[B, P]`` and their attention mask."""
    gen = torch.Generator().manual_seed(seed + 1)
    P = max(size.prompt_lengths)
    ids_BP = torch.zeros(len(size.prompt_lengths), P, dtype=torch.long)
    mask_BP = torch.zeros_like(ids_BP)
    for b, n in enumerate(size.prompt_lengths):
        ids_BP[b, P - n :] = torch.randint(3, size.vocab, (n,), generator=gen)
        mask_BP[b, P - n :] = 1
    return ids_BP, mask_BP


def _progress_streamer(total: int, desc: str) -> Any:
    """A ``generate`` streamer that advances a tqdm bar once per decoding step."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class _Bar(BaseStreamer):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False, disable=None, file=sys.stderr)
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate first pushes the prompt
                self.prompt_seen = True
                return
            self.bar.update(1)

        def end(self) -> None:
            self.bar.close()

    return _Bar()


@dataclass(frozen=True)
class Rollout:
    """What the rollout hands the trainer."""

    sequences_BL: torch.Tensor
    """Prompts (left-padded) and sampled tokens."""
    mask_BL: torch.Tensor
    """1 for real tokens, 0 for padding."""
    logp_BN: torch.Tensor
    """Log-probability of each sampled token under the bf16 rollout model (float32)."""
    trace: mr.RoutingTrace
    """Routes per MoE layer, ``[B, L - 1, K]`` (the last token is never forwarded)."""


def _rollout(model: Any, ids_BP: torch.Tensor, mask_BP: torch.Tensor, size: DemoSize, seed: int) -> Rollout:
    torch.manual_seed(seed + 2)
    with mr.record(model) as trace:
        out = model.generate(
            ids_BP,
            attention_mask=mask_BP,
            max_new_tokens=size.new_tokens,
            min_new_tokens=size.new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            streamer=_progress_streamer(size.new_tokens, "rollout (bf16 generate)"),
        )
    # Rollout log-probs from generate's raw logits (output_logits, not the processed
    # output_scores): the very numbers the engine sampled from (bfloat16, KV cache, one token
    # per step), as an inference engine reports them. Recomputing them with a teacher-forced
    # bf16 forward would use a different kernel path (no KV cache) and hide part of the gap.
    # With temperature 1 and no top-k/top-p, these logits are the sampling distribution.
    logits_BNV = torch.stack(out.logits, dim=1).float()
    new_BN = out.sequences[:, ids_BP.shape[1] :]
    logp_BN = torch.log_softmax(logits_BNV, dim=-1).gather(2, new_BN.unsqueeze(-1)).squeeze(-1)
    mask_BL = torch.cat([mask_BP, torch.ones_like(new_BN)], dim=1)
    return Rollout(out.sequences, mask_BL, logp_BN, trace)


@dataclass(frozen=True)
class Training:
    """One teacher-forced training pass over the rollout's sequences."""

    logp_BN: torch.Tensor
    """Log-probability of each sampled token under the float32 training forward."""
    trace: mr.RoutingTrace
    """Routes the training forward used, ``[B, L, K]`` per MoE layer."""
    loss: float
    """Next-token cross-entropy over the non-padding tokens."""


def _train_forward(model: Any, rollout: Rollout, num_new: int, forced: mr.RoutingTrace | None) -> Training:
    """One teacher-forced forward + backward of the rollout's sequences, replaying ``forced`` if given."""
    seq_BL, mask_BL = rollout.sequences_BL, rollout.mask_BL
    # The position ids generate used for left-padded prompts; without them the training forward
    # would see shifted rotary positions and differ from the rollout for reasons other than routing.
    pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
    labels_BL = seq_BL.masked_fill(mask_BL == 0, -100)
    model.zero_grad(set_to_none=True)

    def step() -> Training:
        with mr.record(model) as trace:
            out = model(seq_BL, attention_mask=mask_BL, position_ids=pos_BL, labels=labels_BL)
        out.loss.backward()
        logits_BNV = out.logits[:, -num_new - 1 : -1].float()
        new_BN = seq_BL[:, -num_new:]
        logp_BN = torch.log_softmax(logits_BNV, dim=-1).gather(2, new_BN.unsqueeze(-1)).squeeze(-1)
        return Training(logp_BN.detach(), trace, out.loss.item())

    if forced is None:
        return step()
    with mr.replay(model, forced):
        return step()


def _logprob_stats(train_BN: torch.Tensor, rollout_BN: torch.Tensor) -> dict[str, Any]:
    delta = (train_BN - rollout_BN).double()  # log(p_train / p_rollout), tokens sampled from the rollout
    k3 = (delta.exp() - 1 - delta).mean()  # k3 estimator of KL(rollout || train): unbiased, >= 0 per sample
    return {
        "mean_abs_dlogp": float(delta.abs().mean()),
        "max_abs_dlogp": float(delta.abs().max()),
        "k3_kl": float(k3),
        "abs_dlogp": [float(x) for x in delta.abs().flatten()],
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    size = SIZES["small" if args.small else "default"]
    steps = tqdm(total=4, desc="demo", leave=False, disable=None, file=sys.stderr)
    steps.set_postfix_str("build model")
    trainer = _build_model(args.model, size, args.seed)  # float32 master weights
    engine = copy.deepcopy(trainer).to(torch.bfloat16)  # the inference engine's bf16 copy
    for model in (trainer, engine):
        mr.hf.attach(model)
    trainer.train()  # dropout is 0 in these configs; train mode as a trainer would run it
    steps.update(1)

    steps.set_postfix_str("rollout")
    ids_BP, mask_BP = _prompts(size, args.seed)
    rollout = _rollout(engine, ids_BP, mask_BP, size, args.seed)
    steps.update(1)

    # The rollout's routes aligned with the sequences: -1 (router decides) for padding and for
    # the last token, which generate never forwarded.
    forced = mr.hf.align_generation_trace(rollout.trace, rollout.mask_BL)
    results = {}
    for label, replay in (("without_replay", None), ("with_replay", forced)):
        steps.set_postfix_str(f"training {label.replace('_', ' ')}")
        train = _train_forward(trainer, rollout, size.new_tokens, replay)
        report = mr.compare(forced, train.trace)
        results[label] = {
            "slot_mismatch": report.slot_mismatch,
            "token_mismatch": report.token_mismatch,
            "layer_mismatch": [layer.fraction for layer in report.layers],
            "loss": train.loss,
            **_logprob_stats(train.logp_BN, rollout.logp_BN),
        }
        steps.update(1)
    steps.close()
    return {
        "model": args.model,
        "architecture": type(trainer).__name__,
        "seed": args.seed,
        "size": "small" if args.small else "default",
        "moe_layers": len(forced),
        "num_experts": forced.num_experts,
        "top_k": forced.top_k,
        "prompts": len(size.prompt_lengths),
        "prompt_tokens": int(sum(size.prompt_lengths)),
        "new_tokens": size.new_tokens * len(size.prompt_lengths),
        "layers": forced.layer_names,
        "results": results,
    }


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"


def _table(summary: dict[str, Any]) -> str:
    without, with_ = summary["results"]["without_replay"], summary["results"]["with_replay"]
    names = summary["layers"]
    width = max(len("all layers"), *(len(n) for n in names))
    col = 16
    lines = [
        f"moe-replay demo: {summary['architecture']} (random init, seed {summary['seed']}), "
        f"{summary['moe_layers']} MoE layers, top-{summary['top_k']} of {summary['num_experts']} experts",
        f"{summary['prompts']} left-padded prompts ({summary['prompt_tokens']} tokens), "
        f"{summary['new_tokens']} sampled tokens",
        "rollout: bfloat16 generate with KV cache; training: float32 teacher-forced forward",
        "",
        f"{'routing mismatch':<{width}}  {'without replay':>{col}}  {'with replay':>{col}}",
    ]
    rows = [(name, without["layer_mismatch"][i], with_["layer_mismatch"][i]) for i, name in enumerate(names)]
    rows.append(("all layers", without["slot_mismatch"], with_["slot_mismatch"]))
    rows.append(("tokens, >= 1 layer", without["token_mismatch"], with_["token_mismatch"]))
    lines += [f"{name:<{width}}  {_pct(a):>{col}}  {_pct(b):>{col}}" for name, a, b in rows]
    lines += [
        "",
        f"{'log p, training vs rollout':<{width}}  {'without replay':>{col}}  {'with replay':>{col}}",
    ]
    for key, label in (
        ("mean_abs_dlogp", "mean |Δ log p|"),
        ("max_abs_dlogp", "max |Δ log p|"),
        ("k3_kl", "KL (k3)"),
    ):
        lines.append(f"{label:<{width}}  {without[key]:>{col}.3e}  {with_[key]:>{col}.3e}")
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    without, with_ = summary["results"]["without_replay"], summary["results"]["with_replay"]
    fig, (ax_mis, ax_lp) = plt.subplots(1, 2, figsize=(11, 4.2))
    n = len(summary["layers"])
    x = np.arange(n)
    ax_mis.bar(
        x - 0.2, [100 * v for v in without["layer_mismatch"]], 0.4, label="without replay", color="tab:red"
    )
    ax_mis.bar(
        x + 0.2, [100 * v for v in with_["layer_mismatch"]], 0.4, label="with replay", color="tab:blue"
    )
    ax_mis.set_xticks(
        x, [name.split(".")[-2] if name.count(".") >= 2 else name for name in summary["layers"]]
    )
    ax_mis.set_xlabel("MoE layer")
    ax_mis.set_ylabel("routed slots differing from rollout (%)")
    ax_mis.set_title("Routing mismatch, training vs rollout")
    for i, v in enumerate(with_["layer_mismatch"]):
        ax_mis.annotate(
            f"{100 * v:.0f}", (i + 0.2, 0), ha="center", va="bottom", fontsize=7, color="tab:blue"
        )
    ax_mis.legend()

    raw = [np.asarray(r["abs_dlogp"]) for r in (without, with_)]
    positive = np.concatenate(raw)[np.concatenate(raw) > 0]
    floor = float(positive.min()) / 2 if positive.size else 1e-8  # exact zeros drawn in the first bin
    values = [np.maximum(v, floor) for v in raw]
    hi = max(float(v.max()) for v in values)
    bins = np.logspace(np.log10(floor), np.log10(max(hi, 10 * floor)) + 0.1, 40)
    for v, r, label, color in (
        (values[0], without, "without", "tab:red"),
        (values[1], with_, "with", "tab:blue"),
    ):
        ax_lp.hist(
            v,
            bins=bins,
            alpha=0.55,
            color=color,
            label=f"{label} replay: mean {r['mean_abs_dlogp']:.2e}, KL(k3) {r['k3_kl']:.1e}",
        )
    ax_lp.set_xscale("log")
    ax_lp.set_xlabel("|log p_training − log p_rollout| per sampled token")
    ax_lp.set_ylabel("tokens")
    ax_lp.set_title("Log-probability gap")
    ax_lp.legend(fontsize=8)
    fig.suptitle(
        f"{summary['architecture']} (random init): bf16 rollout vs fp32 training, "
        f"{summary['new_tokens']} sampled tokens",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success, 1 if replay left any routing mismatch."""
    # One intra-op thread: the matrices are tiny, so on an idle CPU one thread is as fast as all
    # (3.9 s vs 3.7 s, 2 cores), while on a busy one torch's threads spin at barriers and the demo
    # took 1 min 47 s instead. It also makes the numbers independent of the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = _run(args)
    finally:
        torch.set_num_threads(threads)
    public = copy.deepcopy(summary)
    for result in public["results"].values():
        del result["abs_dlogp"]  # per-token values: in the plot, not in the printed results
    if args.json == "-":
        json.dump(public, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(summary))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(public, f, indent=2)
                f.write("\n")
    if args.plot:
        _plot(summary, args.plot)
    leftover = summary["results"]["with_replay"]["slot_mismatch"]
    if leftover != 0:
        print(f"error: routing mismatch with replay is {_pct(leftover)}, expected 0", file=sys.stderr)
        return 1
    return 0
