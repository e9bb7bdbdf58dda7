"""Routing: ``route`` (ids and weights from logits), routing sites, ``record``/``replay``, traces."""

from moe_replay.routing.bridges import from_routed_experts, to_routed_experts
from moe_replay.routing.compare import CompareReport, LayerMismatch, compare
from moe_replay.routing.context import record, replay
from moe_replay.routing.engines import (
    batch_trace,
    engine_layer_map,
    sequence_routes,
    sglang_routes,
    vllm_routes,
)
from moe_replay.routing.route import Routing, route
from moe_replay.routing.trace import RoutingTrace

__all__ = [
    "CompareReport",
    "LayerMismatch",
    "Routing",
    "RoutingTrace",
    "batch_trace",
    "compare",
    "engine_layer_map",
    "from_routed_experts",
    "record",
    "replay",
    "route",
    "sequence_routes",
    "sglang_routes",
    "to_routed_experts",
    "vllm_routes",
]
