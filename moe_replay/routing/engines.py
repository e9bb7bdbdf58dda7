"""Routes returned by inference engines -> a :class:`RoutingTrace` aligned to a training batch.

Shape legend: R rows the engine reported, N tokens of one sequence (prompt + completion), L
transformer layers the engine reports (dense layers included), K experts per token, B sequences,
S padded length, T packed tokens.

Engines report one sequence at a time, every transformer layer, one row per forwarded token. The
last token of a sequence (the last sampled one) is never forwarded, so it has no row; with a
start offset ``s`` the rows are those of tokens ``s .. N - 2``, ``R = N - 1 - s``:

* **SGLang** (``--enable-return-routed-experts``, request ``return_routed_experts=True``):
  ``meta_info["routed_experts"]`` is base64 of little-endian int32 ids ``[R, L, K]``; the
  request's ``routed_experts_start_len`` is ``s``.
* **vLLM** (``enable_return_routed_experts=True``): ``routed_experts`` is a numpy array
  ``[R, L, K]``, uint8 when the model has at most 256 experts, else uint16 (int16 or int32 in
  older versions); over HTTP the same array travels as base64 of a ``.npy`` file. Both are read.
* **plain tensors** ``[R, L, K]`` of any integer dtype (:func:`sequence_routes`).

Two steps turn them into a trace:

1. ``sglang_routes`` / ``vllm_routes`` / ``sequence_routes`` decode one sequence into
   ``[N, L, K]``, ``-1`` in every row the engine did not report (the missing last token, tokens
   before ``start``). With ``num_experts`` the ids are range-checked and come in the trace's
   compact dtype (int8 up to 128 experts), which keeps memory low; without it, int32.
2. :func:`batch_trace` lays B such sequences into ``[B, S]`` with left or right padding (padding
   rows are ``-1``), or packs them (``packed=True``: token shape ``[T]`` and ``cu_seqlens``),
   and keeps the MoE layers only, named by model module. It writes each sequence straight into
   the trace's one token-major buffer: building a trace allocates the trace plus one sequence's
   temporaries, and with ``num_tokens`` given it consumes ``sequences`` lazily (a generator that
   decodes one response at a time never holds more than one decoded response).

``-1`` rows are decided by the router at replay: padding and unreported tokens never pile onto
expert 0 and never create repeated experts in a row.

Engine layer ``l`` -> MoE module name (``layers=`` of :func:`batch_trace`, see
:func:`engine_layer_map`): an explicit ``{l: name}`` mapping; or module names in layer order
(or the model itself, whose routing sites are taken in module order) with optional
``moe_layer_indices``. Without indices, names map to layers ``0..len-1`` when there are as many
names as engine layers (a uniform stack), and otherwise each name's layer number is read from
its first integer path component (``model.layers.7.mlp`` -> 7), which covers interleaved stacks
(DeepSeek's leading dense layers, ``decoder_sparse_step``, ``mlp_only_layers``). Engine layers
no name maps to are dropped: dense layers, and multi-token-prediction (MTP) layers that some
engines report after the decoder layers, unless a name is given for them.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from moe_replay.routing.trace import RoutingTrace, _is_int_tensor, compact_dtype

Padding = Literal["right", "left"]

_NPY_MAGIC = b"\x93NUMPY"

try:  # optional: a SIMD base64 decoder, about 12x faster than the standard library's
    import pybase64 as _fast_b64
except ImportError:  # pragma: no cover - depends on the environment
    _fast_b64 = None


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _np_dtype(num_experts: int | None) -> np.dtype:
    if num_experts is None:
        return np.dtype(np.int32)
    return np.dtype(str(compact_dtype(num_experts)).removeprefix("torch."))


def _check_ids_range(ids: np.ndarray, num_experts: int | None, what: str) -> None:
    """``ValueError`` naming the first row with an id outside ``-1 .. E - 1`` (or outside int32
    when ``num_experts`` is None): values are checked before any narrowing cast, never wrapped."""
    if ids.size == 0:
        return
    hi_limit = num_experts if num_experts is not None else 2**31
    # One pass instead of two for what engines send (ids in [0, E), no -1): every value lies in
    # [0, OR of all values] when that OR is non-negative (a negative value sets the sign bit).
    acc = int(np.bitwise_or.reduce(ids, axis=None))
    if 0 <= acc < hi_limit:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= -1 and hi < hi_limit:
        return
    flat = ids.reshape(ids.shape[0], -1)
    row = int((((flat < -1) | (flat >= hi_limit)).any(axis=1)).nonzero()[0][0])
    bad = flat[row][(flat[row] < -1) | (flat[row] >= hi_limit)][0]
    bound = f"num_experts={num_experts}" if num_experts is not None else "the int32 range"
    raise ValueError(
        f"{what}: row {row} holds id {int(bad)}, outside -1 .. {hi_limit - 1} ({bound}); "
        "is num_experts right, and is the payload of this model?"
    )


def _place_rows(
    ids_RLK: np.ndarray, num_tokens: int, start: int, num_experts: int | None, what: str
) -> torch.Tensor:
    """``[num_tokens, L, K]``: rows ``start .. start + R - 1`` from ``ids_RLK``, others -1, in the
    compact dtype of ``num_experts`` (int32 without it), range-checked before the cast."""
    _check_ids_range(ids_RLK, num_experts, what)
    R, L, K = ids_RLK.shape
    out_NLK = np.empty((num_tokens, L, K), dtype=_np_dtype(num_experts))
    out_NLK[:start] = -1
    np.copyto(out_NLK[start : start + R], ids_RLK, casting="unsafe")  # in range: checked above
    out_NLK[start + R :] = -1
    return torch.from_numpy(out_NLK)


def _from_mapping(payload: Mapping[str, object], engine: str) -> tuple[object, Mapping[str, object]]:
    meta = payload.get("meta_info", payload)
    if not isinstance(meta, Mapping) or "routed_experts" not in meta:
        hint = (
            "send the request with return_routed_experts=True to a server started with "
            "--enable-return-routed-experts"
            if engine == "SGLang"
            else "start the engine with enable_return_routed_experts=True"
        )
        raise ValueError(f"payload mapping has no 'routed_experts' (nor meta_info['routed_experts']); {hint}")
    return meta["routed_experts"], meta


def _b64decode(payload: str | bytes, name: str) -> bytes:
    """Strict base64 decoding (no whitespace, no junk); pybase64's SIMD decoder when installed
    (``pip install moe-replay[engines]``): 2.5 ms instead of 31 ms for one 16.8 MB SGLang payload
    of 8,192 tokens x 48 layers x 8 (AVX-512 CPU), which is most of the time of decoding a batch."""
    if isinstance(payload, str):
        try:
            payload = payload.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{name} is not valid base64 (non-ASCII characters)") from None
    decode = _fast_b64.b64decode if _fast_b64 is not None else base64.b64decode
    try:
        return decode(payload, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"{name} is not valid base64 ({e})") from None


def sglang_routes(
    payload: str | bytes | Mapping[str, object],
    *,
    num_tokens: int,
    num_layers: int,
    top_k: int,
    start: int | None = None,
    num_experts: int | None = None,
) -> torch.Tensor:
    """One sequence's SGLang routes as ``[num_tokens, num_layers, top_k]`` (CPU).

    ``payload`` is the base64 string (or bytes) of ``meta_info["routed_experts"]``, the
    ``meta_info`` mapping, or the whole response holding ``meta_info``. ``num_tokens`` is the
    sequence length (prompt + completion, ``len(tokens)``); ``start`` is the request's
    ``routed_experts_start_len`` (default: ``meta_info["routed_experts_start_len"]`` when the
    mapping holds it, else 0). The payload must hold exactly
    ``(num_tokens - 1 - start) * num_layers * top_k`` int32 values, else ``ValueError`` naming
    the expected and actual element counts. Rows of tokens before ``start`` and of the last token
    are ``-1``. With ``num_experts`` the result has the trace's compact dtype (ids checked
    against it), else int32.
    """
    _positive("num_tokens", num_tokens)
    _positive("num_layers", num_layers)
    _positive("top_k", top_k)
    if num_experts is not None:
        compact_dtype(num_experts)  # checks it
    if isinstance(payload, Mapping):
        payload, meta = _from_mapping(payload, "SGLang")
        given = meta.get("routed_experts_start_len")
        if given is not None:
            if start is not None and start != given:
                raise ValueError(
                    f"start={start} differs from the response's routed_experts_start_len={given!r}"
                )
            start = given
    start = 0 if start is None else start
    _positive("start", start, minimum=0)
    if start > num_tokens - 1:
        raise ValueError(f"start must be <= num_tokens - 1 = {num_tokens - 1}, got {start}")
    if not isinstance(payload, (str, bytes)):
        raise TypeError(f"payload must be a base64 str or bytes, got {type(payload).__name__}")
    raw = _b64decode(payload, "payload")
    rows = num_tokens - 1 - start
    expected = rows * num_layers * top_k
    if len(raw) % 4 or len(raw) // 4 != expected:
        actual = f"{len(raw) // 4}" if len(raw) % 4 == 0 else f"{len(raw)} bytes, not whole int32 values"
        raise ValueError(
            f"SGLang routed_experts holds {actual} int32 elements, expected {expected} = "
            f"(num_tokens={num_tokens} - 1 - start={start}) rows x num_layers={num_layers} x top_k={top_k}"
        )
    ids = np.frombuffer(raw, dtype="<i4").reshape(rows, num_layers, top_k)  # SGLang writes little-endian
    return _place_rows(ids, num_tokens, start, num_experts, "SGLang routed_experts")


def _as_ids(ids: object, name: str) -> np.ndarray:
    """``ids`` (tensor, array or nested lists) as an integer numpy array ``[R, L, K]`` (a view
    where it can be: no copy of a CPU tensor or an array)."""
    if isinstance(ids, torch.Tensor):
        if not _is_int_tensor(ids):
            raise ValueError(
                f"{name} must be an integer tensor [R, L, K], got {ids.dtype} {tuple(ids.shape)}"
            )
        ids = ids.detach().cpu().numpy()
    elif not isinstance(ids, np.ndarray):
        try:
            ids = np.asarray(ids)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(
                f"{name} must be a tensor or array [R, L, K], got {type(ids).__name__}: {e}"
            ) from None
        if ids.dtype == object or ids.dtype.kind not in "iub":
            raise TypeError(f"{name} must be a tensor or integer array [R, L, K], got {ids.dtype} elements")
    if ids.dtype.kind not in "iu" or ids.ndim != 3:
        raise ValueError(f"{name} must be an integer tensor [R, L, K], got {ids.dtype} {tuple(ids.shape)}")
    return ids


def sequence_routes(
    ids: object,
    *,
    num_tokens: int | None = None,
    start: int = 0,
    name: str = "ids",
    num_experts: int | None = None,
) -> torch.Tensor:
    """One sequence's routes ``[R, L, K]`` (tensor or array, any integer dtype) as
    ``[num_tokens, L, K]`` on the CPU: rows ``start .. start + R - 1`` are taken from ``ids``, the
    others are ``-1``. ``num_tokens`` defaults to ``start + R``. With ``num_experts`` the result
    has the trace's compact dtype, else int32; ids outside the range are a ``ValueError``."""
    ids = _as_ids(ids, name)
    _positive("start", start, minimum=0)
    R, L, K = ids.shape
    if num_tokens is None:
        num_tokens = start + R
    _positive("num_tokens", num_tokens)
    if start + R > num_tokens:
        raise ValueError(
            f"{name} holds {ids.size} elements ({R} rows of {L} layers x {K}) from token {start}, "
            f"expected at most {(num_tokens - start) * L * K} for num_tokens={num_tokens}"
        )
    if num_experts is not None:
        compact_dtype(num_experts)
    return _place_rows(ids, num_tokens, start, num_experts, name)


def _npy_array(raw: bytes) -> np.ndarray:
    """A ``.npy`` file's array, without pickle (object arrays are refused)."""
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"routed_experts is base64 of a damaged .npy file ({e})") from None


def vllm_routes(
    routed_experts: object,
    *,
    num_tokens: int | None = None,
    start: int = 0,
    num_experts: int | None = None,
) -> torch.Tensor:
    """One sequence's vLLM ``routed_experts`` as ``[num_tokens, L, K]`` (CPU).

    ``routed_experts`` is the array ``[R, L, K]`` (uint8, uint16, int16 or int32, numpy or
    torch), its HTTP form (base64 str or bytes of a ``.npy`` file), or a mapping holding it under
    ``"routed_experts"``. vLLM reports tokens ``start .. N - 2``: ``R = N - 1 - start``. With
    ``num_tokens`` (N) given, any other ``R`` is a ``ValueError`` naming the expected and actual
    element counts; without it, ``N = start + R + 1``. Rows of tokens before ``start`` and of the
    last token are ``-1``. With ``num_experts`` the result has the trace's compact dtype (ids
    checked against it), else int32.
    """
    if isinstance(routed_experts, Mapping):
        routed_experts, _ = _from_mapping(routed_experts, "vLLM")
    if isinstance(routed_experts, (str, bytes)):
        raw = _b64decode(routed_experts, "routed_experts")
        if not raw.startswith(_NPY_MAGIC):
            raise ValueError(
                "routed_experts is base64 but not of a .npy file (vLLM's HTTP form); raw int32 "
                "base64 is SGLang's form: use sglang_routes"
            )
        routed_experts = _npy_array(raw)
    ids = _as_ids(routed_experts, "routed_experts")
    _positive("start", start, minimum=0)
    R, L, K = ids.shape
    if num_tokens is None:
        num_tokens = start + R + 1
    else:
        _positive("num_tokens", num_tokens)
        rows = num_tokens - 1 - start
        if rows != R:
            raise ValueError(
                f"vLLM routed_experts holds {ids.size} elements ({R} rows of {L} layers x {K}), expected "
                f"{max(rows, 0) * L * K} ({rows} rows = num_tokens={num_tokens} - 1 - start={start}: "
                "vLLM never reports the last token)"
            )
    return sequence_routes(
        ids, num_tokens=num_tokens, start=start, name="routed_experts", num_experts=num_experts
    )


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
        elif isinstance(layers, Sequence) and not isinstance(layers, (str, bytes)):
            names = list(layers)
            for name in names:
                if not isinstance(name, str):
                    raise TypeError(
                        f"layers must hold module names (str), got {type(name).__name__} {name!r:.40}"
                    )
        else:
            raise TypeError(
                f"layers must be a model, a list of MoE module names or a {{layer: name}} mapping, "
                f"got {type(layers).__name__}"
            )
        if moe_layer_indices is not None:
            if isinstance(moe_layer_indices, (str, bytes)) or not isinstance(moe_layer_indices, Sequence):
                raise TypeError(
                    f"moe_layer_indices must be a list of ints, got {type(moe_layer_indices).__name__}"
                )
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
        if len(set(indices)) != len(indices):
            raise ValueError(f"MoE layers {names} map to repeated engine layers {indices}")
        mapping = dict(zip(indices, names))
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
    if not mapping:
        raise ValueError("the layer mapping is empty: name at least one MoE layer")
    return dict(sorted(mapping.items()))


def _layer_selector(engine_idx: list[int]) -> slice | list[int]:
    """A slice when the engine layers kept are consecutive (a view, no copy), else the list."""
    if engine_idx == list(range(engine_idx[0], engine_idx[-1] + 1)):
        return slice(engine_idx[0], engine_idx[-1] + 1)
    return engine_idx


def batch_trace(
    sequences: Iterable[object],
    *,
    layers: nn.Module | Sequence[str] | Mapping[int, str],
    num_experts: int,
    seq_len: int | None = None,
    padding: Padding = "right",
    moe_layer_indices: Sequence[int] | None = None,
    packed: bool = False,
    num_tokens: Sequence[int] | None = None,
) -> RoutingTrace:
    """A trace of B sequences' routes ``[N_b, L, K]``: ``[B, S]`` padded, or packed.

    ``sequences[b]`` comes from :func:`sglang_routes`, :func:`vllm_routes` or
    :func:`sequence_routes` (or is any integer ``[N_b, L, K]`` tensor or array, one row per token
    of sequence b, ``-1`` for rows to leave to the router). ``layers`` names the MoE layers
    (module docstring, :func:`engine_layer_map`); engine layers without a name (dense, MTP) are
    dropped. Ids are checked to lie in ``-1`` / ``[0, num_experts)`` before they are narrowed to
    the compact dtype.

    Padded (default): ``seq_len`` is the padded length S of the training batch (default: the
    longest sequence); ``padding="right"`` puts sequence b at positions ``0 .. N_b - 1``,
    ``"left"`` at ``S - N_b .. S - 1``; the other positions are ``-1``.
    Packed (``packed=True``): token shape ``[sum N_b]``, sequence after sequence, with
    ``cu_seqlens``; ``seq_len`` and ``padding`` do not apply.

    ``num_tokens`` (the N_b, known from the token ids) lets ``sequences`` be any iterable,
    consumed one at a time (a generator decoding one engine response per step); each must then
    hold exactly ``num_tokens[b]`` rows. Without it, ``sequences`` must be a list.
    """
    if padding not in ("right", "left"):
        raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be a bool, got {type(packed).__name__}")
    if packed and (seq_len is not None or padding != "right"):
        raise ValueError("seq_len and padding apply to a padded batch, not with packed=True")
    dtype = np.dtype(str(compact_dtype(num_experts)).removeprefix("torch."))
    if num_tokens is None:
        if isinstance(sequences, (torch.Tensor, np.ndarray, str, bytes)) or not isinstance(
            sequences, Sequence
        ):
            raise ValueError(
                "sequences must be a non-empty list of per-sequence [N, L, K] routes (or pass num_tokens "
                f"to stream them from an iterable), got {type(sequences).__name__}"
            )
        items = [_as_ids(s, f"sequences[{b}]") for b, s in enumerate(sequences)]
        lengths = [s.shape[0] for s in items]
        stream: Iterable[object] = items
    else:
        if isinstance(num_tokens, (str, bytes)) or not isinstance(num_tokens, Sequence):
            raise TypeError(f"num_tokens must be a list of ints, got {type(num_tokens).__name__}")
        lengths = [_positive(f"num_tokens[{b}]", n, minimum=0) for b, n in enumerate(num_tokens)]
        stream = sequences
    if not lengths:
        raise ValueError("sequences must be a non-empty list of per-sequence [N, L, K] routes, got none")
    B = len(lengths)
    longest = max(lengths)
    if not packed:
        if seq_len is None:
            seq_len = longest
        _positive("seq_len", seq_len)
        if longest > seq_len:
            b = lengths.index(longest)
            raise ValueError(f"sequences[{b}] has {longest} tokens, more than seq_len={seq_len}")

    out = None  # allocated at the first sequence, which tells L and K
    mapping: dict[int, str] = {}
    select: slice | list[int] = slice(None)
    offset = 0
    count = 0
    for b, seq in enumerate(stream):
        if b >= B:
            raise ValueError(f"sequences yields more than len(num_tokens)={B} sequences")
        ids = _as_ids(seq, f"sequences[{b}]")
        n, L, K = ids.shape
        if n != lengths[b]:
            raise ValueError(f"sequences[{b}] holds {n} token rows, num_tokens[{b}] says {lengths[b]}")
        if out is None:
            mapping = engine_layer_map(layers, L, moe_layer_indices)
            select = _layer_selector(list(mapping))
            L0, K0 = L, K
            if not 1 <= K <= num_experts:
                raise ValueError(f"sequences[{b}] has top_k={K}, expected 1 .. num_experts={num_experts}")
            shape = (sum(lengths),) if packed else (B, seq_len)
            # Packed: every row is written below, so no fill pass (it cost 0.8 s per 600 MB here).
            out = (
                np.empty((*shape, len(mapping), K), dtype=dtype)
                if packed
                else np.full((*shape, len(mapping), K), -1, dtype=dtype)
            )
        elif (L, K) != (L0, K0):
            raise ValueError(f"sequences[{b}] has {L} layers x top_k {K}, sequences[0] has {L0} x {K0}")
        kept = ids[:, select]
        _check_ids_range(kept, num_experts, f"sequences[{b}]")
        if packed:
            dst = out[offset : offset + n]
        else:
            lo = 0 if padding == "right" else seq_len - n
            dst = out[b, lo : lo + n]
        np.copyto(dst, kept, casting="unsafe")  # in range: checked above
        offset += n
        count += 1
    if count != B:
        raise ValueError(f"sequences yielded {count} sequences, num_tokens lists {B}")
    cu = None
    if packed:
        cu = torch.zeros(B + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=cu[1:])
    return RoutingTrace._of_tokens_first(torch.from_numpy(out), list(mapping.values()), num_experts, cu)
