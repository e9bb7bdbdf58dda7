"""Dispatchers: how routed tokens reach their experts and come back.

A dispatcher is ``dispatch(x_TH, routing, experts, backend) -> y_TH``. ``local_dispatch`` runs
every expert in this process; expert-parallel dispatchers move rows between ranks around the
same backend stages.
"""

from moe_replay.parallel.local import local_dispatch

__all__ = ["local_dispatch"]
