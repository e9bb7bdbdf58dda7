"""Expert parallelism's metadata stages: where an origin's tokens go (:func:`send_plan`) and the
buckets of the rows a receiver got (:func:`received_buckets`).

Shape legend: T tokens, K experts per token, W ranks, C chunks, M received rows, E experts.

Both are compute, not communication, so every transport shares them. Each has a plain torch
reference, which runs for any backend; a backend with faster kernels for them is listed in
:data:`KERNELS` (the ``triton`` one: two launches for the plan, the dispatch's for the buckets,
where the reference takes about twenty torch ops, each costing the host more than the device at
the sizes expert parallelism runs).
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

import torch

from moe_replay.types import ExpertBuckets, SendPlan

if TYPE_CHECKING:
    from moe_replay.backends.base import Backend

KERNELS: dict[str, dict[str, str]] = {
    "triton": {
        "send_plan": "moe_replay.backends.triton.send_plan",
        "received_buckets": "moe_replay.backends.triton.dispatch",
    },
}
"""backend name -> stage -> the module whose function of that name implements it."""


def _kernel(backend: Backend, stage: str) -> object | None:
    return _kernel_of(backend.name, stage)


@functools.cache
def _kernel_of(name: str, stage: str) -> object | None:
    module = KERNELS.get(name, {}).get(stage)
    if module is None:
        return None
    return torch.compiler.disable(getattr(importlib.import_module(module), stage))


def send_plan(
    backend: Backend,
    expert_ids_TK: torch.Tensor,
    rank_offsets_W1: torch.Tensor,
    chunks: int,
    counts_WC3: torch.Tensor,
) -> SendPlan:
    """The sender's metadata, on the device, without host syncs: the :class:`SendPlan` of tokens
    routed to ``expert_ids_TK`` (global ids; rank r holds experts
    ``rank_offsets_W1[r]:rank_offsets_W1[r + 1]``, int32), and in ``counts_WC3[r, c, 0]`` /
    ``[r, c, 1]`` (int32, column 2 untouched) the rows chunk c sends to rank r and their (token,
    expert) pairs."""
    kernel = _kernel(backend, "send_plan")
    if kernel is None:
        from moe_replay.backends.torch.send_plan import send_plan as kernel
    return kernel(expert_ids_TK, rank_offsets_W1, chunks, counts_WC3)  # type: ignore[operator]


def received_buckets(
    backend: Backend,
    meta_MM: torch.Tensor,
    local_of_expert_E: torch.Tensor,
    num_local: int,
    num_pairs: int,
) -> ExpertBuckets:
    """The receiver's metadata: buckets of received token rows over this rank's ``num_local``
    experts, from their ``meta_MM`` (``[gate weights_K | global expert ids_K]``, float32).

    Each row is read R = 2K times, once per column of ``meta_MM``, so that ``meta_MM`` itself is
    the combine's weights: read k < K is pair (row, k), slot -1 where its expert is on another
    rank (``local_of_expert_E[id] == num_local``); read K + k (an id) has slot -1 always, adding
    nothing and getting a zero gradient. A negative id is no expert's (the padding rows of a
    capacity). The ``num_pairs`` pairs on this rank are the slots, in ascending (row, k) order
    within each expert (the ``ExpertBuckets`` contract). The reference: a dispatch over the local
    experts and a sink bucket (other ranks' experts), which the stable sort puts last and which
    is cut off."""
    kernel = _kernel(backend, "received_buckets")
    if kernel is not None:
        return kernel(meta_MM, local_of_expert_E, num_local, num_pairs)  # type: ignore[operator,no-any-return]
    K = meta_MM.shape[1] // 2
    ids_MK = meta_MM[:, K:].long()  # ids are exact float32 values
    local_ids_MK = torch.where(ids_MK >= 0, local_of_expert_E[ids_MK.clamp_min(0)], num_local)
    pairs = backend.dispatch(local_ids_MK, num_local + 1)
    slot_of_row_MK = torch.where(local_ids_MK < num_local, pairs.slot_of_row_MR, -1)
    return ExpertBuckets(
        row_of_slot_N=pairs.row_of_slot_N[:num_pairs],
        slot_of_row_MR=torch.cat([slot_of_row_MK, torch.full_like(slot_of_row_MK, -1)], dim=1),
        offsets_E1=pairs.offsets_E1[: num_local + 1],
    )
