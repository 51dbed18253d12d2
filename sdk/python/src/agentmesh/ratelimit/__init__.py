"""The rate limiter client: checks (one key or a batch), concurrency leases as an ``async
with``, cost budgets (reserve → commit the actual cost, or cancel). Generated messages:
:mod:`agentmesh.ratelimit.v1.ratelimit_pb2`.

    async with RateLimiter("http://127.0.0.1:7104") as rl:
        if (await rl.check("api", "user-7", policy="per-user")).allowed:
            ...
        async with rl.lease("llm", "gpt", limit=4):      # at most 4 at once, fleet-wide
            ...
        async with rl.budget("tokens", "team-a", estimate=2000) as spend:
            spend.actual = 1712                          # committed on exit
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from .._base import Client, duration, seconds
from ..errors import AgentmeshError, ResourceExhausted
from .v1 import ratelimit_pb2 as pb
from .v1 import ratelimit_pb2_grpc as pb_grpc

__all__ = ["Budget", "Decision", "RateLimiter", "pb"]

log = logging.getLogger("agentmesh.ratelimit")

#: Default address of the rate limiter.
DEFAULT_ADDRESS = "http://127.0.0.1:7104"


@dataclass(frozen=True)
class Decision:
    """One check's answer: ``allowed``, ``remaining`` in the window, ``retry_after`` seconds
    when denied, and the raw :class:`pb.CheckResult`."""

    allowed: bool
    remaining: int
    retry_after: float
    result: pb.CheckResult


@dataclass
class Budget:
    """A reservation against a cost budget: set ``actual`` before leaving the ``async with``
    (unset: the estimate is committed)."""

    reservation_id: str
    estimate: int
    usage: pb.BudgetUsage
    actual: int | None = None


class RateLimiter(Client):
    """Client of ``agentmesh.ratelimit.v1.RateLimiter`` (any instance: it routes each key to its
    owner)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options: Any) -> None:
        super().__init__(address, **options)
        self.stub = pb_grpc.RateLimiterStub(self.channel)

    async def check(
        self,
        namespace: str,
        key: str,
        *,
        policy: str = "",
        limit: int = 0,
        period: float = 1.0,
        burst: int = 0,
        cost: int = 1,
    ) -> Decision:
        """Takes ``cost`` (0 = a peek) from ``key``'s allowance under a stored ``policy`` or an
        inline ``limit`` per ``period`` seconds. Not retried (it debits)."""
        item = pb.CheckItem(namespace=namespace, key=key, cost=cost)
        if policy:
            item.policy = policy
        elif limit:
            item.limit.CopyFrom(pb.LimitSpec(limit=limit, period=duration(period), burst=burst))
        answer = await self.call(self.stub.Check, pb.CheckRequest(items=[item]))
        result: pb.CheckResult = answer.results[0]
        return Decision(
            allowed=result.decision == pb.DECISION_ALLOW,
            remaining=result.remaining,
            retry_after=seconds(result.retry_after),
            result=result,
        )

    async def check_many(
        self, items: list[pb.CheckItem], *, all_or_nothing: bool = False
    ) -> pb.CheckResponse:
        """Several checks in one call; ``all_or_nothing`` debits none unless all are allowed."""
        response: pb.CheckResponse = await self.call(
            self.stub.Check, pb.CheckRequest(items=items, all_or_nothing=all_or_nothing)
        )
        return response

    @asynccontextmanager
    async def lease(
        self,
        namespace: str,
        key: str,
        *,
        limit: int,
        ttl: float = 30.0,
        wait: float = 0.0,
    ) -> AsyncIterator[pb.AcquireResponse]:
        """Holds one of ``limit`` concurrent slots of ``key`` while inside (renewed every third
        of ``ttl``; released on exit, or expiring after ``ttl`` if this process dies). Waits up to
        ``wait`` seconds for a slot, then raises :class:`ResourceExhausted`."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            acquired: pb.AcquireResponse = await self.call(
                self.stub.Acquire,
                pb.AcquireRequest(namespace=namespace, key=key, limit=limit, ttl=duration(ttl)),
            )
            if acquired.acquired:
                break
            retry = max(seconds(acquired.retry_after), 0.05)
            if asyncio.get_running_loop().time() + retry > deadline:
                raise ResourceExhausted(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{namespace}/{key}: {acquired.in_use} of {acquired.limit} slots in use",
                    retry_delay=retry,
                )
            await asyncio.sleep(retry)

        async def renew() -> None:
            while True:
                await asyncio.sleep(ttl / 3)
                try:
                    await self.call(
                        self.stub.RenewLease,
                        pb.RenewLeaseRequest(
                            namespace=namespace,
                            key=key,
                            lease_id=acquired.lease_id,
                            ttl=duration(ttl),
                        ),
                        retry=True,
                    )
                except AgentmeshError as e:
                    # The slot may be gone (it expires with its TTL): say so loudly.
                    log.warning("lease %s/%s could not be renewed: %s", namespace, key, e)
                    return

        renewer = asyncio.create_task(renew())
        try:
            yield acquired
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self.call(
                    self.stub.Release,
                    pb.ReleaseRequest(namespace=namespace, key=key, lease_id=acquired.lease_id),
                    retry=True,
                )
            except AgentmeshError:
                pass  # it expires with its TTL

    @asynccontextmanager
    async def budget(
        self,
        namespace: str,
        key: str,
        *,
        estimate: int,
        policy: str = "",
        limit: int = 0,
        window: int = pb.BUDGET_WINDOW_DAY,
        ttl: float = 300.0,
    ) -> AsyncIterator[Budget]:
        """Reserves ``estimate`` from a cost budget (a stored budget ``policy`` or an inline
        ``limit`` per ``window``) and commits ``actual`` on exit — or cancels the reservation
        when the block raises. Raises :class:`ResourceExhausted` when the budget cannot cover
        the estimate."""
        target = pb.BudgetTarget(namespace=namespace, key=key, policy=policy)
        if not policy:
            target.budget.CopyFrom(pb.BudgetSpec(limit=limit, window=window))  # type: ignore[arg-type]
        reserved: pb.ReserveResponse = await self.call(
            self.stub.Reserve,
            pb.ReserveRequest(target=target, estimate=estimate, ttl=duration(ttl)),
        )
        if not reserved.granted:
            raise ResourceExhausted(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{namespace}/{key}: {reserved.usage.remaining} left, {estimate} asked",
            )
        spend = Budget(reserved.reservation_id, estimate, reserved.usage)
        try:
            yield spend
        except BaseException:
            await self.call(
                self.stub.Cancel,
                pb.CancelRequest(target=target, reservation_id=spend.reservation_id),
                retry=True,
            )
            raise
        committed: pb.BudgetUsageResponse = await self.call(
            self.stub.Commit,
            pb.CommitRequest(
                target=target,
                reservation_id=spend.reservation_id,
                actual=estimate if spend.actual is None else spend.actual,
            ),
            retry=True,
        )
        spend.usage = committed.usage
