"""Helpers shared by the Triton kernels.

Interpreter note: under ``TRITON_INTERPRET=1`` (how CI runs these kernels on the CPU) Triton 3.6's
``tl.dot`` multiplies bfloat16 operands as their raw 16-bit patterns (errors of ~1e10 on unit
data). Every kernel therefore takes ``DOT_FP32``: when set, operands are upcast to float32 before
``tl.dot``. Launchers set it only when interpreting; on a GPU bf16 goes to the tensor cores.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

logger = logging.getLogger(__name__)


@functools.cache
def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (it reads the variable when a kernel is
    decorated, so the answer holds for the process; cached: launchers ask on every call)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a stage must record an autograd node: gradients are on and an input wants one.
    Without, stages call their forward directly (``Function.apply`` costs host time per call)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=1024)
def pow2(n: int, minimum: int = 1) -> int:
    return max(triton.next_power_of_2(max(n, 1)), minimum)


@functools.cache
def dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """``DOT_FP32`` (interpreter workaround) and ``IEEE`` (full-precision float32 dots, not TF32)."""
    return {"DOT_FP32": interpreting() and dtype != torch.float32, "IEEE": dtype == torch.float32}


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation (see the module docstring for the flags)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def expert_of_tile(offsets_ptr, pid_m, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map the ``pid_m``-th row tile of a grouped GEMM to its expert.

    Expert e owns rows ``offsets[e]:offsets[e+1]``, cut into ``ceil(count / BLOCK_M)`` tiles, tiles
    numbered expert after expert. Returns (expert, first row of the tile, end of the expert's rows,
    whether the tile exists). Computed from ``offsets`` on the device: no host synchronisation.
    """
    e_idx = tl.arange(0, E_PAD)
    lo = tl.load(offsets_ptr + e_idx, mask=e_idx < E, other=0)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=e_idx < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    here = e_idx == expert
    first_tile = tl.sum(tl.where(here, tiles_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(here, lo, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(here, hi, 0), 0)
    return expert, row_start, row_end, pid_m < tl.sum(tiles, 0)


@triton.jit
def grouped_tile_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in a grid of ``num_m x num_n`` tiles, ``GROUP_M`` row tiles
    at a time: the programs running together share weight tiles (columns) and row tiles, so
    both are read from L2. Walking all columns of one row tile first re-reads the whole weight
    matrix per row tile, which costs ~30% where an expert's weights outgrow L2 (Mixtral, H100)."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


def max_row_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of ``sum_e ceil(count_e / block_m)``, known on the host without a sync."""
    return triton.cdiv(num_rows, block_m) + min(num_experts, num_rows)


# Tiles that did not fit a device's shared memory, and the smaller ones that ran instead.
_SHRUNK: dict[tuple, dict] = {}


def launch_fitting(kernel: str, cfg: dict, device: torch.device, launch: Callable[[dict], None]) -> None:
    """``launch(cfg)``; if those tiles need more shared memory than the device has (the tables are
    tuned on an H100's 227 KB; an A100 has 163 KB), retry with one pipeline stage fewer, then with
    half the K block, and remember what ran. The error comes when the kernel loads, before
    anything is enqueued, so a retry is safe (and happens in warm-up, not inside graph capture)."""
    key = (kernel, tuple(sorted(cfg.items())), device.type, device.index)
    cfg = _SHRUNK.get(key, cfg)
    while True:
        try:
            launch(cfg)
            return
        except OutOfResources as error:
            if cfg["num_stages"] > 2:
                smaller = {**cfg, "num_stages": cfg["num_stages"] - 1}
            elif cfg["BLOCK_K"] > 16:
                smaller = {**cfg, "BLOCK_K": cfg["BLOCK_K"] // 2}
            else:
                raise
            logger.info("moe_replay: %s tiles %s do not fit (%s); trying %s", kernel, cfg, error, smaller)
            _SHRUNK[key] = cfg = smaller
