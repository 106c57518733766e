"""What the Hubble API server needs from the agent's flow observer: one narrow protocol, so the
server knows nothing of how flows are made, stored or filtered."""

from collections.abc import AsyncIterator
from typing import Protocol

from meshagent.observe.api.observer import observer_pb2


class FlowSource(Protocol):
    """The agent's flows, as Hubble's observer service hands them out."""

    def get_flows(self, request: observer_pb2.GetFlowsRequest
                  ) -> AsyncIterator[observer_pb2.GetFlowsResponse]:
        """The flows the request asks for, oldest first; with follow, then each new one as it
        comes. Raises ValueError for a request it cannot serve (an unsupported filter field,
        bad times): the server answers INVALID_ARGUMENT with that text."""

    def server_status(self) -> observer_pb2.ServerStatusResponse:
        """num_flows, max_flows, seen_flows, uptime_ns, version (and node counts left 0: the
        server fills them)."""
