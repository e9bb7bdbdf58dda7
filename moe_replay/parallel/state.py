"""Checkpoints of expert-parallel layers: load the full layer's weights, gather them back.

Shape legend: E experts of the layer, E_loc this rank's experts (global ids ``first:first+E_loc``).

* ``load_state_dict`` on an expert-parallel layer accepts the single-process layer's state dict:
  every expert tensor ``[E, ...]`` is cut to this rank's ``[E_loc, ...]`` by
  :func:`keep_local_experts`, a load-state-dict pre-hook of the experts module. Tensors already
  of the local size (``layer.state_dict()`` of an expert-parallel layer: this rank's shard) load
  as they are.
* :func:`full_state_dict` (a collective) gathers every rank's experts and returns the
  single-process layer's state dict, on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from moe_replay.parallel.collectives import all_gather_rows, collective_device

if TYPE_CHECKING:
    from moe_replay.parallel.expert_parallel import ExpertParallel


class _ExpertShard(Protocol):
    """What :func:`keep_local_experts` reads of an experts module."""

    first_expert: int
    num_global_experts: int

    @property
    def num_experts(self) -> int: ...


def keep_local_experts(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook: cut the full layer's expert tensors to this rank's experts.

    ``module`` is an experts module with ``first_expert`` (global id of its expert 0),
    ``num_experts`` (local count) and ``num_global_experts``; each of its own parameters and buffers
    whose entry in ``state_dict`` has ``num_global_experts`` rows is replaced by rows
    ``first_expert:first_expert + num_experts``. (``load_state_dict`` hands hooks its own shallow
    copy of the caller's dict, so the caller's dict is untouched.)
    """
    shard = cast(_ExpertShard, module)
    first, local, total = shard.first_expert, shard.num_experts, shard.num_global_experts
    if local == total:
        return
    names = [name for name, _ in module.named_parameters(recurse=False)]
    names += [name for name, _ in module.named_buffers(recurse=False)]
    for name in names:
        tensor = state_dict.get(prefix + name)
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.shape[0] == total:
            state_dict[prefix + name] = tensor[first : first + local]


@torch.no_grad()
def full_state_dict(
    layer: nn.Module, ep: ExpertParallel | None, experts_prefix: str = "experts."
) -> dict[str, torch.Tensor]:
    """``layer``'s state dict with every expert tensor gathered over ``ep.group`` (all experts, in
    global order): what the single-process layer's ``state_dict()`` holds. Tensors come back on
    their own device. A collective: every rank of the group must call it."""
    local = layer.state_dict()
    if ep is None:
        return dict(local)
    device = collective_device(ep.group)
    counts = ep.partition.counts
    full: dict[str, torch.Tensor] = {}
    for key, tensor in local.items():  # the same keys, in the same order, on every rank
        if key.startswith(experts_prefix):
            (gathered,) = all_gather_rows([tensor.to(device)], counts, ep.group)
            tensor = gathered.to(tensor.device)
        full[key] = tensor
    return full
