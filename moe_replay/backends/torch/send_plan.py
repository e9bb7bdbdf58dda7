"""Expert parallelism's sender metadata in plain torch ops: the reference ``Backend.send_plan``.

Shape legend: T tokens, K experts per token, W ranks, C chunks, T_c tokens per chunk, L places per
chunk (see ``SendPlan``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_replay.types import SendPlan


def send_plan(
    expert_ids_TK: torch.Tensor,
    rank_offsets_W1: torch.Tensor,
    chunks: int,
    counts_WC3: torch.Tensor,
) -> SendPlan:
    """``Backend.send_plan``: one cumsum over the 0/1 mask "token t sends a row to rank r", laid
    out as (chunk, rank, token), numbers each chunk's sent pairs; each pair's token is scattered to
    its place, the unsent pairs' to a spare (the place before the chunk's first: the previous
    chunk's spare, or the last one)."""
    T, K = expert_ids_TK.shape
    W = rank_offsets_W1.numel() - 1
    Tc, L = SendPlan.places(T, K, W, chunks)
    device = expert_ids_TK.device
    ids_TK = expert_ids_TK.to(torch.int32)

    rank_TK = torch.bucketize(ids_TK, rank_offsets_W1[1:W].contiguous(), right=True, out_int32=True)
    ranks_W11 = torch.arange(W, dtype=torch.int32, device=device).view(W, 1, 1)
    pairs_WT = (rank_TK == ranks_W11).sum(dim=2, dtype=torch.int32)  # t's experts on r
    sent_WT = pairs_WT.clamp(max=1)  # t sends a row to r
    pad = chunks * Tc - T
    counts_WC3[:, :, 0] = F.pad(sent_WT, (0, pad)).view(W, chunks, Tc).sum(dim=2)
    counts_WC3[:, :, 1] = F.pad(pairs_WT, (0, pad)).view(W, chunks, Tc).sum(dim=2)

    sent_CWT = F.pad(sent_WT, (0, pad)).view(W, chunks, Tc).transpose(0, 1)
    upto_CWT = torch.cumsum(sent_CWT.reshape(chunks, W * Tc), dim=1, dtype=torch.int32).view(chunks, W, Tc)
    slot_CTW = torch.empty(chunks, Tc, W, dtype=torch.int32, device=device)
    minus_one = torch.tensor(-1, dtype=torch.int32, device=device)
    torch.addcmul(minus_one, upto_CWT, sent_CWT, out=slot_CTW.transpose(1, 2))  # count - 1, or -1
    token_of_slot_CL = torch.zeros(chunks, L, dtype=torch.int32, device=device)
    chunk_start_C11 = torch.arange(0, chunks * L, L, dtype=torch.int32, device=device).view(chunks, 1, 1)
    token_1T1 = torch.arange(Tc, dtype=torch.int32, device=device).view(1, Tc, 1)
    token_of_slot_CL.view(-1)[slot_CTW + chunk_start_C11] = token_1T1  # distinct places, and spares
    ends_CW = upto_CWT[:, :, -1] if Tc else upto_CWT.new_zeros(chunks, W)
    return SendPlan(
        chunk_tokens=Tc,
        slot_of_row_TW=slot_CTW.view(chunks * Tc, W)[:T],
        token_of_slot_CL=token_of_slot_CL,
        offsets_CW1=F.pad(ends_CW, (1, 0)),
    )
