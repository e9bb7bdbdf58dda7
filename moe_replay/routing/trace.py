"""RoutingTrace: expert ids per layer, the thing that is recorded, stored, shipped and replayed.

Shape legend: L layers, K experts per token, T tokens (all token axes flattened). A layer's ids
are ``[..., K]`` with the token shape of what the layer routed (``[T]``, or ``[B, S]`` for a batch
of sequences); every layer of one trace has the same token shape. ``-1`` marks a slot the router
decides at replay (padding, a token the engine never forwarded).

In memory, ids are int32 on any device. On disk (:meth:`RoutingTrace.save`) a trace is one
safetensors file holding one tensor ``expert_ids [L, *token_shape, K]``, int16 when
``num_experts <= 32767`` (ids up to 32766 and ``-1`` fit), else int32, plus string metadata:

=================  ===========================================================================
``format``         ``"moe_replay.routing_trace"`` (foreign safetensors files are refused)
``format_version`` ``"1"``; a reader refuses versions it does not know
``num_experts``    E, decimal
``top_k``          K, decimal
``layers``         JSON list of the L layer names, in trace order
``token_shape``    JSON list, the token shape shared by every layer
``crc32``          CRC-32 of the ``expert_ids`` bytes as stored, decimal (detects damaged data)
=================  ===========================================================================

Files are written atomically: the bytes go to a temporary file in the target's directory, which
is flushed and fsynced, then renamed over the target (``os.replace``); a crash or error mid-save
leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

FORMAT = "moe_replay.routing_trace"
FORMAT_VERSION = 1
TENSOR_NAME = "expert_ids"
INT16_MAX_EXPERTS = 32767
"""Up to this many experts, ids (at most 32766, and -1) are stored as int16."""

_STORAGE_DTYPES = {"I16": torch.int16, "I32": torch.int32}
_ITEMSIZE = {"I16": 2, "I32": 4}


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _is_int_tensor(ids: object) -> bool:
    return (
        isinstance(ids, torch.Tensor)
        and not ids.is_floating_point()
        and not ids.is_complex()
        and ids.dtype != torch.bool
    )


def storage_dtype(num_experts: int) -> torch.dtype:
    """The dtype ids are stored with on disk: int16 up to 32767 experts, int32 beyond."""
    return torch.int16 if num_experts <= INT16_MAX_EXPERTS else torch.int32


class RoutingTrace(Mapping[str, torch.Tensor]):
    """Mapping of layer name -> int32 ids ``[..., K]``, in layer order, with ``num_experts`` and ``top_k``.

    Every layer holds the same token shape (all layers route the same tokens). Ids are ``-1``
    (free: the router decides at replay) or in ``[0, num_experts)``; :meth:`validate` checks the
    range (the constructor checks dtypes and shapes only, so building a trace never synchronises
    with a GPU). Integer ids of any dtype are converted to int32.

    Token axes are addressed by ``dim`` (an index into :attr:`token_shape`): for ``[B, S, K]``
    ids, ``dim=0`` is the batch axis and ``dim=1`` (or ``-1``) the sequence axis; for ``[T, K]``,
    ``dim=0`` is the token axis. :meth:`slice`, :meth:`split` and :meth:`cat` work along one.

    Two traces compare equal (``==``) when they have the same ``num_experts``, ``top_k``, layer
    names in the same order, token shape and ids.
    """

    def __init__(self, layers: Mapping[str, torch.Tensor], *, num_experts: int, top_k: int) -> None:
        self.num_experts = _check_count("num_experts", num_experts)
        self.top_k = _check_count("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
        self._assign(layers)

    def _assign(self, layers: Mapping[str, torch.Tensor]) -> None:
        """Check and store ``layers`` (``record`` fills the trace it yielded this way on exit)."""
        top_k = self.top_k
        if not isinstance(layers, Mapping):
            raise TypeError(f"layers must be a mapping of layer name -> tensor, got {type(layers).__name__}")
        token_shape: tuple[int, ...] | None = None
        stored: dict[str, torch.Tensor] = {}
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
            stored[name] = ids.to(torch.int32)
        self._layers = stored
        self._token_shape = token_shape or ()

    # ----- Mapping ---------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        return (
            self.num_experts == other.num_experts
            and self.top_k == other.top_k
            and self.layer_names == other.layer_names
            and self.token_shape == other.token_shape
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
    def device(self) -> torch.device | None:
        """Device of the ids (``None`` for a trace without layers)."""
        return next(iter(self._layers.values())).device if self._layers else None

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(layers={len(self)}, token_shape={list(self._token_shape)}, "
            f"top_k={self.top_k}, num_experts={self.num_experts})"
        )

    def _like(self, layers: Mapping[str, torch.Tensor]) -> RoutingTrace:
        return RoutingTrace(layers, num_experts=self.num_experts, top_k=self.top_k)

    # ----- checks and conversions ------------------------------------------------------------

    def validate(self) -> RoutingTrace:
        """Raise ``ValueError`` naming the layer and the first id outside ``-1`` / ``[0, num_experts)``.

        Reads the values (a host synchronisation for GPU ids). Returns ``self``. Repeated experts
        within a row are checked by :func:`moe_replay.replay` when the trace is used.
        """
        layers = [(name, ids) for name, ids in self._layers.items() if ids.numel()]
        if not layers:
            return self
        # One min/max pass per layer and one host read for all of them (validate runs on every
        # save and load: 12.6M ids take ~15 ms this way, ~50 ms with elementwise masks).
        bounds = torch.stack([torch.stack(torch.aminmax(ids)) for _, ids in layers]).tolist()
        for (name, ids), (lo, hi) in zip(layers, bounds):
            if lo >= -1 and hi < self.num_experts:
                continue
            ids_TK = ids.reshape(-1, self.top_k)
            row = int(((ids_TK < -1) | (ids_TK >= self.num_experts)).any(dim=1).nonzero()[0])
            raise ValueError(
                f"layer {name!r}: token {row} (of the flattened token axes) holds "
                f"{ids_TK[row].tolist()}: ids must be -1 (free) or in [0, num_experts={self.num_experts})"
            )
        return self

    def to(self, device: torch.device | str) -> RoutingTrace:
        """The same trace with ids on ``device`` (``self`` when nothing moves)."""
        device = torch.device(device)
        if all(ids.device == device for ids in self._layers.values()):
            return self
        return self._like({n: ids.to(device) for n, ids in self._layers.items()})

    def to_tensor(self) -> torch.Tensor:
        """All layers as one int32 tensor ``[T, L, K]`` (token axes flattened, layers in trace order)."""
        if not self._layers:
            raise ValueError("to_tensor() needs a trace with at least one layer, got an empty trace")
        return torch.stack([ids.reshape(-1, self.top_k) for ids in self._layers.values()], dim=1)

    @classmethod
    def from_tensor(cls, ids: torch.Tensor, layer_names: Sequence[str], num_experts: int) -> RoutingTrace:
        """A trace from ids ``[..., L, K]`` (e.g. ``[T, L, K]`` from :meth:`to_tensor`).

        ``layer_names[l]`` names ``ids[..., l, :]``; the leading axes become the token shape.
        ``top_k`` is ``ids.shape[-1]``. The ids are range-checked (:meth:`validate`).
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
        if len(set(layer_names)) != len(layer_names):
            raise ValueError(f"layer_names must be distinct, got {list(layer_names)}")
        ids_LK = ids.to(torch.int32).movedim(-2, 0).contiguous()  # [L, ..., K]: each layer contiguous
        trace = cls(dict(zip(layer_names, ids_LK.unbind(0))), num_experts=num_experts, top_k=ids.shape[-1])
        return trace.validate()

    # ----- token axes: micro-batches, generation steps ---------------------------------------

    def _token_dim(self, dim: int) -> int:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
        n = len(self._token_shape)
        if not self._layers or not -n <= dim < n:
            raise ValueError(f"dim must index the token shape {list(self._token_shape)}, got {dim}")
        return dim % n

    def slice(self, start: int, stop: int, dim: int = 0) -> RoutingTrace:
        """Tokens ``start:stop`` along token axis ``dim`` (views, no copy). Bounds are not clamped:
        ``0 <= start <= stop <= token_shape[dim]`` or ``ValueError``."""
        d = self._token_dim(dim)
        size = self._token_shape[d]
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if not 0 <= start <= stop <= size:
            raise ValueError(
                f"slice [{start}:{stop}] is outside token axis {dim} of size {size} "
                f"(token shape {list(self._token_shape)})"
            )
        return self._like({n: ids.narrow(d, start, stop - start) for n, ids in self._layers.items()})

    def split(self, size: int, dim: int = 0) -> list[RoutingTrace]:
        """Consecutive pieces of ``size`` along token axis ``dim`` (the last may be shorter):
        the micro-batches of a batch trace with ``dim=0``."""
        d = self._token_dim(dim)
        _check_count("size", size)
        total = self._token_shape[d]
        return [self.slice(start, min(start + size, total), d) for start in range(0, total, size)]

    def flatten(self) -> RoutingTrace:
        """The same ids with token shape ``[T]`` (``[T, K]`` per layer)."""
        return self._like({n: ids.reshape(-1, self.top_k) for n, ids in self._layers.items()})

    @classmethod
    def cat(cls, traces: Sequence[RoutingTrace], dim: int = 0) -> RoutingTrace:
        """Join traces along token axis ``dim`` (micro-batches with ``dim=0`` of ``[B, S]`` traces,
        generation steps with ``dim=-1``). They must share num_experts, top_k, layer names and
        order, and every other token axis."""
        if isinstance(traces, RoutingTrace) or not isinstance(traces, Sequence) or not traces:
            raise ValueError(f"traces must be a non-empty sequence of RoutingTrace, got {traces!r}")
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
        d = first._token_dim(dim)
        for i, t in enumerate(traces):
            shape, ref = list(t.token_shape), list(first.token_shape)
            if len(shape) != len(ref) or shape[:d] + shape[d + 1 :] != ref[:d] + ref[d + 1 :]:
                raise ValueError(
                    f"traces[{i}] has token shape {shape}, traces[0] {ref}: "
                    f"they may differ on axis {dim} only"
                )
        return first._like({n: torch.cat([t[n] for t in traces], dim=d) for n in first.layer_names})

    # ----- files -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace to ``path`` as a safetensors file, atomically (module docstring).

        Ids are range-checked first (``ValueError``); on any error the previous file at ``path``,
        if there is one, is left unchanged.
        """
        import safetensors.torch

        path = os.fspath(path)
        # Host-side work in numpy, single-threaded: on a machine whose cores are busy, each of
        # torch's parallel CPU ops waits at a thread-pool barrier (a [32768, 48, 8] trace took
        # ~0.5 s in torch.stack alone on 2 loaded cores, ~0.1 s in np.stack).
        layers = list(self._layers.values())
        if not layers:
            ids_L = np.empty((0, *self._token_shape, self.top_k), dtype=np.int32)
        elif all(ids.device.type == "cpu" for ids in layers):
            ids_L = np.stack([ids.numpy() for ids in layers])  # [L, ..., K] int32
        else:
            ids_L = torch.stack([ids.to(layers[0].device) for ids in layers]).cpu().numpy()
        if not _in_range(ids_L, self.num_experts):
            self.validate()  # raises, naming the layer and token
        stored = torch.from_numpy(ids_L.astype(_numpy_dtype(storage_dtype(self.num_experts))))
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "num_experts": str(self.num_experts),
            "top_k": str(self.top_k),
            "layers": json.dumps(self.layer_names),
            "token_shape": json.dumps(list(self._token_shape)),
            "crc32": str(zlib.crc32(stored.numpy())),  # type: ignore[arg-type]  # ndarray is a Buffer
        }
        data = safetensors.torch.save({TENSOR_NAME: stored}, metadata=metadata)
        write_atomic(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> RoutingTrace:
        """Read a trace written by :meth:`save`; ids int32 on ``device`` (default: CPU).

        A file that is truncated, damaged (bad header, size or checksum, ids out of range) or not
        a routing trace raises ``ValueError`` naming the file and what is wrong.
        """
        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        return _decode(path, data, device)


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: write a temporary file beside it, fsync, ``os.replace``.

    The temporary file is created with mode 0o666 minus the umask, like ``open(path, "wb")``.
    On error it is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
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


def _decode(path: str, data: bytes, device: torch.device | str | None) -> RoutingTrace:
    """Parse and check the bytes of a trace file (see the module docstring for the layout)."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}")

    # safetensors layout: u64 little-endian header length, JSON header, then the tensor bytes.
    if len(data) < 8:
        raise bad(f"not a routing trace file: {len(data)} bytes, too short for a safetensors header")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise bad(
            f"truncated or not a safetensors file: the header claims {header_len} bytes, "
            f"only {len(data) - 8} follow the length field"
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"damaged or not a safetensors file: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("damaged or not a safetensors file: the header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise bad(f"not a moe_replay routing trace: metadata 'format' is {found!r}, expected {FORMAT!r}")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise bad(
            f"routing trace format_version {meta.get('format_version')!r} is not supported; "
            f"this moe_replay reads version {FORMAT_VERSION}"
        )
    try:
        num_experts = int(meta["num_experts"])
        top_k = int(meta["top_k"])
        layers = json.loads(meta["layers"])
        token_shape = json.loads(meta["token_shape"])
        crc = int(meta["crc32"])
    except (KeyError, ValueError, TypeError) as e:
        raise bad(f"damaged routing trace metadata: missing or malformed field ({e!r})") from None
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise bad(f"damaged routing trace metadata: 'layers' must be a list of names, got {layers!r}")
    if not isinstance(token_shape, list) or not all(isinstance(d, int) and d >= 0 for d in token_shape):
        raise bad(
            f"damaged routing trace metadata: 'token_shape' must be a list of sizes, got {token_shape!r}"
        )

    entry = header.get(TENSOR_NAME)
    others = sorted(k for k in header if k not in ("__metadata__", TENSOR_NAME))
    if not isinstance(entry, dict) or others:
        raise bad(
            f"damaged routing trace: expected exactly one tensor {TENSOR_NAME!r}, found {others or 'none'}"
        )
    expected_shape = [len(layers), *token_shape, top_k]
    expected_dtype = "I16" if num_experts <= INT16_MAX_EXPERTS else "I32"
    if entry.get("dtype") != expected_dtype or entry.get("shape") != expected_shape:
        raise bad(
            f"damaged routing trace: {TENSOR_NAME!r} is {entry.get('dtype')} {entry.get('shape')}, "
            f"the metadata says {expected_dtype} {expected_shape} (num_experts={num_experts})"
        )
    offsets = entry.get("data_offsets")
    nbytes = math.prod(expected_shape) * _ITEMSIZE[expected_dtype]
    if offsets != [0, nbytes]:
        raise bad(f"damaged routing trace: data_offsets {offsets}, expected [0, {nbytes}]")
    body = len(data) - 8 - header_len
    if body != nbytes:
        what = "truncated" if body < nbytes else "damaged"
        raise bad(f"{what}: {nbytes} bytes of ids expected after the header, the file holds {body}")

    import safetensors.torch

    try:
        stored = safetensors.torch.load(data)[TENSOR_NAME]
    except Exception as e:  # safetensors raises its own error types; name the file
        raise bad(f"damaged safetensors file: {e}") from None
    if zlib.crc32(stored.numpy()) != crc:  # type: ignore[arg-type]  # ndarray is a Buffer
        raise bad("damaged: the ids do not match the checksum stored in the file (crc32)")
    if len(set(layers)) != len(layers):
        raise bad(f"damaged routing trace metadata: repeated layer names in {layers}")
    ids = torch.from_numpy(stored.numpy().astype(np.int32))  # numpy: see RoutingTrace.save
    try:
        trace = RoutingTrace(dict(zip(layers, ids.unbind(0))), num_experts=num_experts, top_k=top_k)
        if not _in_range(stored.numpy(), num_experts):  # on the CPU, before any move
            trace.validate()  # raises, naming the layer and token
    except (ValueError, TypeError) as e:
        raise bad(f"damaged routing trace: {e}") from None
    return trace if device is None else trace.to(device)


def _in_range(ids: np.ndarray, num_experts: int) -> bool:
    """Whether every id of ``ids`` is -1 or in ``[0, num_experts)``."""
    return ids.size == 0 or (int(ids.min()) >= -1 and int(ids.max()) < num_experts)


def _numpy_dtype(dtype: torch.dtype) -> type:
    return {torch.int16: np.int16, torch.int32: np.int32}[dtype]
