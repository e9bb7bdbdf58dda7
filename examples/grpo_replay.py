"""One GRPO step with rollout routing replay, on a tiny random Qwen3-MoE, FSDP2 over gloo on the CPU.

An RL step of an MoE language model, end to end, small enough to run in seconds:

1. **Model.** A tiny, randomly initialised Qwen3-MoE (seeded: identical on every rank), its MoE
   blocks made routing sites with ``mr.hf.attach``.
2. **Rollout** (rank 0, standing in for the inference engine). A bfloat16 copy samples a group of
   completions per prompt with ``generate`` under ``mr.record``; toy rewards give group-normalised
   advantages (GRPO). The routes, aligned with the sequences by ``mr.hf.align_generation_trace``,
   are saved with ``trace.save``; the batch goes to a safetensors file next to them.
3. **Training** (every rank). The float32 trainer's routers are first nudged (the trainer has
   taken an optimizer step since the rollout weights were synced), so its own routing differs
   from the rollout's. The model is sharded with FSDP2 (``fully_shard`` on every decoder layer
   and on the model), runs with activation checkpointing, and each rank takes its shard of the
   batch in two micro-batches::

       with mr.replay(model, [routes_mb0, routes_mb1]), mr.record(model) as used:
           for mb in micro_batches:
               grpo_loss(token_logp(model, mb), mb, ...).backward()  # gradient accumulation
       optimizer.step()

   ``mr.replay`` with a list gives the k-th forward of every MoE block the k-th micro-batch's
   routes; activation-checkpoint recomputes in backward reuse exactly their forward's routes.
4. **Checks.** On every rank: the routes used in training equal the rollout's on every token the
   rollout routed, and the rest (padding, the last token, which generation never forwarded) hold
   the trainer router's own distinct experts; the step's gradients equal those of a plain
   single-process step (whole batch, no checkpointing, no FSDP), so the recomputes routed as their
   forwards. Rank 0 prints ``mr.compare`` of the rollout's routes with the trainer's, without and
   with replay.

Run it either way (2 processes by default; it exits non-zero if a check fails)::

    python examples/grpo_replay.py                       # starts the processes itself
    torchrun --nproc-per-node 2 examples/grpo_replay.py  # or under torchrun (gloo, env://)

Shape legend: Q prompts, G completions per prompt (the group), B = Q * G sequences, P padded
prompt length, N new tokens, L = P + N sequence length, V vocabulary, K experts per token;
b: the rows of one rank or one micro-batch.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from dataclasses import dataclass

import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch.distributed.fsdp import fully_shard

import moe_replay as mr


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    size = p.add_argument_group("sizes (defaults: a few seconds per process on a CPU core)")
    size.add_argument("--prompts", type=int, default=2, help="distinct prompts")
    size.add_argument("--group", type=int, default=4, help="completions sampled per prompt (GRPO group)")
    size.add_argument("--max-prompt-len", type=int, default=6, help="longest prompt; others are shorter")
    size.add_argument("--new-tokens", type=int, default=6, help="tokens generated per completion")
    size.add_argument("--layers", type=int, default=2, help="decoder layers, each with an MoE block")
    size.add_argument("--hidden", type=int, default=32, help="hidden size")
    size.add_argument("--experts", type=int, default=8, help="experts per MoE block")
    size.add_argument("--top-k", type=int, default=2, help="experts per token")
    size.add_argument("--vocab", type=int, default=64, help="vocabulary (0 is padding)")
    run = p.add_argument_group("run")
    run.add_argument("--world-size", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    run.add_argument("--micro-batches", type=int, default=2, help="micro-batches per rank")
    run.add_argument(
        "--greedy",
        action="store_true",
        help="greedy rollout instead of sampling (a group's completions are then equal: zero advantages)",
    )
    run.add_argument(
        "--reentrant", action="store_true", help="reentrant activation checkpointing (default: non-reentrant)"
    )
    run.add_argument("--router-noise", type=float, default=0.05, help="router perturbation, x its std")
    run.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    run.add_argument("--clip", type=float, default=0.2, help="PPO/GRPO ratio clip")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=None, help="where the rollout files go (default: a temporary folder)")
    args = p.parse_args(argv)
    positive = ("prompts", "group", "max_prompt_len", "new_tokens", "layers", "experts", "top_k")
    for name in (*positive, "world_size", "micro_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        p.error(f"--group must be >= 2 (advantages are normalised within a group), got {args.group}")
    if args.top_k > args.experts:
        p.error(f"--top-k must be <= --experts={args.experts}, got {args.top_k}")
    if args.hidden < 4 or args.hidden % 4:
        p.error(f"--hidden must be a positive multiple of 4 (4 attention heads), got {args.hidden}")
    if args.vocab < 8:
        p.error(f"--vocab must be >= 8, got {args.vocab}")
    if not (args.router_noise >= 0 and args.lr > 0 and 0 < args.clip < 1):
        p.error(
            f"need --router-noise >= 0, --lr > 0 and 0 < --clip < 1, got {args.router_noise}, {args.lr}, "
            f"{args.clip}"
        )
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.world_size
    if (args.prompts * args.group) % (world * args.micro_batches):
        p.error(
            f"--prompts x --group = {args.prompts * args.group} sequences must split evenly over {world} "
            f"ranks x --micro-batches={args.micro_batches}"
        )
    return args


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The tiny random Qwen3-MoE, float32, attached: the same weights on every rank (seeded)."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        max_position_embeddings=2 * (args.max_prompt_len + args.new_tokens),
        pad_token_id=0,
        tie_word_embeddings=False,
        # Weights ~ N(0, 1/H): router logits of unit scale, as in a trained model (transformers'
        # default std 0.02 leaves the routers nearly indifferent between experts).
        initializer_range=args.hidden**-0.5,
    )
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    mr.hf.attach(model)
    return model


def routers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The MoE blocks' routers by module name (``model.layers.0.mlp.gate``, ...)."""
    return {f"{name}.gate": m.gate for name, m in model.named_modules() if name.endswith(".mlp")}


def nudge_routers(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Move every router a little (seeded: the same on every rank), as an optimizer step would."""
    torch.manual_seed(args.seed + 3)
    with torch.no_grad():
        for router in routers(model).values():
            router.weight.add_(args.router_noise * router.weight.std() * torch.randn_like(router.weight))


def enable_activation_checkpointing(model: torch.nn.Module, reentrant: bool) -> None:
    """Hugging Face activation checkpointing of every decoder layer (``torch.utils.checkpoint``)."""
    # transformers >= 5.24 names it activation_checkpointing_enable (the old name still works, with
    # a FutureWarning); earlier 5.x only gradient_checkpointing_enable. moe_replay finds the routes
    # of a recompute through the checkpoint region either way, reentrant or not.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})


# ----------------------------------------------------------------------------------------------
# Rollout (rank 0): generate, rewards, advantages, files
# ----------------------------------------------------------------------------------------------


def rollout(args: argparse.Namespace, policy: torch.nn.Module, out: str) -> None:
    """Sample ``group`` completions per prompt with a bfloat16 copy of ``policy``, record their
    routes, and write ``routes.safetensors`` and ``batch.safetensors`` to ``out``."""
    engine = copy.deepcopy(policy).to(torch.bfloat16).eval()  # the "inference engine"
    g = torch.Generator().manual_seed(args.seed + 1)
    P = args.max_prompt_len
    lengths = [P - i % P for i in range(args.prompts)]  # left-padded prompts of several lengths
    ids_QP = torch.zeros(args.prompts, P, dtype=torch.long)  # token ids 3..V-1; 0 is padding
    for i, n in enumerate(lengths):
        ids_QP[i, P - n :] = torch.randint(3, args.vocab, (n,), generator=g)
    # Each prompt G times, consecutively: rows i*G .. (i+1)*G - 1 are prompt i's group.
    ids_BP = ids_QP.repeat_interleave(args.group, dim=0)
    mask_BP = (ids_BP != 0).long()

    # Sampling from the model's own distribution (temperature 1, no top-k/top-p), so that the
    # logits generate returns are the ones it sampled from.
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    if args.greedy:
        sampling = {"do_sample": False}
    torch.manual_seed(args.seed + 2)
    with mr.record(engine) as trace:
        gen = engine.generate(
            ids_BP,
            attention_mask=mask_BP,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,  # every completion N tokens (no EOS to pad after)
            **sampling,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    seq_BL = gen.sequences
    new_BN = seq_BL[:, P:]
    mask_BL = torch.cat([mask_BP, torch.ones_like(new_BN)], dim=1)
    # The rollout's log-probs of its tokens, from the raw logits it sampled from, as an engine
    # reports them: the "old" log-probs of the GRPO ratio.
    logits_BNV = torch.stack(gen.logits, dim=1).float()
    old_logp_BN = torch.log_softmax(logits_BNV, dim=-1).gather(2, new_BN.unsqueeze(-1)).squeeze(-1)

    # Toy reward: the fraction of even token ids in the completion. GRPO's advantage: the reward
    # normalised within its prompt's group.
    reward_B = (new_BN % 2 == 0).float().mean(dim=1)
    reward_QG = reward_B.view(args.prompts, args.group)
    adv_QG = (reward_QG - reward_QG.mean(dim=1, keepdim=True)) / (reward_QG.std(dim=1, keepdim=True) + 1e-4)

    # generate recorded [B, L - 1, K] per block; aligned: [B, L, K], -1 at padding and the last token.
    routes = mr.hf.align_generation_trace(trace, mask_BL)
    routes.save(os.path.join(out, "routes.safetensors"))  # atomic; ids stored as int16
    batch = {
        "sequences": seq_BL,
        "attention_mask": mask_BL,
        "old_logp": old_logp_BN,
        "advantages": adv_QG.reshape(-1),
        "rewards": reward_B,
    }
    tmp = os.path.join(out, "batch.safetensors.tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in batch.items()}, tmp)
    os.replace(tmp, os.path.join(out, "batch.safetensors"))
    print(
        f"rollout: {len(seq_BL)} sequences ({args.prompts} prompts x {args.group}) of {seq_BL.shape[1]} "
        f"tokens, {'greedy' if args.greedy else 'sampled'} in bfloat16; mean reward "
        f"{reward_B.mean():.3f}; routes of {len(routes)} MoE blocks -> {out}",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# Training (every rank)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatch:
    """Rows of the rollout batch: sequences and mask ``[b, L]``, old log-probs ``[b, N]``,
    advantages ``[b]``."""

    seq_bL: torch.Tensor
    mask_bL: torch.Tensor
    old_logp_bN: torch.Tensor
    adv_b: torch.Tensor

    @classmethod
    def rows(cls, batch: dict[str, torch.Tensor], start: int, stop: int) -> MicroBatch:
        keys = ("sequences", "attention_mask", "old_logp", "advantages")
        return cls(*(batch[k][start:stop] for k in keys))


def token_logp(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Log-probs ``[b, N]`` of the completion tokens under ``model``, teacher-forced."""
    N = mb.old_logp_bN.shape[1]
    # The position ids generate used for left-padded prompts: without them the forward sees other
    # rotary positions than the rollout did, and the free rows' routing differs.
    pos_bL = (mb.mask_bL.cumsum(-1) - 1).clamp(min=0)
    logits_bLV = model(mb.seq_bL, attention_mask=mb.mask_bL, position_ids=pos_bL, use_cache=False).logits
    logits_bNV = logits_bLV[:, -N - 1 : -1].float()  # position t predicts token t + 1
    return torch.log_softmax(logits_bNV, dim=-1).gather(2, mb.seq_bL[:, -N:].unsqueeze(-1)).squeeze(-1)


def grpo_loss(logp_bN: torch.Tensor, mb: MicroBatch, clip: float, num_sequences: int) -> torch.Tensor:
    """The clipped GRPO surrogate of ``mb``'s sequences (token mean per sequence), summed and divided
    by ``num_sequences``: the micro-batches' gradients add up to the mean over the rank's sequences,
    which FSDP averages over the ranks. No KL penalty (beta = 0)."""
    ratio_bN = torch.exp(logp_bN - mb.old_logp_bN)
    adv_b1 = mb.adv_b.unsqueeze(1)
    surrogate_bN = torch.minimum(ratio_bN * adv_b1, ratio_bN.clamp(1 - clip, 1 + clip) * adv_b1)
    return -surrogate_bN.mean(dim=1).sum() / num_sequences


def reference_gradients(
    args: argparse.Namespace, routes: mr.RoutingTrace, batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The same step's gradients the plain way: one process, the whole batch in one forward, no
    checkpointing, no FSDP. Equal gradients mean the checkpointed recomputes routed as their forwards."""
    model = build_model(args)
    nudge_routers(model, args)
    model.train()
    everything = MicroBatch.rows(batch, 0, len(batch["sequences"]))
    with mr.replay(model, routes):
        grpo_loss(token_logp(model, everything), everything, args.clip, len(everything.seq_bL)).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def gather_batch_axis(trace: mr.RoutingTrace, world: int) -> mr.RoutingTrace:
    """Every rank's ``[b, ...]`` trace joined along the batch axis, in rank order (on every rank)."""
    layers = {}
    for name in trace.layer_names:
        parts = [torch.empty_like(trace[name]) for _ in range(world)]
        dist.all_gather(parts, trace[name].contiguous())
        layers[name] = torch.cat(parts)
    return mr.RoutingTrace(layers, num_experts=trace.num_experts, top_k=trace.top_k)


def train(args: argparse.Namespace, rank: int, world: int, out: str) -> None:
    model = build_model(args)  # the rollout policy's weights (same seed) ...
    if rank == 0:
        rollout(args, model, out)
    dist.barrier()  # the rollout files exist
    nudge_routers(model, args)  # ... moved by a step since they were synced to the engine

    routes = mr.RoutingTrace.load(os.path.join(out, "routes.safetensors"))  # [B, L, K] per block
    batch = safetensors.torch.load_file(os.path.join(out, "batch.safetensors"))
    B, L = batch["sequences"].shape  # B splits evenly (parse_args checks)
    per_rank = B // world
    mb_size = per_rank // args.micro_batches
    first = rank * per_rank  # this rank's rows: first .. first + per_rank - 1
    micro_batches = [MicroBatch.rows(batch, i, i + mb_size) for i in range(first, first + per_rank, mb_size)]
    my_routes = routes.slice(first, first + per_rank)  # [b, L, K] per block
    mb_routes = my_routes.split(mb_size)  # one trace per micro-batch, along the batch axis

    # FSDP2: each decoder layer is one unit (all-gathered for its forward and again for its
    # recompute in backward), the root takes the rest (embeddings, final norm, LM head).
    enable_activation_checkpointing(model, args.reentrant)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # For comparison only: the trainer's own routing, without replay (no grad).
    with torch.no_grad(), mr.record(model) as own:
        own_logp = torch.cat([token_logp(model, mb) for mb in micro_batches])

    # The training step: one replay scope for both micro-batches, gradients accumulated. The k-th
    # forward of each MoE block takes mb_routes[k]; the recompute in backward reuses its forward's.
    logp, loss = [], 0.0
    with mr.replay(model, mb_routes), mr.record(model) as used:
        for mb in micro_batches:
            logp_bN = token_logp(model, mb)
            mb_loss = grpo_loss(logp_bN, mb, args.clip, per_rank)
            mb_loss.backward()
            logp.append(logp_bN.detach())
            loss += float(mb_loss.detach())
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # record appended the micro-batches' [mb, L] calls along the token axis ([mb, 2L]; recomputes are
    # not recorded); back to this rank's [b, L] rows:
    own = mr.RoutingTrace.cat(own.split(L, dim=1), dim=0)
    used = mr.RoutingTrace.cat(used.split(L, dim=1), dim=0)

    # Checks on this rank's rows: the rollout's routes on every token it routed ...
    decided_bL = batch["attention_mask"][first : first + per_rank].bool()
    decided_bL[:, -1] = False  # generate never forwarded the last token
    for name in my_routes.layer_names:
        assert torch.equal(used[name][decided_bL], my_routes[name][decided_bL]), f"{name}: not replayed"
        # ... the trainer router's own choice elsewhere: k distinct valid experts per row ...
        free_FK = used[name][~decided_bL]  # F free rows
        assert int(free_FK.min()) >= 0 and bool((free_FK.sort(dim=-1).values.diff(dim=-1) > 0).all()), name
    # ... the gradients of the plain single-process step ...
    reference = reference_gradients(args, routes, batch)
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    if bool(batch["advantages"].any()):  # else (e.g. --greedy) the loss and all gradients are 0
        assert all(bool(grads[f"{name}.weight"].any()) for name in routers(model)), "a router got no gradient"
    # ... and finite weights after the optimizer step.
    assert all(torch.isfinite(p.detach().full_tensor()).all() for p in model.parameters())

    # Summary over all ranks' rows (collectives: every rank takes part).
    without = mr.compare(routes, gather_batch_axis(own, world))
    with_ = mr.compare(routes, gather_batch_axis(used, world))
    assert without.slot_mismatch > 0, "the trainer routes as the rollout even without replay: nothing to test"
    assert with_.slot_mismatch == 0 and with_.token_mismatch == 0
    old_logp = torch.cat([mb.old_logp_bN for mb in micro_batches])
    stats = torch.stack(
        [(own_logp - old_logp).abs().mean(), (torch.cat(logp) - old_logp).abs().mean(), torch.tensor(loss)]
    )
    dist.all_reduce(stats)
    gap_without, gap_with, loss = (stats / world).tolist()
    if rank == 0:
        print(
            f"training: {world} ranks x {args.micro_batches} micro-batches of {mb_size} sequences, FSDP2 "
            f"(fully_shard, gloo), activation checkpointing; GRPO loss {loss:.4f}, one AdamW step"
        )
        print(f"rollout vs trainer routes, without replay: {_brief(without)}")
        print(f"rollout vs trainer routes, with replay:    {_brief(with_)}")
        print(f"mean |log p(train) - log p(rollout)|: {gap_without:.2e} without replay, {gap_with:.2e} with")
        print(
            "checks passed: replayed routes equal the rollout's on every routed token; gradients equal "
            "a single-process step without checkpointing"
        )


def _brief(report: mr.CompareReport) -> str:
    return (
        f"{report.slot_mismatch:.1%} of routed slots differ, {report.token_mismatch:.1%} of tokens "
        f"differ in >= 1 block"
    )


# ----------------------------------------------------------------------------------------------
# Processes: torchrun or spawn
# ----------------------------------------------------------------------------------------------


def worker(rank: int, world: int, init_method: str, args: argparse.Namespace, out: str | None) -> None:
    torch.set_num_threads(1)  # tiny model; keeps the processes from fighting over cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        if out is None:  # under torchrun without --out: a temporary folder chosen by rank 0, kept
            holder = [tempfile.mkdtemp(prefix="grpo_replay_") if rank == 0 else None]
            dist.broadcast_object_list(holder, src=0)
            out = holder[0]
        train(args, rank, world, out)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
    if under_torchrun():  # one process per rank, started by torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args, args.out)
        return 0
    with tempfile.TemporaryDirectory(prefix="grpo_replay_") as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")
        out = args.out if args.out is not None else tmp
        # fork where there is one: the children inherit the imported torch and transformers instead
        # of importing them again (seconds per process on a small machine).
        start_method = "fork" if sys.platform == "linux" else "spawn"
        worker_args = (args.world_size, init_method, args, out)
        mp.start_processes(worker, args=worker_args, nprocs=args.world_size, start_method=start_method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
