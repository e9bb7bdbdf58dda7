"""What a backend implements: the stages of the MoE pipeline, routing included.

Shape legend: T tokens, M rows of the input to the experts (M = T for a local layer), R reads of
each row (R = K for a local layer: each token is routed to K experts), N = M * R routed rows,
E experts (local experts under expert parallelism), H hidden, I expert intermediate.

Every stage takes routing as data (ids, weights, buckets); nothing reads global state. The stages
a layer runs, in order::

    route(logits_TE, ...)                      -> Routing(expert_ids_TK, weights_TK)
    dispatch(expert_ids_MR, E)                 -> ExpertBuckets (metadata only, no data moved)
    expert_mlp(x_MH, buckets, w_gate_up, w_down) -> y_NH   (rows in bucket order)
    combine(y_NH, buckets, weights_MR, dtype)  -> y_MH

Expert parallelism runs the same stages with ``permute_rows`` and collectives in between
(``moe_replay.parallel``); quantized experts replace ``expert_mlp`` with ``quant_expert_mlp``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_replay.config import MoEConfig
    from moe_replay.quantize import QuantizedWeight
    from moe_replay.routing.route import Routing


@dataclass(frozen=True)
class ExpertBuckets:
    """Routed rows grouped by expert: the result of ``dispatch``.

    Every one of the M input rows is read up to R times (once per routed slot). Sorted position
    ``n`` (``0 <= n < N``) reads input row ``row_of_slot_N[n]``; the r-th read of row ``m`` sits at
    sorted position ``slot_of_row_MR[m, r]``, or nowhere when that entry is ``-1``. Expert ``e``
    owns sorted positions ``offsets_E1[e]:offsets_E1[e + 1]``.

    ``-1`` slots: a (row, read) with slot ``-1`` has no routed row; it contributes nothing
    (``combine`` adds nothing for it and gives its weight a zero gradient, ``permute_rows``'
    backward skips it). ``dispatch`` never makes them (every read has a slot, N = M * R); expert
    parallelism composes buckets that have them (a token's experts on other ranks, a token not
    sent to a rank: ``moe_replay.parallel.alltoall``). Either way the entries ``>= 0`` are a
    permutation of ``0..N-1``: every slot is read by exactly one (row, read).

    Contract: within one expert's bucket rows are in ascending (row, read) order, in every
    backend, so results are deterministic and backends agree bit-for-bit on the metadata.
    All three tensors are int32 on the device of the routed ids.
    """

    row_of_slot_N: torch.Tensor
    slot_of_row_MR: torch.Tensor
    offsets_E1: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.offsets_E1.numel() - 1

    @property
    def num_rows(self) -> int:
        return self.slot_of_row_MR.shape[0]

    @property
    def num_slots(self) -> int:
        return self.row_of_slot_N.numel()

    def tokens_per_expert(self) -> torch.Tensor:
        """``[E]`` int32: rows routed to each expert."""
        return self.offsets_E1[1:] - self.offsets_E1[:-1]

    def per_read(self, values_N: torch.Tensor) -> torch.Tensor:
        """``values_N[slot_of_row_MR[m, r]]`` for every (row, read), ``[M, R, *]``; zero where the
        slot is ``-1`` (index -1 reads a zero appended to ``values_N``). Differentiable in
        ``values_N``."""
        padded = torch.cat([values_N, values_N.new_zeros(1, *values_N.shape[1:])])
        return padded[self.slot_of_row_MR.long()]


class Backend(ABC):
    """One implementation of every pipeline stage. Register instances with ``registry.register``."""

    name: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device``, or None if it can."""
        return None

    @abstractmethod
    def route(
        self,
        logits_TE: torch.Tensor,
        cfg: MoEConfig,
        forced_TK: torch.Tensor | None,
        bias_E: torch.Tensor | None,
    ) -> Routing:
        """Routing of ``logits_TE``; inputs are already checked by ``moe_replay.route``."""

    @abstractmethod
    def dispatch(self, expert_ids_MR: torch.Tensor, num_experts: int) -> ExpertBuckets:
        """Group the M*R routed slots by expert (stable: ascending flat slot index per expert)."""

    @abstractmethod
    def expert_mlp(
        self,
        x_MH: torch.Tensor,
        buckets: ExpertBuckets,
        w_gate_up_E2IH: torch.Tensor,
        w_down_EHI: torch.Tensor,
    ) -> torch.Tensor:
        """``y_NH[n] = down_e(silu(gate_e x) * up_e x)`` for ``x = x_MH[row_of_slot[n]]``, e = n's expert.

        Differentiable with respect to ``x_MH`` and both weights; accumulates in float32. The
        output dtype is float32 or x's dtype (the backend's choice); ``combine`` takes either.
        """

    @abstractmethod
    def combine(
        self,
        y_NH: torch.Tensor,
        buckets: ExpertBuckets,
        weights_MR: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``y_MH[m] = sum_r weights_MR[m, r] * y_NH[slot_of_row[m, r]]``, float32 sums, ``out_dtype`` out.

        Each output row gathers its own R rows (no atomics): deterministic. Reads
        whose slot is ``-1`` add nothing, whatever their weight, and their weights get a zero
        gradient. Differentiable with respect to ``y_NH`` and ``weights_MR``.
        """

    def expert_mlp_combine(
        self,
        x_MH: torch.Tensor,
        buckets: ExpertBuckets,
        w_gate_up_E2IH: torch.Tensor,
        w_down_EHI: torch.Tensor,
        weights_MR: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``combine(expert_mlp(x_MH, ...), ...)``: the local layer's path, which a backend may fuse
        (the triton backend's backward then never materialises the routed rows' gradient). ``-1``
        slots as in ``combine``: the expert-parallel receiver runs it on such buckets."""
        y_NH = self.expert_mlp(x_MH, buckets, w_gate_up_E2IH, w_down_EHI)
        return self.combine(y_NH, buckets, weights_MR, out_dtype)

    @abstractmethod
    def permute_rows(self, x_MH: torch.Tensor, buckets: ExpertBuckets) -> torch.Tensor:
        """``x_NH[n] = x_MH[row_of_slot[n]]``, differentiable: the backward sums each row's reads
        that have a slot (``-1`` entries of ``slot_of_row`` are skipped), in float32, deterministically."""

    def quant_expert_mlp(
        self, x_MH: torch.Tensor, buckets: ExpertBuckets, gate_up: QuantizedWeight, down: QuantizedWeight
    ) -> torch.Tensor:
        """``expert_mlp`` with quantized weights (``moe_replay.quantize``); inference only."""
        raise ValueError(f"backend {self.name!r} has no quantized experts; use backend='torch' for QuantMoE")
