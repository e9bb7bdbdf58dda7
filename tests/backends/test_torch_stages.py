"""The torch backend's stages (dispatch, expert_mlp, combine, permute_rows) against naive loops.

Shape legend: M rows, R reads per row, N = M * R routed rows, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from moe_replay.backends import ExpertBuckets, get_backend

BACKEND = get_backend("torch", "cpu")

# Stage outputs vs float64 loops. float32: reassociation of H- and I-length sums. bfloat16 inputs
# are upcast and accumulated in float32, so only the inputs' rounding (shared with the reference,
# which reads the same bf16 values) and float32 sums remain: the float32 tolerance with some slack.
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 5e-5, "rtol": 5e-5},
}

# (M, R, E): routed ids drawn per row without repeats
SHAPES = [
    (7, 2, 4),  # basic
    (1, 1, 1),  # one row, one expert
    (0, 2, 4),  # no rows
    (5, 6, 6),  # R == E: every expert in every row
    (3, 1, 16),  # E > M * R: idle experts
    (11, 3, 7),  # prime E
]


def random_ids(M: int, R: int, E: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(E, generator=g)[:R] for _ in range(M)]
    return torch.stack(rows).to(torch.int32) if rows else torch.zeros(0, R, dtype=torch.int32)


def naive_buckets(ids_MR: torch.Tensor, E: int) -> tuple[list[int], list[list[int]], list[int]]:
    """row_of_slot, slot_of_row, offsets by walking experts, then rows, then reads."""
    M, R = ids_MR.shape
    ids = ids_MR.tolist()
    row_of_slot, slot_of_row, offsets = [], [[-1] * R for _ in range(M)], [0]
    for e in range(E):
        for m in range(M):
            for r in range(R):
                if ids[m][r] == e:
                    slot_of_row[m][r] = len(row_of_slot)
                    row_of_slot.append(m)
        offsets.append(len(row_of_slot))
    return row_of_slot, slot_of_row, offsets


def expert_of_slot(buckets: ExpertBuckets) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(buckets.num_experts), buckets.tokens_per_expert().long())


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(("M", "R", "E"), SHAPES)
def test_dispatch_matches_naive_loop(M: int, R: int, E: int) -> None:
    ids = random_ids(M, R, E)
    b = BACKEND.dispatch(ids, E)
    row_of_slot, slot_of_row, offsets = naive_buckets(ids, E)
    assert b.row_of_slot_N.tolist() == row_of_slot
    assert b.slot_of_row_MR.reshape(M, R).tolist() == slot_of_row
    assert b.offsets_E1.tolist() == offsets
    assert b.row_of_slot_N.dtype == b.slot_of_row_MR.dtype == b.offsets_E1.dtype == torch.int32


@pytest.mark.parametrize(("M", "R", "E"), SHAPES)
def test_dispatch_invariants(M: int, R: int, E: int) -> None:
    ids = random_ids(M, R, E, seed=1)
    b = BACKEND.dispatch(ids, E)
    N = M * R
    assert (b.num_experts, b.num_rows, b.num_slots) == (E, M, N)
    counts = b.tokens_per_expert()
    assert counts.sum() == N  # counts sum to M * R
    assert torch.equal(counts.long(), torch.bincount(ids.reshape(-1).long(), minlength=E))
    assert b.offsets_E1[0] == 0 and (b.offsets_E1[1:] >= b.offsets_E1[:-1]).all()
    slot = b.slot_of_row_MR.reshape(-1).long()
    assert torch.equal(slot.sort().values, torch.arange(N))  # a permutation of the N slots
    # inverse permutation: the r-th read of row m sits at a slot that reads row m
    assert torch.equal(b.row_of_slot_N.long()[slot], torch.arange(M).repeat_interleave(R))
    # each slot lies in the bucket of the expert its (row, read) was routed to
    assert torch.equal(expert_of_slot(b)[slot], ids.reshape(-1).long())
    # stable: within one bucket, flat (row, read) index ascends
    flat_of_slot = torch.empty(N, dtype=torch.long)
    flat_of_slot[slot] = torch.arange(N)
    for lo, hi in zip(b.offsets_E1[:-1].tolist(), b.offsets_E1[1:].tolist()):
        bucket = flat_of_slot[lo:hi]
        assert (bucket[1:] > bucket[:-1]).all()


def test_dispatch_all_rows_on_one_expert() -> None:
    ids = torch.full((6, 1), 2, dtype=torch.int32)
    b = BACKEND.dispatch(ids, 4)
    assert b.tokens_per_expert().tolist() == [0, 0, 6, 0]
    assert b.row_of_slot_N.tolist() == list(range(6))


# ----------------------------------------------------------------------------- experts


def random_weights(
    E: int, H: int, I: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w_down = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    return w_gate_up.requires_grad_(), w_down.requires_grad_()


def naive_expert_mlp(
    x_MH: torch.Tensor,
    ids_MR: torch.Tensor,
    buckets: ExpertBuckets,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """One token at a time: y[slot of (m, r)] = down_e(silu(gate_e x_m) * up_e x_m), rows 0..I-1 = gate."""
    I = w_down.shape[2]
    N = buckets.num_slots
    out = [None] * N
    for m in range(ids_MR.shape[0]):
        for r in range(ids_MR.shape[1]):
            e = int(ids_MR[m, r])
            gate = w_gate_up[e, :I] @ x_MH[m]
            up = w_gate_up[e, I:] @ x_MH[m]
            out[int(buckets.slot_of_row_MR[m, r])] = w_down[e] @ (F.silu(gate) * up)
    if not N:  # keep the graph so that backward runs (and gives zeros)
        return 0 * (x_MH.sum() + w_gate_up.sum() + w_down.sum()) + x_MH.new_zeros(0, w_down.shape[1])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("M", "R", "E"), SHAPES)
def test_expert_mlp_and_its_gradients_match_naive_loop(M: int, R: int, E: int, dtype: torch.dtype) -> None:
    H, I = 12, 10
    ids = random_ids(M, R, E, seed=2)
    b = BACKEND.dispatch(ids, E)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, H, generator=g).to(dtype).requires_grad_()
    w_gate_up, w_down = random_weights(E, H, I, dtype)
    y = BACKEND.expert_mlp(x, b, w_gate_up, w_down)
    assert y.shape == (M * R, H) and y.dtype in (torch.float32, dtype)
    upstream = torch.randn(M * R, H, generator=g)
    (y.float() * upstream).sum().backward()

    leaves64 = [t.detach().double().requires_grad_() for t in (x, w_gate_up, w_down)]
    y64 = naive_expert_mlp(*leaves64[:1], ids, b, *leaves64[1:])
    (y64 * upstream.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, **TOL[dtype])
    for got, want in zip((x, w_gate_up, w_down), leaves64):
        assert got.grad is not None and got.grad.dtype == got.dtype
        # gradients come back in the leaf's dtype: one bf16 rounding (2**-9 relative) of a float32 sum
        tol = TOL[dtype] if dtype == torch.float32 else {"atol": 1e-5, "rtol": 2**-8}
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)


def test_idle_experts_get_zero_gradients() -> None:
    ids = torch.tensor([[1], [1], [3]], dtype=torch.int32)  # experts 0 and 2 idle
    b = BACKEND.dispatch(ids, 4)
    w_gate_up, w_down = random_weights(4, 8, 6, torch.float32)
    BACKEND.expert_mlp(torch.randn(3, 8), b, w_gate_up, w_down).sum().backward()
    for e in (0, 2):
        assert torch.equal(w_gate_up.grad[e], torch.zeros_like(w_gate_up[e]))
        assert torch.equal(w_down.grad[e], torch.zeros_like(w_down[e]))
    assert w_gate_up.grad[1].abs().sum() > 0 and w_down.grad[3].abs().sum() > 0


# ----------------------------------------------------------------------------- combine, permute_rows


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("M", "R", "E"), SHAPES)
def test_combine_matches_naive_loop(M: int, R: int, E: int, out_dtype: torch.dtype) -> None:
    H = 5
    ids = random_ids(M, R, E, seed=4)
    b = BACKEND.dispatch(ids, E)
    g = torch.Generator().manual_seed(5)
    y_NH = torch.randn(M * R, H, generator=g).requires_grad_()
    w_MR = torch.rand(M, R, generator=g).requires_grad_()
    out = BACKEND.combine(y_NH, b, w_MR, out_dtype)
    assert out.shape == (M, H) and out.dtype == out_dtype
    upstream = torch.randn(M, H, generator=g)
    (out.float() * upstream).sum().backward()

    y64, w64 = (t.detach().double().requires_grad_() for t in (y_NH, w_MR))
    rows = [
        sum(w64[m, r] * y64[int(b.slot_of_row_MR[m, r])] for r in range(R)) if R else y64.new_zeros(H)
        for m in range(M)
    ]
    ref = torch.stack(rows) if M else 0 * (y64.sum() + w64.sum()) + y64.new_zeros(0, H)
    # the gradient reaching a bf16 output is bf16: round the upstream gradient the same way
    (ref * upstream.to(out_dtype).double()).sum().backward()
    # bf16 output: one rounding of the float32 sum (2**-8 relative at most)
    tol = {"atol": 1e-6, "rtol": 1e-6} if out_dtype == torch.float32 else {"atol": 1e-6, "rtol": 2**-8}
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(y_NH.grad.double(), y64.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w_MR.grad.double(), w64.grad, atol=1e-6, rtol=1e-6)


def test_combine_accumulates_bf16_rows_in_float32() -> None:
    # 1 + 2**-8 + 2**-8 is 1 + 2**-7 (a bf16 number) in float32, but 1.0 if each bf16 partial sum
    # were rounded (1 + 2**-8 is a tie that rounds to even: 1.0).
    y_NH = torch.tensor([[1.0], [2**-8], [2**-8]], dtype=torch.bfloat16)
    b = BACKEND.dispatch(torch.tensor([[0, 1, 2]], dtype=torch.int32), 3)
    out = BACKEND.combine(y_NH, b, torch.ones(1, 3), torch.bfloat16)
    assert out.item() == 1 + 2**-7


@pytest.mark.parametrize(("M", "R", "E"), SHAPES)
def test_permute_rows_gathers_and_its_backward_sums_each_rows_reads(M: int, R: int, E: int) -> None:
    ids = random_ids(M, R, E, seed=6)
    b = BACKEND.dispatch(ids, E)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, 3, generator=g).requires_grad_()
    x_NH = BACKEND.permute_rows(x, b)
    row_of_slot, slot_of_row, _ = naive_buckets(ids, E)
    assert torch.equal(x_NH, x.detach()[row_of_slot] if row_of_slot else x.new_zeros(0, 3))
    upstream = torch.randn(M * R, 3, generator=g)
    (x_NH * upstream).sum().backward()
    expected = [sum((upstream[slot_of_row[m][r]] for r in range(R)), torch.zeros(3)) for m in range(M)]
    torch.testing.assert_close(x.grad, torch.stack(expected) if M else torch.zeros(0, 3))


# ----------------------------------------------------------------------------- -1 slots
# Buckets with -1 slots (a (row, read) without a routed row) are what expert parallelism composes:
# naive_buckets of ids with -1 entries gives them (a -1 id matches no expert).

# (M, R, E, which (row, read) entries have no slot)
MISSING_CASES = [
    (6, 3, 5, "some"),  # about a third of the reads missing, row 0 entirely
    (4, 2, 3, "none"),  # no -1: the usual buckets
    (3, 2, 4, "all"),  # every read missing: N = 0, outputs are zero
    (0, 2, 4, "all"),  # no rows
]


def ids_with_missing(M: int, R: int, E: int, which: str, seed: int) -> torch.Tensor:
    ids = random_ids(M, R, E, seed)
    if which == "all":
        return torch.full_like(ids, -1)
    if which == "some" and M:
        missing = torch.rand(M, R, generator=torch.Generator().manual_seed(seed)) < 0.35
        missing[0] = True
        ids = ids.masked_fill(missing, -1)
    return ids


def buckets_of(ids_MR: torch.Tensor, E: int) -> ExpertBuckets:
    row_of_slot, slot_of_row, offsets = naive_buckets(ids_MR, E)
    M, R = ids_MR.shape
    return ExpertBuckets(
        torch.tensor(row_of_slot, dtype=torch.int32),
        torch.tensor(slot_of_row, dtype=torch.int32).view(M, R),
        torch.tensor(offsets, dtype=torch.int32),
    )


def weights_with_nan(ids_MR: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gate weights, NaN where the read is missing: it must add nothing whatever its weight."""
    return torch.rand(ids_MR.shape, generator=g).masked_fill(ids_MR < 0, float("nan")).requires_grad_()


def naive_present_sum(
    ids_MR: torch.Tensor,
    w_MR: torch.Tensor,
    read: Callable[[int, int], torch.Tensor],
    width: int,
    leaves: list[torch.Tensor],
) -> torch.Tensor:
    """``out[m] = sum over r with ids[m, r] >= 0 of w[m, r] * read(m, r)``, one read at a time.
    Every leaf stays in the graph, so backward gives zeros where nothing reads it."""
    M, R = ids_MR.shape
    rows = [
        sum((w_MR[m, r] * read(m, r) for r in range(R) if ids_MR[m, r] >= 0), w_MR.new_zeros(width))
        for m in range(M)
    ]
    anchor = 0 * sum(leaf.nan_to_num().sum() for leaf in leaves)
    return (torch.stack(rows) if rows else w_MR.new_zeros(0, width)) + anchor


@pytest.mark.parametrize(("M", "R", "E", "which"), MISSING_CASES)
def test_combine_skips_missing_slots(M: int, R: int, E: int, which: str) -> None:
    H = 5
    ids = ids_with_missing(M, R, E, which, seed=10)
    b = buckets_of(ids, E)
    g = torch.Generator().manual_seed(11)
    y_NH = torch.randn(b.num_slots, H, generator=g).requires_grad_()
    w_MR = weights_with_nan(ids, g)
    out = BACKEND.combine(y_NH, b, w_MR, torch.float32)
    upstream = torch.randn(M, H, generator=g)
    (out * upstream).sum().backward()

    y64, w64 = (t.detach().double().requires_grad_() for t in (y_NH, w_MR))
    slots = b.slot_of_row_MR.tolist()
    ref = naive_present_sum(ids, w64, lambda m, r: y64[slots[m][r]], H, [y64, w64])
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y_NH.grad.double(), y64.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w_MR.grad.double(), w64.grad, atol=1e-6, rtol=1e-6)  # 0 where missing


@pytest.mark.parametrize(("M", "R", "E", "which"), MISSING_CASES)
def test_permute_rows_backward_skips_missing_slots(M: int, R: int, E: int, which: str) -> None:
    ids = ids_with_missing(M, R, E, which, seed=12)
    b = buckets_of(ids, E)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(M, 3, generator=g).requires_grad_()
    x_NH = BACKEND.permute_rows(x, b)
    assert torch.equal(x_NH, x.detach()[b.row_of_slot_N.long()])
    upstream = torch.randn(b.num_slots, 3, generator=g)
    (x_NH * upstream).sum().backward()
    slots = b.slot_of_row_MR.tolist()
    expected = [sum((upstream[s] for s in slots[m] if s >= 0), torch.zeros(3)) for m in range(M)]
    torch.testing.assert_close(x.grad, torch.stack(expected) if M else torch.zeros(0, 3))


@pytest.mark.parametrize(("M", "R", "E", "which"), MISSING_CASES)
def test_expert_mlp_combine_skips_missing_slots(M: int, R: int, E: int, which: str) -> None:
    H, I = 12, 10
    ids = ids_with_missing(M, R, E, which, seed=14)
    b = buckets_of(ids, E)
    g = torch.Generator().manual_seed(15)
    x = torch.randn(M, H, generator=g).requires_grad_()
    w_MR = weights_with_nan(ids, g)
    w_gate_up, w_down = random_weights(E, H, I, torch.float32, seed=16)
    out = BACKEND.expert_mlp_combine(x, b, w_gate_up, w_down, w_MR, torch.float32)
    upstream = torch.randn(M, H, generator=g)
    (out * upstream).sum().backward()

    leaves64 = [t.detach().double().requires_grad_() for t in (x, w_MR, w_gate_up, w_down)]
    x64, w64, gate_up64, down64 = leaves64

    def expert_output(m: int, r: int) -> torch.Tensor:
        e = int(ids[m, r])
        gate, up = gate_up64[e, :I] @ x64[m], gate_up64[e, I:] @ x64[m]
        return down64[e] @ (F.silu(gate) * up)

    ref = naive_present_sum(ids, w64, expert_output, H, leaves64)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    for got, want in zip((x, w_MR, w_gate_up, w_down), leaves64):
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL[torch.float32])
