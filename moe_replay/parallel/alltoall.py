"""The ``alltoall`` expert-parallel dispatcher: each routed row goes only to its expert's owner.

Shape legend: W ranks, T this rank's tokens, K experts per token, N = T * K routed rows of this
rank, M rows received from all ranks, E experts of the layer, E_loc this rank's experts, H hidden.

Data movement, on each rank::

    buckets = dispatch(ids_TK, E)            rows sorted by global expert = grouped by owner rank
    all-to-all of per-expert row counts (+ a grad flag)                (one host sync)
    x_NH = permute_rows(x_TH, buckets) ─► all-to-all ─► x_MH           (source-rank order)
    dispatch(ids_M1 of local experts, E_loc) ─► experts + combine(weights 1): y_MH, received order
    y_MH ─► all-to-all back ─► y_NH          (in ``buckets`` order again)
    y_TH = combine(y_NH, buckets, weights_TK)                         on the origin rank

These are the single-process layer's stages (``parallel.local``) with the rows' trip to their
experts and back in the middle; the gate weights never leave their rank. Backward runs the
adjoints in reverse: combine, the all-to-all back (gradients of the expert outputs travel to the
experts), the experts' backward, the all-to-all forth (gradients of the rows travel home),
``permute_rows``' backward. Router gradients stay local; expert gradients land on the owner.

Uneven splits need no padding: ``all_to_all_single`` takes per-rank row counts, which every
receiver learns from the count exchange. Received rows arrive source-major and, within a
source, sorted by expert; the second dispatch regroups them by local expert (stable, so within an
expert by source rank, then by token: deterministic).

Precision notes: expert outputs travel back in x's dtype (bf16 halves the return traffic); the
origin's combine then sums the K weighted rows in float32 as the single-process layer does, whose
expert outputs may stay float32: in bf16 the results differ by that one rounding per row.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from moe_replay.parallel.collectives import (
    align_requires_grad,
    all_to_all_ints,
    all_to_all_rows,
    check_device,
    input_needs_grad,
)

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend
    from moe_replay.parallel.partition import ExpertPartition
    from moe_replay.routing.route import Routing


class AllToAllDispatcher:
    """``dispatch(x_TH, routing, experts, backend) -> y_TH`` over ``group`` (module docstring).

    ``experts`` holds this rank's experts (``partition.first:partition.end``); ``routing`` holds
    global expert ids. A collective: every rank of ``group`` calls it, also with T = 0.
    """

    def __init__(self, group: ProcessGroup, partition: ExpertPartition) -> None:
        self.group = group
        self.partition = partition
        # Positions in cat([rows per expert (E), grad flag]) that make up each rank's count message:
        # its experts' row counts, then the flag.
        offsets, E = partition.offsets, partition.num_experts
        message_index = [index for lo, hi in itertools.pairwise(offsets) for index in (*range(lo, hi), E)]
        self._host_constants = {"message_index": message_index, "offsets_W1": list(offsets)}
        self._device_constants: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """An int64 constant on ``device``, copied there once (not on every call)."""
        key = (name, device)
        if key not in self._device_constants:
            values = self._host_constants[name]
            self._device_constants[key] = torch.tensor(values, dtype=torch.int64, device=device)
        return self._device_constants[key]

    def _exchange_counts(
        self, rows_per_expert_E: torch.Tensor, rows_to_rank_W: torch.Tensor, needs_grad: bool
    ) -> tuple[list[int], list[int], torch.Tensor, bool]:
        """(rows sent to each rank, rows received from each rank, ``[W, E_loc]`` rows received per
        source and local expert (on the device), whether any rank's input needs grad)."""
        part, device = self.partition, rows_per_expert_E.device
        W, E_loc = part.world_size, part.num_local
        flag = torch.tensor([int(needs_grad)], dtype=torch.int64, device=device)
        message = torch.cat([rows_per_expert_E.long(), flag])[self._constant("message_index", device)]
        send_sizes = [count + 1 for count in part.counts]
        received = all_to_all_ints(message, send_sizes, [E_loc + 1] * W, self.group).view(W, E_loc + 1)
        host = torch.cat([rows_to_rank_W.long(), received.reshape(-1)]).tolist()  # the one host sync
        send_counts = host[:W]
        per_source = [host[W + r * (E_loc + 1) : W + (r + 1) * (E_loc + 1)] for r in range(W)]
        recv_counts = [sum(row[:E_loc]) for row in per_source]
        any_needs_grad = any(row[E_loc] for row in per_source)
        return send_counts, recv_counts, received[:, :E_loc], any_needs_grad

    def __call__(
        self, x_TH: torch.Tensor, routing: Routing, experts: nn.Module, backend: Backend
    ) -> torch.Tensor:
        check_device(self.group, x_TH.device, "x")
        part, device = self.partition, x_TH.device
        ids_TK = routing.expert_ids.to(device)
        weights_TK = routing.weights.to(device)

        buckets = backend.dispatch(ids_TK, part.num_experts)
        slot_offsets = buckets.offsets_E1.long()[self._constant("offsets_W1", device)]
        rows_to_rank_W = slot_offsets[1:] - slot_offsets[:-1]
        send_counts, recv_counts, rows_per_source_expert, any_needs_grad = self._exchange_counts(
            buckets.tokens_per_expert(), rows_to_rank_W, input_needs_grad(x_TH)
        )
        x_TH = align_requires_grad(x_TH, any_needs_grad)

        x_NH = backend.permute_rows(x_TH, buckets)
        x_MH = all_to_all_rows(x_NH, send_counts, recv_counts, self.group)
        M, E_loc = x_MH.shape[0], part.num_local
        expert_of_block = torch.arange(E_loc, dtype=torch.int32, device=device).repeat(part.world_size)
        ids_M1 = torch.repeat_interleave(expert_of_block, rows_per_source_expert.reshape(-1), output_size=M)
        local = backend.dispatch(ids_M1.view(M, 1), E_loc)
        # Experts, then a combine with weight 1 (R = 1): the rows come back in received order. One
        # fused stage where the backend has it (experts.forward_combined -> expert_mlp_combine).
        ones_M1 = torch.ones(M, 1, dtype=torch.float32, device=device)
        y_MH = experts.forward_combined(x_MH, local, ones_M1, backend, x_TH.dtype)
        y_NH = all_to_all_rows(y_MH, recv_counts, send_counts, self.group)
        return backend.combine(y_NH, buckets, weights_TK, x_TH.dtype)
