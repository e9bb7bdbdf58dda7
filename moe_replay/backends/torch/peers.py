"""The expert-parallel peer transport's stages as plain torch ops on the peers' mapped rows: the
reference for ``Backend.pull_rows``, and ``push_rows``' one implementation
(``moe_replay.backends.base``).

Shape legend: W ranks, T this rank's tokens, M rows it receives, X a row's width."""

from __future__ import annotations

import torch

from moe_replay.backends.base import PeerArea, PeerExchange


def pull_rows(src: PeerArea, exchange: PeerExchange, token_M: torch.Tensor | None) -> torch.Tensor:
    parts = []
    for s, received, places in sorted(exchange.blocks()):  # by origin: the receiver's row order
        parts.append(src.views[s][places] if token_M is None else src.views[s][token_M[received].long()])
    return torch.cat(parts)


@torch.no_grad()
def push_rows(x_MX: torch.Tensor, dst: PeerArea, exchange: PeerExchange) -> None:
    for s, received, places in exchange.blocks():
        dst.views[s][places].copy_(x_MX[received])
