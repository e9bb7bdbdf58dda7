"""Reference quantized experts: GEMMs with exact accumulation, then scaling.

Shape legend: n rows of one expert, D input features, O output features, G weight groups.

Exactness: every product of an int8 activation and an int8/int4 weight is at most 127 * 127, so a
group's sum of ``group_size`` products is an integer below 2**53 for any realistic size and float64
matmuls add such integers exactly, in any order. That gives int32 semantics without building a
``[tokens, O, D]`` integer tensor (memory stays ``[n, O]``). Likewise for fp8: an e4m3 value has 4
significant bits and magnitude in [2**-9, 448], so a product has 8 bits in [2**-18, 2**18) and a sum
of 128 of them spans fewer than 53 bits: float64 adds a block's products exactly.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from moe_replay.quantize import QuantizedWeight, quantize_row_groups, quantize_rows
from moe_replay.types import ExpertBuckets


def quant_linear(x_nD: torch.Tensor, weight: QuantizedWeight, expert: int) -> torch.Tensor:
    """``x @ w.T`` with x quantized per row to int8 (fp8 weights: per 128 inputs to e4m3);
    float32 ``[n, O]``."""
    if weight.weight_dtype == "fp8":
        return _fp8_linear(x_nD, weight, expert)
    q_x, scale_n = quantize_rows(x_nD)
    q_w = weight.int_weight(expert)
    group = weight.group_size
    acc_nO = torch.zeros(x_nD.shape[0], weight.out_features, dtype=torch.float64, device=x_nD.device)
    for g in range(weight.scale.shape[2]):
        cols = slice(g * group, (g + 1) * group)
        exact_sum_nO = q_x[:, cols].double() @ q_w[:, cols].double().T
        acc_nO += exact_sum_nO * weight.scale[expert, :, g].double()
    return (acc_nO * scale_n.double().unsqueeze(1)).float()


def _fp8_linear(x_nD: torch.Tensor, weight: QuantizedWeight, expert: int) -> torch.Tensor:
    q_x, scale_nG = quantize_row_groups(x_nD, weight.group_size)
    q_w = weight.int_weight(expert).double()
    scale_OG = weight.row_scales(expert).double()
    group = weight.group_size
    acc_nO = torch.zeros(x_nD.shape[0], weight.out_features, dtype=torch.float64, device=x_nD.device)
    for g in range(scale_OG.shape[1]):
        cols = slice(g * group, (g + 1) * group)
        exact_sum_nO = q_x[:, cols].double() @ q_w[:, cols].T
        acc_nO += exact_sum_nO * scale_nG[:, g : g + 1].double() * scale_OG[:, g]
    return acc_nO.float()


def quant_expert_mlp(
    x_MH: torch.Tensor, buckets: ExpertBuckets, gate_up: QuantizedWeight, down: QuantizedWeight
) -> torch.Tensor:
    """Float32 ``y_NH`` in bucket order: each expert's SwiGLU with both GEMMs quantized."""
    x_NH = x_MH[buckets.row_of_slot_N.long()]
    bounds = buckets.offsets_E1.tolist()
    y_NH = torch.empty(x_NH.shape[0], down.out_features, dtype=torch.float32, device=x_MH.device)
    for e, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if lo == hi:
            continue
        gate_nI, up_nI = quant_linear(x_NH[lo:hi], gate_up, e).chunk(2, dim=1)
        y_NH[lo:hi] = quant_linear(F.silu(gate_nI) * up_nI, down, e)
    return y_NH
