"""What a backend implements: the compute stages of the MoE pipeline, routing included.

Shape legend: T tokens, M rows of the input to the experts (M = T for a local layer), R reads of
each row (R = K for a local layer: each token is routed to K experts), N = M * R routed rows,
E experts (local experts under expert parallelism), H hidden, I expert intermediate.

Every stage takes routing as data (ids, weights, buckets; the types of ``moe_replay.types``);
nothing reads global state. The stages a layer runs, in order::

    route(logits_TE, ...)                      -> Routing(expert_ids_TK, weights_TK)
    dispatch(expert_ids_MR, E)                 -> ExpertBuckets (metadata only, no data moved)
    expert_mlp(x_MH, buckets, w_gate_up, w_down) -> y_NH   (rows in bucket order)
    combine(y_NH, buckets, weights_MR, dtype)  -> y_MH

``permute_rows`` moves rows into bucket order (expert parallelism uses it around its transfers);
quantized experts replace ``expert_mlp`` with ``quant_expert_mlp``. Communication is not a
backend's business: expert parallelism (``moe_replay.parallel``) moves rows between ranks with a
transport around these same stages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from moe_replay.types import ExpertBuckets, InputGradsHook, Routing, RowSink

if TYPE_CHECKING:
    from moe_replay.config import MoEConfig
    from moe_replay.quantize import QuantizedWeight

__all__ = ["Backend", "ExpertBuckets", "InputGradsHook", "write_into"]


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
        bad_row_flag: torch.Tensor | None = None,
    ) -> Routing:
        """Routing of ``logits_TE``; inputs are already checked by ``moe_replay.route``, except
        with ``bad_row_flag`` (int32 ``[1]``, zero): then the backend checks ``forced_TK`` on the
        device as ``moe_replay.routing.route.bad_forced_rows`` does, gives bad rows NaN weights
        and raises the flag to ``T - r`` for the first bad row ``r`` (no host synchronisation)."""

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
        on_input_grads: InputGradsHook | None = None,
        out_MH: torch.Tensor | RowSink | None = None,
    ) -> torch.Tensor:
        """``combine(expert_mlp(x_MH, ...), ...)``: the local layer's path, which a backend may fuse
        (the triton backend's backward then never materialises the routed rows' gradient). ``-1``
        slots as in ``combine``: the expert-parallel receiver runs it on such buckets.

        ``on_input_grads(dx_MH, dweights_MR) -> busy_sms``: a backend whose backward can finish
        the gradients of ``x_MH`` and ``weights_MR`` before the experts' weight gradients calls it
        once with them (None for one that needs none), from inside the backward, and returns the
        same tensors to autograd. The expert-parallel dispatcher starts their all-to-all there, so
        that it travels while the weight-gradient GEMMs run, and returns how many SMs its kernel
        may occupy meanwhile (0 for none), which the backend's next GEMM leaves free. Here (plain
        autograd ops) there is no such point, and it is not called.

        ``out_MH``: where to write the result: a ``[M, H]`` ``out_dtype`` tensor, returned; or a
        :class:`~moe_replay.types.RowSink`, which stores the rows where it keeps them (an
        expert-parallel transport: their origins' memory) and returns their stand-in."""
        y_NH = self.expert_mlp(x_MH, buckets, w_gate_up_E2IH, w_down_EHI)
        y_MH = self.combine(y_NH, buckets, weights_MR, out_dtype)
        return write_into(y_MH, out_MH)

    def prepare_backward(self, grad_fn: object) -> None:
        """Queue the work of the backward of ``grad_fn`` (the autograd node of an
        ``expert_mlp_combine`` output) that needs no output gradient, for that backward to use.
        The expert-parallel ``collectives`` transport calls it in the backward while the output gradient is in
        flight, so that the work overlaps the transfer. Here, and for nodes a backend does not
        know: nothing."""
        return None

    @abstractmethod
    def permute_rows(self, x_MH: torch.Tensor, buckets: ExpertBuckets) -> torch.Tensor:
        """``x_NH[n] = x_MH[row_of_slot[n]]``, differentiable: the backward sums each row's reads
        that have a slot (``-1`` entries of ``slot_of_row`` are skipped), in float32, deterministically."""

    def quant_expert_mlp(
        self, x_MH: torch.Tensor, buckets: ExpertBuckets, gate_up: QuantizedWeight, down: QuantizedWeight
    ) -> torch.Tensor:
        """``expert_mlp`` with quantized weights (``moe_replay.quantize``); inference only."""
        raise ValueError(f"backend {self.name!r} has no quantized experts; use backend='torch' for QuantMoE")


def write_into(y: torch.Tensor, out: torch.Tensor | RowSink | None) -> torch.Tensor:
    """``y`` where ``Backend.expert_mlp_combine``'s ``out_MH`` says: ``y`` itself (None), ``out``
    holding its values (a tensor), or stored by a :class:`~moe_replay.types.RowSink` and its
    stand-in returned. Differentiable as ``y``."""
    if out is None:
        return y
    if isinstance(out, torch.Tensor):
        return _WriteInto.apply(y, out)
    return _WriteToSink.apply(y, out)


class _WriteToSink(torch.autograd.Function):
    """``sink.write`` of ``y``'s rows as they are; the stand-in's gradient is ``y``'s."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, sink: RowSink) -> torch.Tensor:
        with torch.no_grad():
            return sink.write(y, None, None, y.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _WriteInto(torch.autograd.Function):
    """``out`` with ``y``'s values (copied), differentiable as ``y``."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None
