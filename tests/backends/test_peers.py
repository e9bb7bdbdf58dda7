"""The peer transport's stages (``pull_rows``, ``pull_sum``, ``push_rows``) of every backend
against naive loops, in one process: W "ranks" are W tensors of this process, and a
``PeerArea`` holds their views and addresses as a group's symmetric memory would (the kernels
cannot tell the difference). The transport across processes is tested in
``tests/parallel/test_ep.py``.

Shape legend: W ranks, T a rank's tokens, M rows a rank receives, X a row's width.
"""

from __future__ import annotations

import pytest
import torch

from moe_replay.backends.base import PeerArea, PeerExchange
from moe_replay.backends.registry import available_backends, get_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = available_backends(DEVICE)


def local_area(tensors: list[torch.Tensor]) -> PeerArea:
    """The tensors as one area of W ranks' memory (each rank's rows at its tensor's address)."""
    bases = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=tensors[0].device)
    return PeerArea(views=tuple(tensors), bases_W=bases)


def random_routes(W: int, tokens: list[int], gen: torch.Generator) -> list[torch.Tensor]:
    """Per origin s, ``[T_s, W]`` bool: whether token t goes to rank d (each token to >= 1 rank)."""
    routes = []
    for T in tokens:
        goes = torch.rand(T, W, generator=gen) < 0.5
        goes[torch.arange(T), torch.randint(0, W, (T,), generator=gen)] = True
        routes.append(goes)
    return routes


def send_lists(routes: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple]:
    """Per origin: its send list (tokens, ordered by (rank, token)), each token's place per rank
    (``[T, W]``, -1 where not sent), and the count matrix ``rows[s][d]``."""
    lists, slots, rows = [], [], []
    for goes in routes:
        T, W = goes.shape
        tokens, slot = [], torch.full((T, W), -1, dtype=torch.int32)
        for d in range(W):
            for t in range(T):
                if goes[t, d]:
                    slot[t, d] = len(tokens)
                    tokens.append(t)
        lists.append(torch.tensor(tokens, dtype=torch.int32))
        slots.append(slot)
        rows.append(tuple(int(goes[:, d].sum()) for d in range(W)))
    return lists, slots, tuple(rows)


def exchange_of(rank: int, rows: tuple) -> PeerExchange:
    W = len(rows)
    counts = torch.zeros(W, W, 3, dtype=torch.int32)
    counts[:, :, 0] = torch.tensor(rows, dtype=torch.int32).view(W, W)
    return PeerExchange(rank=rank, rows=rows, counts_WW3=counts.to(DEVICE))


CASES = [(1, [5]), (2, [7, 0]), (3, [4, 9, 6]), (4, [3, 1, 0, 8])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("W", "tokens"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pull_rows_reads_each_origins_tokens(
    backend: str, W: int, tokens: list[int], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(W)
    X, spare = 24, 3  # every rank's area holds more rows than it uses
    lists, _, rows = send_lists(random_routes(W, tokens, gen))
    xs = [torch.randn(max(tokens) + spare, X, generator=gen).to(DEVICE, dtype) for _ in range(W)]
    toks = [torch.cat([lst, torch.full((spare,), -7, dtype=torch.int32)]).to(DEVICE) for lst in lists]
    src, tok = local_area(xs), local_area(toks)
    for me in range(W):
        exchange = exchange_of(me, rows)
        out = get_backend(backend, DEVICE).pull_rows(src, tok, exchange)
        expected = [xs[s][lists[s][i].item()] for s in range(W) for i in range(len(lists[s]))
                    if sum(rows[s][:me]) <= i < sum(rows[s][: me + 1])]  # fmt: skip
        assert out.shape == (exchange.num_received, X) and out.dtype == dtype
        if expected:
            assert torch.equal(out, torch.stack(expected))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("W", "tokens"), CASES)
def test_pull_sum_adds_each_tokens_partials_in_rank_order(backend: str, W: int, tokens: list[int]) -> None:
    gen = torch.Generator().manual_seed(10 + W)
    X = 40
    _, slots, rows = send_lists(random_routes(W, tokens, gen))
    received = [sum(rows[s][d] for s in range(W)) for d in range(W)]
    ys = [torch.randn(max(received) + 2, X, generator=gen).to(DEVICE) for _ in range(W)]
    src = local_area(ys)
    for me in range(W):
        exchange = exchange_of(me, rows)
        out = get_backend(backend, DEVICE).pull_sum(src, slots[me].to(DEVICE), exchange, torch.float32)
        expected = torch.zeros(tokens[me], X, device=DEVICE)
        for t in range(tokens[me]):
            for r in range(W):
                place = slots[me][t, r].item()
                if place >= 0:  # receiver r's row: its rows from ranks before me, then mine in order
                    row = sum(rows[s][r] for s in range(me)) + place - sum(rows[me][:r])
                    expected[t] += ys[r][row]
        assert out.dtype == torch.float32 and out.shape == (tokens[me], X)
        assert torch.equal(out, expected)  # float32, the same order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("W", "tokens"), CASES)
@pytest.mark.parametrize("sms", [0, 1, 3])
def test_push_rows_writes_each_row_to_its_origins_place(
    backend: str, W: int, tokens: list[int], sms: int
) -> None:
    gen = torch.Generator().manual_seed(20 + W)
    X = 33
    _, _, rows = send_lists(random_routes(W, tokens, gen))
    sent = [sum(r) for r in rows]
    dsts = [torch.full((max(sent) + 2, X), float("nan"), device=DEVICE) for _ in range(W)]
    dst = local_area(dsts)
    pushed = {}
    for me in range(W):
        exchange = exchange_of(me, rows)
        x = torch.randn(exchange.num_received, X, generator=gen).to(DEVICE)
        pushed[me] = x
        get_backend(backend, DEVICE).push_rows(x, dst, exchange, sms)
    for s in range(W):
        for d in range(W):  # origin s's places for rank d hold d's rows from s, in order
            first_place, first_row = sum(rows[s][:d]), sum(rows[q][d] for q in range(s))
            n = rows[s][d]
            assert torch.equal(dsts[s][first_place : first_place + n], pushed[d][first_row : first_row + n])
        assert dsts[s][sent[s] :].isnan().all()  # nothing past the send list
