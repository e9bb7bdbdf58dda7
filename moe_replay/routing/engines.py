"""Routes returned by inference engines -> a :class:`RoutingTrace` aligned to a training batch.

Shape legend: R rows the engine reported, N tokens of one sequence, L transformer layers the
engine reports (dense layers included), K experts per token, B sequences, S padded length.

Engines report one sequence at a time, every transformer layer, one row per token:

* **SGLang** (``return_routed_experts=True``): ``meta_info["routed_experts"]`` is base64 of
  int32 ids, logical shape ``[N - 1, L, K]``: the last token is never forwarded, so it has no
  row. With ``routed_experts_start_len=s`` the rows are those of tokens ``s .. N - 2``.
* **vLLM** (``enable_return_routed_experts=True``): ``routed_experts`` is an int16 array
  ``[R, L, K]``, one row per token (``R = N``) or per forwarded token (``R = N - 1``).
* **plain tensors** ``[R, L, K]`` of any integer dtype.

Two steps turn them into a trace:

1. ``sglang_routes`` / ``vllm_routes`` / ``sequence_routes`` decode one sequence into
   ``[N, L, K]`` int32, ``-1`` in every row the engine did not report (the missing last token,
   tokens before ``start``).
2. :func:`batch_trace` lays B such sequences into ``[B, S]`` with left or right padding
   (padding rows are ``-1``) and keeps the MoE layers only, named by model module.

``-1`` rows are decided by the router at replay: padding and unreported tokens never pile onto
expert 0 and never create repeated experts in a row.

Engine layer ``l`` -> MoE module name (``layers=`` of :func:`batch_trace`, see
:func:`engine_layer_map`): an explicit ``{l: name}`` mapping; or module names in layer order
(or the model itself, whose routing sites are taken in module order) with optional
``moe_layer_indices``. Without indices, names map to layers ``0..len-1`` when there are as many
names as engine layers (a uniform stack), and otherwise each name's layer number is read from
its first integer path component (``model.layers.7.mlp`` -> 7), which covers interleaved stacks
(DeepSeek's leading dense layers, ``decoder_sparse_step``, ``mlp_only_layers``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from moe_replay.routing.trace import RoutingTrace, _is_int_tensor

Padding = Literal["right", "left"]


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _place_rows(ids_RLK: torch.Tensor, num_tokens: int, start: int) -> torch.Tensor:
    """``[num_tokens, L, K]`` int32: rows ``start .. start + R - 1`` from ``ids_RLK``, others -1."""
    R, L, K = ids_RLK.shape
    out_NLK = torch.full((num_tokens, L, K), -1, dtype=torch.int32)
    out_NLK[start : start + R] = ids_RLK
    return out_NLK


def sglang_routes(
    payload: str | bytes | Mapping[str, object],
    *,
    num_tokens: int,
    num_layers: int,
    top_k: int,
    start: int = 0,
) -> torch.Tensor:
    """One sequence's SGLang routes as int32 ``[num_tokens, num_layers, top_k]`` (CPU).

    ``payload`` is the base64 string (or bytes) of ``meta_info["routed_experts"]``, the
    ``meta_info`` mapping, or the whole response holding ``meta_info``. ``num_tokens`` is the
    sequence length (prompt + completion, ``len(tokens)``); ``start`` is the request's
    ``routed_experts_start_len``. The payload must hold exactly
    ``(num_tokens - 1 - start) * num_layers * top_k`` int32 values, else ``ValueError`` naming
    the expected and actual element counts. Rows of tokens before ``start`` and of the last token
    are ``-1``.
    """
    _positive("num_tokens", num_tokens)
    _positive("num_layers", num_layers)
    _positive("top_k", top_k)
    _positive("start", start, minimum=0)
    if start > num_tokens - 1:
        raise ValueError(f"start must be <= num_tokens - 1 = {num_tokens - 1}, got {start}")
    if isinstance(payload, Mapping):
        meta = payload.get("meta_info", payload)
        if not isinstance(meta, Mapping) or "routed_experts" not in meta:
            raise ValueError(
                "payload mapping has no 'routed_experts' (nor meta_info['routed_experts']); send the "
                "request with return_routed_experts=True to a server started with "
                "--enable-return-routed-experts"
            )
        payload = meta["routed_experts"]
    if not isinstance(payload, (str, bytes)):
        raise TypeError(f"payload must be a base64 str or bytes, got {type(payload).__name__}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"payload is not valid base64 ({e})") from None
    rows = num_tokens - 1 - start
    expected = rows * num_layers * top_k
    if len(raw) % 4 or len(raw) // 4 != expected:
        actual = f"{len(raw) // 4}" if len(raw) % 4 == 0 else f"{len(raw)} bytes, not whole int32 values"
        raise ValueError(
            f"SGLang routed_experts holds {actual} int32 elements, expected {expected} = "
            f"(num_tokens={num_tokens} - 1 - start={start}) rows x num_layers={num_layers} x top_k={top_k}"
        )
    ids = torch.from_numpy(np.frombuffer(raw, dtype="<i4").astype(np.int32))  # SGLang writes little-endian
    return _place_rows(ids.view(rows, num_layers, top_k), num_tokens, start)


def _as_ids(ids: object, name: str) -> torch.Tensor:
    """``ids`` (tensor, array or nested lists) as an integer tensor ``[R, L, K]``."""
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"{name} must be a tensor or array [R, L, K], got {type(ids).__name__}: {e}"
            ) from None
    if not _is_int_tensor(ids) or ids.dim() != 3:
        raise ValueError(f"{name} must be an integer tensor [R, L, K], got {ids.dtype} {tuple(ids.shape)}")
    return ids


def sequence_routes(
    ids: object, *, num_tokens: int | None = None, start: int = 0, name: str = "ids"
) -> torch.Tensor:
    """One sequence's routes ``[R, L, K]`` (tensor or array, any integer dtype) as int32
    ``[num_tokens, L, K]`` on the CPU: rows ``start .. start + R - 1`` are taken from ``ids``, the
    others are ``-1``. ``num_tokens`` defaults to ``start + R``."""
    ids = _as_ids(ids, name)
    _positive("start", start, minimum=0)
    R, L, K = ids.shape
    if num_tokens is None:
        num_tokens = start + R
    _positive("num_tokens", num_tokens)
    if start + R > num_tokens:
        raise ValueError(
            f"{name} holds {ids.numel()} elements ({R} rows of {L} layers x {K}) from token {start}, "
            f"expected at most {(num_tokens - start) * L * K} for num_tokens={num_tokens}"
        )
    return _place_rows(ids.detach().cpu().to(torch.int32), num_tokens, start)


def vllm_routes(routed_experts: object, *, num_tokens: int | None = None, start: int = 0) -> torch.Tensor:
    """One sequence's vLLM ``routed_experts`` (int16 array ``[R, L, K]``) as int32 ``[num_tokens, L, K]``.

    With ``num_tokens`` given, ``R`` must be ``num_tokens - start`` (every token reported) or one
    less (the last token unreported; its row becomes ``-1``), else ``ValueError`` naming the
    expected and actual element counts. Without it, ``num_tokens = start + R``.
    """
    ids = _as_ids(routed_experts, "routed_experts")
    if num_tokens is not None:
        _positive("num_tokens", num_tokens)
        _positive("start", start, minimum=0)
        R, L, K = ids.shape
        full = num_tokens - start
        if R not in (full, full - 1):
            raise ValueError(
                f"vLLM routed_experts holds {ids.numel()} elements ({R} rows of {L} layers x {K}), expected "
                f"{full * L * K} ({full} rows) or {(full - 1) * L * K} ({full - 1} rows) for "
                f"num_tokens={num_tokens}, start={start}"
            )
    return sequence_routes(ids, num_tokens=num_tokens, start=start, name="routed_experts")


def _first_int_component(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def engine_layer_map(
    layers: nn.Module | Sequence[str] | Mapping[int, str],
    num_engine_layers: int,
    moe_layer_indices: Sequence[int] | None = None,
) -> dict[int, str]:
    """Engine layer index -> MoE module name, in engine layer order (module docstring).

    ``ValueError`` when the mapping cannot be decided or points outside ``[0, num_engine_layers)``.
    """
    _positive("num_engine_layers", num_engine_layers)
    if isinstance(layers, Mapping):
        if moe_layer_indices is not None:
            raise ValueError("pass moe_layer_indices with a list of names, not with a {layer: name} mapping")
        mapping = dict(layers)
    else:
        if isinstance(layers, nn.Module):
            from moe_replay.routing.sites import find_sites

            names = [name for name, _ in find_sites(layers)]
            if not names:
                raise ValueError(f"layers: the model ({type(layers).__name__}) has no routing sites")
        elif isinstance(layers, Sequence) and not isinstance(layers, str):
            names = list(layers)
        else:
            raise TypeError(
                f"layers must be a model, a list of MoE module names or a {{layer: name}} mapping, "
                f"got {type(layers).__name__}"
            )
        if moe_layer_indices is not None:
            indices = list(moe_layer_indices)
            if len(indices) != len(names):
                raise ValueError(
                    f"moe_layer_indices has {len(indices)} entries, the MoE layers are {len(names)}: {names}"
                )
        elif len(names) == num_engine_layers:
            indices = list(range(len(names)))
        else:
            parsed = [_first_int_component(n) for n in names]
            if any(p is None for p in parsed):
                unnumbered = [n for n, p in zip(names, parsed) if p is None]
                raise ValueError(
                    f"{len(names)} MoE layers for {num_engine_layers} engine layers, and the layer number "
                    f"cannot be read from {unnumbered}; pass moe_layer_indices or a {{layer: name}} mapping"
                )
            indices = parsed  # type: ignore[assignment]
        mapping = dict(zip(indices, names))
        if len(mapping) != len(names):
            raise ValueError(f"MoE layers {names} map to repeated engine layers {indices}")
    for index, name in mapping.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_engine_layers:
            raise ValueError(
                f"MoE layer {name!r} maps to engine layer {index!r}, outside [0, {num_engine_layers}) "
                f"(the engine reports {num_engine_layers} layers)"
            )
        if not isinstance(name, str):
            raise TypeError(f"engine layer {index} maps to {name!r}, expected a module name (str)")
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"a module name appears twice in the layer mapping {mapping}")
    return dict(sorted(mapping.items()))


def batch_trace(
    sequences: Sequence[torch.Tensor],
    *,
    layers: nn.Module | Sequence[str] | Mapping[int, str],
    num_experts: int,
    seq_len: int | None = None,
    padding: Padding = "right",
    moe_layer_indices: Sequence[int] | None = None,
) -> RoutingTrace:
    """A trace of ``[B, S, K]`` ids per MoE layer from B sequences' routes ``[N_b, L, K]``.

    ``sequences[b]`` comes from :func:`sglang_routes`, :func:`vllm_routes` or
    :func:`sequence_routes` (or is any integer ``[N_b, L, K]`` tensor, one row per token of
    sequence b, ``-1`` for rows to leave to the router). ``seq_len`` is the padded length S of the
    training batch (default: the longest sequence). ``padding="right"`` puts sequence b at
    positions ``0 .. N_b - 1``, ``"left"`` at ``S - N_b .. S - 1``; the other positions are
    ``-1``. ``layers`` names the MoE layers (module docstring, :func:`engine_layer_map`);
    engine layers without a name (dense layers) are dropped. Ids are checked to lie in
    ``-1`` / ``[0, num_experts)``.
    """
    if isinstance(sequences, torch.Tensor) or not isinstance(sequences, Sequence) or not sequences:
        raise ValueError(
            "sequences must be a non-empty list of per-sequence [N, L, K] routes, "
            f"got {type(sequences).__name__}"
        )
    if padding not in ("right", "left"):
        raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
    seqs = [sequence_routes(s, name=f"sequences[{b}]") for b, s in enumerate(sequences)]
    L, K = seqs[0].shape[1:]
    for b, s in enumerate(seqs):
        if tuple(s.shape[1:]) != (L, K):
            raise ValueError(
                f"sequences[{b}] has {s.shape[1]} layers x top_k {s.shape[2]}, sequences[0] has {L} x {K}"
            )
    longest = max(s.shape[0] for s in seqs)
    if seq_len is None:
        seq_len = longest
    _positive("seq_len", seq_len)
    if longest > seq_len:
        b = max(range(len(seqs)), key=lambda i: seqs[i].shape[0])
        raise ValueError(f"sequences[{b}] has {longest} tokens, more than seq_len={seq_len}")
    mapping = engine_layer_map(layers, L, moe_layer_indices)
    engine_idx = list(mapping)

    out_BSLK = torch.full((len(seqs), seq_len, len(engine_idx), K), -1, dtype=torch.int32)
    for b, s in enumerate(seqs):
        n = s.shape[0]
        lo = 0 if padding == "right" else seq_len - n
        out_BSLK[b, lo : lo + n] = s[:, engine_idx]
    return RoutingTrace.from_tensor(out_BSLK, list(mapping.values()), num_experts)
