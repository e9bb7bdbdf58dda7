"""Routing: ``route`` (ids and weights from logits), routing sites, ``record``/``replay``, traces."""

from moe_replay.routing.context import record, replay
from moe_replay.routing.route import Routing, route
from moe_replay.routing.trace import RoutingTrace

__all__ = ["Routing", "RoutingTrace", "record", "replay", "route"]
