"""The ``triton`` backend: fused GPU kernels for every stage, forward and backward.

Runs on CUDA devices of compute capability 8.0 or newer, and on CPU tensors under
``TRITON_INTERPRET=1`` (Triton's interpreter: how CI tests the kernels, at small sizes).

Quantized experts (``QuantMoE``): int8 GEMMs with int32 sums over the same expert buckets
(``quant.py``), forward only, between this backend's dispatch and combine.

``torch.compile``: every stage below is opaque to Dynamo (``torch.compiler.disable``): a compiled
model runs them as they are, breaking its graph around each call, and compiles what lies between
(Dynamo would otherwise try to trace into Triton's launcher). For launch-bound sizes capture the
layer, or the model, in a CUDA graph instead (``torch.cuda.graph``): no stage syncs with the host.
The layer does not either when it routes itself or replays (``mr.replay``, from its second
forward); ``forced_expert_ids`` passed to the layer are validated, which reads them on the host.
"""

from __future__ import annotations

import torch

from moe_replay.backends.base import Backend
from moe_replay.backends.triton import combine, dispatch, experts, quant, route
from moe_replay.backends.triton._common import interpreting
from moe_replay.config import MoEConfig
from moe_replay.quantize import QuantizedWeight
from moe_replay.types import ExpertBuckets, InputGradsHook, Routing, RowSink


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"needs compute capability >= 8.0 (bf16 tensor cores), the device has {major}.{minor}"
            return None
        if device.type == "cpu" and interpreting():
            return None
        return f"its kernels run on CUDA devices (on {device.type} only under TRITON_INTERPRET=1)"

    @torch.compiler.disable
    def route(
        self,
        logits_TE: torch.Tensor,
        cfg: MoEConfig,
        forced_TK: torch.Tensor | None,
        bias_E: torch.Tensor | None,
        bad_row_flag: torch.Tensor | None = None,
    ) -> Routing:
        return route.route(logits_TE, cfg, forced_TK, bias_E, bad_row_flag)

    @torch.compiler.disable
    def dispatch(self, expert_ids_MR: torch.Tensor, num_experts: int) -> ExpertBuckets:
        return dispatch.dispatch(expert_ids_MR, num_experts)

    @torch.compiler.disable
    def expert_mlp(
        self,
        x_MH: torch.Tensor,
        buckets: ExpertBuckets,
        w_gate_up_E2IH: torch.Tensor,
        w_down_EHI: torch.Tensor,
    ) -> torch.Tensor:
        return experts.expert_mlp(x_MH, buckets, w_gate_up_E2IH, w_down_EHI)

    @torch.compiler.disable
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
        return experts.expert_mlp_combine(
            x_MH, buckets, w_gate_up_E2IH, w_down_EHI, weights_MR, out_dtype, on_input_grads, out_MH
        )

    def prepare_backward(self, grad_fn: object) -> None:
        experts.prepare_backward(grad_fn)

    @torch.compiler.disable
    def combine(
        self, y_NH: torch.Tensor, buckets: ExpertBuckets, weights_MR: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return combine.combine(y_NH, buckets, weights_MR, out_dtype)

    @torch.compiler.disable
    def permute_rows(self, x_MH: torch.Tensor, buckets: ExpertBuckets) -> torch.Tensor:
        return combine.permute_rows(x_MH, buckets)

    @torch.compiler.disable
    def quant_expert_mlp(
        self, x_MH: torch.Tensor, buckets: ExpertBuckets, gate_up: QuantizedWeight, down: QuantizedWeight
    ) -> torch.Tensor:
        return quant.quant_expert_mlp(x_MH, buckets, gate_up, down)


BACKEND = TritonBackend()
