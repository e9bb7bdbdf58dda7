"""Single-process dispatch: every expert lives here.

Shape legend: T tokens, K experts per token, N = T * K routed rows, H hidden.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_replay.backends.base import Backend
    from moe_replay.types import ExpertsModule, Routing


def local_dispatch(
    x_TH: torch.Tensor, routing: Routing, experts: ExpertsModule, backend: Backend
) -> torch.Tensor:
    """``y_TH[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x_TH[t])``, in x's dtype."""
    buckets = backend.dispatch(routing.expert_ids, experts.num_experts)
    return experts.forward_combined(x_TH, buckets, routing.weights, backend, x_TH.dtype)
