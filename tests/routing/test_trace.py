"""RoutingTrace (routing/trace.py): construction, tensors, token slicing, files.

Shape legend: B batch, S sequence, T tokens, L layers, K experts per token.
"""

from __future__ import annotations

import json
import os

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
    assert trace["a"].dtype == torch.int32 and torch.equal(trace["a"], ids.int())
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
    assert t.shape == (24, 3, 2) and t.dtype == torch.int32
    for l, name in enumerate(trace):
        assert torch.equal(t[:, l], trace[name].reshape(24, 2))
    back = mr.RoutingTrace.from_tensor(t, trace.layer_names, num_experts=8)
    assert back == trace.flatten()
    batched = mr.RoutingTrace.from_tensor(t.reshape(4, 6, 3, 2).long(), trace.layer_names, 8)
    assert batched == trace
    assert all(batched[n].is_contiguous() for n in batched)


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
    with pytest.raises(ValueError, match="size must be a positive int"):
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


@pytest.mark.parametrize(
    ("E", "K", "stored"),
    [
        (8, 2, torch.int16),  # small
        (256, 8, torch.int16),  # DeepSeek-V3
        (300, 6, torch.int16),  # above one byte
        (32767, 4, torch.int16),  # the largest count stored in 2 bytes: ids up to 32766
        (32768, 4, torch.int32),  # beyond: 4 bytes
    ],
)
def test_save_load_round_trip_is_bit_exact(tmp_path, E, K, stored):
    trace = make_trace(E=E, K=K, token_shape=(3, 7))
    last = next(iter(trace.values()))
    last[0, 0, 0] = E - 1  # the largest id
    last[0, 0, 1] = -1
    path = tmp_path / "routes.safetensors"
    trace.save(path)
    loaded = mr.RoutingTrace.load(path)
    assert loaded == trace and loaded.layer_names == trace.layer_names
    assert all(loaded[n].dtype == torch.int32 for n in loaded)
    raw = safetensors.torch.load_file(path)["expert_ids"]
    assert raw.dtype == stored and raw.shape == (3, 3, 7, K)
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
    bad = mr.RoutingTrace({"x": torch.tensor([[0, 40000]])}, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="layer 'x'"):
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


def damaged_files(tmp_path) -> dict[str, tuple[bytes, str]]:
    data = saved_bytes(tmp_path)
    header = header_of(data)
    n = int.from_bytes(data[:8], "little")

    def meta(**changes):
        h = json.loads(json.dumps(header))
        h["__metadata__"].update(changes)
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
        "truncated in the ids": (data[:-10], "truncated: .* bytes of ids expected"),
        "extra bytes": (data + b"\0\0", "damaged: .* bytes of ids expected"),
        "bit flip in the ids": (bytes(flipped), "checksum"),
        "header not JSON": (data[:8] + b"\xff" * n + data[8 + n :], "header is not valid JSON"),
        "foreign safetensors": (other, "not a moe_replay routing trace: metadata 'format' is None"),
        "newer format": (meta(format_version="99"), "format_version '99' is not supported"),
        "metadata field missing": (meta(top_k="two"), "malformed field"),
        "layers wrong": (meta(layers='["a"]'), "metadata says I16"),
        "shape wrong": (with_header(data, shape), "the metadata says I16"),
        "ids out of range": (meta(num_experts="3"), r"damaged routing trace: layer .* num_experts=3"),
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
        "metadata field missing",
        "layers wrong",
        "shape wrong",
        "ids out of range",
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
