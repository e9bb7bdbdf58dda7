"""Reference combine and row permutation (gathers; autograd gives the backward).

Shape legend: M rows, R reads per row, N routed rows (``M * R`` without ``-1`` slots), H hidden.
"""

from __future__ import annotations

import torch

from moe_replay.types import ExpertBuckets


def combine(
    y_NH: torch.Tensor, buckets: ExpertBuckets, weights_MR: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    # A -1 slot (no routed row) reads a zero row with a zero weight: it adds nothing, also for a
    # non-finite weight, and its weight's gradient is zero.
    y_MRH = buckets.per_read(y_NH).float()
    weights_MR = torch.where(buckets.slot_of_row_MR >= 0, weights_MR.float(), 0.0)
    return (weights_MR.unsqueeze(-1) * y_MRH).sum(dim=1).to(out_dtype)


def permute_rows(x_MH: torch.Tensor, buckets: ExpertBuckets) -> torch.Tensor:
    # Gather from float32 so the backward sums each row's reads in float32, then round once. Only
    # row_of_slot is read, so -1 entries of slot_of_row need nothing here.
    return x_MH.float()[buckets.row_of_slot_N.long()].to(x_MH.dtype)
