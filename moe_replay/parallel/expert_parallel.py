"""Expert parallelism of one layer: argument checks, the construction-time handshake, the dispatcher.

An expert-parallel layer replicates its router on every rank of ``ep_group`` and holds only its
rank's experts (:mod:`moe_replay.parallel.partition`). Its forward is the layer's usual forward;
only the dispatcher differs (:mod:`~moe_replay.parallel.allgather`,
:mod:`~moe_replay.parallel.alltoall`).

At construction every rank of the group (a collective, so all must construct the layer together):

1. checks that all ranks built the same layer (kind, config, ``ep_mode``, world size): an
   all-gather of a 64-bit fingerprint; a mismatch is a ``ValueError`` on every rank;
2. broadcasts the router from the group's first rank, so all ranks route alike from the start
   (load a checkpoint afterwards as usual; see :mod:`moe_replay.parallel.state`).

Experts are initialised independently on each rank.

Shape legend: T this rank's tokens, H hidden.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch import nn

from moe_replay.parallel.allgather import AllGatherDispatcher
from moe_replay.parallel.alltoall import AllToAllDispatcher
from moe_replay.parallel.collectives import all_gather_ints, collective_device
from moe_replay.parallel.partition import ExpertPartition

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend
    from moe_replay.config import MoEConfig
    from moe_replay.routing.route import Routing

EP_MODES = ("allgather", "alltoall")
_DISPATCHERS = {"allgather": AllGatherDispatcher, "alltoall": AllToAllDispatcher}


class Dispatcher(Protocol):
    def __call__(
        self, x_TH: torch.Tensor, routing: Routing, experts: nn.Module, backend: Backend
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class ExpertParallel:
    """How one layer spreads its experts: the group, the mode, this rank's share, the dispatcher."""

    group: ProcessGroup
    """The expert-parallel process group."""
    mode: str
    """``"allgather"`` or ``"alltoall"``."""
    partition: ExpertPartition
    """The experts this rank holds."""
    dispatcher: Dispatcher
    """The layer's ``dispatch_experts``."""


def check_ep_args(ep_group: object, ep_mode: object) -> None:
    """``TypeError``/``ValueError`` naming the argument for a bad ``ep_group`` or ``ep_mode``."""
    if not isinstance(ep_mode, str):
        raise TypeError(f"ep_mode must be a str, one of {EP_MODES}, got {type(ep_mode).__name__} {ep_mode!r}")
    if ep_mode not in EP_MODES:
        raise ValueError(f"ep_mode must be one of {EP_MODES}, got {ep_mode!r}")
    if ep_group is None:
        if ep_mode != "allgather":
            raise ValueError(
                f"ep_mode={ep_mode!r} needs an ep_group (expert parallelism), got ep_group=None; pass "
                "the process group to spread the experts over, or leave ep_mode at its default"
            )
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "ep_group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first"
        )
    if not isinstance(ep_group, dist.ProcessGroup):
        raise TypeError(
            f"ep_group must be a torch.distributed.ProcessGroup or None, got {type(ep_group).__name__}"
        )
    if dist.get_rank(ep_group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of ep_group")


def _fingerprint(description: str) -> int:
    digest = hashlib.blake2b(description.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _check_same_layer(group: ProcessGroup, description: str) -> None:
    device = collective_device(group)
    fingerprints = [row[0] for row in all_gather_ints([_fingerprint(description)], group, device)]
    differ = [rank for rank, fp in enumerate(fingerprints) if fp != fingerprints[0]]
    if differ:
        raise ValueError(
            f"ranks {differ} of ep_group built this layer differently from rank 0 (config, ep_mode or "
            f"layer kind differ); every rank must build the same layer. This rank "
            f"({dist.get_rank(group)}) built: {description}"
        )


@torch.no_grad()
def _broadcast_module(module: nn.Module, group: ProcessGroup) -> None:
    device = collective_device(group)
    source = dist.get_global_rank(group, 0)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "meta":
            continue
        staged = tensor.detach().to(device).contiguous()
        dist.broadcast(staged, src=source, group=group)
        tensor.copy_(staged)


def setup_expert_parallel(
    cfg: MoEConfig, ep_group: ProcessGroup | None, ep_mode: str, *, layer_kind: str, router: nn.Module
) -> ExpertParallel | None:
    """The layer's :class:`ExpertParallel`, or None without ``ep_group``; a collective over
    ``ep_group`` (module docstring): every rank must call it, with the same arguments."""
    check_ep_args(ep_group, ep_mode)
    if ep_group is None:
        return None
    world = dist.get_world_size(ep_group)
    partition = ExpertPartition(num_experts=cfg.num_experts, world_size=world, rank=dist.get_rank(ep_group))
    _check_same_layer(ep_group, f"{layer_kind}({cfg!r}, ep_mode={ep_mode!r}, ep world size {world})")
    _broadcast_module(router, ep_group)
    return ExpertParallel(ep_group, ep_mode, partition, _DISPATCHERS[ep_mode](ep_group, partition))
