"""Engine-node hops: how many bot processes a generation request has already passed through.

A bot whose remote backend points (directly or round a ring of nodes) at itself would otherwise turn one request into
an endless storm. The remote backend sends the count it received plus one; the engine node refuses past MAX_HOPS.
"""

from __future__ import annotations

from contextvars import ContextVar

HOP_HEADER = "X-Engine-Node-Hops"
MAX_HOPS = 4  # a front end → node → node chain is 2; past this it is a loop
# The hops of the request being served: the engine node sets it, the remote backend's requests carry it on.
incoming_hops: ContextVar[int] = ContextVar("engine_node_hops", default=0)


def outgoing_headers() -> dict[str, str]:
    """The hop header for a request to a remote engine, made while serving a request that came with `incoming_hops`."""
    return {HOP_HEADER: str(incoming_hops.get() + 1)}
