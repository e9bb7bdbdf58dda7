"""The alltoall dispatcher's metadata (parallel/alltoall.py), against brute-force references; no
processes needed (the dispatcher itself runs in tests/parallel/test_ep.py).

Shape legend: W ranks, T tokens, K experts per token, M received rows, E experts, E_loc this
rank's experts, S sent rows, P received (row, k) pairs whose expert is on this rank.
"""

from __future__ import annotations

import pytest
import torch

from moe_replay.backends.registry import available_backends, get_backend
from moe_replay.parallel.alltoall import _pair_buckets, _send_order


def _send_order_reference(sent_WT: torch.Tensor) -> tuple[list[list[int]], list[int], list[int]]:
    """(slot_of_row_TW, tokens of the send list, offsets_W1) by enumeration in (rank, token) order."""
    W, T = sent_WT.shape
    slot = [[-1] * W for _ in range(T)]
    tokens, offsets = [], [0]
    for r in range(W):
        for t in range(T):
            if sent_WT[r, t]:
                slot[t][r] = len(tokens)
                tokens.append(t)
        offsets.append(len(tokens))
    return slot, tokens, offsets


@pytest.mark.parametrize(
    ("W", "T", "density"),
    [
        (2, 9, 0.5),  # random mask
        (3, 17, 0.3),  # odd sizes, sparse
        (4, 5, 1.0),  # every token to every rank: the list fills the capacity but the spare
        (4, 6, 0.0),  # nothing sent: every slot -1, every offset 0
        (3, 0, 0.5),  # T = 0: a rank without tokens
        (1, 7, 1.0),  # a world of one
    ],
)
def test_send_order_matches_enumeration(W: int, T: int, density: float) -> None:
    gen = torch.Generator().manual_seed(W * 100 + T)
    sent_WT = (torch.rand(W, T, generator=gen) < density).to(torch.int32)
    token_T1 = torch.arange(T, dtype=torch.int32).view(T, 1)
    minus_one, zero_1 = torch.tensor(-1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    slot_TW, token_of_slot_C, offsets_W1 = _send_order(sent_WT, token_T1, minus_one, zero_1)

    slot, tokens, offsets = _send_order_reference(sent_WT)
    S = len(tokens)
    assert slot_TW.dtype == token_of_slot_C.dtype == offsets_W1.dtype == torch.int32
    assert slot_TW.shape == (T, W) and slot_TW.is_contiguous()
    assert slot_TW.tolist() == slot
    assert token_of_slot_C.shape == (W * T + 1,)
    assert token_of_slot_C[:S].tolist() == tokens
    assert offsets_W1.tolist() == offsets
    # The invariants ExpertBuckets promises: the slots >= 0 are a permutation of 0..S-1, and each
    # place's token reads back its slot.
    assert sorted(s for s in slot_TW.flatten().tolist() if s >= 0) == list(range(S))
    for t in range(T):
        for r in range(W):
            if slot[t][r] >= 0:
                assert tokens[slot[t][r]] == t


def _meta(ids_MK: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``[M, 2K]`` float32: random gate weights, then the ids as float values."""
    return torch.cat([torch.rand(ids_MK.shape, generator=gen), ids_MK.float()], dim=1)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
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
def test_pair_buckets_match_enumeration(
    backend_name: str, M: int, K: int, E: int, first: int, end: int
) -> None:
    if backend_name not in available_backends("cpu"):
        pytest.skip("the triton backend cannot run on the CPU here (no Triton, or no interpreter)")
    gen = torch.Generator().manual_seed(M + K + E)
    ids_MK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(M)]) if M else torch.empty(0, K)
    meta_MM = _meta(ids_MK, gen)
    E_loc = end - first
    local_of_expert_E = torch.tensor(
        [e - first if first <= e < end else E_loc for e in range(E)], dtype=torch.int32
    )
    read_bounds_21 = torch.tensor([[E_loc], [0]], dtype=torch.int32)
    mine = [(m, k) for m in range(M) for k in range(K) if first <= int(ids_MK[m, k]) < end]
    P = len(mine)

    buckets = _pair_buckets(
        meta_MM, local_of_expert_E, read_bounds_21, P, E_loc, get_backend(backend_name, "cpu")
    )

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
