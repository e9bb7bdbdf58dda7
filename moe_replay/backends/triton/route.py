"""Fused routing: scores, bias, group limit, top-k, forced-id merge and gate weights in one pass.

Shape legend: T tokens, E experts, K experts per token; ``*_PAD`` are powers of two >= the size.

One program owns ``BLOCK_T`` rows of logits and keeps them in registers: top-k is K rounds of
"arg-max, then knock out", which for E <= 256 costs less than reading the logits. The backward
writes dense ``dlogits [T, E]`` rows (zeros off the selected experts) without atomics.

Selection ranks experts exactly as the reference does: without a bias it ranks the logits (softmax
and sigmoid are monotonic, and ranking the logits makes every backend choose bit-identically);
with a bias it ranks ``scores + bias``. Ties go to the lower expert index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_replay.backends.triton._common import needs_autograd, pow2
from moe_replay.config import MoEConfig
from moe_replay.types import Routing

_KNOCKED_OUT = tl.constexpr(-(2**63) + 1)  # below every packed selection key (route forward)


@triton.jit
def _route_fwd_kernel(
    logits_ptr,
    bias_ptr,
    forced_ptr,
    ids_ptr,
    weights_ptr,
    flag_ptr,
    T,
    E,
    scale,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_FORCED: tl.constexpr,
    CHECK: tl.constexpr,
    LOGIT_IN_KEY: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    k_cols = tl.arange(0, K_PAD)
    rows64 = rows.to(tl.int64)
    logits = tl.load(
        logits_ptr + rows64[:, None] * E + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    logits = tl.where(row_ok[:, None] | ~col_ok[None, :], logits, 0.0)  # rows past T: finite, unused

    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        row_max = tl.max(logits, 1)
        exps = tl.exp(logits - row_max[:, None])
        row_sum = tl.sum(exps, 1)
        scores = exps / row_sum[:, None]
    scores = tl.where(col_ok[None, :], scores, 0.0)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        select = scores + bias[None, :]
    else:
        select = scores
    rank = select if HAS_BIAS else logits
    rank = tl.where(col_ok[None, :], rank, float("-inf"))

    if N_GROUP > 1:
        group_of = cols // GROUP_SIZE
        group_score = tl.full([BLOCK_T, E_PAD], float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = ((group_of == g) & col_ok)[None, :]
            v = tl.where(in_g, select, float("-inf"))
            best = tl.max(v, 1)
            if GROUP_SIZE >= 2:
                first = tl.min(tl.where(v == best[:, None], cols[None, :], E_PAD), 1)
                second = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), v), 1)
                best = best + second
            group_score = tl.where(in_g, best[:, None], group_score)
        keep = tl.zeros([BLOCK_T, E_PAD], tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(group_score, 1)
            first = tl.min(tl.where(group_score == top[:, None], cols[None, :], E_PAD), 1)
            in_best = group_of[None, :] == (first // GROUP_SIZE)[:, None]
            keep = keep | in_best
            group_score = tl.where(in_best, float("-inf"), group_score)
        rank = tl.where(keep, rank, float("-inf"))

    # Top-k over packed int64 keys: the rank's order-preserving int32 image in the high word, the
    # reversed column in the low word, so keys are distinct, the largest is the best expert and,
    # among equal ranks, the lower column wins. -0.0 ranks as +0.0 (a tie); a knocked-out key sorts
    # below every real one, -inf included. ``tl.topk`` (a bitonic network) returns the K_PAD best
    # in descending order, the padding slots past K being the next best (never stored).
    rank = tl.where(rank == 0.0, 0.0, rank)
    bits = rank.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (E_PAD - 1 - cols)[None, :].to(tl.int64)
    slot_ok = row_ok[:, None] & (k_cols < K)[None, :]
    if HAS_FORCED:
        # One load of the [BLOCK_T, K] tile: per-slot loads inside the loops below would each wait
        # on global memory (8 us of a 61 us decode step at top-8, H100).
        forced = tl.load(forced_ptr + rows64[:, None] * K + k_cols[None, :], mask=slot_ok, other=-1)
        if CHECK:  # routing.route.bad_forced_rows, on the tile already loaded
            bad = slot_ok & ((forced < -1) | (forced >= E))
            for j in range(K):
                f_j = tl.sum(tl.where(k_cols[None, :] == j, forced, 0), 1)
                bad = bad | (slot_ok & (k_cols[None, :] > j) & (forced >= 0) & (forced == f_j[:, None]))
            bad_row = (tl.max(bad.to(tl.int32), 1) > 0) & row_ok
            countdown = tl.max(tl.where(bad_row, T - rows, 0), 0)  # T - the block's first bad row
            if countdown > 0:
                tl.atomic_max(flag_ptr, countdown)
        forced = tl.where((forced >= 0) & (forced < E), forced, -1)  # validate=False: out of range is free
        ids = forced
        free = slot_ok & (forced < 0)
        # Replay usually forces every slot; then the block skips selection altogether.
        if tl.sum(free.to(tl.int32)) > 0:
            for j in range(K):  # forced experts are not the router's to pick again
                f = tl.sum(tl.where(k_cols[None, :] == j, forced, 0), 1)
                key = tl.where(cols[None, :] == f[:, None], _KNOCKED_OUT, key)
            best_ids = E_PAD - 1 - (tl.topk(key, K_PAD, dim=1) & (E_PAD - 1)).to(tl.int32)
            # The n-th free slot of a row takes the row's n-th best expert.
            nth = tl.cumsum(free.to(tl.int32), 1) - free.to(tl.int32)
            at = nth[:, :, None] == k_cols[None, None, :]
            ids = tl.where(free, tl.sum(tl.where(at, best_ids[:, None, :], 0), 2), forced)
    else:
        best_keys = tl.topk(key, K_PAD, dim=1)
        ids = E_PAD - 1 - (best_keys & (E_PAD - 1)).to(tl.int32)
    if LOGIT_IN_KEY:  # no bias, groups or forced ids: the keys hold the chosen logits themselves
        high = (best_keys >> 32).to(tl.int32)
        picked_logits = tl.where(high >= 0, high, high ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    else:  # one gather from the tile just read (cached)
        picked_logits = tl.load(logits_ptr + rows64[:, None] * E + ids, mask=slot_ok, other=0.0).to(
            tl.float32
        )

    k_ok = k_cols < K
    if NORM:
        if SIGMOID:  # log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|))
            z = tl.minimum(picked_logits, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(picked_logits)))
        else:
            z = picked_logits
        z = tl.where(k_ok[None, :], z, float("-inf"))
        ez = tl.exp(z - tl.max(z, 1)[:, None])
        weights = ez / tl.sum(ez, 1)[:, None]
    elif SIGMOID:
        weights = tl.sigmoid(picked_logits)
    else:  # the softmax at the chosen logits, as the scores above computed it
        weights = tl.exp(picked_logits - row_max[:, None]) / row_sum[:, None]
    weights = weights * scale
    if CHECK:
        weights = tl.where(bad_row[:, None], float("nan"), weights)

    out = rows64[:, None] * K + k_cols[None, :]
    out_ok = row_ok[:, None] & k_ok[None, :]
    tl.store(ids_ptr + out, ids, mask=out_ok)
    tl.store(weights_ptr + out, weights, mask=out_ok)


@triton.jit
def _route_bwd_kernel(
    logits_ptr,
    ids_ptr,
    dweights_ptr,
    dlogits_ptr,
    T,
    E,
    scale,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr,
    NORM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    k_cols = tl.arange(0, K_PAD)
    k_ok = k_cols < K
    tile_ok = row_ok[:, None] & col_ok[None, :]
    logits = tl.load(logits_ptr + rows64[:, None] * E + cols[None, :], mask=tile_ok, other=float("-inf"))
    logits = tl.where(row_ok[:, None] | ~col_ok[None, :], logits, 0.0)  # rows past T: finite, unused
    slot_ok = row_ok[:, None] & k_ok[None, :]
    slot_off = rows64[:, None] * K + k_cols[None, :]
    ids = tl.load(ids_ptr + slot_off, mask=slot_ok, other=0)
    dw = tl.load(dweights_ptr + slot_off, mask=slot_ok, other=0.0).to(tl.float32) * scale

    picked = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    for j in range(K):
        id_j = tl.sum(tl.where(k_cols[None, :] == j, ids, 0), 1)
        l_j = tl.sum(tl.where(cols[None, :] == id_j[:, None], logits, 0.0), 1)
        picked = tl.where(k_cols[None, :] == j, l_j[:, None], picked)

    if NORM:
        if SIGMOID:
            z = tl.minimum(picked, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(picked)))
        else:
            z = picked
        z = tl.where(k_ok[None, :], z, float("-inf"))
        ez = tl.exp(z - tl.max(z, 1)[:, None])
        p = ez / tl.sum(ez, 1)[:, None]
        dz = p * (dw - tl.sum(p * dw, 1)[:, None])
        d_picked = dz * (1.0 - tl.sigmoid(picked)) if SIGMOID else dz
    elif SIGMOID:
        s = tl.sigmoid(picked)
        d_picked = dw * s * (1.0 - s)
    else:
        d_picked = dw  # the dense softmax term is added below

    dlogits = tl.zeros([BLOCK_T, E_PAD], tl.float32)
    if not NORM and not SIGMOID:
        exps = tl.exp(logits - tl.max(logits, 1)[:, None])
        probs = exps / tl.sum(exps, 1)[:, None]
        weighted = tl.zeros([BLOCK_T], tl.float32)  # sum_j dw_j * P[id_j]
        for j in range(K):
            id_j = tl.sum(tl.where(k_cols[None, :] == j, ids, 0), 1)
            dw_j = tl.sum(tl.where(k_cols[None, :] == j, dw, 0.0), 1)
            at = cols[None, :] == id_j[:, None]
            p_j = tl.sum(tl.where(at, probs, 0.0), 1)
            weighted += dw_j * p_j
            dlogits += tl.where(at, (dw_j * p_j)[:, None], 0.0)
        dlogits -= probs * weighted[:, None]
    else:
        for j in range(K):
            id_j = tl.sum(tl.where(k_cols[None, :] == j, ids, 0), 1)
            d_j = tl.sum(tl.where(k_cols[None, :] == j, d_picked, 0.0), 1)
            dlogits += tl.where(cols[None, :] == id_j[:, None], d_j[:, None], 0.0)
    tl.store(dlogits_ptr + rows64[:, None] * E + cols[None, :], dlogits, mask=tile_ok)


def _block_t(e_pad: int) -> int:
    # About 2K fp32 values per live [BLOCK_T, E_PAD] tile keeps it in registers and, at T=4096 and
    # E=128, gives two programs per multiprocessor: the top-k loop is a latency chain per program.
    return max(1, min(64, 2048 // e_pad))


def _flags(cfg: MoEConfig) -> tuple[dict[str, int], dict[str, int]]:
    groups = cfg.n_group or 1
    return {
        "K": cfg.top_k,
        "K_PAD": pow2(cfg.top_k),
        "E_PAD": pow2(cfg.num_experts, 16),
        "SIGMOID": cfg.scoring == "sigmoid",
        "NORM": cfg.norm_topk_prob,
    }, {"N_GROUP": groups, "TOPK_GROUP": cfg.topk_group or 1, "GROUP_SIZE": cfg.num_experts // groups}


def route_fwd(
    logits_TE: torch.Tensor,
    cfg: MoEConfig,
    forced_TK: torch.Tensor | None,
    bias_E: torch.Tensor | None,
    tiles: dict | None = None,
    bad_row_flag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_TK, weights_TK)``; ``tiles`` (``BLOCK_T``, ``num_warps``) overrides for tuning;
    ``bad_row_flag``: check the forced ids on the device (``Backend.route``)."""
    T, E = logits_TE.shape
    ids_TK = torch.empty(T, cfg.top_k, dtype=torch.int32, device=logits_TE.device)
    weights_TK = torch.empty(T, cfg.top_k, dtype=torch.float32, device=logits_TE.device)
    if T == 0:
        return ids_TK, weights_TK
    shared, groups = _flags(cfg)
    tiles = tiles or {"BLOCK_T": _block_t(shared["E_PAD"]), "num_warps": 4}
    forced = forced_TK.to(torch.int32).contiguous() if forced_TK is not None else ids_TK
    bias = bias_E.float().contiguous() if bias_E is not None else logits_TE
    check = bad_row_flag is not None and forced_TK is not None
    flag = bad_row_flag if check else ids_TK
    _route_fwd_kernel[(triton.cdiv(T, tiles["BLOCK_T"]),)](
        logits_TE, bias, forced, ids_TK, weights_TK, flag, T, E, float(cfg.routed_scaling_factor),
        HAS_BIAS=bias_E is not None, HAS_FORCED=forced_TK is not None, CHECK=check,
        LOGIT_IN_KEY=bias_E is None and forced_TK is None and groups["N_GROUP"] == 1,
        **shared, **groups, **tiles,
    )  # fmt: skip
    return ids_TK, weights_TK


def route_bwd(
    logits_TE: torch.Tensor, ids_TK: torch.Tensor, dweights_TK: torch.Tensor, cfg: MoEConfig
) -> torch.Tensor:
    T, E = logits_TE.shape
    dlogits_TE = torch.empty(T, E, dtype=torch.float32, device=logits_TE.device)
    if T == 0:
        return dlogits_TE
    shared, _ = _flags(cfg)
    block_t = _block_t(shared["E_PAD"])
    _route_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits_TE, ids_TK, dweights_TK.contiguous(), dlogits_TE, T, E, float(cfg.routed_scaling_factor),
        BLOCK_T=block_t, **shared, num_warps=4,
    )  # fmt: skip
    return dlogits_TE


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, forced_TK, bias_E, cfg, bad_row_flag):  # type: ignore[override]
        ids_TK, weights_TK = route_fwd(logits_TE, cfg, forced_TK, bias_E, bad_row_flag=bad_row_flag)
        ctx.mark_non_differentiable(ids_TK)
        ctx.save_for_backward(logits_TE, ids_TK)
        ctx.cfg = cfg
        return ids_TK, weights_TK

    @staticmethod
    def backward(ctx, _dids, dweights_TK):  # type: ignore[override]
        logits_TE, ids_TK = ctx.saved_tensors
        return route_bwd(logits_TE, ids_TK, dweights_TK, ctx.cfg), None, None, None, None


def route(
    logits_TE: torch.Tensor,
    cfg: MoEConfig,
    forced_TK: torch.Tensor | None,
    bias_E: torch.Tensor | None,
    bad_row_flag: torch.Tensor | None = None,
) -> Routing:
    logits_TE = logits_TE.float().contiguous()
    if needs_autograd(logits_TE):
        ids_TK, weights_TK = _Route.apply(logits_TE, forced_TK, bias_E, cfg, bad_row_flag)
    else:
        ids_TK, weights_TK = route_fwd(logits_TE, cfg, forced_TK, bias_E, bad_row_flag=bad_row_flag)
    return Routing(ids_TK, weights_TK)
