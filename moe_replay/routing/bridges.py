"""RL framework bridges: ``routed_experts [B, S, L, K]`` tensors <-> :class:`RoutingTrace`.

Shape legend: B sequences, S padded length, T packed tokens, L transformer layers the tensor
holds (dense and MTP layers included), K experts per token, E experts.

RL frameworks carry the engine's routes from the rollout to the trainer as one integer tensor
``routed_experts`` ``[B, S, L, K]`` (or ``[T, L, K]`` / ``[1, T, L, K]`` for packed sequences
with ``cu_seqlens``), aligned with the batch's token ids. Rows the engine did not route (padding,
the last token of every sequence, which the engine never forwards) hold a *fill*, and the fill is
the framework's convention:

============  ==========================================================================
``fill``      what unrouted rows hold
============  ==========================================================================
``"zeros"``   K zeros (verl). Replayed as is, such a row repeats expert 0 ("expert repeated").
``"arange"``  ``arange(K) % E`` (slime): valid-looking rows that pile onto experts 0 .. K-1.
``"none"``    anything: only ``attention_mask`` / ``cu_seqlens`` say what was routed (NeMo-RL).
============  ==========================================================================

:func:`from_routed_experts` turns every unrouted row into ``-1`` (the router decides it at
replay), by these rules:

1. Positions outside ``attention_mask`` (value 0) become ``-1``. With ``fill="zeros"`` or
   ``"arange"`` they must hold the fill, else ``ValueError`` naming the position: a route under
   the mask's padding means the mask and the tensor disagree (left against right padding).
2. The last token of every sequence (its last masked position; the last token of each packed
   sequence) becomes ``-1``: engines never report it. Pass ``last_token_routed=True`` to keep it.
3. With ``fill="zeros"`` and ``K >= 2``, any other row of K zeros also becomes ``-1`` (it cannot
   be a route: it repeats expert 0), e.g. prompt tokens before ``routed_experts_start_len``.
   ``"arange"`` rows inside the mask are kept, since a real route may hold them.

Layers: ``layers`` maps tensor layer ``l`` to a MoE module name, exactly as for the engine
adapters (:func:`moe_replay.routing.engines.engine_layer_map`): an explicit ``{l: name}``
mapping, module names in layer order, or the model. Layers no name maps to (dense layers, MTP
layers after the decoder) are dropped, unless named. :func:`to_routed_experts` is the inverse:
the trace back into the framework's tensor, fill in every unrouted row and unnamed layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from moe_replay.routing.engines import engine_layer_map
from moe_replay.routing.trace import RoutingTrace, _check_cu_seqlens, _check_mask, _check_range, compact_dtype

Fill = Literal["zeros", "arange", "none"]
FILLS = ("zeros", "arange", "none")


def _check_fill(fill: object) -> str:
    if fill not in FILLS:
        raise ValueError(
            f"fill must be one of {FILLS} (verl: 'zeros', slime: 'arange', a mask only: 'none'), "
            f"got {fill!r:.40}"
        )
    return fill  # type: ignore[return-value]


def _fill_row(fill: str, top_k: int, num_experts: int, dtype: torch.dtype) -> torch.Tensor | None:
    if fill == "zeros":
        return torch.zeros(top_k, dtype=dtype)
    if fill == "arange":
        return torch.arange(top_k, dtype=torch.int64).remainder(num_experts).to(dtype)
    return None


def _is_fill(ids_TK: torch.Tensor, fill_K: torch.Tensor) -> torch.Tensor:
    """``[T]``: whether each row equals the fill."""
    return (ids_TK == fill_K.to(ids_TK.device, ids_TK.dtype)).all(dim=-1)


def from_routed_experts(
    routed_experts: torch.Tensor,
    *,
    layers: nn.Module | Sequence[str] | Mapping[int, str],
    num_experts: int,
    fill: Fill,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    last_token_routed: bool = False,
    moe_layer_indices: Sequence[int] | None = None,
) -> RoutingTrace:
    """A trace from a framework's ``routed_experts`` (module docstring: fills and rules).

    Padded: ``routed_experts [B, S, L, K]`` with ``attention_mask [B, S]`` (0/1 or bool) gives a
    ``[B, S]`` trace. Packed: ``routed_experts [T, L, K]`` (or ``[1, T, L, K]``) with
    ``cu_seqlens [B + 1]`` gives a packed trace. Exactly one of ``attention_mask`` and
    ``cu_seqlens`` is required: without one, unrouted rows cannot be told apart from routes.
    Ids are checked against ``num_experts`` before they are narrowed to the compact dtype; the
    input is not modified.
    """
    fill = _check_fill(fill)
    if (
        not isinstance(routed_experts, torch.Tensor)
        or routed_experts.is_floating_point()
        or routed_experts.dtype
        in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        )
    ):
        got = (
            routed_experts.dtype
            if isinstance(routed_experts, torch.Tensor)
            else type(routed_experts).__name__
        )
        raise TypeError(f"routed_experts must be an integer torch.Tensor [B, S, L, K], got {got}")
    if not isinstance(last_token_routed, bool):
        raise TypeError(f"last_token_routed must be a bool, got {type(last_token_routed).__name__}")
    if (attention_mask is None) == (cu_seqlens is None):
        raise ValueError(
            "pass attention_mask (for [B, S, L, K]) or cu_seqlens (for packed [T, L, K]), exactly one: "
            "they say which rows the engine routed"
        )
    if cu_seqlens is not None:
        ids = (
            routed_experts[0]
            if routed_experts.dim() == 4 and routed_experts.shape[0] == 1
            else routed_experts
        )
        if ids.dim() != 3:
            raise ValueError(
                f"packed routed_experts must be [T, L, K] or [1, T, L, K], got {tuple(routed_experts.shape)}"
            )
        T, L, K = ids.shape
        cu = _check_cu_seqlens(cu_seqlens, T)
        valid_T = torch.ones(T, dtype=torch.bool)
        lens = cu[1:] - cu[:-1]
        last_T = torch.zeros(T, dtype=torch.bool)
        last_T[(cu[1:] - 1)[lens > 0]] = True
        token_shape: tuple[int, ...] = (T,)
    else:
        if routed_experts.dim() != 4:
            raise ValueError(
                f"routed_experts must be [B, S, L, K] with attention_mask, got {tuple(routed_experts.shape)}"
            )
        B, S, L, K = routed_experts.shape
        ids = routed_experts.reshape(B * S, L, K)
        mask = _check_mask(attention_mask, (B, S), "attention_mask")
        valid_T = mask.reshape(-1)
        last_T = torch.zeros(B, S, dtype=torch.bool)
        has = mask.any(dim=1)
        last_pos = S - 1 - mask.flip(1).int().argmax(dim=1)
        last_T[has.nonzero().flatten(), last_pos[has]] = True
        last_T = last_T.reshape(-1)
        token_shape = (B, S)
        cu = None
    if not 1 <= K <= num_experts:
        raise ValueError(f"routed_experts has top_k={K}, expected 1 .. num_experts={num_experts}")
    if fill == "zeros" and K == 1:
        raise ValueError(
            "fill='zeros' with top_k=1 cannot tell fill from expert 0; pass fill='none' (the mask decides)"
        )
    mapping = engine_layer_map(layers, L, moe_layer_indices)
    device = ids.device
    valid_T, last_T = valid_T.to(device), last_T.to(device)
    fill_K = _fill_row(fill, K, num_experts, torch.int64)
    # Layer by layer, straight into the compact token-major result: the framework's tensor is
    # often int64 and large (tens of GB), so no copy of it, nor a [T, L, K] temporary, is made.
    out_TLK = torch.empty((ids.shape[0], len(mapping), K), dtype=compact_dtype(num_experts), device=device)
    for j, (l, name) in enumerate(mapping.items()):
        src_TK = ids[:, l]
        if src_TK.dtype in (torch.uint16, torch.uint32, torch.uint64):
            src_TK = src_TK.to(torch.int64)  # few torch ops take these (vLLM's uint16 via from_numpy)
        unrouted_T = ~valid_T
        if fill_K is not None:
            is_fill_T = _is_fill(src_TK, fill_K)
            wrong_T = unrouted_T & ~is_fill_T
            if bool(wrong_T.any()):
                t = int(wrong_T.nonzero()[0])
                where = f"position {divmod(t, token_shape[1])}" if len(token_shape) == 2 else f"token {t}"
                raise ValueError(
                    f"routed_experts at {where}, layer {name!r} is padding in attention_mask but holds "
                    f"{src_TK[t].tolist()}, not the {fill!r} fill {fill_K.tolist()}: the mask and the "
                    "tensor disagree (left against right padding?)"
                )
            if fill == "zeros":
                unrouted_T = unrouted_T | is_fill_T
        if not last_token_routed:
            unrouted_T = unrouted_T | last_T
        # before narrowing: out-of-range ids are errors, never wrapped
        _check_range([(name, src_TK[~unrouted_T])], num_experts, K)
        out_TLK[:, j] = src_TK  # unrouted rows may wrap here: they are overwritten next
        out_TLK[:, j].masked_fill_(unrouted_T[:, None], -1)
    out = out_TLK.reshape(*token_shape, len(mapping), K)
    return RoutingTrace._of_tokens_first(out, list(mapping.values()), num_experts, cu)


def to_routed_experts(
    trace: RoutingTrace,
    *,
    num_layers: int,
    fill: Fill,
    layers: Sequence[str] | Mapping[int, str] | None = None,
    moe_layer_indices: Sequence[int] | None = None,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """The framework's ``routed_experts`` from a trace: ``[B, S, num_layers, K]`` for a ``[B, S]``
    trace, ``[T, num_layers, K]`` for a packed or ``[T]`` one (``trace.cu_seqlens`` goes beside it).

    ``layers`` maps tensor layer index -> trace layer name (default: the trace's layer names,
    mapped as :func:`~moe_replay.routing.engines.engine_layer_map` maps names); every name must
    be a layer of the trace. Rows of ``-1`` and unnamed layers hold ``fill`` (``"none"``: ``-1``,
    which needs a signed ``dtype``). A row with some ``-1`` slots and some routed ones has no
    representation in these tensors: ``ValueError`` naming it. Ids are range-checked against
    ``dtype``.
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace must be a moe_replay.RoutingTrace, got {type(trace).__name__}")
    fill = _check_fill(fill)
    if (
        not isinstance(dtype, torch.dtype)
        or dtype.is_floating_point
        or dtype.is_complex
        or dtype == torch.bool
    ):
        raise TypeError(f"dtype must be an integer torch.dtype, got {dtype!r:.40}")
    if len(trace) == 0 or len(trace.token_shape) not in (1, 2):
        raise ValueError(f"to_routed_experts needs a [B, S], [T] or packed trace with layers, got {trace!r}")
    mapping = engine_layer_map(trace.layer_names if layers is None else layers, num_layers, moe_layer_indices)
    missing = [n for n in mapping.values() if n not in trace]
    if missing:
        raise ValueError(
            f"layers names {missing} that the trace does not hold (trace layers: {trace.layer_names})"
        )
    info = torch.iinfo(dtype)
    if trace.num_experts - 1 > info.max or (fill == "none" and info.min > -1):
        raise ValueError(f"dtype {dtype} cannot hold ids -1 .. {trace.num_experts - 1} with fill={fill!r}")
    K = trace.top_k
    device = trace.device
    fill_K = _fill_row(fill, K, trace.num_experts, dtype)
    fill_K = torch.full((K,), -1, dtype=dtype) if fill_K is None else fill_K
    out = fill_K.to(device).expand(*trace.token_shape, num_layers, K).clone()
    for index, name in mapping.items():
        ids = trace[name]
        free = ids < 0
        partial = free.any(dim=-1) & ~free.all(dim=-1)
        if bool(partial.any()):
            pos = partial.nonzero()[0].tolist()
            raise ValueError(
                f"layer {name!r} at token position {pos} holds {ids[tuple(pos)].tolist()}: a row with some "
                "free (-1) slots cannot be written as routed_experts (only whole rows can be fill)"
            )
        out[..., index, :] = torch.where(free, fill_K.to(device), ids.to(dtype))
    return out
