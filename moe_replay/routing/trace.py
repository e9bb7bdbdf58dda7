"""RoutingTrace: expert ids per layer, the thing that is recorded, stored, shipped and replayed.

Shape legend: K experts per token; a layer's ids are ``[..., K]`` with the token shape of what
the layer routed (``[T]`` or ``[B, S]``). ``-1`` marks a slot the router decides at replay.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class RoutingTrace(Mapping[str, torch.Tensor]):
    """Mapping of layer name -> int ids ``[..., K]``, in model order, with ``num_experts`` and ``top_k``.

    Every layer holds the same token shape (all layers route the same tokens).
    """

    def __init__(self, layers: Mapping[str, torch.Tensor], *, num_experts: int, top_k: int) -> None:
        self.num_experts = _check_count("num_experts", num_experts)
        self.top_k = _check_count("top_k", top_k)
        self._assign(layers)

    def _assign(self, layers: Mapping[str, torch.Tensor]) -> None:
        """Check and store ``layers`` (``record`` fills the trace it yielded this way on exit)."""
        top_k = self.top_k
        if not isinstance(layers, Mapping):
            raise TypeError(f"layers must be a mapping of layer name -> tensor, got {type(layers).__name__}")
        token_shape: tuple[int, ...] | None = None
        self._layers: dict[str, torch.Tensor] = {}
        for name, ids in layers.items():
            if not isinstance(name, str):
                raise TypeError(f"layer names must be str, got {type(name).__name__} {name!r}")
            if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
                raise ValueError(f"layer {name!r}: ids must be an integer tensor, got {getattr(ids, 'dtype', ids)!r}")
            if ids.dim() == 0 or ids.shape[-1] != top_k:
                raise ValueError(f"layer {name!r}: ids must have shape [..., top_k={top_k}], got {tuple(ids.shape)}")
            if token_shape is None:
                token_shape = tuple(ids.shape[:-1])
            elif tuple(ids.shape[:-1]) != token_shape:
                raise ValueError(
                    f"layer {name!r}: token shape {tuple(ids.shape[:-1])} differs from the other layers' {token_shape}"
                )
            self._layers[name] = ids
        self._token_shape = token_shape or ()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Leading shape shared by every layer's ids (``()`` for an empty trace)."""
        return self._token_shape

    @property
    def num_tokens(self) -> int:
        n = 1
        for d in self._token_shape:
            n *= d
        return n if self._layers else 0

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(layers={len(self)}, token_shape={list(self._token_shape)}, "
            f"top_k={self.top_k}, num_experts={self.num_experts})"
        )
