"""Dispatchers: how routed tokens reach their experts and come back.

A dispatcher is ``dispatch(x_TH, routing, experts, backend) -> y_TH`` (shape legend: T tokens,
H hidden). ``local_dispatch`` runs every expert in this process. The expert-parallel dispatchers
move rows between the ranks of a ``torch.distributed`` group around the same backend stages
(dispatch, permute_rows, expert_mlp, combine), so every backend, and the bf16 and quantized
layers alike, run under them unchanged:

* ``allgather`` (:class:`AllGatherDispatcher`): all-gather every rank's tokens and routing, run
  this rank's experts on all of them, reduce-scatter the partial sums back. Simple; each rank
  handles every token.
* ``alltoall`` (:class:`AllToAllDispatcher`): exchange row counts, send each token once to each
  rank holding one of its experts, run the experts there and sum them per token, send one partial
  row per (token, rank) back, add the partials on the origin rank. Each rank handles only its
  experts' rows: the scheme that scales. The dispatcher computes; a :class:`Transport`
  (:mod:`.transport`) moves the rows: ``collectives`` (``torch.distributed``, the default) or,
  experimental, ``peers`` (:mod:`.peers`, symmetric memory).

Experts are split by :func:`expert_offsets` (balanced, contiguous). Layers get expert parallelism
through ``moe_replay.MoE(cfg, ep_group=group, ep=EPConfig(...))`` (:mod:`.config`); see
:mod:`.expert_parallel` for the construction-time checks and :mod:`.state` for checkpoints.
"""

from moe_replay.parallel.allgather import AllGatherDispatcher
from moe_replay.parallel.alltoall import AllToAllDispatcher
from moe_replay.parallel.config import EP_MODES, EPConfig
from moe_replay.parallel.expert_parallel import ExpertParallel
from moe_replay.parallel.local import local_dispatch
from moe_replay.parallel.partition import ExpertPartition, expert_offsets
from moe_replay.parallel.transport import Transport

__all__ = [
    "EP_MODES",
    "AllGatherDispatcher",
    "AllToAllDispatcher",
    "EPConfig",
    "ExpertParallel",
    "ExpertPartition",
    "Transport",
    "expert_offsets",
    "local_dispatch",
]
