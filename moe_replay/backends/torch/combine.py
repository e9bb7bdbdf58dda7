"""Reference combine and row permutation (gathers; autograd gives the backward).

Shape legend: M rows, R reads per row, N = M * R routed rows, H hidden.
"""

from __future__ import annotations

import torch

from moe_replay.backends.base import ExpertBuckets


def combine(
    y_NH: torch.Tensor, buckets: ExpertBuckets, weights_MR: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    y_MRH = y_NH[buckets.slot_of_row_MR.long()].float()
    return (weights_MR.float().unsqueeze(-1) * y_MRH).sum(dim=1).to(out_dtype)


def permute_rows(x_MH: torch.Tensor, buckets: ExpertBuckets) -> torch.Tensor:
    # Gather from float32 so the backward sums each row's R reads in float32, then round once.
    return x_MH.float()[buckets.row_of_slot_N.long()].to(x_MH.dtype)
