"""Modules: the MoE layer and its quantized variant."""

from moe_replay.layers.moe import MoE, MoELayer
from moe_replay.layers.quant import QuantMoE

__all__ = ["MoE", "MoELayer", "QuantMoE"]
