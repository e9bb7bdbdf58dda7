"""Engine adapters (routing/engines.py): SGLang base64, vLLM arrays, padding, layer mapping.

Shape legend: N tokens of a sequence, L engine layers, K experts per token, B batch, S length.
"""

from __future__ import annotations

import base64
import io
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import moe_replay as mr
from moe_replay.routing import engines

E, K = 8, 2


def engine_ids(rows: int, L: int, seed: int = 0) -> torch.Tensor:
    """[rows, L, K] int32: K distinct experts per (token, layer), as an engine would report."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, L, E, generator=g).topk(K, dim=2).indices.to(torch.int32)


def b64(ids: torch.Tensor) -> str:
    return base64.b64encode(ids.to(torch.int32).numpy().tobytes()).decode()


# ----------------------------------------------------------------------------- SGLang


def test_sglang_payload_has_one_row_fewer_than_tokens():
    ids = engine_ids(4, 3)  # 5 tokens: the last one was never forwarded
    routes = engines.sglang_routes(b64(ids), num_tokens=5, num_layers=3, top_k=K)
    assert routes.shape == (5, 3, K) and routes.dtype == torch.int32
    assert torch.equal(routes[:4], ids) and (routes[4] == -1).all()


def test_sglang_accepts_meta_info_response_and_bytes():
    ids = engine_ids(2, 1)
    payload = b64(ids)
    expected = engines.sglang_routes(payload, num_tokens=3, num_layers=1, top_k=K)
    for form in ({"routed_experts": payload}, {"meta_info": {"routed_experts": payload}}, payload.encode()):
        assert torch.equal(engines.sglang_routes(form, num_tokens=3, num_layers=1, top_k=K), expected)


def test_sglang_start_len_leaves_earlier_tokens_to_the_router():
    ids = engine_ids(3, 2)  # tokens 2, 3, 4 of 6 (routed_experts_start_len=2)
    routes = engines.sglang_routes(b64(ids), num_tokens=6, num_layers=2, top_k=K, start=2)
    assert (routes[:2] == -1).all() and torch.equal(routes[2:5], ids) and (routes[5] == -1).all()


@pytest.mark.parametrize(
    ("rows", "num_tokens", "match"),
    [
        (5, 5, r"holds 30 int32 elements, expected 24 = \(num_tokens=5 - 1 - start=0\)"),  # a row too many
        (3, 5, r"holds 18 int32 elements, expected 24"),  # a row missing
    ],
)
def test_sglang_bad_payload_size_names_expected_and_actual_counts(rows, num_tokens, match):
    with pytest.raises(ValueError, match=match):
        engines.sglang_routes(b64(engine_ids(rows, 3)), num_tokens=num_tokens, num_layers=3, top_k=K)


def test_sglang_bad_payloads():
    with pytest.raises(ValueError, match="6 bytes, not whole int32 values"):
        engines.sglang_routes(base64.b64encode(b"\0" * 6), num_tokens=2, num_layers=1, top_k=K)
    with pytest.raises(ValueError, match="not valid base64"):
        engines.sglang_routes("***", num_tokens=2, num_layers=1, top_k=K)
    with pytest.raises(ValueError, match="return_routed_experts=True"):
        engines.sglang_routes({"meta_info": {}}, num_tokens=2, num_layers=1, top_k=K)
    with pytest.raises(TypeError, match="base64 str or bytes"):
        engines.sglang_routes([1, 2], num_tokens=2, num_layers=1, top_k=K)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_tokens must be >= 1, got 0"):
        engines.sglang_routes("", num_tokens=0, num_layers=1, top_k=K)


def test_sglang_start_len_from_the_response_and_compact_output():
    ids = engine_ids(3, 2)
    response = {"meta_info": {"routed_experts": b64(ids), "routed_experts_start_len": 2}}
    routes = engines.sglang_routes(response, num_tokens=6, num_layers=2, top_k=K, num_experts=E)
    assert routes.dtype == torch.int8 and (routes[:2] == -1).all() and torch.equal(routes[2:5], ids)
    with pytest.raises(ValueError, match="start=1 differs from the response's routed_experts_start_len=2"):
        engines.sglang_routes(response, num_tokens=6, num_layers=2, top_k=K, start=1)
    with pytest.raises(ValueError, match=r"row 0 holds id 9, outside -1 \.\. 7"):
        engines.sglang_routes(b64(ids + 2), num_tokens=4, num_layers=2, top_k=K, num_experts=E)


# ----------------------------------------------------------------------------- vLLM, tensors


@pytest.mark.parametrize(
    "dtype",
    [
        np.uint8,  # vLLM, E <= 256
        np.uint16,  # vLLM, E > 256
        np.int16,  # older vLLM
        np.int32,  # older vLLM
    ],
)
@pytest.mark.parametrize("start", [0, 2])
def test_vllm_rows_are_tokens_start_to_n_minus_2(dtype, start):
    ids = engine_ids(5 - 1 - start, 3)  # 5 tokens: rows of tokens start .. 3, never of the last one
    array = ids.numpy().astype(dtype)
    routes = engines.vllm_routes(array, num_tokens=5, start=start)
    assert routes.shape == (5, 3, K) and routes.dtype == torch.int32
    assert (routes[:start] == -1).all() and torch.equal(routes[start:4], ids) and (routes[4] == -1).all()
    # without num_tokens: N = start + R + 1, never R (which shifted every row by one)
    assert torch.equal(engines.vllm_routes(array, start=start), routes)
    compact = engines.vllm_routes(torch.from_numpy(array), start=start, num_experts=E)
    assert compact.dtype == torch.int8 and torch.equal(compact, routes)


@pytest.mark.parametrize("rows", [5, 3])
def test_vllm_bad_sizes_name_expected_and_actual_counts(rows):
    array = engine_ids(rows, 3).numpy().astype(np.uint8)
    with pytest.raises(
        ValueError,
        match=rf"holds {rows * 6} elements \({rows} rows.*expected 24 \(4 rows = num_tokens=5 - 1 - start=0",
    ):
        engines.vllm_routes(array, num_tokens=5)


def npy_b64(array: np.ndarray) -> str:
    """vLLM's HTTP form: base64 of the array's .npy file."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def test_vllm_http_npy_base64_and_mapping_forms():
    ids = engine_ids(4, 3)
    array = ids.numpy().astype(np.uint16)
    expected = engines.vllm_routes(array)
    for form in (
        npy_b64(array),
        npy_b64(array).encode(),
        {"routed_experts": npy_b64(array)},
        {"routed_experts": array},
    ):
        assert torch.equal(engines.vllm_routes(form), expected)
    with pytest.raises(ValueError, match=r"not of a .npy file.*use sglang_routes"):
        engines.vllm_routes(b64(ids))  # SGLang's raw int32 form
    buf = io.BytesIO()
    np.save(buf, np.array([object()] * 4, dtype=object).reshape(1, 2, 2), allow_pickle=True)
    with pytest.raises(ValueError, match=r"damaged .npy file"):  # pickled objects are never loaded
        engines.vllm_routes(base64.b64encode(buf.getvalue()))
    with pytest.raises(ValueError, match=r"damaged .npy file"):
        engines.vllm_routes(npy_b64(array)[:-12])
    with pytest.raises(ValueError, match="enable_return_routed_experts=True"):
        engines.vllm_routes({"text": "hi"})


@pytest.mark.parametrize(
    ("array", "E", "match"),
    [
        (
            np.full((2, 1, 2), 65535, dtype=np.uint16),
            128,
            r"row 0 holds id 65535, outside -1 \.\. 127",
        ),  # not -1
        (np.array([[[0, 2**31 - 1]]], dtype=np.int64), None, "outside -1 .. 2147483647"),  # int32 output
        (np.array([[[0, 8]]], dtype=np.int32), 8, r"row 0 holds id 8, outside -1 \.\. 7 \(num_experts=8\)"),
    ],
)
def test_engine_ids_out_of_range_are_errors_never_wrapped(array, E, match):
    array = array.copy()
    if E is None:
        array[0, 0, 1] = 2**31  # beyond int32
    with pytest.raises(ValueError, match=match):
        engines.vllm_routes(array, num_experts=E)


def test_sequence_routes_of_plain_tensors_and_errors():
    ids = engine_ids(3, 2).long()
    assert torch.equal(engines.sequence_routes(ids, num_tokens=4)[:3], ids.int())
    with pytest.raises(ValueError, match=r"holds 12 elements \(3 rows of 2 layers x 2\).*at most 8"):
        engines.sequence_routes(ids, num_tokens=2)
    with pytest.raises(ValueError, match=r"integer tensor \[R, L, K\], got torch.float32"):
        engines.sequence_routes(ids.float())
    with pytest.raises(ValueError, match=r"got int64 \(3, 4\)"):
        engines.sequence_routes(ids.reshape(3, 4))
    with pytest.raises(TypeError, match=r"integer array \[R, L, K\], got <U1 elements"):
        engines.sequence_routes([[["a"]]])


# ----------------------------------------------------------------------------- layer mapping


def test_layer_map_defaults():
    uniform = ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]
    assert engines.engine_layer_map(uniform, 3) == {0: uniform[0], 1: uniform[1], 2: uniform[2]}
    # DeepSeek-style: 2 leading dense layers of 5; interleaved: every other layer.
    assert engines.engine_layer_map(["model.layers.2.mlp", "model.layers.4.mlp"], 5) == {
        2: "model.layers.2.mlp",
        4: "model.layers.4.mlp",
    }
    assert engines.engine_layer_map(["a", "b"], 4, moe_layer_indices=[1, 3]) == {1: "a", 3: "b"}
    assert engines.engine_layer_map({3: "b", 1: "a"}, 4) == {1: "a", 3: "b"}


@pytest.mark.parametrize(
    ("layers", "L", "indices", "match"),
    [
        (["moe_a", "moe_b"], 4, None, r"cannot be read from \['moe_a', 'moe_b'\]; pass moe_layer_indices"),
        (
            ["layers.1.mlp", "layers.7.mlp"],
            4,
            None,
            r"'layers\.7\.mlp' maps to engine layer 7, outside \[0, 4\)",
        ),
        (["a", "b"], 4, [1], r"moe_layer_indices has 1 entries, the MoE layers are 2"),
        (["a", "b"], 4, [1, 1], r"map to repeated engine layers \[1, 1\]"),
        ({0: "a", 1: "a"}, 4, None, "appears twice"),
        ({0: "a"}, 4, [0], "not with a"),
        ("layers.0.mlp", 4, None, "got str"),
    ],
)
def test_layer_map_errors(layers, L, indices, match):
    with pytest.raises((ValueError, TypeError), match=match):
        engines.engine_layer_map(layers, L, indices)


# ----------------------------------------------------------------------------- batches


def test_batch_trace_right_and_left_padding_with_missing_last_rows():
    # Two sequences of 3 and 5 tokens, SGLang-style (last row missing), in a batch of length 6.
    short, long = engine_ids(2, 2, seed=1), engine_ids(4, 2, seed=2)
    seqs = [
        engines.sglang_routes(b64(short), num_tokens=3, num_layers=2, top_k=K),
        engines.sglang_routes(b64(long), num_tokens=5, num_layers=2, top_k=K),
    ]
    names = ["layers.0.mlp", "layers.1.mlp"]
    right = engines.batch_trace(seqs, layers=names, num_experts=E, seq_len=6)
    left = engines.batch_trace(seqs, layers=names, num_experts=E, seq_len=6, padding="left")
    assert right.token_shape == left.token_shape == (2, 6) and right.layer_names == names
    for l, name in enumerate(names):
        r, lt = right[name], left[name]
        assert torch.equal(r[0, :2], short[:, l]) and (r[0, 2:] == -1).all()
        assert torch.equal(r[1, :4], long[:, l]) and (r[1, 4:] == -1).all()
        assert (lt[0, :3] == -1).all() and torch.equal(lt[0, 3:5], short[:, l]) and (lt[0, 5] == -1).all()
        assert (lt[1, :1] == -1).all() and torch.equal(lt[1, 1:5], long[:, l]) and (lt[1, 5] == -1).all()
    assert engines.batch_trace(seqs, layers=names, num_experts=E).token_shape == (2, 5)  # default S


def test_batch_trace_drops_dense_layers():
    # 4 engine layers; the model's MoE blocks sit at layers 1 and 3 (0 and 2 are dense: zeros).
    ids = engine_ids(3, 4)
    ids[:, [0, 2]] = 0
    names = ["model.layers.1.mlp", "model.layers.3.mlp"]
    trace = engines.batch_trace(
        [engines.vllm_routes(ids.numpy().astype(np.int16))], layers=names, num_experts=E
    )
    assert trace.layer_names == names and trace.token_shape == (1, 4)  # 3 rows: 4 tokens
    assert torch.equal(trace[names[0]][0, :3], ids[:, 1]) and torch.equal(trace[names[1]][0, :3], ids[:, 3])
    assert (trace[names[0]][0, 3] == -1).all()


def test_batch_trace_errors():
    seq = engine_ids(4, 2)
    names = ["l.0", "l.1"]
    with pytest.raises(ValueError, match=r"sequences\[0\] has 4 tokens, more than seq_len=3"):
        engines.batch_trace([seq], layers=names, num_experts=E, seq_len=3)
    with pytest.raises(ValueError, match=r"sequences\[1\] has 3 layers x top_k 2, sequences\[0\] has 2 x 2"):
        engines.batch_trace([seq, engine_ids(4, 3)], layers=names, num_experts=E)
    with pytest.raises(ValueError, match="padding must be 'right' or 'left', got 'middle'"):
        engines.batch_trace([seq], layers=names, num_experts=E, padding="middle")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"sequences\[0\]: row 0 holds id 11, outside -1 \.\. 3 \(num_experts=4\)"
    ):
        engines.batch_trace([seq + 4], layers=names, num_experts=4)  # ids beyond the model's experts
    with pytest.raises(ValueError, match="non-empty list"):
        engines.batch_trace([], layers=names, num_experts=E)


# ----------------------------------------------------------------------------- end to end


class Stack(nn.Module):
    """Dense, MoE, dense, MoE: engines report 4 layers, the model has 2 routing sites."""

    def __init__(self) -> None:
        super().__init__()
        cfg = mr.MoEConfig(num_experts=E, top_k=K, hidden_size=8, intermediate_size=8)
        self.layers = nn.ModuleList()
        for i in range(4):
            block = nn.Module()
            block.mlp = mr.MoE(cfg, backend="torch") if i % 2 else nn.Linear(8, 8)
            self.layers.append(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block.mlp(x)
        return x


def test_engine_trace_replays_in_a_model_with_dense_layers_and_padding():
    torch.manual_seed(0)
    model = Stack()
    lengths = [3, 5]
    raw = [engine_ids(n - 1, 4, seed=n) for n in lengths]
    seqs = [engines.sglang_routes(b64(r), num_tokens=n, num_layers=4, top_k=K) for r, n in zip(raw, lengths)]
    trace = engines.batch_trace(seqs, layers=model, num_experts=E, seq_len=5, padding="left")
    assert trace.layer_names == ["layers.1.mlp", "layers.3.mlp"]

    x = torch.randn(2, 5, 8)
    with mr.replay(model, trace), mr.record(model) as used:
        model(x)
    for name, engine_layer in (("layers.1.mlp", 1), ("layers.3.mlp", 3)):
        ids = used[name]
        assert (ids >= 0).all() and (ids[..., 0] != ids[..., 1]).all()  # -1 rows: no pile-up, no repeats
        for b, (r, n) in enumerate(zip(raw, lengths)):
            assert torch.equal(ids[b, 5 - n : 4], r[:, engine_layer])  # the engine's routes are kept
    # Padding and the unreported last tokens were routed by the router. In the first MoE layer its
    # inputs do not depend on other layers' routing, so the ids equal the router's own choice there.
    with mr.record(model) as own:
        model(x)
    free = trace["layers.1.mlp"][..., 0] < 0
    assert free.sum() == 4 and torch.equal(used["layers.1.mlp"][free], own["layers.1.mlp"][free])


def test_left_padded_vllm_batch_lines_up_with_the_tokens():
    # The bug this guards: with R taken as N, every row moved one position left under left padding.
    lengths = [3, 6]
    raw = [engine_ids(n - 1, 2, seed=n) for n in lengths]
    seqs = [engines.vllm_routes(r.numpy().astype(np.uint8)) for r in raw]  # num_tokens inferred
    trace = engines.batch_trace(seqs, layers=["l.0", "l.1"], num_experts=E, seq_len=7, padding="left")
    for b, (r, n) in enumerate(zip(raw, lengths)):
        ids = trace["l.1"][b]
        assert (ids[: 7 - n] == -1).all() and (ids[-1] == -1).all()  # padding, then the unreported last token
        assert torch.equal(ids[7 - n : 6], r[:, 1])  # token i of the sequence holds the engine's row i


def test_batch_trace_packed_and_streamed_from_a_generator():
    lengths = [3, 5, 1]
    raw = [engine_ids(n - 1, 4, seed=n) for n in lengths]
    names = {1: "layers.1.mlp", 3: "layers.3.mlp"}
    decoded = [
        engines.sglang_routes(b64(r), num_tokens=n, num_layers=4, top_k=K) for r, n in zip(raw, lengths)
    ]
    packed = engines.batch_trace(decoded, layers=names, num_experts=E, packed=True)
    assert packed.is_packed and packed.seq_lens == lengths and packed.dtype == torch.int8
    padded = engines.batch_trace(decoded, layers=names, num_experts=E)
    assert packed == padded.pack(torch.arange(5) < torch.tensor(lengths)[:, None])
    consumed = []

    def responses():  # one response decoded at a time
        for r, n in zip(raw, lengths):
            consumed.append(n)
            yield engines.sglang_routes(b64(r), num_tokens=n, num_layers=4, top_k=K, num_experts=E)

    streamed = engines.batch_trace(responses(), layers=names, num_experts=E, packed=True, num_tokens=lengths)
    assert streamed == packed and consumed == lengths
    with pytest.raises(ValueError, match=r"sequences\[1\] holds 5 token rows, num_tokens\[1\] says 4"):
        engines.batch_trace(iter(decoded), layers=names, num_experts=E, num_tokens=[3, 4, 1])
    with pytest.raises(ValueError, match="sequences yielded 2 sequences, num_tokens lists 3"):
        engines.batch_trace(iter(decoded[:2]), layers=names, num_experts=E, num_tokens=lengths)
    with pytest.raises(ValueError, match="more than len\\(num_tokens\\)=2"):
        engines.batch_trace(iter(decoded), layers=names, num_experts=E, num_tokens=lengths[:2])
    with pytest.raises(ValueError, match="pass num_tokens"):
        engines.batch_trace(iter(decoded), layers=names, num_experts=E)
    with pytest.raises(ValueError, match="not with packed=True"):
        engines.batch_trace(decoded, layers=names, num_experts=E, packed=True, padding="left")


@pytest.mark.parametrize(
    ("dtype", "num_experts"),
    [
        (np.uint8, 128),  # vLLM, small E: the trace is int8
        (np.int16, 256),  # int16 payloads, int16 trace
    ],
)
def test_building_a_trace_from_payloads_peaks_below_one_and_a_half_payloads(dtype, num_experts):
    g = np.random.default_rng(0)
    lengths = [int(n) for n in g.integers(200, 400, size=16)]
    payloads = [g.integers(0, 128, size=(n - 1, 8, 8)).astype(dtype) for n in lengths]
    payload_bytes = sum(p.nbytes for p in payloads)
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        trace = engines.batch_trace(
            (engines.vllm_routes(p, num_experts=num_experts) for p in payloads),
            layers=[f"model.layers.{i}.mlp" for i in range(8)],
            num_experts=num_experts,
            packed=True,
            num_tokens=lengths,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak >= trace.nbytes  # the trace's own buffer was seen: the measure covers the build
    assert trace.nbytes <= payload_bytes * 1.1 and peak <= 1.5 * payload_bytes
    assert torch.equal(
        trace["model.layers.5.mlp"][: lengths[0] - 1], torch.from_numpy(payloads[0][:, 5]).to(trace.dtype)
    )


def test_mtp_layers_after_the_decoder_are_dropped_unless_named():
    ids = engine_ids(3, 5)  # 4 decoder layers + 1 MTP layer
    names = [f"model.layers.{i}.mlp" for i in range(4)]
    trace = engines.batch_trace([engines.sequence_routes(ids)], layers=names, num_experts=E)
    assert trace.layer_names == names and torch.equal(trace["model.layers.3.mlp"][0], ids[:, 3])
    with_mtp = engines.batch_trace(
        [engines.sequence_routes(ids)],
        layers=[*names, "mtp.0.mlp"],
        num_experts=E,
        moe_layer_indices=[0, 1, 2, 3, 4],
    )
    assert torch.equal(with_mtp["mtp.0.mlp"][0], ids[:, 4])


@pytest.mark.parametrize(
    "decoder",
    [
        "stdlib",
        pytest.param(
            "pybase64",
            marks=pytest.mark.skipif(
                engines._fast_b64 is None, reason="the engines extra (pybase64) is not installed"
            ),
        ),
    ],
)
def test_both_base64_decoders_accept_and_refuse_the_same_payloads(decoder, monkeypatch):
    if decoder == "stdlib":
        monkeypatch.setattr(engines, "_fast_b64", None)
    ids = engine_ids(4, 3)
    routes = engines.sglang_routes(b64(ids), num_tokens=5, num_layers=3, top_k=K)
    assert torch.equal(routes[:4], ids)
    for bad in ("***", b64(ids)[:-1], b64(ids) + "\n", "é" * 8):
        with pytest.raises(ValueError, match="not valid base64"):
            engines.sglang_routes(bad, num_tokens=5, num_layers=3, top_k=K)


def test_the_readme_engine_examples_run(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Engine adapters") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3  # SGLang, vLLM, RL frameworks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "RoutingTrace(layers=2, token_shape=[2, 8], top_k=2, num_experts=8)",
        "[5, 7] [0, 5, 12]",
        "[[[1, 5], [2, 3], [-1, -1], [-1, -1]]]",
    ]
