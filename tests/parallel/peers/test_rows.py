"""The peer transport's stages (parallel/peers/rows.py: ``pull_rows``, ``push_rows``, and
``expert_mlp_combine`` into ``PeerRows``) on every backend's kernels against naive loops, in one
process: W "ranks" are W tensors of this process, and a ``PeerArea`` holds their views and
addresses as a group's symmetric memory would (the kernels cannot tell the difference). The
transport across processes is tested in ``tests/parallel/test_ep.py``.

Shape legend: W ranks, T a rank's tokens, M rows a rank receives, X a row's width.
"""

from __future__ import annotations

import functools

import pytest
import torch

from moe_replay.backends.registry import available_backends, get_backend
from moe_replay.parallel.peers import rows as peer_rows
from moe_replay.parallel.peers.rows import PeerArea, PeerExchange, PeerRows, push_rows

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
    """First the tokens of the rows (by place, from the origins' send lists), then the rows."""
    gen = torch.Generator().manual_seed(W)
    X, spare = 24, 3  # every rank's area holds more rows than it uses
    lists, _, rows = send_lists(random_routes(W, tokens, gen))
    xs = [torch.randn(max(tokens) + spare, X, generator=gen).to(DEVICE, dtype) for _ in range(W)]
    # Every rank's area has the same rows, as in symmetric memory.
    room = max(len(lst) for lst in lists) + spare
    pad = [torch.full((room - len(lst),), -7, dtype=torch.int32) for lst in lists]
    toks = [torch.cat([lst, p]).to(DEVICE) for lst, p in zip(lists, pad)]
    src, tok = local_area(xs), local_area(toks)
    for me in range(W):
        exchange = exchange_of(me, rows)
        pull = functools.partial(peer_rows.pull_rows, kernels=backend == "triton")
        token_M = pull(tok, exchange)
        out = pull(src, exchange, token_M)
        # Receiver me's rows: each origin's places for me, origins in rank order.
        places = [(s, i) for s in range(W) for i in range(sum(rows[s][:me]), sum(rows[s][: me + 1]))]
        assert token_M.dtype == torch.int32 and token_M.tolist() == [lists[s][i].item() for s, i in places]
        assert out.shape == (exchange.num_received, X) and out.dtype == dtype
        if places:
            assert torch.equal(out, torch.stack([xs[s][lists[s][i].item()] for s, i in places]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("W", "tokens"), CASES)
def test_pull_rows_at_a_capacity_counts_on_the_device(backend: str, W: int, tokens: list[int]) -> None:
    """With a capacity and no host counts (before the count sync), the first M rows are those of
    the exact pull; a capacity below M, or areas too small for the places, give undefined rows
    but read nothing outside the areas (the tensors here end where the areas do)."""
    gen = torch.Generator().manual_seed(10 + W)
    X = 16
    lists, _, rows = send_lists(random_routes(W, tokens, gen))
    xs = [torch.randn(max(tokens), X, generator=gen).to(DEVICE) for _ in range(W)]
    room = max(len(lst) for lst in lists)  # every rank's area has the same rows
    toks = [torch.cat([lst, torch.zeros(room - len(lst), dtype=torch.int32)]).to(DEVICE) for lst in lists]
    src, tok = local_area(xs), local_area(toks)
    pull = functools.partial(peer_rows.pull_rows, kernels=backend == "triton")
    for me in range(W):
        exact = exchange_of(me, rows)
        M = exact.num_received
        early = PeerExchange(rank=me, rows=None, counts_WW3=exact.counts_WW3)
        token_M = pull(tok, early, None, M + 5)
        out = pull(src, early, token_M, M + 5)
        assert token_M.shape == (M + 5,) and out.shape == (M + 5, X)
        assert torch.equal(token_M[:M], pull(tok, exact))
        assert torch.equal(out[:M], pull(src, exact, pull(tok, exact)))
        filled = pull(src, early, token_M, M + 5, fill=-1.0)  # the padding rows' value
        assert torch.equal(filled[:M], out[:M]) and (filled[M:] == -1).all()
        # Too small a capacity, or places past the areas' rows: rows undefined, no stray reads.
        assert pull(src, early, token_M, max(M - 2, 1)).shape == (max(M - 2, 1), X)
        short = local_area([t[: max(room // 2, 1)] for t in toks])
        assert pull(short, early, None, M + 1).shape == (M + 1,)
        assert pull(local_area([x[:1] for x in xs]), early, token_M, M + 1).shape == (M + 1, X)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("W", "tokens"), CASES)
def test_expert_mlp_combine_writes_rows_to_their_origins(backend: str, W: int, tokens: list[int]) -> None:
    """``out_MH=PeerRows``: each combined row lands at its origin's place, as ``push_rows`` of the
    plain result would put it, and the placeholder carries the rows' gradient."""
    gen = torch.Generator().manual_seed(30 + W)
    E, R, H, I = 3, 2, 16, 8
    _, _, rows = send_lists(random_routes(W, tokens, gen))
    sent = [sum(r) for r in rows]
    stages = get_backend(backend, DEVICE)
    w_gate_up = (0.3 * torch.randn(E, 2 * I, H, generator=gen)).to(DEVICE)
    w_down = (0.3 * torch.randn(E, H, I, generator=gen)).to(DEVICE)
    got = [torch.full((max(sent) + 1, H), float("nan"), device=DEVICE) for _ in range(W)]
    want = [torch.full((max(sent) + 1, H), float("nan"), device=DEVICE) for _ in range(W)]
    for me in range(W):
        exchange = exchange_of(me, rows)
        M = exchange.num_received
        x = torch.randn(M, H, generator=gen).to(DEVICE).requires_grad_()
        ids = torch.randint(0, E, (M, R), generator=gen).to(DEVICE)
        weights = torch.rand(M, R, generator=gen).to(DEVICE)
        buckets = stages.dispatch(ids, E)
        placeholder = stages.expert_mlp_combine(
            x,
            buckets,
            w_gate_up,
            w_down,
            weights,
            torch.float32,
            out_MH=PeerRows(local_area(got), exchange, backend == "triton"),
        )
        assert placeholder.shape == (M, H)
        dy = torch.randn(M, H, generator=gen).to(DEVICE)
        placeholder.backward(dy)
        y = stages.expert_mlp_combine(
            x.detach().requires_grad_(), buckets, w_gate_up, w_down, weights, torch.float32
        )
        push_rows(y.detach(), local_area(want), exchange)
        x_again = x.detach().requires_grad_()
        stages.expert_mlp_combine(x_again, buckets, w_gate_up, w_down, weights, torch.float32).backward(dy)
        assert torch.equal(x.grad, x_again.grad)
    for s in range(W):
        assert torch.equal(got[s][: sent[s]], want[s][: sent[s]]) and got[s][sent[s] :].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("W", "tokens"), CASES)
def test_push_rows_writes_each_row_to_its_origins_place(backend: str, W: int, tokens: list[int]) -> None:
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
        push_rows(x, dst, exchange)
    for s in range(W):
        for d in range(W):  # origin s's places for rank d hold d's rows from s, in order
            first_place, first_row = sum(rows[s][:d]), sum(rows[q][d] for q in range(s))
            n = rows[s][d]
            assert torch.equal(dsts[s][first_place : first_place + n], pushed[d][first_row : first_row + n])
        assert dsts[s][sent[s] :].isnan().all()  # nothing past the send list
