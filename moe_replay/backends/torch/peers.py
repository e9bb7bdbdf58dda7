"""The expert-parallel peer transport's stages as plain torch ops on the peers' mapped rows: the
reference for ``Backend.pull_rows``, ``pull_sum`` and ``push_rows`` (``moe_replay.backends.base``).

Shape legend: W ranks, T this rank's tokens, M rows it receives, X a row's width."""

from __future__ import annotations

import torch

from moe_replay.backends.base import PeerArea, PeerExchange


def pull_rows(src: PeerArea, tokens: PeerArea, exchange: PeerExchange) -> torch.Tensor:
    me, W = exchange.rank, exchange.world_size
    parts = []
    for s in range(W):
        first = exchange.send_start(s, me)
        token_of_place = tokens.views[s][first : first + exchange.rows[s][me]].long()
        parts.append(src.views[s][token_of_place])
    return torch.cat(parts) if parts else src.views[me][:0].clone()


def pull_sum(
    src: PeerArea, slot_of_row_TW: torch.Tensor, exchange: PeerExchange, out_dtype: torch.dtype
) -> torch.Tensor:
    me = exchange.rank
    T, X = slot_of_row_TW.shape[0], src.views[me].shape[1:]
    total = torch.zeros((T, *X), dtype=torch.float32, device=slot_of_row_TW.device)
    for r in range(exchange.world_size):
        place = slot_of_row_TW[:, r].long()
        sent = place >= 0
        row = torch.where(sent, place + (exchange.recv_start(r, me) - exchange.send_start(me, r)), 0)
        partial = src.views[r][row].float()
        total += torch.where(sent.view(-1, *([1] * len(X))), partial, 0.0)
    return total.to(out_dtype)


def push_rows(x_MX: torch.Tensor, dst: PeerArea, exchange: PeerExchange) -> None:
    me = exchange.rank
    for s in range(exchange.world_size):
        n, first = exchange.rows[s][me], exchange.recv_start(me, s)
        place = exchange.send_start(s, me)
        dst.views[s][place : place + n] = x_MX[first : first + n]
