"""Reference dispatch: group routed slots by expert with a stable sort (metadata only).

Shape legend: M rows, R reads per row, N = M * R routed slots, E experts.
"""

from __future__ import annotations

import torch

from moe_replay.types import ExpertBuckets


def dispatch(expert_ids_MR: torch.Tensor, num_experts: int) -> ExpertBuckets:
    M, R = expert_ids_MR.shape
    flat_N = expert_ids_MR.reshape(-1).long()
    order_N = torch.argsort(flat_N, stable=True)  # sorted position -> flat slot m * R + r
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat_N.device)
    offsets_E1[1:] = torch.cumsum(counts_E, dim=0)
    slot_N = torch.empty_like(order_N)
    slot_N[order_N] = torch.arange(flat_N.numel(), device=flat_N.device)
    return ExpertBuckets(
        row_of_slot_N=torch.div(order_N, R, rounding_mode="floor").to(torch.int32),
        slot_of_row_MR=slot_N.view(M, R).to(torch.int32),
        offsets_E1=offsets_E1,
    )
