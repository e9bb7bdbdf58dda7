"""The ``peers`` transport of the ``alltoall`` dispatcher: experimental, an explicit opt-in
(``EPConfig(transport="peers")``).

Tokens travel through PyTorch's symmetric memory (``torch.distributed._symmetric_memory``, a
private API; on the CPU, shared-memory files, which is how CI runs it) instead of NCCL's
all-to-all: receivers read their rows straight from the origins' memory and each receiver's
combine writes its partial sums straight into the origins' memory. On 4 H100s it measured about
7% faster than ``collectives`` at 16384 tokens per rank (``benchmarks/RESULTS.md``); no test runs
it on GPUs. Nothing outside this package imports it: the transport registry
(``moe_replay.parallel.transport.TRANSPORTS``) loads it by name.

* :mod:`.memory`: a group's symmetric buffer, its areas and its barrier;
* :mod:`.rows`: who sends whom (``PeerExchange``), rows in every rank's memory (``PeerArea``),
  ``pull_rows`` / ``push_rows``, and ``PeerRows``, the combine's ``RowSink``;
* :mod:`.torch_ops`, :mod:`.triton_ops`: those stages in torch ops and Triton kernels;
* :mod:`.transport`: the transport itself.
"""

from moe_replay.parallel.peers.memory import PeerMemory, peer_memory, release_peer_memory, unavailable_reason
from moe_replay.parallel.peers.transport import PeerTransport

TRANSPORT = PeerTransport

__all__ = [
    "TRANSPORT",
    "PeerMemory",
    "PeerTransport",
    "peer_memory",
    "release_peer_memory",
    "unavailable_reason",
]
