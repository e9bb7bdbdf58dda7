"""The ``torch`` backend: the plain PyTorch reference and test oracle, on any device."""

from __future__ import annotations

import torch

from moe_replay.backends.base import Backend
from moe_replay.backends.torch import combine, dispatch, experts, quant, route
from moe_replay.config import MoEConfig
from moe_replay.quantize import QuantizedWeight
from moe_replay.types import ExpertBuckets, Routing


class TorchBackend(Backend):
    name = "torch"

    def route(
        self,
        logits_TE: torch.Tensor,
        cfg: MoEConfig,
        forced_TK: torch.Tensor | None,
        bias_E: torch.Tensor | None,
        bad_row_flag: torch.Tensor | None = None,
    ) -> Routing:
        return route.route(logits_TE, cfg, forced_TK, bias_E, bad_row_flag)

    def dispatch(self, expert_ids_MR: torch.Tensor, num_experts: int) -> ExpertBuckets:
        return dispatch.dispatch(expert_ids_MR, num_experts)

    def expert_mlp(
        self,
        x_MH: torch.Tensor,
        buckets: ExpertBuckets,
        w_gate_up_E2IH: torch.Tensor,
        w_down_EHI: torch.Tensor,
    ) -> torch.Tensor:
        return experts.expert_mlp(x_MH, buckets, w_gate_up_E2IH, w_down_EHI)

    def combine(
        self, y_NH: torch.Tensor, buckets: ExpertBuckets, weights_MR: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return combine.combine(y_NH, buckets, weights_MR, out_dtype)

    def permute_rows(self, x_MH: torch.Tensor, buckets: ExpertBuckets) -> torch.Tensor:
        return combine.permute_rows(x_MH, buckets)

    def quant_expert_mlp(
        self, x_MH: torch.Tensor, buckets: ExpertBuckets, gate_up: QuantizedWeight, down: QuantizedWeight
    ) -> torch.Tensor:
        return quant.quant_expert_mlp(x_MH, buckets, gate_up, down)


BACKEND = TorchBackend()
