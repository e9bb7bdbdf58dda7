"""The peer transport's stages as plain torch ops on the peers' mapped rows: the reference for
``rows.pull_rows``, and ``rows.push_rows``' one implementation.

Shape legend: W ranks, T this rank's tokens, M rows it receives, X a row's width."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_replay.parallel.peers.rows import PeerArea, PeerExchange


def pull_rows(
    src: PeerArea,
    exchange: PeerExchange,
    token_M: torch.Tensor | None,
    capacity: int | None = None,
    fill: float | None = None,
) -> torch.Tensor:
    if capacity is not None:  # the counts from the device; rows left undefined are zeros here
        exchange = exchange.with_host_rows()
        own = src.views[exchange.rank]
        out = own.new_full((capacity, *own.shape[1:]), 0 if fill is None else fill)
        M, limit = exchange.num_received, own.shape[0]
        reads = [
            token_M[received].long() if token_M is not None else torch.arange(p.start, p.stop)
            for _, received, p in exchange.blocks()
        ]
        if capacity >= M and all(bool(((p >= 0) & (p < limit)).all()) for p in reads):
            out[:M] = pull_rows(src, exchange, None if token_M is None else token_M[:M])
        return out
    parts = []
    for s, received, places in sorted(exchange.blocks()):  # by origin: the receiver's row order
        parts.append(src.views[s][places] if token_M is None else src.views[s][token_M[received].long()])
    return torch.cat(parts)


@torch.no_grad()
def push_rows(x_MX: torch.Tensor, dst: PeerArea, exchange: PeerExchange) -> None:
    for s, received, places in exchange.blocks():
        dst.views[s][places].copy_(x_MX[received])
