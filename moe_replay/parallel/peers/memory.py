"""Symmetric memory of a process group: a buffer of the same size on every rank, each rank's
mapped into every process, so that kernels read and write other ranks' rows directly.

The ``alltoall`` dispatcher's peer transport (``moe_replay.parallel.alltoall``) moves tokens
through it instead of NCCL's all-to-all. Two kinds, one interface (:class:`PeerMemory`):

* CUDA (an NCCL group): PyTorch's symmetric memory (``torch.distributed._symmetric_memory``):
  peer buffers mapped over NVLink, and its barrier, a kernel that signals every peer and waits
  for their signals (release / acquire at system scope), on the current stream.
* CPU (a gloo group): one shared-memory file per rank (under ``/dev/shm`` where there is one),
  mapped by every process; the barrier is the group's. CPU kernels (the torch backend, or
  Triton's interpreter) finish before the host goes on, so the barrier orders them. This is how
  CI runs the transport, with the kernels it runs on a GPU.

A buffer is laid out in :class:`PeerArea` s at the same byte offsets on every rank (a 256-byte
aligned row block each). Who may touch which rows when is the caller's protocol: between two
barriers a rank's rows are either written by one side or read, never both (the dispatcher's
docstring).

Allocation is collective (every rank of the group, the same size), so :func:`peer_memory`
grows a group's buffer only when the caller says all ranks need it, and keeps it otherwise.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from moe_replay.parallel.collectives import group_backend
from moe_replay.parallel.peers.rows import PeerArea

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ALIGN = 256


def unavailable_reason(group: ProcessGroup, device: torch.device) -> str | None:
    """Why ``group`` has no symmetric memory on ``device`` here, or None if it has."""
    backend = group_backend(group)
    if device.type == "cpu":
        return None if "gloo" in backend else f"CPU peer memory needs a gloo group, this one is {backend!r}"
    if device.type != "cuda" or "nccl" not in backend:
        return f"no peer memory for {device.type} tensors in a {backend!r} group"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError as e:
        return f"torch.distributed._symmetric_memory is missing: {e}"
    return None


def _typed(storage_of: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A ``shape`` ``dtype`` tensor on ``storage_of``'s memory at byte ``offset`` (not an autograd
    view of it: writes into it, differentiable or not, leave the buffer alone)."""
    item = torch.empty((), dtype=dtype).element_size()
    start = storage_of.storage_offset() * storage_of.element_size() + offset
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]  # contiguous
    return torch.empty(0, dtype=dtype, device=storage_of.device).set_(
        storage_of.untyped_storage(), start // item, shape, strides
    )


class PeerMemory:
    """``nbytes`` of symmetric memory on each rank of ``group`` (collective: every rank calls it
    with the same ``nbytes``)."""

    def __init__(self, group: ProcessGroup, device: torch.device, nbytes: int) -> None:
        reason = unavailable_reason(group, device)
        if reason is not None:
            raise ValueError(reason)
        self.group = group
        self.device = device
        self.nbytes = nbytes
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._handle: Any = None  # torch's private _SymmetricMemory on CUDA
        if device.type == "cuda":
            self._buffers = self._map_cuda()
        else:
            self._buffers = self._map_files()
        addresses = [b.data_ptr() for b in self._buffers]
        self._bases_W = torch.tensor(addresses, dtype=torch.int64, device=device)
        self._areas: dict[tuple[int, tuple[int, ...], torch.dtype], PeerArea] = {}

    def _map_cuda(self) -> list[torch.Tensor]:
        from torch.distributed import _symmetric_memory as symm_mem

        buffer = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self._handle = symm_mem.rendezvous(buffer, self.group)
        self._own = buffer  # keeps the allocation alive
        return [
            buffer if r == self.rank else self._handle.get_buffer(r, (self.nbytes,), torch.uint8, 0)
            for r in range(self.world_size)
        ]

    def _map_files(self) -> list[torch.Tensor]:
        # A name every rank agrees on, without pickling: rank 0's random 64 bits, broadcast.
        key = torch.tensor([uuid.uuid4().int & (2**63 - 1)], dtype=torch.int64)
        dist.broadcast(key, dist.get_global_rank(self.group, 0), group=self.group)
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        paths = [os.path.join(folder, f"moe_replay_peers_{key.item():x}_{r}") for r in range(self.world_size)]

        def mapped(path: str) -> torch.Tensor:
            return torch.from_file(path, shared=True, size=self.nbytes, dtype=torch.uint8)

        own = mapped(paths[self.rank])  # created here
        dist.barrier(group=self.group)  # every file exists
        buffers = [own if r == self.rank else mapped(p) for r, p in enumerate(paths)]
        dist.barrier(group=self.group)  # every rank mapped every file: the names can go
        os.unlink(paths[self.rank])
        return buffers

    def area(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> PeerArea:
        """The ``shape`` ``dtype`` rows at byte ``offset`` of every rank's buffer (cached)."""
        key = (offset, tuple(shape), dtype)
        if key not in self._areas:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if offset % ALIGN or offset + nbytes > self.nbytes:
                raise ValueError(f"area of {nbytes} bytes at {offset} outside a {self.nbytes}-byte buffer")
            views = tuple(_typed(b, offset, tuple(shape), dtype) for b in self._buffers)
            self._areas[key] = PeerArea(views=views, bases_W=self._bases_W + offset)
        return self._areas[key]

    def barrier(self) -> None:
        """Every rank's work before it (on this rank's current stream, for CUDA) is done and
        visible to every rank's work after it. Collective."""
        if self._handle is not None:
            self._handle.barrier()
        else:
            dist.barrier(group=self.group)


_MEMORY: dict[tuple[str, torch.device], PeerMemory] = {}


def peer_memory(group: ProcessGroup, device: torch.device, nbytes: int) -> PeerMemory:
    """``group``'s symmetric memory on ``device``, at least ``nbytes`` per rank: the one made
    before if it is large enough, else a new one (a collective: every rank of the group must ask
    for the same ``nbytes`` at the same point; grown by half again, so that it rarely grows)."""
    key = (group.group_name, device)
    memory = _MEMORY.get(key)
    if memory is not None and memory.group is not group:  # a new group under a destroyed one's name
        memory = None
    if memory is None or memory.nbytes < nbytes:
        size = max(nbytes, 3 * memory.nbytes // 2 if memory is not None else 0)
        _MEMORY.pop(key, None)
        memory = PeerMemory(group, device, -(-size // ALIGN) * ALIGN)
        _MEMORY[key] = memory
    return memory


def release_peer_memory(group: ProcessGroup) -> None:
    """Drop ``group``'s symmetric memory (on every device); the next call that needs some makes it
    anew. Every rank of the group must call it at the same point (making it is collective)."""
    for key in [key for key in _MEMORY if key[0] == group.group_name]:
        del _MEMORY[key]


def row_layout(rows: int, row_bytes: list[int]) -> tuple[list[int], int]:
    """Byte offsets of areas of ``rows`` rows of ``row_bytes[i]`` bytes each, every area aligned,
    and the total size."""
    offsets, total = [], 0
    for b in row_bytes:
        offsets.append(total)
        total += -(-rows * b // ALIGN) * ALIGN
    return offsets, total
