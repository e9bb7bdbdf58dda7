"""RoutingTrace (routing/trace.py): construction, tensors, token slicing, files.

Shape legend: B batch, S sequence, T tokens, L layers, K experts per token.
"""

from __future__ import annotations

import json
import os
import stat
import tracemalloc
import zlib

import pytest
import safetensors.torch
import torch

import moe_replay as mr


def random_ids(
    token_shape: tuple[int, ...], E: int, K: int, seed: int = 0, free: float = 0.1
) -> torch.Tensor:
    """K distinct ids in [0, E) per token, with about ``free`` of the slots set to -1."""
    g = torch.Generator().manual_seed(seed)
    T = 1
    for d in token_shape:
        T *= d
    scores = torch.rand(T, E, generator=g)
    ids = scores.topk(K, dim=1).indices.to(torch.int32)
    ids[torch.rand(T, K, generator=g) < free] = -1
    return ids.reshape(*token_shape, K)


def make_trace(E: int = 8, K: int = 2, L: int = 3, token_shape=(4, 6), seed: int = 0) -> mr.RoutingTrace:
    layers = {f"layers.{i}.mlp": random_ids(token_shape, E, K, seed + i) for i in range(L)}
    return mr.RoutingTrace(layers, num_experts=E, top_k=K)


# ----------------------------------------------------------------------------- construction


def test_mapping_shape_and_dtype():
    ids = torch.tensor([[[0, 1], [2, 3]]], dtype=torch.int64)  # [1, 2, K]
    trace = mr.RoutingTrace({"b": ids, "a": ids}, num_experts=4, top_k=2)
    assert trace.layer_names == ["b", "a"] and list(trace) == ["b", "a"] and len(trace) == 2
    assert trace.token_shape == (1, 2) and trace.num_tokens == 2 and trace.num_layers == 2
    assert trace["a"].dtype == torch.int8 and torch.equal(trace["a"], ids)  # compact: E = 4 fits int8
    assert repr(trace) == "RoutingTrace(layers=2, token_shape=[1, 2], top_k=2, num_experts=4)"
    empty = mr.RoutingTrace({}, num_experts=4, top_k=2)
    assert empty.num_tokens == 0 and empty.token_shape == () and empty.device is None


@pytest.mark.parametrize(
    ("layers", "kw", "error", "match"),
    [
        ({"a": torch.zeros(3, 2)}, {}, ValueError, "layer 'a': ids must be an integer"),  # float ids
        ({"a": [[0, 1]]}, {}, ValueError, "got list"),  # not a tensor
        ({"a": torch.zeros(3, 3, dtype=torch.long)}, {}, ValueError, r"\[\.\.\., top_k=2\], got \(3, 3\)"),
        (
            {"a": torch.zeros(3, 2, dtype=torch.long), "b": torch.zeros(4, 2, dtype=torch.long)},
            {},
            ValueError,
            r"layer 'b': token shape \[4\] differs from the other layers' \[3\]",
        ),
        ({}, {"num_experts": 0}, ValueError, "num_experts must be a positive int, got 0"),
        ({}, {"top_k": 2.0}, TypeError, "top_k must be an int"),
        ({}, {"top_k": 9}, ValueError, "top_k must be <= num_experts=8, got 9"),
        ([("a", 1)], {}, TypeError, "layers must be a mapping"),
    ],
)
def test_construction_errors(layers, kw, error, match):
    args = {"num_experts": 8, "top_k": 2, **kw}
    with pytest.raises(error, match=match):
        mr.RoutingTrace(layers, **args)


def test_validate_names_layer_and_token():
    ids = torch.tensor([[0, 1], [2, 8]])
    with pytest.raises(ValueError, match=r"layer 'x': token 1 .* \[2, 8\].*\[0, num_experts=8\)"):
        mr.RoutingTrace({"x": ids}, num_experts=8, top_k=2).validate()
    with pytest.raises(ValueError, match=r"token 0 .* \[-2, 1\]"):
        mr.RoutingTrace({"x": torch.tensor([[-2, 1]])}, num_experts=8, top_k=2).validate()


def test_equality():
    a = make_trace()
    assert a == make_trace() and a != make_trace(seed=1)
    assert a != mr.RoutingTrace(dict(reversed(list(a.items()))), num_experts=8, top_k=2)  # layer order
    assert a != mr.RoutingTrace(dict(a), num_experts=9, top_k=2)
    assert a != a.flatten()  # same ids, other token shape
    assert a.__eq__({"x": 1}) is NotImplemented


# ----------------------------------------------------------------------------- tensors


def test_to_tensor_and_from_tensor_round_trip():
    trace = make_trace(token_shape=(4, 6))
    t = trace.to_tensor()
    assert t.shape == (24, 3, 2) and t.dtype == torch.int8
    for l, name in enumerate(trace):
        assert torch.equal(t[:, l], trace[name].reshape(24, 2))
    back = mr.RoutingTrace.from_tensor(t, trace.layer_names, num_experts=8)
    assert back == trace.flatten()
    batched = mr.RoutingTrace.from_tensor(t.reshape(4, 6, 3, 2).long(), trace.layer_names, 8)
    assert batched == trace
    # one token-major tensor, each layer a view of it; to_tensor() hands it back without a copy
    assert batched.to_tensor().data_ptr() == batched[trace.layer_names[0]].data_ptr()


@pytest.mark.parametrize(
    ("ids", "names", "match"),
    [
        (
            torch.zeros(5, 3, 2, dtype=torch.long),
            ["a", "b"],
            r"\[\.\.\., L=2 \(len\(layer_names\)\), K\], got \(5, 3, 2\)",
        ),
        (torch.zeros(5, 2, 2), ["a", "b"], "integer"),
        (torch.zeros(5, 2, 2, dtype=torch.long), ["a", "a"], "distinct"),
        (torch.full((5, 2, 2), 8), ["a", "b"], r"layer 'a': token 0"),  # out of range for 8 experts
    ],
)
def test_from_tensor_errors(ids, names, match):
    with pytest.raises(ValueError, match=match):
        mr.RoutingTrace.from_tensor(ids, names, num_experts=8)


def test_to_tensor_of_an_empty_trace_is_an_error():
    with pytest.raises(ValueError, match="empty trace"):
        mr.RoutingTrace({}, num_experts=8, top_k=2).to_tensor()


def test_to_device():
    trace = make_trace()
    assert trace.to("cpu") is trace
    with pytest.raises(ValueError, match="device 'gpu0' is not a device"):
        trace.to("gpu0")
    with pytest.raises(ValueError, match="device -1 is not a device"):
        trace.to(-1)
    with pytest.raises(TypeError, match=r"device must be a str, int or torch\.device, got float"):
        trace.to(1.5)
    moved = trace.to("meta")
    assert moved.device == torch.device("meta") and moved.token_shape == trace.token_shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_cuda_and_back():
    trace = make_trace()
    assert trace.to("cuda").to("cpu") == trace


# ----------------------------------------------------------------------------- token axes


def test_split_then_cat_is_the_identity_on_both_axes():
    trace = make_trace(token_shape=(5, 6))
    pieces = trace.split(2)  # micro-batches of 2 rows: 2, 2, 1
    assert [p.token_shape for p in pieces] == [(2, 6), (2, 6), (1, 6)]
    assert mr.RoutingTrace.cat(pieces) == trace
    steps = trace.split(4, dim=-1)  # along the sequence
    assert [p.token_shape for p in steps] == [(5, 4), (5, 2)]
    assert mr.RoutingTrace.cat(steps, dim=1) == trace


def test_slice_takes_the_named_rows_and_does_not_clamp():
    trace = make_trace(token_shape=(5, 6))
    part = trace.slice(1, 3)
    assert all(torch.equal(part[n], trace[n][1:3]) for n in trace)
    cols = trace.slice(2, 5, dim=1)
    assert all(torch.equal(cols[n], trace[n][:, 2:5]) for n in trace)
    assert trace.slice(2, 2).num_tokens == 0
    with pytest.raises(ValueError, match=r"slice \[3:9\] is outside token axis 0 of size 5"):
        trace.slice(3, 9)
    with pytest.raises(ValueError, match=r"slice \[3:1\]"):
        trace.slice(3, 1)
    with pytest.raises(ValueError, match=r"dim must index the token shape \[5, 6\], got 2"):
        trace.slice(0, 1, dim=2)
    with pytest.raises(ValueError, match="sizes must be a positive int"):
        trace.split(0)


def test_cat_errors():
    a = make_trace(token_shape=(2, 6))
    with pytest.raises(ValueError, match=r"traces\[1\] has token shape \[2, 5\], traces\[0\] \[2, 6\]"):
        mr.RoutingTrace.cat([a, make_trace(token_shape=(2, 5))])
    with pytest.raises(ValueError, match=r"traces\[1\] \(num_experts=16"):
        mr.RoutingTrace.cat([a, make_trace(E=16, token_shape=(2, 6))])
    with pytest.raises(ValueError, match=r"traces\[1\].*layers="):
        mr.RoutingTrace.cat([a, make_trace(L=2, token_shape=(2, 6))])
    with pytest.raises(TypeError, match=r"traces\[1\] must be a RoutingTrace"):
        mr.RoutingTrace.cat([a, {}])
    with pytest.raises(ValueError, match="non-empty sequence"):
        mr.RoutingTrace.cat([])


# ----------------------------------------------------------------------------- files


COMPACT = [
    (8, 2, torch.int8),  # small
    (128, 8, torch.int8),  # the largest count in 1 byte: ids up to 127 (Qwen3-30B-A3B)
    (129, 8, torch.int16),  # one more: 2 bytes
    (256, 8, torch.int16),  # DeepSeek-V3
    (32768, 4, torch.int16),  # the largest count in 2 bytes: ids up to 32767
    (32769, 4, torch.int32),  # beyond: 4 bytes
]


@pytest.mark.parametrize(("E", "K", "stored"), COMPACT)
@pytest.mark.parametrize("layout", ["layers_first", "tokens_first"])
def test_save_load_round_trip_is_bit_exact(tmp_path, E, K, stored, layout):
    trace = make_trace(E=E, K=K, token_shape=(3, 7))
    last = next(iter(trace.values()))
    last[0, 0, 0] = E - 1  # the largest id
    last[0, 0, 1] = -1
    if layout == "tokens_first":  # every layer a view of one [B, S, L, K] tensor
        trace = mr.RoutingTrace.from_tensor(torch.stack(list(trace.values()), dim=-2), trace.layer_names, E)
    assert trace.dtype == stored and all(ids.dtype == stored for ids in trace.values())
    path = tmp_path / "routes.safetensors"
    trace.save(path)
    loaded = mr.RoutingTrace.load(path)
    assert loaded == trace and loaded.layer_names == trace.layer_names
    assert all(loaded[n].dtype == stored for n in loaded)
    raw = safetensors.torch.load_file(path)["expert_ids"]
    shape = (3, 3, 7, K) if layout == "layers_first" else (3, 7, 3, K)
    assert raw.dtype == stored and raw.shape == shape
    assert safetensors.safe_open(path, "pt").metadata()["layout"] == layout
    assert os.listdir(tmp_path) == ["routes.safetensors"]  # no temporary file left


def test_save_load_flat_empty_and_zero_token_traces(tmp_path):
    for i, trace in enumerate(
        [
            make_trace(token_shape=(11,)),
            mr.RoutingTrace({}, num_experts=8, top_k=2),
            make_trace(token_shape=(0, 4)),
        ]
    ):
        path = tmp_path / f"t{i}.safetensors"
        trace.save(str(path))
        assert mr.RoutingTrace.load(str(path)) == trace


def test_load_to_device(tmp_path):
    trace = make_trace()
    trace.save(tmp_path / "t.safetensors")
    assert mr.RoutingTrace.load(tmp_path / "t.safetensors", device="meta").device == torch.device("meta")


def test_save_refuses_out_of_range_ids_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "t.safetensors"
    good = make_trace()
    good.save(path)
    with pytest.raises(ValueError, match="layer 'x'"):  # caught when narrowed to int8
        mr.RoutingTrace({"x": torch.tensor([[0, 40000]])}, num_experts=8, top_k=2)
    bad = mr.RoutingTrace({"x": torch.tensor([[0, 100]], dtype=torch.int8)}, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="layer 'x'"):  # int8 already: caught by save
        bad.save(path)
    assert mr.RoutingTrace.load(path) == good


class HalfWriter:
    """A file whose write stores half of the bytes, then fails (a crash mid-write)."""

    def __init__(self, f) -> None:
        self.f = f

    def __enter__(self) -> HalfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, data: bytes) -> None:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError("simulated crash")


@pytest.mark.parametrize("failing", ["replace", "fsync", "write"])
def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "t.safetensors"
    old = make_trace(seed=0)
    old.save(path)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash")

    if failing == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="simulated crash"):
        make_trace(seed=1).save(path)
    monkeypatch.undo()
    assert mr.RoutingTrace.load(path) == old
    assert os.listdir(tmp_path) == ["t.safetensors"]  # the temporary file was removed


def saved_bytes(tmp_path, trace=None) -> bytes:
    path = tmp_path / "good.safetensors"
    (trace or make_trace()).save(path)
    return path.read_bytes()


def header_of(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def with_header(data: bytes, header: dict) -> bytes:
    n = int.from_bytes(data[:8], "little")
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def crc_for(data: bytes, **changes: str) -> str:
    """The checksum a file with these metadata changes would carry (metadata, then tensor bytes)."""
    header = header_of(data)
    meta = {k: v for k, v in {**header["__metadata__"], **changes}.items() if k != "crc32"}
    n = int.from_bytes(data[:8], "little")
    text = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return f"{zlib.crc32(data[8 + n :], zlib.crc32(text)):010d}"


def damaged_files(tmp_path) -> dict[str, tuple[bytes, str]]:
    data = saved_bytes(tmp_path)
    header = header_of(data)
    n = int.from_bytes(data[:8], "little")

    def meta(**changes):
        h = json.loads(json.dumps(header))
        h["__metadata__"].update(changes)
        return with_header(data, h)

    def without_layers():
        h = json.loads(json.dumps(header))
        del h["__metadata__"]["layers"]
        return with_header(data, h)

    flipped = bytearray(data)
    flipped[-3] ^= 0x01  # one bit of one id
    other = safetensors.torch.save({"weight": torch.zeros(3)})
    shape = json.loads(json.dumps(header))
    shape["expert_ids"]["shape"][1] += 1
    return {
        "empty file": (b"", "too short"),
        "text file": (b"hello, this is not a trace at all", "truncated or not a safetensors file"),
        "truncated in the header": (data[: 8 + n // 2], "truncated or not a safetensors file"),
        "truncated in the ids": (data[:-10], "truncated: .* bytes of tensors expected"),
        "extra bytes": (data + b"\0\0", "damaged: .* bytes of tensors expected"),
        "bit flip in the ids": (bytes(flipped), "checksum"),
        "header not JSON": (data[:8] + b"\xff" * n + data[8 + n :], "header is not valid JSON"),
        "foreign safetensors": (other, "not a moe_replay routing trace: metadata 'format' is None"),
        "newer format": (meta(format_version="99"), "format_version '99' is not supported"),
        "metadata field malformed": (meta(top_k="two"), "'top_k' must be a decimal integer"),
        "metadata field missing": (without_layers(), "missing or malformed field"),
        "layers wrong": (meta(layers='["a"]'), "metadata says I8"),
        "shape wrong": (with_header(data, shape), "the metadata says I8"),
        "layer renamed": (
            meta(layers=header["__metadata__"]["layers"].replace("layers.0", "layers.9")),
            "checksum",
        ),
        "metadata added": (meta(note="x"), "checksum"),
        "ids out of range": (
            meta(num_experts="3", crc32=crc_for(data, num_experts="3")),
            r"damaged routing trace: layer .* num_experts=3",
        ),
        "num_experts not decimal": (meta(num_experts="1e3"), "'num_experts' must be a decimal integer"),
        "top_k above num_experts": (meta(top_k="9"), "1 <= top_k <= num_experts"),
        "token_shape too long": (meta(token_shape=json.dumps([1] * 9)), "at most 8 sizes"),
        "token_shape of bools": (meta(token_shape="[true, 6]"), "list of at most 8 sizes"),
        "layout unknown": (meta(layout="columns"), "layout 'columns'"),
        "metadata value not a string": (meta(top_k=2), "'top_k' must be a string"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty file",
        "text file",
        "truncated in the header",
        "truncated in the ids",
        "extra bytes",
        "bit flip in the ids",
        "header not JSON",
        "foreign safetensors",
        "newer format",
        "metadata field malformed",
        "metadata field missing",
        "layers wrong",
        "shape wrong",
        "layer renamed",
        "metadata added",
        "ids out of range",
        "num_experts not decimal",
        "top_k above num_experts",
        "token_shape too long",
        "token_shape of bools",
        "layout unknown",
        "metadata value not a string",
    ],
)
def test_damaged_truncated_and_foreign_files_raise_value_error_naming_the_file(tmp_path, case):
    data, match = damaged_files(tmp_path)[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        mr.RoutingTrace.load(path)
    assert str(info.value).startswith(str(path))


def test_every_truncation_is_detected(tmp_path):
    data = saved_bytes(tmp_path, make_trace(token_shape=(2, 3)))
    path = tmp_path / "cut.safetensors"
    for cut in range(0, len(data), 7):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=str(path)):
            mr.RoutingTrace.load(path)


def test_load_of_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        mr.RoutingTrace.load(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------- compact ids


@pytest.mark.parametrize(("E", "K", "dtype"), COMPACT)
def test_ids_are_kept_in_the_compact_dtype_in_memory(E, K, dtype):
    ids = torch.tensor([[E - 1] + [-1] * (K - 1)], dtype=torch.int64)
    trace = mr.RoutingTrace({"a": ids}, num_experts=E, top_k=K)
    assert trace.dtype == dtype == trace["a"].dtype and torch.equal(trace["a"], ids)
    assert trace.nbytes == K * torch.iinfo(dtype).bits // 8


@pytest.mark.parametrize(
    ("value", "dtype", "E"),
    [
        (2**32 + 3, torch.int64, 8),  # used to wrap to 3 through int32
        (2**32 - 1, torch.int64, 8),  # used to wrap to -1
        (255, torch.uint8, 128),  # vLLM's uint8: fits uint8, not the int8 trace (and not 128 experts)
        (40000, torch.int32, 32768),  # beyond int16
        (-2, torch.int32, 8),  # below -1
    ],
)
def test_ids_outside_the_range_are_an_error_never_wrapped(value, dtype, E):
    ids = torch.tensor([[0, 1], [1, 0]], dtype=dtype)
    ids[1, 1] = value
    with pytest.raises(
        ValueError, match=rf"layer 'a': token 1 .* ids must be -1 \(free\) or in \[0, num_experts={E}\)"
    ):
        mr.RoutingTrace({"a": ids}, num_experts=E, top_k=2)
    with pytest.raises(ValueError, match="layer 'a'"):
        mr.RoutingTrace.from_tensor(ids.unsqueeze(1), ["a"], num_experts=E)


def test_num_experts_bounds():
    with pytest.raises(ValueError, match=r"num_experts must be <= 2147483648"):
        mr.RoutingTrace({}, num_experts=2**31 + 1, top_k=2)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        trace_module().compact_dtype("8")


def trace_module():
    from moe_replay.routing import trace

    return trace


# ----------------------------------------------------------------------------- rows


def test_select_rows_by_index_list_tensor_and_mask():
    trace = make_trace(token_shape=(5, 6))
    picked = trace[[0, 2]]
    assert picked == trace.select(torch.tensor([0, 2])) == trace.select([True, False, True, False, False])
    assert all(torch.equal(picked[n], trace[n][[0, 2]]) for n in trace)
    assert trace[[-1, 0, 0]].token_shape == (3, 6)  # negatives from the end, repeats allowed
    assert torch.equal(trace[[-1, 0, 0]]["layers.0.mlp"][0], trace["layers.0.mlp"][4])
    assert trace[1:4] == trace.slice(1, 4) and trace[3:] == trace.slice(3, 5) and trace[:] == trace
    with pytest.raises(ValueError, match=r"slice \[1:9\] is outside token axis 0 of size 5"):
        trace[1:9]  # never clamped
    with pytest.raises(ValueError, match="takes no step"):
        trace[::2]
    assert trace.select([1, 3], dim=1) == mr.RoutingTrace(
        {n: ids[:, [1, 3]] for n, ids in trace.items()}, num_experts=8, top_k=2
    )
    assert "layers.0.mlp" in trace and [0] not in trace and 0 not in trace


@pytest.mark.parametrize(
    ("rows", "error", "match"),
    [
        ([5], ValueError, r"row index 5 is out of range for 5"),
        ([-6], ValueError, r"row index -6 is out of range"),
        ([True, False], ValueError, r"boolean rows mask must have 5 entries"),
        ([0.5], TypeError, "rows must hold ints or bools"),
        ([0, True], TypeError, "mixes bools and ints"),
        (torch.zeros(2, 2, dtype=torch.long), ValueError, "rows must be 1-D"),
        (torch.tensor([0.0]), TypeError, "integer indices or a boolean mask"),
        ("ab", TypeError, "rows must be a list"),
    ],
)
def test_select_errors(rows, error, match):
    with pytest.raises(error, match=match):
        make_trace(token_shape=(5, 6)).select(rows)


def test_getitem_with_other_keys_is_a_type_error():
    with pytest.raises(TypeError, match="indexed by a layer name"):
        make_trace()[1.5]
    with pytest.raises(KeyError):
        make_trace()["nope"]


def test_split_by_micro_batch_sizes():
    trace = make_trace(token_shape=(5, 6))
    pieces = trace.split([2, 0, 3])  # piece i: rows sum(sizes[:i]) .. sum(sizes[:i+1]) - 1
    assert [p.token_shape for p in pieces] == [(2, 6), (0, 6), (3, 6)]
    assert pieces[2] == trace.slice(2, 5) and mr.RoutingTrace.cat(pieces) == trace
    with pytest.raises(ValueError, match=r"sizes \[2, 2\] sum to 4, the axis has 5 rows"):
        trace.split([2, 2])
    with pytest.raises(ValueError, match="non-negative ints"):
        trace.split([6, -1])
    with pytest.raises(TypeError, match="sizes must be an int or a list"):
        trace.split(2.0)


# ----------------------------------------------------------------------------- packing


def padded(lengths: list[int], S: int, padding: str, seed: int = 0) -> tuple[mr.RoutingTrace, torch.Tensor]:
    """A [B, S] trace routed at the mask's positions only (-1 at padding), and the mask."""
    pos = torch.arange(S)
    lens = torch.tensor(lengths)[:, None]
    mask = pos < lens if padding == "right" else pos >= S - lens
    trace = make_trace(token_shape=(len(lengths), S), seed=seed)
    return trace._like({n: ids.masked_fill(~mask[..., None], -1) for n, ids in trace.items()}), mask


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("tokens_first", [False, True])
def test_pack_then_unpack_is_the_identity(padding, tokens_first):
    trace, mask = padded([3, 6, 0, 1], 6, padding)
    if tokens_first:
        trace = mr.RoutingTrace.from_tensor(torch.stack(list(trace.values()), -2), trace.layer_names, 8)
    packed = trace.pack(mask)
    assert packed.is_packed and packed.token_shape == (10,) and packed.seq_lens == [3, 6, 0, 1]
    assert packed.cu_seqlens.tolist() == [0, 3, 9, 9, 10] and packed.cu_seqlens.dtype == torch.int64
    for n in trace:  # sequence after sequence, in order
        assert torch.equal(packed[n], trace[n][mask])
    assert packed.unpack(mask) == trace
    assert packed.unpack(seq_len=6, padding=padding) == trace
    assert packed.unpack(padding=padding).token_shape == (4, 6)  # S = the longest sequence


def test_pack_refuses_routes_under_the_padding():
    trace, mask = padded([2, 4], 4, "left")
    with pytest.raises(ValueError, match=r"position \(0, 2\) is padding in attention_mask but holds routes"):
        trace.pack(torch.arange(4) < torch.tensor([[2], [4]]))  # a right-padding mask for a left-padded trace
    full = make_trace(token_shape=(2, 4))
    assert full.pack(mask, check_padding=False).seq_lens == [2, 4]  # dropped on purpose


def test_pack_and_unpack_errors():
    trace, mask = padded([2, 4], 4, "right")
    with pytest.raises(ValueError, match="only 0 and 1"):
        trace.pack(mask.long() * 2)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[2, 4\]"):
        trace.pack(mask[:, :3])
    with pytest.raises(ValueError, match="needs a \\[B, S\\] trace"):
        make_trace(token_shape=(8,)).pack(mask)
    packed = trace.pack(mask)
    with pytest.raises(ValueError, match="already packed"):
        packed.pack(mask)
    with pytest.raises(ValueError, match=r"row sums \[2, 3\] differ from the sequence lengths \[2, 4\]"):
        packed.unpack(mask & (torch.arange(4) < 3))
    with pytest.raises(ValueError, match="seq_len=3 is shorter than the longest sequence"):
        packed.unpack(seq_len=3)
    with pytest.raises(ValueError, match="needs a packed trace"):
        trace.unpack(seq_len=4)
    with pytest.raises(
        ValueError, match=r"cu_seqlens must start at 0, never decrease and end at the total tokens 6"
    ):
        mr.RoutingTrace(dict(packed), num_experts=8, top_k=2, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match=r"cu_seqlens needs a trace of token shape \[total_tokens\]"):
        mr.RoutingTrace(dict(trace), num_experts=8, top_k=2, cu_seqlens=torch.tensor([0, 8]))


def test_row_operations_on_a_packed_trace_address_sequences(tmp_path):
    trace, mask = padded([3, 1, 4, 2], 4, "right")
    packed = trace.pack(mask)
    sub = packed[[2, 0]]
    assert sub.seq_lens == [4, 3] and sub == trace[[2, 0]].pack(mask[[2, 0]])
    assert packed.select([False, True, True, False]).seq_lens == [1, 4]
    pieces = packed.split([1, 3])
    assert [p.seq_lens for p in pieces] == [[3], [1, 4, 2]] and mr.RoutingTrace.cat(pieces) == packed
    assert packed.slice(1, 3) == trace.slice(1, 3).pack(mask[1:3])
    with pytest.raises(ValueError, match=r"dim must index the token shape \[10\], got 1"):  # one token axis
        packed.split(1, dim=1)
    with pytest.raises(ValueError, match=r"traces\[1\] is not packed"):
        mr.RoutingTrace.cat([packed, trace.flatten()])
    path = tmp_path / "packed.safetensors"
    packed.save(path)
    loaded = mr.RoutingTrace.load(path)
    assert loaded == packed and loaded.cu_seqlens.tolist() == [0, 3, 4, 8, 10]


class TokenStack(torch.nn.Module):
    """Two MoE layers without attention: a packed forward routes every token as a padded one does."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.MoEConfig(num_experts=8, top_k=2, hidden_size=8, intermediate_size=8)
        self.layers = torch.nn.ModuleList(mr.MoE(cfg, backend="torch") for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for moe in self.layers:
            x = x + moe(x)
        return x


def test_a_packed_trace_replays_a_packed_forward():
    torch.manual_seed(0)
    rollout, trainer = TokenStack(), TokenStack()  # different routers: replay must override them
    x = torch.randn(3, 5, 8)
    mask = torch.arange(5) < torch.tensor([[5], [2], [4]])
    with mr.record(rollout) as routes:
        rollout(x)
    packed = routes.pack(mask, check_padding=False)  # the padded forward routed its padding too
    x_packed = x[mask].unsqueeze(0)  # [1, T, H]: one row, sequence after sequence
    with mr.replay(trainer, packed), mr.record(trainer) as used:
        trainer(x_packed)
    for name in packed:
        assert torch.equal(used[name].reshape(-1, 2), packed[name].to(torch.int32))


# ----------------------------------------------------------------------------- data and context parallelism


def test_dp_shard_cuts_rows_contiguously():
    trace = make_trace(token_shape=(5, 6))
    shards = [trace.dp_shard(r, 3) for r in range(3)]
    assert [s.token_shape[0] for s in shards] == [2, 2, 1]  # the first 5 % 3 ranks get one more
    assert shards[1] == trace.slice(2, 4) and mr.RoutingTrace.cat(shards) == trace
    packed = padded([1, 2, 3, 4], 4, "right")
    ps = packed[0].pack(packed[1])
    assert [ps.dp_shard(r, 2).seq_lens for r in range(2)] == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=3\), got 3"):
        trace.dp_shard(3, 3)
    with pytest.raises(TypeError, match="rank must be an int"):
        trace.dp_shard(0.0, 3)


def test_cp_shard_contiguous_and_zigzag_take_the_documented_tokens():
    trace = make_trace(token_shape=(2, 8))
    ids = trace["layers.0.mlp"]
    contiguous = [trace.cp_shard(r, 2) for r in range(2)]
    assert torch.equal(contiguous[1]["layers.0.mlp"], ids[:, 4:8])
    zigzag = [
        trace.cp_shard(r, 2, zigzag=True) for r in range(2)
    ]  # chunks of 2: rank 0 [0, 3], rank 1 [1, 2]
    assert torch.equal(zigzag[0]["layers.0.mlp"], ids[:, [0, 1, 6, 7]])
    assert torch.equal(zigzag[1]["layers.0.mlp"], ids[:, [2, 3, 4, 5]])
    assert mr.RoutingTrace.cp_gather(zigzag, zigzag=True) == trace
    assert mr.RoutingTrace.cp_gather(contiguous) == trace
    flat = make_trace(token_shape=(12,))
    assert torch.equal(flat.cp_shard(2, 3, zigzag=True)["layers.1.mlp"], flat["layers.1.mlp"][[4, 5, 6, 7]])
    with pytest.raises(
        ValueError, match=r"the sequence axis has 8 tokens, not a multiple of 6 \(2 x world_size=3\)"
    ):
        trace.cp_shard(0, 3, zigzag=True)


def test_cp_shard_of_a_packed_trace_cuts_every_sequence():
    trace, mask = padded([4, 8, 0], 8, "right")
    packed = trace.pack(mask)
    shard = packed.cp_shard(1, 2, zigzag=True)  # each sequence in 4 chunks; rank 1 keeps chunks 1 and 2
    assert shard.seq_lens == [2, 4, 0]
    ids = packed["layers.2.mlp"]
    assert torch.equal(shard["layers.2.mlp"], ids[[1, 2, 4 + 2, 4 + 3, 4 + 4, 4 + 5]])
    shards = [packed.cp_shard(r, 2, zigzag=True) for r in range(2)]
    assert mr.RoutingTrace.cp_gather(shards, zigzag=True) == packed
    with pytest.raises(ValueError, match="sequence 0 has 4 tokens, not a multiple of 8"):
        packed.cp_shard(0, 4, zigzag=True)
    with pytest.raises(ValueError, match=r"shards\[1\] does not match"):
        mr.RoutingTrace.cp_gather([shards[0], trace])


# ----------------------------------------------------------------------------- hardened files


def test_format_version_1_files_are_still_read(tmp_path):
    ids = random_ids((2, 3), 8, 2).unsqueeze(0).expand(2, -1, -1, -1).to(torch.int16)  # [L, B, S, K]
    metadata = {
        "format": "moe_replay.routing_trace",
        "format_version": "1",
        "num_experts": "8",
        "top_k": "2",
        "layers": json.dumps(["a", "b"]),
        "token_shape": "[2, 3]",
        "crc32": str(zlib.crc32(ids.contiguous().numpy())),
    }
    path = tmp_path / "v1.safetensors"
    safetensors.torch.save_file({"expert_ids": ids.contiguous()}, path, metadata=metadata)
    loaded = mr.RoutingTrace.load(path)
    assert loaded == mr.RoutingTrace({"a": ids[0], "b": ids[1]}, num_experts=8, top_k=2)
    assert loaded.dtype == torch.int8


def foreign_header(**tensor: object) -> bytes:
    text = json.dumps(
        {"weight": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}, **tensor}
    ).encode()
    return len(text).to_bytes(8, "little") + text


def test_a_foreign_multi_gigabyte_file_is_refused_after_its_header(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(foreign_header())
        f.truncate(f.tell() + 2**32)  # sparse: 4 GiB of body on disk for free
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="not a moe_replay routing trace"):
            mr.RoutingTrace.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # the body was never read


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ((2**60).to_bytes(8, "little") + b"{" * 16, "the header claims 1152921504606846976 bytes"),
        (b"[" * 5000, "header claims"),  # 5000 '[' read as a length: far beyond the file
    ],
)
def test_a_tiny_file_claiming_a_huge_header_allocates_nothing(tmp_path, header, match):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(header[:24])
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            mr.RoutingTrace.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_a_header_claiming_a_huge_trace_is_refused_before_the_body(tmp_path):
    data = saved_bytes(tmp_path)
    h = header_of(data)
    h["__metadata__"]["token_shape"] = json.dumps([2**40, 2**40])
    h["expert_ids"]["shape"] = [3, 2**40, 2**40, 2]
    h["expert_ids"]["data_offsets"] = [0, 3 * 2**81]
    path = tmp_path / "huge.safetensors"
    path.write_bytes(with_header(data, h))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="bytes of tensors expected after the header"):
            mr.RoutingTrace.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_header_size_and_json_depth_are_capped(tmp_path, monkeypatch):
    data = saved_bytes(tmp_path)
    deep = b"[" * 100_000 + b"]" * 100_000  # json.loads would hit RecursionError
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(deep).to_bytes(8, "little") + deep)
    with pytest.raises(ValueError, match="nests deeper than 8 levels"):
        mr.RoutingTrace.load(path)
    nine = b"[" * 9 + b"]" * 9  # parses, but deeper than any trace header
    path.write_bytes(len(nine).to_bytes(8, "little") + nine)
    with pytest.raises(ValueError, match="nests deeper than 8 levels"):
        mr.RoutingTrace.load(path)
    escapes = b'"' + b'\\"' * 200_000  # an unterminated string of escaped quotes: linear time, no hang
    path.write_bytes(len(escapes).to_bytes(8, "little") + escapes)
    with pytest.raises(ValueError, match="header is not valid JSON"):
        mr.RoutingTrace.load(path)
    # brackets inside strings do not count
    strings = json.dumps({"__metadata__": {"x": "[[[[[[[[[[[["}}).encode()
    path.write_bytes(len(strings).to_bytes(8, "little") + strings)
    with pytest.raises(ValueError, match="metadata 'format' is None"):
        mr.RoutingTrace.load(path)
    monkeypatch.setattr(trace_module(), "MAX_HEADER_BYTES", 64)
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"-byte header, more than the 64 a trace file has"):
        mr.RoutingTrace.load(path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_devices_fifos_and_directories_are_refused_at_once(tmp_path):
    with pytest.raises(ValueError, match="/dev/zero: not a routing trace file: a FIFO, socket or device"):
        mr.RoutingTrace.load("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open would wait forever
    with pytest.raises(ValueError, match="a FIFO, socket or device, not a regular file"):
        mr.RoutingTrace.load(fifo)
    with pytest.raises(ValueError, match="a directory, not a regular file"):
        mr.RoutingTrace.load(tmp_path)


def dead_pid() -> int:
    """A process id no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_a_save_removes_temporaries_of_dead_earlier_saves_only(tmp_path):
    path = tmp_path / "t.safetensors"
    stale = tmp_path / f".t.safetensors.{dead_pid()}.0123456789ab.moe_replay-tmp"
    alive = tmp_path / f".t.safetensors.{os.getppid()}.0123456789ab.moe_replay-tmp"  # a save running now
    other = tmp_path / f".u.safetensors.{dead_pid()}.0123456789ab.moe_replay-tmp"  # another target's
    for p in (stale, alive, other):
        p.write_bytes(b"half a trace")
    make_trace().save(path)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name, "t.safetensors"])


def test_saving_over_a_file_keeps_its_mode_and_follows_a_symlink(tmp_path):
    path = tmp_path / "t.safetensors"
    make_trace(seed=0).save(path)
    os.chmod(path, 0o640)
    make_trace(seed=1).save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and mr.RoutingTrace.load(path) == make_trace(seed=1)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(path.name)
    make_trace(seed=2).save(link)  # the target is replaced, the link kept
    assert link.is_symlink() and mr.RoutingTrace.load(path) == make_trace(seed=2)
    assert sorted(os.listdir(tmp_path)) == ["latest.safetensors", "t.safetensors"]
    dangling = tmp_path / "next.safetensors"
    dangling.symlink_to("created.safetensors")
    make_trace(seed=3).save(dangling)  # a dangling link gets its target created
    assert dangling.is_symlink() and mr.RoutingTrace.load(tmp_path / "created.safetensors") == make_trace(
        seed=3
    )


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: t.save(123), TypeError, "path must be a str or os.PathLike, got int"),
        (lambda t: t.save(""), ValueError, "path must be a non-empty file name"),
        (lambda t: mr.RoutingTrace.load(None), TypeError, "path must be a str or os.PathLike, got NoneType"),
        (lambda t: mr.RoutingTrace.load("a\0b"), ValueError, "without NUL bytes"),
    ],
)
def test_bad_paths_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(make_trace())


def test_row_operations_keep_one_token_major_tensor(tmp_path):
    trace = mr.RoutingTrace.from_tensor(
        torch.stack(list(make_trace(token_shape=(5, 6)).values()), -2), ["a", "b", "c"], 8
    )
    piece = trace.split([2, 3])[1]  # a view of rows 2..4, still one [3, 6, L, K] tensor
    assert piece.to_tensor().data_ptr() == trace.to_tensor()[12:].data_ptr()
    for derived in (
        piece,
        trace[[4, 0]],
        trace.cp_shard(1, 3, zigzag=True),
        trace.pack(torch.ones(5, 6, dtype=torch.bool)),
    ):
        derived.save(tmp_path / "d.safetensors")
        assert safetensors.safe_open(tmp_path / "d.safetensors", "pt").metadata()["layout"] == "tokens_first"
        assert mr.RoutingTrace.load(tmp_path / "d.safetensors") == derived
