"""The cache coordinator client: get/set/delete with versions and compare-and-set,
``get_or_compute`` with the lease protocol (one computation per missing key, fleet-wide), and
the semantic cache for LLM prompts. Generated messages: :mod:`agentmesh.cache.v1.cache_pb2`.

    async with Cache("http://127.0.0.1:7103") as cache:
        value = await cache.get_or_compute("answers", "capital:fr", compute, ttl=600)
        hit = await cache.semantic_get("llm", "Which city is France's capital?", model="m")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from .._base import Client, duration
from ..errors import AgentmeshError, NotFound
from .v1 import cache_pb2 as pb
from .v1 import cache_pb2_grpc as pb_grpc

__all__ = ["Cache", "pb"]

log = logging.getLogger("agentmesh.cache")

#: Default address of the cache coordinator.
DEFAULT_ADDRESS = "http://127.0.0.1:7103"


def as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class Cache(Client):
    """Client of ``agentmesh.cache.v1.CacheCoordinator`` (any instance)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options: Any) -> None:
        super().__init__(address, **options)
        self.stub = pb_grpc.CacheCoordinatorStub(self.channel)
        self._refreshing: set[asyncio.Task[bytes]] = set()

    async def get(self, namespace: str, key: str) -> pb.GetResponse:
        """The entry (``found`` false on a miss) with its ``version`` and the tier that answered."""
        response: pb.GetResponse = await self.call(
            self.stub.Get, pb.GetRequest(namespace=namespace, key=key), retry=True
        )
        return response

    async def set(
        self,
        namespace: str,
        key: str,
        value: bytes | str,
        *,
        ttl: float | None = None,
        if_version: int | None = None,
        tags: Iterable[str] = (),
    ) -> int:
        """Stores a value (``ttl`` seconds); with ``if_version`` only when the stored version is
        that one (0: only when absent) — else ``FailedPrecondition``. The new version."""
        request = pb.SetRequest(namespace=namespace, key=key, value=as_bytes(value), tags=tags)
        if ttl is not None:
            request.ttl.CopyFrom(duration(ttl))
        if if_version is not None:
            request.if_version = if_version
        # An unconditional write may be repeated; a compare-and-set may not (its first try
        # may have been applied).
        response: pb.SetResponse = await self.call(self.stub.Set, request, retry=if_version is None)
        return response.version

    async def delete(self, namespace: str, key: str) -> None:
        await self.call(
            self.stub.Delete, pb.DeleteRequest(namespace=namespace, key=key), retry=True
        )

    async def get_or_compute(
        self,
        namespace: str,
        key: str,
        compute: Callable[[], Awaitable[bytes | str]],
        *,
        ttl: float | None = None,
        lease_ttl: float = 30.0,
        wait: float = 10.0,
    ) -> bytes:
        """The cached value, or ``compute()``'s — computed by one caller fleet-wide: the one
        granted the lease computes and fills it, the others wait for it (up to ``wait``
        seconds each round). A ``compute`` that raises abandons the lease (another caller may
        take it) and the error propagates."""
        while True:
            answer: pb.GetOrLeaseResponse = await self.call(
                self.stub.GetOrLease,
                pb.GetOrLeaseRequest(
                    namespace=namespace,
                    key=key,
                    lease_ttl=duration(lease_ttl),
                    wait=duration(wait),
                ),
                timeout=wait + self.timeout,
            )
            if answer.outcome == pb.GetOrLeaseResponse.OUTCOME_HIT:
                if answer.HasField("lease"):
                    # A hit to refresh: served now, refreshed in the background.
                    refresh = asyncio.create_task(
                        self._fill(namespace, key, answer.lease.token, compute, ttl)
                    )
                    self._refreshing.add(refresh)
                    refresh.add_done_callback(self._refreshing.discard)
                return answer.value.value
            if answer.outcome == pb.GetOrLeaseResponse.OUTCOME_LEASE:
                return await self._fill(namespace, key, answer.lease.token, compute, ttl)
            if answer.outcome == pb.GetOrLeaseResponse.OUTCOME_NEGATIVE:
                raise NotFound(
                    grpc.StatusCode.NOT_FOUND,
                    f"{namespace}/{key}: a recent computation failed (a negative entry for "
                    f"{answer.ttl_left.ToNanoseconds() / 1e9:.1f} s more)",
                )
            # PENDING: another caller computes; ask again (the server waits `wait` for it).
            await asyncio.sleep(0.05)

    async def _fill(
        self,
        namespace: str,
        key: str,
        token: int,
        compute: Callable[[], Awaitable[bytes | str]],
        ttl: float | None,
    ) -> bytes:
        """Computes under the lease `token` and fills it (abandons it when `compute` raises).
        A fill refused (the lease expired meanwhile) still returns the value computed."""
        try:
            value = as_bytes(await compute())
        except BaseException:
            with contextlib.suppress(AgentmeshError):
                await self.call(
                    self.stub.AbandonLease,
                    pb.AbandonLeaseRequest(namespace=namespace, key=key, token=token),
                    retry=True,
                )
            raise
        fill = pb.FillLeaseRequest(namespace=namespace, key=key, token=token, value=value)
        if ttl is not None:
            fill.ttl.CopyFrom(duration(ttl))
        try:
            await self.call(self.stub.FillLease, fill, retry=True)
        except AgentmeshError as e:
            log.warning("cache %s/%s: the value computed was not stored: %s", namespace, key, e)
        return value

    async def semantic_get(
        self,
        namespace: str,
        prompt: str,
        *,
        model: str = "",
        parameters: str = "",
        threshold: float | None = None,
    ) -> pb.SemanticGetResponse:
        """A cached answer to a prompt meaning the same (``found``, ``similarity``,
        ``matched_prompt``), within one model and its parameters."""
        request = pb.SemanticGetRequest(
            namespace=namespace,
            prompt=prompt,
            partition=pb.Partition(model=model, parameters=parameters),
        )
        if threshold is not None:
            request.threshold = threshold
        response: pb.SemanticGetResponse = await self.call(
            self.stub.SemanticGet, request, retry=True
        )
        return response

    async def semantic_put(
        self,
        namespace: str,
        prompt: str,
        answer: bytes | str,
        *,
        model: str = "",
        parameters: str = "",
        ttl: float | None = None,
    ) -> int:
        """Stores an answer to a prompt; its version."""
        request = pb.SemanticPutRequest(
            namespace=namespace,
            prompt=prompt,
            answer=as_bytes(answer),
            partition=pb.Partition(model=model, parameters=parameters),
        )
        if ttl is not None:
            request.ttl.CopyFrom(duration(ttl))
        response: pb.SemanticPutResponse = await self.call(self.stub.SemanticPut, request)
        return response.version
