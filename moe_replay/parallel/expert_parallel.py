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
from moe_replay.parallel.config import EP_MODES, EPConfig
from moe_replay.parallel.partition import ExpertPartition

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_replay.backends.base import Backend
    from moe_replay.config import MoEConfig
    from moe_replay.types import ExpertsModule, Routing

__all__ = [
    "DEFAULT_EP_MODE",
    "EP_MODES",
    "Dispatcher",
    "EPConfig",
    "ExpertParallel",
    "ep_config_of",
    "setup_expert_parallel",
]


class Dispatcher(Protocol):
    def __call__(
        self, x_TH: torch.Tensor, routing: Routing, experts: ExpertsModule, backend: Backend
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class ExpertParallel:
    """How one layer spreads its experts: the group, the mode, this rank's share, the dispatcher."""

    group: ProcessGroup
    """The expert-parallel process group."""
    config: EPConfig
    """How: the mode, and for ``alltoall`` the transport, chunks and overlap switches."""
    partition: ExpertPartition
    """The experts this rank holds."""
    dispatcher: Dispatcher
    """The layer's ``dispatch_experts``."""

    @property
    def mode(self) -> str:
        """``"allgather"`` or ``"alltoall"``."""
        return self.config.mode


class _Default(str):
    """A default argument value that can be told from the same value passed explicitly."""


DEFAULT_EP_MODE: str = _Default("allgather")
"""``ep_mode``'s default in the layers' signatures: ``"allgather"``, unless ``ep=`` says otherwise."""


def ep_config_of(ep: object, ep_mode: object) -> EPConfig:
    """The layer's :class:`EPConfig` from ``ep=`` and its shorthand ``ep_mode=``: ``ep_mode``
    alone is ``EPConfig(mode=ep_mode)``; given both, they must agree."""
    if ep is None:
        return EPConfig(mode=ep_mode)  # type: ignore[arg-type]  # EPConfig checks the type
    if not isinstance(ep, EPConfig):
        raise TypeError(f"ep must be a moe_replay.EPConfig or None, got {type(ep).__name__}")
    if ep_mode is not DEFAULT_EP_MODE and ep_mode != ep.mode:
        raise ValueError(f"ep_mode={ep_mode!r} contradicts ep=EPConfig(mode={ep.mode!r}); pass one of them")
    return ep


def check_ep_args(ep_group: object, config: EPConfig) -> None:
    """``TypeError``/``ValueError`` naming the argument for a bad ``ep_group`` (the config checks
    itself)."""
    if ep_group is None:
        if config != EPConfig():
            what = f"ep_mode={config.mode!r}" if config.mode != "allgather" else f"ep={config!r}"
            raise ValueError(
                f"{what} needs an ep_group (expert parallelism), got ep_group=None; pass the process "
                "group to spread the experts over, or leave ep and ep_mode at their defaults"
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
    cfg: MoEConfig, ep_group: ProcessGroup | None, config: EPConfig, *, layer_kind: str, router: nn.Module
) -> ExpertParallel | None:
    """The layer's :class:`ExpertParallel`, or None without ``ep_group``; a collective over
    ``ep_group`` (module docstring): every rank must call it, with the same arguments."""
    check_ep_args(ep_group, config)
    if ep_group is None:
        return None
    world = dist.get_world_size(ep_group)
    partition = ExpertPartition(num_experts=cfg.num_experts, world_size=world, rank=dist.get_rank(ep_group))
    _check_same_layer(ep_group, f"{layer_kind}({cfg!r}, {config!r}, ep world size {world})")
    _broadcast_module(router, ep_group)
    dispatcher: Dispatcher
    if config.mode == "alltoall":
        dispatcher = AllToAllDispatcher(ep_group, partition, config)
    else:
        dispatcher = AllGatherDispatcher(ep_group, partition)
    return ExpertParallel(ep_group, config, partition, dispatcher)
