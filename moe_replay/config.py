"""The MoE layer's shape and routing configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scoring = Literal["softmax", "sigmoid"]
_SCORINGS = ("softmax", "sigmoid")


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MoEConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"MoEConfig.{name} must be >= {minimum}, got {value}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"MoEConfig.{name} must be a bool, got {type(value).__name__} {value!r}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Shape and routing rules of one MoE layer. Validated on construction."""

    num_experts: int
    """E: routed experts in the layer."""
    top_k: int
    """K: experts each token is sent to, 1 <= K <= E."""
    hidden_size: int
    """H: width of the tokens the layer reads and writes."""
    intermediate_size: int
    """I: width of one expert's SwiGLU hidden layer."""
    scoring: Scoring = "softmax"
    """How router logits become scores: softmax over experts, or an independent sigmoid per expert."""
    norm_topk_prob: bool = True
    """Divide each token's K gate weights by their sum."""
    n_group: int | None = None
    """Group-limited selection (DeepSeek-V3): experts split into this many equal groups."""
    topk_group: int | None = None
    """With n_group: only the best this-many groups stay selectable for each token."""
    score_bias: bool = False
    """A per-expert bias (router.bias) added to the scores for selection only, not to the weights."""
    routed_scaling_factor: float = 1.0
    """Multiplies the final gate weights."""

    def __post_init__(self) -> None:
        _check_int("num_experts", self.num_experts)
        _check_int("top_k", self.top_k)
        _check_int("hidden_size", self.hidden_size)
        _check_int("intermediate_size", self.intermediate_size)
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        if self.scoring not in _SCORINGS:
            raise ValueError(f"MoEConfig.scoring must be one of {_SCORINGS}, got {self.scoring!r}")
        _check_bool("norm_topk_prob", self.norm_topk_prob)
        _check_bool("score_bias", self.score_bias)
        factor = self.routed_scaling_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise TypeError(f"MoEConfig.routed_scaling_factor must be a float, got {factor!r}")
        if not factor > 0 or factor == float("inf"):
            raise ValueError(f"MoEConfig.routed_scaling_factor must be finite and > 0, got {factor}")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(
                "MoEConfig.n_group and topk_group are set together or not at all, got "
                f"n_group={self.n_group!r}, topk_group={self.topk_group!r}"
            )
        if self.n_group is not None and self.topk_group is not None:  # both or neither (above)
            _check_int("n_group", self.n_group)
            _check_int("topk_group", self.topk_group)
            if self.num_experts % self.n_group:
                raise ValueError(
                    f"MoEConfig.n_group must divide num_experts ({self.num_experts}), got {self.n_group}"
                )
            if self.topk_group > self.n_group:
                raise ValueError(
                    f"MoEConfig.topk_group must be <= n_group ({self.n_group}), got {self.topk_group}"
                )
            selectable = self.topk_group * self.experts_per_group
            if selectable < self.top_k:
                raise ValueError(
                    f"MoEConfig.topk_group={self.topk_group} leaves {selectable} selectable experts "
                    f"({self.topk_group} groups of {self.experts_per_group}), fewer than top_k={self.top_k}"
                )

    @property
    def experts_per_group(self) -> int:
        """Experts in one selection group (all experts when n_group is None)."""
        return self.num_experts // (self.n_group or 1)
