"""moe_replay: Mixture-of-Experts layers whose routing can be recorded and replayed.

The pipeline, one folder per stage::

    x [T, H] ─► router logits [T, E] ─► route(): select ids, weigh   (routing/)  ◄── replay forces ids here
             ─► dispatch: group rows by expert                        (backends/*/dispatch)
             ─► experts: grouped GEMM gate_up ─► SwiGLU ─► grouped GEMM down   (backends/*/experts)
             ─► combine: each token sums its K weighted rows          (backends/*/combine)  ─► y [T, H]

Routing is data: dispatch, experts and combine take ``expert_ids [T, K]`` and ``weights [T, K]``,
so replay touches one function, :func:`route`. Expert parallelism (``parallel/``) moves rows between
ranks around the same stages; quantized experts (``QuantMoE``) swap the GEMMs only.

    import moe_replay as mr
    moe = mr.MoE(mr.MoEConfig(num_experts=8, top_k=2, hidden_size=64, intermediate_size=128))
    with mr.record(model) as trace: model(batch)
    with mr.replay(model, trace): model(batch).sum().backward()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from moe_replay.config import MoEConfig
from moe_replay.layers import MoE, QuantMoE
from moe_replay.parallel.config import EPConfig
from moe_replay.routing import CompareReport, Routing, RoutingTrace, compare, record, replay, route

if TYPE_CHECKING:
    from moe_replay.integrations import hf

__all__ = [
    "CompareReport",
    "EPConfig",
    "MoE",
    "MoEConfig",
    "QuantMoE",
    "Routing",
    "RoutingTrace",
    "compare",
    "hf",
    "record",
    "replay",
    "route",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # transformers is an optional extra and slow to import: load the integration on first use.
    if name == "hf":
        return importlib.import_module("moe_replay.integrations.hf")
    raise AttributeError(f"module 'moe_replay' has no attribute {name!r}")
