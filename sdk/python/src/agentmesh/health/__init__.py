"""The health aggregator client: the cluster's health now, and its changes as they happen.
Generated messages: :mod:`agentmesh.health.v1.health_pb2`.

    async with Health("http://127.0.0.1:7105") as h:
        print(pb.State.Name((await h.cluster()).state))
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from .._base import Client
from ..errors import from_rpc_error
from .v1 import health_pb2 as pb
from .v1 import health_pb2_grpc as pb_grpc

__all__ = ["Health", "pb"]

#: Default address of the health aggregator.
DEFAULT_ADDRESS = "http://127.0.0.1:7105"


class Health(Client):
    """Client of ``agentmesh.health.v1.HealthAggregator``."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options: Any) -> None:
        super().__init__(address, **options)
        self.stub = pb_grpc.HealthAggregatorStub(self.channel)

    async def cluster(self, *, omit_instances: bool = False) -> pb.ClusterHealth:
        """Every component's state and the cluster's."""
        health: pb.ClusterHealth = await self.call(
            self.stub.GetClusterHealth,
            pb.GetClusterHealthRequest(omit_instances=omit_instances),
            retry=True,
        )
        return health

    async def watch(
        self, *, after_revision: int = 0, omit_instances: bool = False
    ) -> AsyncIterator[pb.ClusterHealthUpdate]:
        """A snapshot, then each change, until the caller stops iterating."""
        call = self.stub.WatchClusterHealth(
            pb.WatchClusterHealthRequest(
                after_revision=after_revision, omit_instances=omit_instances
            ),
            metadata=self.metadata(),
        )
        try:
            async for update in call:
                yield update
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(e) from None
        finally:
            call.cancel()
