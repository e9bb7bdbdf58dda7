"""The alltoall dispatcher's metadata stages (parallel/plan.py), against brute-force references;
no processes needed (the dispatcher itself runs in tests/parallel/test_ep.py).

Shape legend: W ranks, T tokens, K experts per token, M received rows, E experts, E_loc this
rank's experts, S sent rows, P received (row, k) pairs whose expert is on this rank.
"""

from __future__ import annotations

import pytest
import torch

from moe_replay.backends.registry import available_backends, get_backend
from moe_replay.parallel import plan as ep_plan
from moe_replay.parallel.partition import expert_offsets


def _send_plan_reference(sent_WT: torch.Tensor, chunks: int) -> list[tuple[range, list, list, list]]:
    """Per chunk: (its tokens, their slots [token][rank], the send list's chunk-local tokens,
    offsets_W1), by enumeration in (rank, token) order within each chunk."""
    W, T = sent_WT.shape
    Tc = -(-T // chunks)
    plans = []
    for c in range(chunks):
        tokens = range(min(c * Tc, T), min((c + 1) * Tc, T))
        slot = [[-1] * W for _ in tokens]
        listed, offsets = [], [0]
        for r in range(W):
            for i, t in enumerate(tokens):
                if sent_WT[r, t]:
                    slot[i][r] = len(listed)
                    listed.append(i)
            offsets.append(len(listed))
        plans.append((tokens, slot, listed, offsets))
    return plans


def _routed(T: int, K: int, E: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """``[T, K]`` distinct ids of E experts; with ``density`` < 1 the ids crowd onto fewer ranks
    (a token's experts drawn from the first ``ceil(density * E)``), so some (token, rank) pairs
    send nothing; density 0: every token's experts on rank 0."""
    span = max(K, min(E, round(density * E)))
    if T == 0:
        return torch.empty(0, K, dtype=torch.int32)
    return torch.stack([torch.randperm(span, generator=gen)[:K] for _ in range(T)]).int()


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize(
    ("W", "T", "K", "E", "density", "chunks"),
    [
        (2, 9, 2, 6, 0.5, 1),  # most tokens on rank 0 only
        (3, 17, 2, 9, 1.0, 1),  # odd sizes
        (4, 5, 4, 4, 1.0, 1),  # every token to every rank: the list fills the capacity
        (4, 6, 2, 8, 0.0, 2),  # all on rank 0: the other ranks get nothing
        (3, 0, 2, 7, 1.0, 2),  # T = 0: a rank without tokens
        (1, 7, 3, 5, 1.0, 2),  # a world of one
        (3, 17, 3, 7, 1.0, 2),  # two chunks (uneven expert split), the last one shorter
        (4, 10, 2, 8, 0.7, 3),  # three chunks of 4, 4, 2
        (2, 1, 2, 4, 1.0, 3),  # fewer tokens than chunks: empty chunks
        (4, 150, 8, 32, 1.0, 2),  # more than one block of tokens per chunk (Triton: BLOCK_T = 64)
    ],
)
def test_send_plan_matches_enumeration(
    backend_name: str, W: int, T: int, K: int, E: int, density: float, chunks: int
) -> None:
    if backend_name not in available_backends("cpu"):
        pytest.skip("the triton backend cannot run on the CPU here (no Triton, or no interpreter)")
    gen = torch.Generator().manual_seed(W * 100 + T)
    ids_TK = _routed(T, K, E, density, gen)
    offsets = expert_offsets(E, W)
    counts_WC3 = torch.full((W, chunks, 3), 7, dtype=torch.int32)
    plan = ep_plan.send_plan(
        get_backend(backend_name, "cpu"), ids_TK, torch.tensor(offsets, dtype=torch.int32), chunks, counts_WC3
    )

    rank_of = [next(r for r in range(W) if offsets[r] <= e < offsets[r + 1]) for e in range(E)]
    hits = [[sum(rank_of[int(e)] == r for e in ids_TK[t]) for t in range(T)] for r in range(W)]
    sent_WT = torch.tensor(hits, dtype=torch.int32).view(W, T).clamp(max=1)
    reach = min(W, K)
    assert plan.slot_of_row_TW.shape == (T, W) and plan.slot_of_row_TW.is_contiguous()
    assert (counts_WC3[:, :, 2] == 7).all()  # the flag column is the caller's
    for c, (tokens, slot, listed, offsets_W1) in enumerate(_send_plan_reference(sent_WT, chunks)):
        S = len(listed)
        rows, buckets = plan.chunk(c, S)
        assert range(rows.start, rows.stop) == tokens
        assert buckets.slot_of_row_MR.dtype == buckets.row_of_slot_N.dtype == torch.int32
        assert buckets.offsets_E1.dtype == torch.int32
        assert buckets.slot_of_row_MR.tolist() == slot
        assert buckets.row_of_slot_N.tolist() == listed
        assert buckets.offsets_E1.tolist() == offsets_W1
        assert counts_WC3[:, c, 0].tolist() == [offsets_W1[r + 1] - offsets_W1[r] for r in range(W)]
        assert counts_WC3[:, c, 1].tolist() == [sum(hits[r][t] for t in tokens) for r in range(W)]
        # At capacity, the places past the list read the chunk's first token: in bounds, never sent.
        capacity = len(tokens) * reach
        assert plan.chunk(c, capacity)[1].row_of_slot_N.tolist() == listed + [0] * (capacity - S)
        # The invariants ExpertBuckets promises: the slots >= 0 are a permutation of 0..S-1, and
        # each place's token reads back its slot.
        assert sorted(s for row in slot for s in row if s >= 0) == list(range(S))
        for i in range(len(tokens)):
            for r in range(W):
                if slot[i][r] >= 0:
                    assert listed[slot[i][r]] == i


def _meta(ids_MK: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``[M, 2K]`` float32: random gate weights, then the ids as float values."""
    return torch.cat([torch.rand(ids_MK.shape, generator=gen), ids_MK.float()], dim=1)


@pytest.mark.parametrize("backend_name", ["torch", "triton", "triton, scan and scatter apart"])
@pytest.mark.parametrize(
    ("M", "K", "E", "first", "end"),
    [
        (11, 3, 7, 0, 4),  # first rank of [4, 3]
        (13, 3, 7, 4, 7),  # last rank: ids below first go to the sink too
        (9, 2, 6, 2, 4),  # a middle rank
        (5, 4, 4, 0, 4),  # every expert here: no sink pairs
        (0, 3, 7, 3, 5),  # nothing received
        (300, 8, 128, 32, 64),  # M * K > 1024: the Triton dispatch's multi-block path
    ],
)
def test_received_buckets_match_enumeration(
    backend_name: str, M: int, K: int, E: int, first: int, end: int, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    if backend_name.endswith("apart"):  # the three-launch dispatch path, used past 128 blocks
        backend_name = "triton"
        if backend_name in available_backends("cpu"):
            from moe_replay.backends.triton import dispatch as triton_dispatch

            monkeypatch.setattr(triton_dispatch, "FUSED_SCAN_BLOCKS", 0)
    if backend_name not in available_backends("cpu"):
        pytest.skip("the triton backend cannot run on the CPU here (no Triton, or no interpreter)")
    gen = torch.Generator().manual_seed(M + K + E)
    ids_MK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(M)]) if M else torch.empty(0, K)
    meta_MM = _meta(ids_MK, gen)
    E_loc = end - first
    local_of_expert_E = torch.tensor(
        [e - first if first <= e < end else E_loc for e in range(E)], dtype=torch.int32
    )
    mine = [(m, k) for m in range(M) for k in range(K) if first <= int(ids_MK[m, k]) < end]
    P = len(mine)

    stages = get_backend(backend_name, "cpu")
    buckets = ep_plan.received_buckets(stages, meta_MM, local_of_expert_E, E_loc, P)

    # Reference: each local expert's pairs in ascending (row, k) order, experts in order.
    order = sorted(mine, key=lambda mk: (int(ids_MK[mk]) - first, mk))
    expected_slot = [[-1] * (2 * K) for _ in range(M)]
    for place, (m, k) in enumerate(order):
        expected_slot[m][k] = place
    counts = [sum(int(ids_MK[mk]) - first == e for mk in mine) for e in range(E_loc)]
    assert buckets.slot_of_row_MR.shape == (M, 2 * K)
    assert buckets.slot_of_row_MR.tolist() == expected_slot  # the id reads (k >= K) never have a slot
    assert buckets.row_of_slot_N.tolist() == [m for m, _ in order]
    assert buckets.offsets_E1.tolist() == [sum(counts[:e]) for e in range(E_loc + 1)]
    assert buckets.num_slots == P and buckets.num_experts == E_loc

    # A capacity's padding rows (ids -1, as pull_rows' fill writes them) are no expert's: the
    # same buckets over the first M rows, no slot in the others.
    padded = torch.cat([meta_MM, torch.full((5, 2 * K), -1.0)])
    with_pad = ep_plan.received_buckets(stages, padded, local_of_expert_E, E_loc, (M + 5) * K)
    assert with_pad.slot_of_row_MR[:M].tolist() == expected_slot
    assert (with_pad.slot_of_row_MR[M:] == -1).all()
    assert with_pad.row_of_slot_N[:P].tolist() == [m for m, _ in order]
    assert with_pad.offsets_E1.tolist() == buckets.offsets_E1.tolist()
