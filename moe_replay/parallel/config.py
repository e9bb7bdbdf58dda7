"""How a layer spreads its experts: :class:`EPConfig`, passed at construction.

``mr.MoE(cfg, ep_group=group, ep=EPConfig(mode="alltoall"))``; ``ep_mode="alltoall"`` is the
shorthand for ``ep=EPConfig(mode="alltoall")``. Every rank of the group must pass the same
configuration (the construction-time handshake checks it): it fixes the sequence of collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

EP_MODES = ("allgather", "alltoall")
TRANSPORTS = ("collectives", "peers")


@dataclass(frozen=True, kw_only=True)
class EPConfig:
    """Expert parallelism of one layer (``docs/expert-parallel.md``)."""

    mode: str = "allgather"
    """``"allgather"`` (every rank sees every token; simple) or ``"alltoall"`` (each token goes
    only to the ranks holding its experts; scales)."""
    transport: str = "collectives"
    """How ``alltoall`` moves rows: ``"collectives"`` (``torch.distributed`` all-to-all: NCCL on
    GPUs, gloo on the CPU) or ``"peers"`` (experimental: symmetric memory, one chunk)."""
    chunks: int = 1
    """Token chunks per ``alltoall`` call (collectives only): each chunk's transfers overlap
    another chunk's experts, at the cost of more host work per call."""
    overlap_backward: bool = True
    """Whether the ``alltoall`` backward overlaps its transfers with the receiver's work (results
    are the same either way; off for A/B measurements)."""
    comm_sms: int | None = None
    """SMs the experts' backward leaves free for the transfer it overlaps (collectives): None for
    NCCL's cap (``collectives.collective_sms``), 0 for none."""

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str):
            raise TypeError(
                f"ep_mode must be a str, one of {EP_MODES}, got {type(self.mode).__name__} {self.mode!r}"
            )
        if self.mode not in EP_MODES:
            raise ValueError(f"ep_mode must be one of {EP_MODES}, got {self.mode!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1:
            raise ValueError(f"chunks must be an int >= 1, got {self.chunks!r}")
        if self.transport == "peers" and self.chunks != 1:
            raise ValueError(f"the peers transport runs one chunk per call, chunks is {self.chunks}")
        if not isinstance(self.overlap_backward, bool):
            raise TypeError(f"overlap_backward must be a bool, got {self.overlap_backward!r}")
        if self.comm_sms is not None and (
            isinstance(self.comm_sms, bool) or not isinstance(self.comm_sms, int) or self.comm_sms < 0
        ):
            raise ValueError(f"comm_sms must be None or an int >= 0, got {self.comm_sms!r}")
