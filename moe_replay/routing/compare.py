"""How far two routings differ: per layer, and per token across layers (the R3 paper's metrics).

Shape legend: T tokens (token axes flattened), L layers, K experts per token.

For one token in one layer, the two rows are compared **as sets**: the number of differing
slots is ``K - |set(a) ∩ set(b)|`` (the order of the K ids does not matter; a row keeps K
distinct experts, so this is also the number of experts of ``a`` missing from ``b``).

``-1`` slots (padding, tokens an engine did not report, rows left to the router) carry no
decision and are not compared: a (token, layer) pair is compared only when both rows are fully
routed (no ``-1``). The per-layer fraction is over compared pairs of that layer; the per-token
metrics are over tokens compared in **every** layer (``tokens_compared``), so every such token
contributes the same L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_replay.routing.trace import RoutingTrace


@dataclass(frozen=True, kw_only=True)
class LayerMismatch:
    """One layer's comparison."""

    name: str
    """The layer (module) name."""
    slots_compared: int
    """Routed slots compared: K times the tokens routed (no -1) in both traces."""
    slots_differing: int
    """Of those, slots whose expert is not in the other trace's row (``K - |a ∩ b|`` per token)."""
    tokens_differing: int
    """Compared tokens whose expert set differs in this layer."""

    @property
    def fraction(self) -> float:
        """``slots_differing / slots_compared`` (NaN when nothing was compared)."""
        return self.slots_differing / self.slots_compared if self.slots_compared else math.nan


@dataclass(frozen=True, kw_only=True)
class CompareReport:
    """:func:`compare`'s result. Fractions are in ``[0, 1]``; NaN when nothing could be compared."""

    num_experts: int
    """E of both traces."""
    top_k: int
    """K of both traces."""
    num_tokens: int
    """Tokens per layer in each trace (token axes flattened)."""
    tokens_compared: int
    """Tokens routed (no -1 slot) in every layer of both traces: the token metrics' denominator."""
    layers: tuple[LayerMismatch, ...]
    """Per-layer results, in ``a``'s layer order."""
    slot_mismatch: float
    """Differing slots over compared slots, all layers pooled."""
    token_mismatch: float
    """Fraction of compared tokens whose expert set differs in at least one layer."""
    mean_layers_differing: float
    """Mean over compared tokens of the number of layers whose expert set differs."""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (NaN becomes ``None``)."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_tokens": self.num_tokens,
            "tokens_compared": self.tokens_compared,
            "slot_mismatch": num(self.slot_mismatch),
            "token_mismatch": num(self.token_mismatch),
            "mean_layers_differing": num(self.mean_layers_differing),
            "layers": [
                {
                    "name": layer.name,
                    "slots_compared": layer.slots_compared,
                    "slots_differing": layer.slots_differing,
                    "tokens_differing": layer.tokens_differing,
                    "fraction": num(layer.fraction),
                }
                for layer in self.layers
            ],
        }

    def __str__(self) -> str:
        def pct(x: float) -> str:
            return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"

        width = max([len("layer"), len("all layers")] + [len(layer.name) for layer in self.layers])
        lines = [
            f"routing comparison: {len(self.layers)} layers, {self.num_tokens} tokens "
            f"({self.tokens_compared} routed in every layer of both), top_k={self.top_k}, "
            f"num_experts={self.num_experts}",
            "",
            f"{'layer':<{width}}  {'slots differing':>15}  {'tokens differing':>16}",
        ]
        for layer in self.layers:
            lines.append(f"{layer.name:<{width}}  {pct(layer.fraction):>15}  {layer.tokens_differing:>16}")
        lines.append(f"{'all layers':<{width}}  {pct(self.slot_mismatch):>15}")
        lines += [
            "",
            f"tokens differing in >= 1 layer: {pct(self.token_mismatch)}",
            "mean differing layers per token: "
            + ("n/a" if math.isnan(self.mean_layers_differing) else f"{self.mean_layers_differing:.3f}")
            + f" of {len(self.layers)}",
        ]
        return "\n".join(lines)


def _check_comparable(a: RoutingTrace, b: RoutingTrace) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, RoutingTrace):
            raise TypeError(f"{name} must be a moe_replay.RoutingTrace, got {type(t).__name__}")
    if (a.num_experts, a.top_k) != (b.num_experts, b.top_k):
        raise ValueError(
            f"a routes top_k={a.top_k} of num_experts={a.num_experts}, b top_k={b.top_k} of "
            f"num_experts={b.num_experts}: only traces of the same layers compare"
        )
    if set(a) != set(b):
        raise ValueError(
            f"a and b hold different layers: only in a {sorted(set(a) - set(b))}, "
            f"only in b {sorted(set(b) - set(a))}"
        )
    if a.num_tokens != b.num_tokens or (
        len(a.token_shape) == len(b.token_shape) and a.token_shape != b.token_shape
    ):
        raise ValueError(f"a has token shape {list(a.token_shape)}, b {list(b.token_shape)}: they must match")


def compare(a: RoutingTrace, b: RoutingTrace) -> CompareReport:
    """Compare two traces of the same layers and tokens (module docstring for the definitions).

    Traces with equal token counts but different numbers of token axes (``[B, S]`` and ``[T]``)
    are compared in row-major order. Works on any device; ``b`` is moved to ``a``'s device.
    """
    _check_comparable(a, b)
    K, T = a.top_k, a.num_tokens
    device = a.device if a.device is not None else torch.device("cpu")
    layers = []
    differs_LT = []
    routed_LT = []
    for name in a.layer_names:
        a_TK = a[name].reshape(T, K)
        b_TK = b[name].to(device).reshape(T, K)
        routed_T = (a_TK >= 0).all(dim=1) & (b_TK >= 0).all(dim=1)
        shared_T = (a_TK.unsqueeze(2) == b_TK.unsqueeze(1)).any(dim=2).sum(dim=1)  # |a ∩ b|, distinct ids
        differing_T = torch.where(routed_T, K - shared_T, 0)
        layers.append(
            LayerMismatch(
                name=name,
                slots_compared=int(routed_T.sum()) * K,
                slots_differing=int(differing_T.sum()),
                tokens_differing=int((differing_T > 0).sum()),
            )
        )
        differs_LT.append(differing_T > 0)
        routed_LT.append(routed_T)
    if layers:
        complete_T = torch.stack(routed_LT).all(dim=0)
        layers_differing_T = torch.stack(differs_LT).sum(dim=0)[complete_T]
    else:
        complete_T = torch.zeros(0, dtype=torch.bool)
        layers_differing_T = torch.zeros(0, dtype=torch.long)
    compared = int(complete_T.sum())
    slots = sum(layer.slots_compared for layer in layers)
    return CompareReport(
        num_experts=a.num_experts,
        top_k=K,
        num_tokens=T,
        tokens_compared=compared,
        layers=tuple(layers),
        slot_mismatch=sum(layer.slots_differing for layer in layers) / slots if slots else math.nan,
        token_mismatch=int((layers_differing_T > 0).sum()) / compared if compared else math.nan,
        mean_layers_differing=int(layers_differing_T.sum()) / compared if compared else math.nan,
    )
