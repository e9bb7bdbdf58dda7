"""RoutingTrace: expert ids per layer, the thing that is recorded, stored, shipped and replayed.

Shape legend: L layers, K experts per token, B sequences (rows of a batch), S padded sequence
length, T tokens (all token axes flattened). A layer's ids are ``[..., K]`` with the token shape
of what the layer routed (``[T]``, or ``[B, S]`` for a batch of sequences); every layer of one
trace has the same token shape. ``-1`` marks a slot the router decides at replay (padding, a
token the engine never forwarded).

Compact ids
-----------
Ids are kept, in memory and on disk, in the smallest signed dtype that holds ``-1 .. E - 1``
(:func:`compact_dtype`): int8 up to 128 experts, int16 up to 32768, int32 beyond (at most
``2**31`` experts). Consumers convert where a kernel needs another dtype (``route`` accepts any
integer dtype). Building a trace from wider ids narrows them only after checking their range: an
id outside ``-1 .. E - 1`` is a ``ValueError``, never wrapped (``2**32 + 3`` does not become 3).

A trace's layers are either separate tensors (``record`` builds them so) or views of one
token-major tensor ``[*token_shape, L, K]`` (:meth:`RoutingTrace.from_tensor`, the engine
adapters and :meth:`RoutingTrace.load` build them so: one copy per payload, and the file is
written and read without transposing). Both behave the same; :meth:`RoutingTrace.to_tensor`
returns the token-major tensor without a copy when there is one.

Rows, packing and shards
------------------------
A *row* is a sequence: index ``b`` of the batch axis of a ``[B, S]`` trace, sequence ``b`` of a
packed trace, a token of an unpacked ``[T]`` trace. A *packed* trace holds token shape
``[total_tokens]`` and ``cu_seqlens`` (int64 ``[B + 1]``, on the CPU): sequence ``b`` is tokens
``cu_seqlens[b] .. cu_seqlens[b + 1] - 1``, as a packed forward (one row, ``position_ids``
restarting at every sequence, ``cu_seqlens`` for varlen attention) routes them. Row operations
(:meth:`~RoutingTrace.select`, :meth:`~RoutingTrace.split`, :meth:`~RoutingTrace.cat`,
:meth:`~RoutingTrace.dp_shard`) work on whole sequences of a packed trace; :meth:`~RoutingTrace.pack`
and :meth:`~RoutingTrace.unpack` convert between ``[B, S]`` and packed;
:meth:`~RoutingTrace.cp_shard` cuts every sequence for context parallelism.

Files
-----
:meth:`RoutingTrace.save` writes one safetensors file (readable by any safetensors reader), format
version 2:

=================  ===========================================================================
tensor ``expert_ids``  the ids in :func:`compact_dtype`, ``[*token_shape, L, K]`` (layout
                   ``tokens_first``) or ``[L, *token_shape, K]`` (``layers_first``)
tensor ``cu_seqlens``  int64 ``[B + 1]``, packed traces only
``format``         ``"moe_replay.routing_trace"`` (foreign safetensors files are refused)
``format_version`` ``"2"``; version 1 files (int16/int32 ``layers_first``, no metadata checksum)
                   are still read; newer versions are refused
``num_experts``    E, decimal
``top_k``          K, decimal
``layers``         JSON list of the L layer names, in trace order
``token_shape``    JSON list, the token shape shared by every layer
``layout``         ``"tokens_first"`` or ``"layers_first"``
``crc32``          CRC-32 of the other metadata (sorted compact JSON) followed by every tensor
                   byte, decimal, 10 digits (detects damaged data and damaged metadata)
=================  ===========================================================================

Reading checks the header before the body (:data:`MAX_HEADER_BYTES`, JSON depth, each metadata
value's size, the body size the header implies against the file size), so a foreign or damaged
file is refused after reading at most the header: a multi-GB file in milliseconds, a 24-byte
file without allocating what its header claims. Only regular files are read: a FIFO, a device
(``/dev/zero``) or a directory is a ``ValueError`` at once (a FIFO is opened non-blocking, so it
does not hang).

Writing is atomic: the bytes go to a temporary file ``.<name>.<pid>.<random>.moe_replay-tmp``
beside the target, which is fsynced and renamed over it (``os.replace``); an error leaves the
previous file intact and removes the temporary file, and a save removes temporary files that
earlier saves of the same target left behind when their process died (a crash, ``kill -9``).
Saving over an existing file keeps its permission bits. If the path is a symbolic link, the
link is followed: the file it points to is replaced and the link kept (a dangling link gets
its target created).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import stat
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

FORMAT = "moe_replay.routing_trace"
FORMAT_VERSION = 2
TENSOR_NAME = "expert_ids"
CU_SEQLENS_NAME = "cu_seqlens"
MAX_EXPERTS = 2**31
"""The most experts a trace holds (ids up to ``2**31 - 1`` in int32)."""
MAX_HEADER_BYTES = 16 * 2**20
"""Largest safetensors header read (a trace's header is its layer names: about 60 bytes a layer)."""
MAX_JSON_DEPTH = 8
"""Deepest JSON nesting accepted in a header (a trace's header nests 3 deep)."""
MAX_TOKEN_DIMS = 8
"""Most token axes a trace file may declare."""
INT16_MAX_EXPERTS = 32768
"""Up to this many experts, ids (at most 32767, and -1) are held as int16 (int8 up to 128)."""

_ST_DTYPES = {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_NP_DTYPES = {torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}
_TMP_SUFFIX = ".moe_replay-tmp"
_CHUNK = 64 * 2**20  # bytes per read/write/checksum step: big enough to be fast, small enough to stream


def _check_count(name: str, value: object, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return value


def _is_int_tensor(ids: object) -> bool:
    return (
        isinstance(ids, torch.Tensor)
        and not ids.is_floating_point()
        and not ids.is_complex()
        and ids.dtype != torch.bool
    )


def compact_dtype(num_experts: int) -> torch.dtype:
    """The smallest signed dtype holding ids ``-1 .. num_experts - 1``: int8 up to 128 experts,
    int16 up to 32768, int32 up to ``2**31``."""
    _check_count("num_experts", num_experts, MAX_EXPERTS)
    if num_experts <= 128:
        return torch.int8
    return torch.int16 if num_experts <= INT16_MAX_EXPERTS else torch.int32


storage_dtype = compact_dtype  # the name an earlier version used


def _holds(dtype: torch.dtype, source: torch.dtype) -> bool:
    """Whether every value of integer dtype ``source`` fits ``dtype``."""
    a, b = torch.iinfo(dtype), torch.iinfo(source)
    return a.min <= b.min and b.max <= a.max


def _first_bad(ids: torch.Tensor, num_experts: int, top_k: int) -> tuple[int, list[int]]:
    ids_TK = ids.reshape(-1, top_k).long()  # int64: uint8 compared with -1 would wrap it to 255
    bad_T = ((ids_TK < -1) | (ids_TK >= num_experts)).any(dim=1)
    row = int(bad_T.nonzero()[0])
    return row, ids_TK[row].tolist()


def _range_error(name: str, ids: torch.Tensor, num_experts: int, top_k: int) -> ValueError:
    row, values = _first_bad(ids, num_experts, top_k)
    return ValueError(
        f"layer {name!r}: token {row} (of the flattened token axes) holds {values}: ids must be -1 "
        f"(free) or in [0, num_experts={num_experts})"
    )


def _check_range(named: Sequence[tuple[str, torch.Tensor]], num_experts: int, top_k: int) -> None:
    """``ValueError`` naming the layer and token of the first id outside ``-1 .. num_experts - 1``.

    One min/max pass per layer and one host read for all of them (a sync for GPU ids)."""
    named = [(n, ids) for n, ids in named if ids.numel()]
    if not named:
        return
    if all(ids.device.type == "cpu" for _, ids in named):
        # numpy, single-threaded: torch's parallel CPU reductions wait at a thread-pool barrier on
        # a loaded machine (a [32768, 48, 8] trace took ~0.5 s in torch ops on 2 busy cores).
        bounds = [(int(a.min()), int(a.max())) for a in (ids.numpy() for _, ids in named)]
    else:
        bounds = torch.stack([torch.stack(torch.aminmax(ids)).long().cpu() for _, ids in named]).tolist()
    for (name, ids), (lo, hi) in zip(named, bounds):
        if lo < -1 or hi >= num_experts:
            raise _range_error(name, ids, num_experts, top_k)


def _to_compact(
    named: Sequence[tuple[str, torch.Tensor]], num_experts: int, top_k: int
) -> list[torch.Tensor]:
    """Each ids tensor in :func:`compact_dtype`, range-checked first where the cast could wrap."""
    dtype = compact_dtype(num_experts)
    narrowing = [(n, ids) for n, ids in named if not _holds(dtype, ids.dtype)]
    if narrowing:
        _check_range(narrowing, num_experts, top_k)
    return [ids if ids.dtype == dtype else ids.to(dtype) for _, ids in named]


def _check_cu_seqlens(cu_seqlens: object, total: int) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or not _is_int_tensor(cu_seqlens):
        raise TypeError(f"cu_seqlens must be an integer torch.Tensor [B + 1], got {cu_seqlens!r:.80}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape [B + 1], got {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at the total tokens {total}, "
            f"got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''} (last {int(cu[-1])})"
        )
    return cu


class RoutingTrace(Mapping[str, torch.Tensor]):
    """Mapping of layer name -> ids ``[..., K]`` (compact dtype), in layer order, with
    ``num_experts`` and ``top_k`` (module docstring: compact ids, rows, packing, files).

    Every layer holds the same token shape (all layers route the same tokens). Ids are ``-1``
    (free: the router decides at replay) or in ``[0, num_experts)``. The constructor converts
    ids of any integer dtype to :func:`compact_dtype`; where that cast could wrap it checks the
    range first (a host read for GPU ids) and raises ``ValueError`` naming the layer and token.
    :meth:`validate` checks the range of every id.

    ``cu_seqlens`` (optional, int64 ``[B + 1]``) makes the trace *packed*: the token shape must
    be ``[total_tokens]``, and row operations address sequences.

    Token axes are addressed by ``dim`` (an index into :attr:`token_shape`): for ``[B, S, K]``
    ids, ``dim=0`` is the batch axis and ``dim=1`` (or ``-1``) the sequence axis.

    Two traces compare equal (``==``) when they have the same ``num_experts``, ``top_k``, layer
    names in the same order, token shape, ``cu_seqlens`` and ids.
    """

    def __init__(
        self,
        layers: Mapping[str, torch.Tensor],
        *,
        num_experts: int,
        top_k: int,
        cu_seqlens: torch.Tensor | None = None,
    ) -> None:
        self.num_experts = _check_count("num_experts", num_experts, MAX_EXPERTS)
        self.top_k = _check_count("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
        self._cu_seqlens: torch.Tensor | None = None
        self._assign(layers)
        if cu_seqlens is not None:
            self._set_cu_seqlens(cu_seqlens)

    def _assign(self, layers: Mapping[str, torch.Tensor]) -> None:
        """Check and store ``layers`` (``record`` fills the trace it yielded this way on exit)."""
        top_k = self.top_k
        if not isinstance(layers, Mapping):
            raise TypeError(f"layers must be a mapping of layer name -> tensor, got {type(layers).__name__}")
        token_shape: tuple[int, ...] | None = None
        named: list[tuple[str, torch.Tensor]] = []
        for name, ids in layers.items():
            if not isinstance(name, str):
                raise TypeError(f"layer names must be str, got {type(name).__name__} {name!r}")
            if not _is_int_tensor(ids):
                got = f"dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"layer {name!r}: ids must be an integer torch.Tensor, got {got}")
            if ids.dim() == 0 or ids.shape[-1] != top_k:
                raise ValueError(
                    f"layer {name!r}: ids must have shape [..., top_k={top_k}], got {tuple(ids.shape)}"
                )
            if token_shape is None:
                token_shape = tuple(ids.shape[:-1])
            elif tuple(ids.shape[:-1]) != token_shape:
                raise ValueError(
                    f"layer {name!r}: token shape {list(ids.shape[:-1])} differs from the other layers' "
                    f"{list(token_shape)}"
                )
            named.append((name, ids.detach()))
        compact = _to_compact(named, self.num_experts, top_k)
        self._layers = {name: ids for (name, _), ids in zip(named, compact)}
        self._token_shape = token_shape or ()
        self._cu_seqlens = None
        self._tokens: torch.Tensor | None = None

    def _set_cu_seqlens(self, cu_seqlens: torch.Tensor) -> None:
        if len(self._token_shape) != 1:
            raise ValueError(
                f"cu_seqlens needs a trace of token shape [total_tokens], got {list(self._token_shape)} "
                "(pack a [B, S] trace with .pack(attention_mask))"
            )
        self._cu_seqlens = _check_cu_seqlens(cu_seqlens, self._token_shape[0])

    @classmethod
    def _of_tokens_first(
        cls,
        ids: torch.Tensor,
        names: Sequence[str],
        num_experts: int,
        cu_seqlens: torch.Tensor | None = None,
    ) -> RoutingTrace:
        """A trace whose layers are views of ``ids [*token_shape, L, K]`` (compact, contiguous,
        range already checked): no copy, no check."""
        trace = cls.__new__(cls)
        trace.num_experts, trace.top_k = num_experts, ids.shape[-1]
        trace._layers = {name: ids.select(-2, l) for l, name in enumerate(names)}
        trace._token_shape = tuple(ids.shape[:-2]) if names else ()
        trace._cu_seqlens = None
        trace._tokens = ids if names else None
        if cu_seqlens is not None:
            trace._set_cu_seqlens(cu_seqlens)
        return trace

    # ----- Mapping ---------------------------------------------------------------------------

    def __getitem__(self, key):  # str -> ids; rows (list, tensor, slice) -> RoutingTrace
        """``trace[name]``: a layer's ids. ``trace[rows]`` with a list or tensor of row indices or a
        boolean mask: :meth:`select` along the rows (batch axis, or sequences). ``trace[a:b]``:
        :meth:`slice` (views; bounds default to the whole axis and are never clamped, no step)."""
        if isinstance(key, str):
            return self._layers[key]
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise ValueError(f"a trace slice takes no step, got {key}; use select() for other rows")
            start = 0 if key.start is None else key.start
            return self.slice(start, self.num_rows if key.stop is None else key.stop)
        if isinstance(key, (list, tuple, range, torch.Tensor, np.ndarray)):
            return self.select(key)
        raise TypeError(
            f"a trace is indexed by a layer name (str) or by rows (a list, tensor, boolean mask or "
            f"slice), got {type(key).__name__} {key!r:.40}"
        )

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._layers

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        cu_a, cu_b = self._cu_seqlens, other._cu_seqlens
        return (
            self.num_experts == other.num_experts
            and self.top_k == other.top_k
            and self.layer_names == other.layer_names
            and self.token_shape == other.token_shape
            and (cu_a is None) == (cu_b is None)
            and (cu_a is None or torch.equal(cu_a, cu_b))
            and all(torch.equal(self[n], other[n].to(self[n].device)) for n in self)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable contents (record fills a yielded trace)

    # ----- shape -----------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """Layer names in trace order (the model's module order for a recorded trace)."""
        return list(self._layers)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Leading shape shared by every layer's ids (``()`` for a trace without layers)."""
        return self._token_shape

    @property
    def num_tokens(self) -> int:
        """Tokens per layer: the product of :attr:`token_shape` (0 for a trace without layers)."""
        return math.prod(self._token_shape) if self._layers else 0

    @property
    def cu_seqlens(self) -> torch.Tensor | None:
        """int64 ``[B + 1]`` (CPU) for a packed trace, else ``None``."""
        return self._cu_seqlens

    @property
    def is_packed(self) -> bool:
        return self._cu_seqlens is not None

    @property
    def seq_lens(self) -> list[int] | None:
        """Tokens of each sequence of a packed trace (``None`` when not packed)."""
        cu = self._cu_seqlens
        return None if cu is None else (cu[1:] - cu[:-1]).tolist()

    @property
    def num_rows(self) -> int:
        """Rows (module docstring): sequences of a packed trace, else ``token_shape[0]``."""
        if self._cu_seqlens is not None:
            return self._cu_seqlens.numel() - 1
        if not self._layers:
            raise ValueError("a trace without layers has no rows")
        return self._token_shape[0]

    @property
    def device(self) -> torch.device | None:
        """Device of the ids (``None`` for a trace without layers)."""
        return next(iter(self._layers.values())).device if self._layers else None

    @property
    def dtype(self) -> torch.dtype:
        """The ids' dtype: :func:`compact_dtype` of ``num_experts``."""
        return compact_dtype(self.num_experts)

    @property
    def nbytes(self) -> int:
        """Bytes the ids take (all layers)."""
        return self.num_tokens * self.num_layers * self.top_k * torch.iinfo(self.dtype).bits // 8

    def __repr__(self) -> str:
        packed = f", packed={self.num_rows} sequences" if self._cu_seqlens is not None else ""
        return (
            f"RoutingTrace(layers={len(self)}, token_shape={list(self._token_shape)}, "
            f"top_k={self.top_k}, num_experts={self.num_experts}{packed})"
        )

    def _like(
        self, layers: Mapping[str, torch.Tensor], cu_seqlens: torch.Tensor | None = None
    ) -> RoutingTrace:
        return RoutingTrace(layers, num_experts=self.num_experts, top_k=self.top_k, cu_seqlens=cu_seqlens)

    def _tokens_first(self) -> torch.Tensor | None:
        """The contiguous ``[*token_shape, L, K]`` tensor whose slices are this trace's layers, if
        the layers are such views (engine adapters, ``from_tensor``, ``load``); else ``None``."""
        return self._tokens

    def _map_tokens(self, fn, cu_seqlens: torch.Tensor | None = None) -> RoutingTrace:
        """Apply ``fn`` (an op on the leading token axes) to every layer, or once to the
        token-major tensor when the layers are views of one (keeping them views of one)."""
        base = self._tokens_first()
        if base is not None:
            return RoutingTrace._of_tokens_first(
                fn(base).contiguous(), self.layer_names, self.num_experts, cu_seqlens
            )
        return self._like({n: fn(ids) for n, ids in self._layers.items()}, cu_seqlens)

    # ----- checks and conversions ------------------------------------------------------------

    def validate(self) -> RoutingTrace:
        """Raise ``ValueError`` naming the layer and the first id outside ``-1`` / ``[0, num_experts)``.

        Reads the values (a host synchronisation for GPU ids). Returns ``self``. Repeated experts
        within a row are checked by :func:`moe_replay.replay` when the trace is used.
        """
        base = self._tokens_first()
        if base is not None and base.device.type == "cpu":
            # One contiguous pass over the shared tensor; strided per-layer passes took 6x longer.
            a = base.numpy()
            if int(a.min()) >= -1 and int(a.max()) < self.num_experts:
                return self
        _check_range(list(self._layers.items()), self.num_experts, self.top_k)
        return self

    def to(self, device: torch.device | str) -> RoutingTrace:
        """The same trace with ids on ``device`` (``self`` when nothing moves). ``cu_seqlens``
        stays on the CPU."""
        device = _check_device(device)
        if all(ids.device == device for ids in self._layers.values()):
            return self
        return self._map_tokens(lambda ids: ids.to(device), self._cu_seqlens)

    def to_tensor(self) -> torch.Tensor:
        """All layers as one tensor ``[T, L, K]`` (token axes flattened, layers in trace order, the
        compact dtype); a view, without a copy, when the layers are views of one tensor."""
        if not self._layers:
            raise ValueError("to_tensor() needs a trace with at least one layer, got an empty trace")
        base = self._tokens_first()
        if base is not None:
            return base.reshape(-1, self.num_layers, self.top_k)
        return torch.stack([ids.reshape(-1, self.top_k) for ids in self._layers.values()], dim=1)

    @classmethod
    def from_tensor(
        cls,
        ids: torch.Tensor,
        layer_names: Sequence[str],
        num_experts: int,
        *,
        cu_seqlens: torch.Tensor | None = None,
    ) -> RoutingTrace:
        """A trace from ids ``[..., L, K]`` (e.g. ``[T, L, K]`` from :meth:`to_tensor`).

        ``layer_names[l]`` names ``ids[..., l, :]``; the leading axes become the token shape.
        ``top_k`` is ``ids.shape[-1]``. The ids are range-checked (``ValueError`` naming the layer
        and token) and kept as one token-major tensor in the compact dtype (a copy unless ``ids``
        already is one, contiguous); each layer is a view of it.
        """
        if not _is_int_tensor(ids):
            got = f"dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be an integer torch.Tensor [..., L, K], got {got}")
        if isinstance(layer_names, str) or not isinstance(layer_names, Sequence):
            raise TypeError(f"layer_names must be a sequence of str, got {type(layer_names).__name__}")
        if ids.dim() < 2 or ids.shape[-2] != len(layer_names):
            raise ValueError(
                f"ids must have shape [..., L={len(layer_names)} (len(layer_names)), K], "
                f"got {tuple(ids.shape)}"
            )
        for name in layer_names:
            if not isinstance(name, str):
                raise TypeError(f"layer_names must be str, got {type(name).__name__} {name!r}")
        if len(set(layer_names)) != len(layer_names):
            raise ValueError(f"layer_names must be distinct, got {list(layer_names)}")
        top_k = _check_count("top_k (ids.shape[-1])", ids.shape[-1])
        dtype = compact_dtype(num_experts)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
        if not layer_names:
            return cls({}, num_experts=num_experts, top_k=top_k)
        ids = ids.detach()
        if ids.numel():
            # Per layer, to name the layer; the views cost nothing.
            _check_range([(n, ids.select(-2, l)) for l, n in enumerate(layer_names)], num_experts, top_k)
        return cls._of_tokens_first(ids.to(dtype).contiguous(), list(layer_names), num_experts, cu_seqlens)

    # ----- token axes: micro-batches, generation steps ---------------------------------------

    def _token_dim(self, dim: int) -> int:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
        n = len(self._token_shape)
        if not self._layers or not -n <= dim < n:
            raise ValueError(f"dim must index the token shape {list(self._token_shape)}, got {dim}")
        return dim % n

    def _row_tokens(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices of the packed sequences ``rows`` (int64), and their new cu_seqlens."""
        cu = self._cu_seqlens
        lens = (cu[1:] - cu[:-1])[rows]
        new_cu = torch.zeros(rows.numel() + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=new_cu[1:])
        starts = cu[:-1][rows]
        # token j of the result is token j - new_cu[r] of selected sequence r
        total = int(new_cu[-1])
        seq_of_token = torch.repeat_interleave(torch.arange(rows.numel()), lens)
        index = starts[seq_of_token] + torch.arange(total) - new_cu[:-1][seq_of_token]
        return index, new_cu

    def _rows_index(self, rows: object, size: int, what: str) -> torch.Tensor:
        """``rows`` (index list, integer tensor or array, boolean mask, range) as int64 indices."""
        if isinstance(rows, (str, bytes)) or not isinstance(
            rows, (Sequence, torch.Tensor, np.ndarray, range)
        ):
            raise TypeError(
                f"rows must be a list of indices, an integer tensor or a boolean mask, got "
                f"{type(rows).__name__} {rows!r:.40}"
            )
        if isinstance(rows, torch.Tensor):
            index = rows.detach().cpu()
        else:
            items = list(rows)
            for item in items:
                if not isinstance(item, (int, np.integer, bool, np.bool_)):
                    raise TypeError(f"rows must hold ints or bools, got {type(item).__name__} {item!r:.40}")
            kinds = {isinstance(i, (bool, np.bool_)) for i in items}
            if len(kinds) > 1:
                raise TypeError("rows mixes bools and ints; pass indices or a boolean mask")
            index = torch.tensor(items, dtype=torch.bool if kinds == {True} else torch.int64)
            if not items:
                index = torch.zeros(0, dtype=torch.int64)
        if index.dim() != 1:
            raise ValueError(f"rows must be 1-D, got shape {tuple(index.shape)}")
        if index.dtype == torch.bool:
            if index.numel() != size:
                raise ValueError(
                    f"a boolean rows mask must have {size} entries ({what}), got {index.numel()}"
                )
            return index.nonzero().flatten()
        if not _is_int_tensor(index):
            raise TypeError(f"rows must be integer indices or a boolean mask, got dtype {index.dtype}")
        index = index.long()
        if index.numel() and (int(index.min()) < -size or int(index.max()) >= size):
            bad = index[(index < -size) | (index >= size)][0]
            raise ValueError(f"row index {int(bad)} is out of range for {size} {what}")
        return index % max(size, 1)

    def select(self, rows: object, dim: int = 0) -> RoutingTrace:
        """The rows ``rows`` in the given order (a copy): a list, integer tensor or array of
        indices (negative ones count from the end, repeats allowed) or a boolean mask of exactly
        ``num_rows`` entries (``trace[rows]`` is the same).

        For a ``[B, S]`` trace, rows are along ``dim`` (default the batch axis); for a packed
        trace they are sequences (``dim=0`` only), and the result is packed with their lengths;
        for a ``[T]`` trace they are tokens. Out-of-range indices are a ``ValueError``.
        """
        d = self._token_dim(dim)
        if self._cu_seqlens is not None:
            index = self._rows_index(rows, self.num_rows, "sequences")
            tokens, cu = self._row_tokens(index)
            return self._map_tokens(lambda ids: ids.index_select(0, tokens.to(ids.device)), cu)
        index = self._rows_index(rows, self._token_shape[d], f"entries of token axis {d}")
        return self._map_tokens(lambda ids: ids.index_select(d, index.to(ids.device)))

    def slice(self, start: int, stop: int, dim: int = 0) -> RoutingTrace:
        """Rows ``start:stop`` along token axis ``dim`` (views, no copy; sequences of a packed
        trace). Bounds are not clamped: ``0 <= start <= stop <= size`` or ``ValueError``."""
        d = self._token_dim(dim)
        size = self.num_rows if self._cu_seqlens is not None else self._token_shape[d]
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if not 0 <= start <= stop <= size:
            raise ValueError(
                f"slice [{start}:{stop}] is outside token axis {dim} of size {size} "
                f"(token shape {list(self._token_shape)}{', in sequences' if self.is_packed else ''})"
            )
        if self._cu_seqlens is not None:
            cu = self._cu_seqlens
            lo, hi = int(cu[start]), int(cu[stop])
            return self._map_tokens(lambda ids: ids.narrow(0, lo, hi - lo), cu[start : stop + 1] - lo)
        return self._map_tokens(lambda ids: ids.narrow(d, start, stop - start))

    def split(self, sizes: int | Sequence[int], dim: int = 0) -> list[RoutingTrace]:
        """Consecutive pieces along token axis ``dim`` (rows: sequences of a packed trace).

        ``sizes`` is an int (pieces of that many rows, the last possibly shorter) or a list of
        ints that sum to exactly the rows of the axis (``ValueError`` otherwise), like
        ``torch.split``. With ``dim=0`` these are the micro-batches of a batch: piece ``i`` holds
        rows ``sum(sizes[:i]) .. sum(sizes[:i + 1]) - 1``, to be replayed with the ``i``-th
        micro-batch. The pieces are views (no copy).
        """
        d = self._token_dim(dim)
        total = self.num_rows if self._cu_seqlens is not None else self._token_shape[d]
        if isinstance(sizes, int) and not isinstance(sizes, bool):
            _check_count("sizes", sizes)
            bounds = [(s, min(s + sizes, total)) for s in range(0, total, sizes)]
        elif isinstance(sizes, Sequence) and not isinstance(sizes, str):
            for s in sizes:
                if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                    raise ValueError(f"sizes must hold non-negative ints, got {list(sizes)}")
            if sum(sizes) != total:
                raise ValueError(f"sizes {list(sizes)} sum to {sum(sizes)}, the axis has {total} rows")
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            bounds = [(s, s + n) for s, n in zip(starts, sizes)]
        else:
            raise TypeError(f"sizes must be an int or a list of ints, got {type(sizes).__name__}")
        return [self.slice(lo, hi, d) for lo, hi in bounds]

    def flatten(self) -> RoutingTrace:
        """The same ids with token shape ``[T]`` (``[T, K]`` per layer), not packed."""
        return self._map_tokens(lambda ids: ids.reshape(-1, *ids.shape[len(self._token_shape) :]))

    @classmethod
    def cat(cls, traces: Sequence[RoutingTrace], dim: int = 0) -> RoutingTrace:
        """Join traces along token axis ``dim`` (micro-batches with ``dim=0`` of ``[B, S]`` traces,
        generation steps with ``dim=-1``; the sequences of packed traces, which stay packed). They
        must share num_experts, top_k, layer names and order, packing, and every other token axis."""
        if isinstance(traces, RoutingTrace) or not isinstance(traces, Sequence) or not traces:
            raise ValueError(f"traces must be a non-empty sequence of RoutingTrace, got {traces!r:.80}")
        first = traces[0]
        for i, t in enumerate(traces):
            if not isinstance(t, RoutingTrace):
                raise TypeError(f"traces[{i}] must be a RoutingTrace, got {type(t).__name__}")
            if (t.num_experts, t.top_k, t.layer_names) != (first.num_experts, first.top_k, first.layer_names):
                raise ValueError(
                    f"traces[{i}] (num_experts={t.num_experts}, top_k={t.top_k}, layers={t.layer_names}) "
                    f"does not match traces[0] (num_experts={first.num_experts}, top_k={first.top_k}, "
                    f"layers={first.layer_names})"
                )
            if t.is_packed != first.is_packed:
                raise ValueError(
                    f"traces[{i}] is {'' if t.is_packed else 'not '}packed, traces[0] is the other"
                )
        d = first._token_dim(dim)
        for i, t in enumerate(traces):
            shape, ref = list(t.token_shape), list(first.token_shape)
            if len(shape) != len(ref) or shape[:d] + shape[d + 1 :] != ref[:d] + ref[d + 1 :]:
                raise ValueError(
                    f"traces[{i}] has token shape {shape}, traces[0] {ref}: "
                    f"they may differ on axis {dim} only"
                )
        cu = None
        if first.is_packed:
            offsets = [0]
            for t in traces:
                offsets.append(offsets[-1] + t.num_tokens)
            cu = torch.cat(
                [torch.zeros(1, dtype=torch.int64)] + [t.cu_seqlens[1:] + o for t, o in zip(traces, offsets)]
            )
        if all(t._tokens_first() is not None for t in traces):
            ids = torch.cat([t._tokens_first() for t in traces], dim=d)
            return cls._of_tokens_first(ids, first.layer_names, first.num_experts, cu)
        return first._like({n: torch.cat([t[n] for t in traces], dim=d) for n in first.layer_names}, cu)

    # ----- packing ---------------------------------------------------------------------------

    def pack(self, attention_mask: torch.Tensor, *, check_padding: bool = True) -> RoutingTrace:
        """A ``[B, S]`` trace as a packed one: the tokens where ``attention_mask`` (``[B, S]``, 0/1
        or bool) is set, sequence after sequence, in order; ``cu_seqlens`` from the mask's row sums.

        With ``check_padding`` (default) every dropped position must hold ``-1`` in every layer,
        else ``ValueError`` naming the position: a route under the mask's padding means the mask
        and the trace disagree (left against right padding). Pass ``check_padding=False`` to drop
        routes at padding on purpose (a trace recorded in a padded forward routed its padding too).
        """
        if self._cu_seqlens is not None:
            raise ValueError("the trace is already packed")
        if len(self._token_shape) != 2:
            raise ValueError(f"pack() needs a [B, S] trace, got token shape {list(self._token_shape)}")
        mask = _check_mask(attention_mask, self._token_shape, "attention_mask")
        if check_padding:
            self._check_free_where(~mask, "attention_mask")
        flat = mask.reshape(-1).nonzero().flatten()
        cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(mask.sum(dim=1), 0, out=cu[1:])
        return self._map_tokens(lambda ids: ids.flatten(0, 1).index_select(0, flat.to(ids.device)), cu)

    def _check_free_where(self, where_BS: torch.Tensor, what: str) -> None:
        for name, ids in self._layers.items():
            routed = (ids >= 0).any(dim=-1).cpu() & where_BS
            if bool(routed.any()):
                b, s = routed.nonzero()[0].tolist()
                raise ValueError(
                    f"layer {name!r}: position ({b}, {s}) is padding in {what} but holds routes "
                    f"{ids[b, s].tolist()}: the mask and the trace disagree (left against right "
                    "padding?); pass check_padding=False to drop such routes"
                )

    def unpack(
        self,
        attention_mask: torch.Tensor | None = None,
        *,
        seq_len: int | None = None,
        padding: str = "right",
    ) -> RoutingTrace:
        """A packed trace as ``[B, S]``, ``-1`` at padding: the inverse of :meth:`pack`.

        Either ``attention_mask`` (``[B, S]``; row ``b`` must have exactly ``seq_lens[b]`` set
        positions, which receive the sequence's tokens in order) or ``seq_len`` (S, default the
        longest sequence) with ``padding="right"`` or ``"left"``.
        """
        if self._cu_seqlens is None:
            raise ValueError("unpack() needs a packed trace (one with cu_seqlens)")
        lens = torch.tensor(self.seq_lens, dtype=torch.int64)
        B = lens.numel()
        if attention_mask is not None:
            if seq_len is not None:
                raise ValueError("pass attention_mask or seq_len, not both")
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be a [B={B}, S] tensor, got {attention_mask!r:.60}")
            mask = _check_mask(attention_mask, (B, attention_mask.shape[1]), "attention_mask")
            if not torch.equal(mask.sum(dim=1), lens):
                raise ValueError(
                    f"attention_mask row sums {mask.sum(dim=1).tolist()[:8]} differ from the sequence "
                    f"lengths {lens.tolist()[:8]}"
                )
        else:
            if padding not in ("right", "left"):
                raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
            longest = int(lens.max()) if B else 0
            S = longest if seq_len is None else _check_count("seq_len", seq_len)
            if longest > S:
                raise ValueError(f"seq_len={S} is shorter than the longest sequence ({longest} tokens)")
            pos = torch.arange(S)
            mask = pos < lens[:, None] if padding == "right" else pos >= S - lens[:, None]
        S = mask.shape[1]
        flat = mask.reshape(-1).nonzero().flatten()

        def scatter(ids: torch.Tensor) -> torch.Tensor:
            out = torch.full((B * S, *ids.shape[1:]), -1, dtype=ids.dtype, device=ids.device)
            out.index_copy_(0, flat.to(ids.device), ids)
            return out.reshape(B, S, *ids.shape[1:])

        return self._map_tokens(scatter)

    # ----- data and context parallelism ------------------------------------------------------

    def dp_shard(self, rank: int, world_size: int) -> RoutingTrace:
        """Data parallelism: rank ``rank``'s rows (sequences) of ``world_size`` contiguous shards,
        as ``torch.tensor_split`` cuts them: the first ``num_rows % world_size`` ranks get one row
        more. Views, no copy."""
        _check_rank(rank, world_size)
        n = self.num_rows
        base, extra = divmod(n, world_size)
        start = rank * base + min(rank, extra)
        return self.slice(start, start + base + (rank < extra))

    def _sequences(self) -> tuple[list[int], list[int]]:
        """(start, length) of every sequence along the sequence axis, for context parallelism."""
        if self._cu_seqlens is not None:
            return self._cu_seqlens[:-1].tolist(), self.seq_lens
        return [0], [self._token_shape[-1]]

    def cp_shard(self, rank: int, world_size: int, *, zigzag: bool = False) -> RoutingTrace:
        """Context parallelism: rank ``rank``'s part of every sequence, cut along the sequence axis.

        Contiguous (``zigzag=False``): each sequence is cut into ``world_size`` equal chunks and
        rank ``r`` keeps chunk ``r``. Zigzag (``zigzag=True``, the split ring attention uses to
        balance causal work): each sequence is cut into ``2 * world_size`` equal chunks and rank
        ``r`` keeps chunks ``r`` and ``2 * world_size - 1 - r``, in that order. A ``[B, S]`` trace
        is cut along S (every row alike), a ``[T]`` trace as one sequence, a packed trace
        sequence by sequence (its shard is packed, each sequence shortened). A length that is not
        a multiple of the chunk count is a ``ValueError`` (nothing is padded or dropped).
        """
        _check_rank(rank, world_size)
        if not isinstance(zigzag, bool):
            raise TypeError(f"zigzag must be a bool, got {type(zigzag).__name__}")
        if not self._layers or len(self._token_shape) not in (1, 2):
            raise ValueError(
                f"cp_shard() needs a [B, S], [T] or packed trace, got token shape {list(self._token_shape)}"
            )
        starts, lens = self._sequences()
        index, new_lens = _cp_index(starts, lens, rank, world_size, zigzag, self.is_packed)
        cu = None if self._cu_seqlens is None else _cu_of(new_lens)
        d = len(self._token_shape) - 1
        return self._map_tokens(lambda ids: ids.index_select(d, index.to(ids.device)), cu)

    @classmethod
    def cp_gather(cls, shards: Sequence[RoutingTrace], *, zigzag: bool = False) -> RoutingTrace:
        """The trace :meth:`cp_shard` cut into ``shards`` (rank order): the inverse, e.g. to join
        what each context-parallel rank recorded."""
        if isinstance(shards, RoutingTrace) or not isinstance(shards, Sequence) or not shards:
            raise ValueError(f"shards must be a non-empty list of RoutingTrace, got {shards!r:.80}")
        world = len(shards)
        first = shards[0]
        for i, s in enumerate(shards):
            if not isinstance(s, RoutingTrace):
                raise TypeError(f"shards[{i}] must be a RoutingTrace, got {type(s).__name__}")
            if (s.num_experts, s.top_k, s.layer_names, s.is_packed, s.token_shape[:-1]) != (
                first.num_experts,
                first.top_k,
                first.layer_names,
                first.is_packed,
                first.token_shape[:-1],
            ) or (s.is_packed and s.seq_lens != first.seq_lens):
                raise ValueError(f"shards[{i}] does not match shards[0] ({s!r} against {first!r})")
        if first.is_packed:
            cu = first.cu_seqlens * world
            total: tuple[int, ...] = (int(cu[-1]),)
            starts, lens = cu[:-1].tolist(), (cu[1:] - cu[:-1]).tolist()
        else:
            cu = None
            total = (*first.token_shape[:-1], first.token_shape[-1] * world)
            starts, lens = [0], [total[-1]]
        d = len(total) - 1
        indices = [_cp_index(starts, lens, r, world, zigzag, first.is_packed)[0] for r in range(world)]
        for rank, (s, index) in enumerate(zip(shards, indices)):
            if s.token_shape[-1] != index.numel():
                raise ValueError(
                    f"shards[{rank}] holds {s.token_shape[-1]} tokens along the sequence, "
                    f"expected {index.numel()}"
                )

        def join(parts: list[torch.Tensor]) -> torch.Tensor:
            out = torch.empty(
                (*total, *parts[0].shape[d + 1 :]), dtype=parts[0].dtype, device=parts[0].device
            )
            for part, index in zip(parts, indices):
                out.index_copy_(d, index.to(out.device), part)
            return out

        bases = [s._tokens_first() for s in shards]
        if all(b is not None for b in bases):
            return cls._of_tokens_first(join(bases), first.layer_names, first.num_experts, cu)
        return first._like({n: join([s[n] for s in shards]) for n in first.layer_names}, cu)

    # ----- files -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace to ``path`` as a safetensors file, atomically (module docstring: the
        format, temporary files, permissions, symbolic links).

        Ids are range-checked first (``ValueError``); on any error the previous file at ``path``,
        if there is one, is left unchanged. Ids on a GPU are copied to the host layer by layer.
        """
        path = _check_path(path)
        self.validate()
        base = self._tokens_first()
        K, dtype = self.top_k, self.dtype
        if base is not None:
            layout = "tokens_first"
            shape = [*self._token_shape, self.num_layers, K]
            chunks = _tensor_chunks(base)
        else:
            layout = "layers_first"
            shape = [self.num_layers, *self._token_shape, K]
            chunks = (c for ids in self._layers.values() for c in _tensor_chunks(ids.to(dtype)))
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "num_experts": str(self.num_experts),
            "top_k": str(K),
            "layers": json.dumps(self.layer_names),
            "token_shape": json.dumps(list(self._token_shape)),
            "layout": layout,
        }
        tensors = [(TENSOR_NAME, _ST_NAMES[dtype], shape, math.prod(shape) * dtype.itemsize)]
        if self._cu_seqlens is not None:
            cu = self._cu_seqlens.numpy()
            tensors.append((CU_SEQLENS_NAME, "I64", [cu.size], cu.nbytes))
            chunks = _chain(chunks, [memoryview(cu).cast("B")])
        _write_safetensors(path, metadata, tensors, chunks)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> RoutingTrace:
        """Read a trace written by :meth:`save`; ids in the compact dtype on ``device`` (default:
        the CPU), every layer a view of the one tensor read from the file.

        A file that is truncated, damaged (bad header, size, checksum, ids out of range), not a
        regular file, or not a routing trace raises ``ValueError`` naming the file and what is
        wrong, after reading at most its header when the header already disagrees (module
        docstring). A missing file is ``FileNotFoundError``.
        """
        path = _check_path(path)
        if device is not None:
            device = _check_device(device)
        trace = _read_trace(path)
        return trace if device is None else trace.to(device)


# --------------------------------------------------------------------------------------------
# helpers of the layout operations
# --------------------------------------------------------------------------------------------


def _check_device(device: object) -> torch.device:
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(
            f"device must be a str, int or torch.device, got {type(device).__name__} {device!r:.40}"
        )
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r:.40} is not a device: {e}") from None


def _check_rank(rank: int, world_size: int) -> None:
    _check_count("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _cu_of(lens: Sequence[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0, out=cu[1:])
    return cu


def _cp_index(
    starts: Sequence[int], lens: Sequence[int], rank: int, world: int, zigzag: bool, packed: bool
) -> tuple[torch.Tensor, list[int]]:
    """Sequence-axis indices of rank ``rank``'s context-parallel shard of the sequences
    (``starts``, ``lens``), and each sequence's length in the shard (``cp_shard``)."""
    parts = 2 * world if zigzag else world
    pieces, new_lens = [], []
    for b, (start, n) in enumerate(zip(starts, lens)):
        if n % parts:
            what = f"sequence {b} has {n} tokens" if packed else f"the sequence axis has {n} tokens"
            raise ValueError(
                f"{what}, not a multiple of {parts} ({'2 x ' if zigzag else ''}world_size={world}); "
                "pad the sequences to a multiple first"
            )
        c = n // parts
        chunks = [rank, parts - 1 - rank] if zigzag else [rank]
        pieces += [torch.arange(start + j * c, start + (j + 1) * c) for j in chunks]
        new_lens.append(c * len(chunks))
    index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    return index, new_lens


def _check_mask(mask: object, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A ``[B, S]`` 0/1 or bool mask as a CPU bool tensor (``ValueError`` for other values)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, S] of 0/1, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{name} must be a bool or integer 0/1 tensor, got {mask.dtype}")
    mask = mask.detach().cpu()
    if mask.dtype != torch.bool:
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 1):
            raise ValueError(
                f"{name} must hold only 0 and 1, got values in [{int(mask.min())}, {int(mask.max())}]"
            )
        mask = mask.bool()
    return mask


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _check_path(path: object) -> str:
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r:.60}")
    path = os.fsdecode(os.fspath(path))
    if not path or "\0" in path:
        raise ValueError(f"path must be a non-empty file name without NUL bytes, got {path!r:.60}")
    return path


def _tensor_chunks(ids: torch.Tensor) -> Iterator[memoryview]:
    """The bytes of ``ids`` (row-major), in chunks of about :data:`_CHUNK` bytes, host side."""
    ids = ids.contiguous()
    if ids.numel() == 0:
        return
    flat = ids.reshape(-1)
    step = max(_CHUNK // ids.element_size(), 1)
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        yield memoryview(part.cpu().numpy()).cast("B")


def _chain(*iterables):
    for it in iterables:
        yield from it


def _canonical(metadata: Mapping[str, str]) -> bytes:
    """What the checksum covers of the metadata: every field but ``crc32``, sorted, compact."""
    return json.dumps(
        {k: v for k, v in metadata.items() if k != "crc32"}, sort_keys=True, separators=(",", ":")
    ).encode()


def _write_safetensors(
    path: str,
    metadata: dict[str, str],
    tensors: list[tuple[str, str, list[int], int]],
    chunks: Iterator[memoryview],
) -> None:
    """Stream a safetensors file: header with a fixed-width ``crc32`` placeholder, the tensor bytes
    (checksummed as they go), then the checksum patched into the header; atomically."""
    header: dict[str, object] = {}
    offset = 0
    for name, st_dtype, shape, nbytes in tensors:
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    crc = zlib.crc32(_canonical(metadata))
    placeholder = "#" * 10
    header["__metadata__"] = {**metadata, "crc32": placeholder}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writers do
    crc_at = 8 + text.index(placeholder.encode())

    def write(f) -> None:
        nonlocal crc
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        written = 0
        # The checksum of a chunk runs on a helper thread while the chunk is written (both release
        # the GIL): writing 1 GB took 1.25 s instead of 1.7 s so, on 2 busy cores.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for chunk in chunks:
                if pending is not None:
                    crc = pending.result()
                pending = pool.submit(zlib.crc32, chunk, crc)
                f.write(chunk)
                written += chunk.nbytes
            if pending is not None:
                crc = pending.result()
        if written != offset:
            raise RuntimeError(f"internal error: wrote {written} bytes of tensors, the header says {offset}")
        f.seek(crc_at)
        f.write(f"{crc:010d}".encode())

    write_atomic(path, write)


def _stale_temporaries(target: str) -> list[str]:
    """Temporary files of earlier saves of ``target`` whose writing process no longer runs."""
    directory, base = os.path.split(target)
    pattern = re.compile(r"\." + re.escape(base) + r"\.(\d+)\.[0-9a-f]+" + re.escape(_TMP_SUFFIX) + "$")
    stale = []
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue  # this process: another thread may be saving right now
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stale.append(os.path.join(directory, name))
        except (PermissionError, OverflowError, OSError):
            continue  # alive under another user, or not a pid: leave it
    return stale


def write_atomic(path: str, data) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function writing to a seekable binary file):
    write a temporary file beside it, fsync, ``os.replace`` (module docstring).

    The temporary file is created with mode 0o666 minus the umask, like ``open(path, "wb")``, or
    with the mode of the file it replaces. On error it is removed and ``path`` is untouched.
    Temporary files that dead processes left for the same ``path`` are removed first.
    """
    path = os.path.realpath(path)  # follow a symbolic link: replace its target, keep the link
    directory = os.path.dirname(path)
    for stale in _stale_temporaries(path):
        with contextlib.suppress(OSError):
            os.unlink(stale)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    name = f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
    tmp = os.path.join(directory, name)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "w+b") as f:
            if mode is not None:
                os.chmod(tmp, mode)
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

_DECIMAL = re.compile(r"^[0-9]{1,19}$")
_MAX_LAYERS = 1 << 20
_MAX_NAME = 4096
_MAX_DIM = 1 << 48


def _json_depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse_decimal(meta: Mapping[str, object], key: str, bad) -> int:
    value = meta.get(key)
    if not isinstance(value, str) or not _DECIMAL.match(value):
        raise bad(f"damaged routing trace metadata: {key!r} must be a decimal integer, got {value!r:.40}")
    return int(value)


def _read_exact(f, view: memoryview, path: str, bad) -> None:
    got = 0
    while got < view.nbytes:
        n = f.readinto(view[got : got + _CHUNK])
        if not n:
            raise bad(f"truncated: the file ended after {got} of {view.nbytes} bytes of tensors")
        got += n


def _read_trace(path: str) -> RoutingTrace:
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}")

    # Non-blocking open: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, socket or device"
            raise bad(f"not a routing trace file: {kind}, not a regular file")
        file = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with file as f:
        size = st.st_size
        if size < 8:
            raise bad(f"not a routing trace file: {size} bytes, too short for a safetensors header")
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise bad(
                f"truncated or not a safetensors file: the header claims {header_len} bytes, "
                f"only {size - 8} follow the length field"
            )
        if header_len > MAX_HEADER_BYTES:
            raise bad(
                f"not a routing trace: a {header_len}-byte header, more than the {MAX_HEADER_BYTES} "
                "a trace file has"
            )
        text = f.read(header_len)
        if len(text) != header_len:
            raise bad("truncated: the file ended inside the header")
        try:
            header = json.loads(text.decode("utf-8"))
        except RecursionError:  # json's C parser stops nesting at the recursion limit, early
            raise bad(f"not a routing trace: the header nests deeper than {MAX_JSON_DEPTH} levels") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"damaged or not a safetensors file: the header is not valid JSON ({e})") from None
        if _json_depth(header) > MAX_JSON_DEPTH:
            raise bad(f"not a routing trace: the header nests deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(header, dict):
            raise bad("damaged or not a safetensors file: the header is not a JSON object")
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise bad(
                f"not a moe_replay routing trace: metadata 'format' is {found!r:.60}, expected {FORMAT!r}"
            )
        version = meta.get("format_version")
        if version not in ("1", "2"):
            raise bad(
                f"routing trace format_version {version!r:.20} is not supported; this moe_replay reads "
                f"versions 1 and {FORMAT_VERSION}"
            )
        for key, value in meta.items():
            if not isinstance(value, str):
                raise bad(
                    f"damaged routing trace metadata: {key!r} must be a string, got {type(value).__name__}"
                )
        num_experts = _parse_decimal(meta, "num_experts", bad)
        top_k = _parse_decimal(meta, "top_k", bad)
        crc_stored = _parse_decimal(meta, "crc32", bad)
        if not 1 <= num_experts <= MAX_EXPERTS or not 1 <= top_k <= num_experts:
            raise bad(
                f"damaged routing trace metadata: num_experts={num_experts}, top_k={top_k} (need "
                f"1 <= top_k <= num_experts <= {MAX_EXPERTS})"
            )
        try:
            layers = json.loads(meta["layers"])
            token_shape = json.loads(meta["token_shape"])
        except (KeyError, json.JSONDecodeError, RecursionError) as e:
            raise bad(f"damaged routing trace metadata: missing or malformed field ({e!r:.80})") from None
        if (
            not isinstance(layers, list)
            or len(layers) > _MAX_LAYERS
            or not all(isinstance(n, str) and len(n) <= _MAX_NAME for n in layers)
        ):
            raise bad(f"damaged routing trace metadata: 'layers' must be a list of names, got {layers!r:.80}")
        if len(set(layers)) != len(layers):
            raise bad(f"damaged routing trace metadata: repeated layer names in {layers!r:.200}")
        if (
            not isinstance(token_shape, list)
            or len(token_shape) > MAX_TOKEN_DIMS
            or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in token_shape)
        ):
            raise bad(
                f"damaged routing trace metadata: 'token_shape' must be a list of at most "
                f"{MAX_TOKEN_DIMS} sizes, got {token_shape!r:.80}"
            )
        L = len(layers)
        if version == "1":
            layout = "layers_first"
            dtype_name = "I16" if num_experts <= 32767 else "I32"
        else:
            layout = meta.get("layout")
            dtype_name = _ST_NAMES[compact_dtype(num_experts)]
        if layout == "tokens_first":
            shape = [*token_shape, L, top_k]
        elif layout == "layers_first":
            shape = [L, *token_shape, top_k]
        else:
            raise bad(
                f"damaged routing trace metadata: layout {layout!r:.40} is not tokens_first or layers_first"
            )

        expected = {TENSOR_NAME}
        entry = header.get(TENSOR_NAME)
        others = sorted(k for k in header if k not in ("__metadata__", TENSOR_NAME, CU_SEQLENS_NAME))
        if not isinstance(entry, dict) or others:
            raise bad(
                f"damaged routing trace: expected a tensor {TENSOR_NAME!r} and nothing else but "
                f"{CU_SEQLENS_NAME!r}, found {others or 'none'}"
            )
        if entry.get("dtype") != dtype_name or entry.get("shape") != shape:
            raise bad(
                f"damaged routing trace: {TENSOR_NAME!r} is {entry.get('dtype')!r:.10} "
                f"{entry.get('shape')!r:.80}, the metadata says {dtype_name} {shape} "
                f"(num_experts={num_experts}, {layout})"
            )
        nbytes = math.prod(shape) * _ST_DTYPES[dtype_name].itemsize
        if entry.get("data_offsets") != [0, nbytes]:
            raise bad(
                f"damaged routing trace: data_offsets {entry.get('data_offsets')!r:.60}, "
                f"expected [0, {nbytes}]"
            )
        cu_entry = header.get(CU_SEQLENS_NAME)
        cu_len = 0
        if cu_entry is not None:
            expected.add(CU_SEQLENS_NAME)
            if version == "1" or len(token_shape) != 1 or not isinstance(cu_entry, dict):
                raise bad(f"damaged routing trace: {CU_SEQLENS_NAME!r} in a trace that cannot be packed")
            cu_shape = cu_entry.get("shape")
            if (
                cu_entry.get("dtype") != "I64"
                or not isinstance(cu_shape, list)
                or len(cu_shape) != 1
                or type(cu_shape[0]) is not int
                or not 1 <= cu_shape[0] <= token_shape[0] + 1
            ):
                raise bad(f"damaged routing trace: {CU_SEQLENS_NAME!r} is {cu_entry!r:.80}")
            cu_len = cu_shape[0]
            if cu_entry.get("data_offsets") != [nbytes, nbytes + 8 * cu_len]:
                raise bad(
                    f"damaged routing trace: {CU_SEQLENS_NAME!r} data_offsets "
                    f"{cu_entry.get('data_offsets')!r:.60}"
                )
        body = size - 8 - header_len
        if body != nbytes + 8 * cu_len:
            what = "truncated" if body < nbytes + 8 * cu_len else "damaged"
            raise bad(
                f"{what}: {nbytes + 8 * cu_len} bytes of tensors expected after the header, "
                f"the file holds {body}"
            )

        # The header agrees with the file's size: read the body into its final buffer.
        ids = np.empty(shape, dtype=_NP_DTYPES[_ST_DTYPES[dtype_name]])
        view = memoryview(ids.reshape(-1)).cast("B")
        _read_exact(f, view, path, bad)
        cu = np.empty(cu_len, dtype=np.int64)
        if cu_len:
            _read_exact(f, memoryview(cu).cast("B"), path, bad)

    if version == "1":
        crc = zlib.crc32(view)
    else:
        crc = zlib.crc32(_canonical(meta))
        for start in range(0, view.nbytes, _CHUNK):
            crc = zlib.crc32(view[start : start + _CHUNK], crc)
        crc = zlib.crc32(memoryview(cu).cast("B"), crc)
    if crc != crc_stored:
        raise bad("damaged: the ids or metadata do not match the checksum stored in the file (crc32)")

    ids_t = torch.from_numpy(ids)
    named = [(n, ids_t.select(-2 if layout == "tokens_first" else 0, l)) for l, n in enumerate(layers)]
    try:
        _check_range(named, num_experts, top_k)
    except ValueError as e:
        raise bad(f"damaged routing trace: {e}") from None
    if version == "1":  # int16/int32 layers_first: convert to today's in-memory form
        return RoutingTrace.from_tensor(ids_t.movedim(0, -2), layers, num_experts)
    try:
        if layout == "tokens_first" and L:
            return RoutingTrace._of_tokens_first(
                ids_t, layers, num_experts, torch.from_numpy(cu) if cu_len else None
            )
        return RoutingTrace(
            dict(named),
            num_experts=num_experts,
            top_k=top_k,
            cu_seqlens=torch.from_numpy(cu) if cu_len else None,
        )
    except (ValueError, TypeError) as e:
        raise bad(f"damaged routing trace: {e}") from None
