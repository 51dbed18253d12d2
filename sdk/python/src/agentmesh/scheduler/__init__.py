"""The scheduler client: submit, get, watch, wait for and cancel tasks; acquire and release an
agent. Agents themselves use :class:`agentmesh.Agent`. Generated messages:
:mod:`agentmesh.scheduler.v1.scheduler_pb2`.

    async with Scheduler("http://127.0.0.1:7102") as s:
        task = await s.submit("summarize", b"...", idempotency_key="doc-42")
        done = await s.wait(task.task_id, timeout=60)
        print(done.output)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc

from .._base import Client, duration
from ..errors import from_rpc_error
from .v1 import scheduler_pb2 as pb
from .v1 import scheduler_pb2_grpc as pb_grpc

__all__ = ["TERMINAL", "Scheduler", "pb"]

#: Default address of a scheduler (any instance: followers forward to the leader).
DEFAULT_ADDRESS = "http://127.0.0.1:7102"

#: States a task does not leave.
TERMINAL = frozenset(
    {
        pb.TASK_STATE_SUCCEEDED,
        pb.TASK_STATE_FAILED,
        pb.TASK_STATE_TIMED_OUT,
        pb.TASK_STATE_CANCELLED,
    }
)


class Scheduler(Client):
    """Client of ``agentmesh.scheduler.v1.Scheduler``."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options: Any) -> None:
        super().__init__(address, **options)
        self.stub = pb_grpc.SchedulerStub(self.channel)

    async def submit(
        self,
        type: str,
        payload: bytes | str = b"",
        *,
        idempotency_key: str = "",
        priority: int = 0,
        labels: Mapping[str, str] | None = None,
        capabilities: Mapping[str, str] | None = None,
        tags: Iterable[str] = (),
        schedule_to_start: float | None = None,
        start_to_close: float | None = None,
        heartbeat_timeout: float | None = None,
        max_attempts: int = 0,
    ) -> pb.Task:
        """Submits a task of ``type`` (times in seconds; unset = the scheduler's defaults).
        With an ``idempotency_key`` a repeat returns the task submitted first, so the call is
        retried on UNAVAILABLE; without one it is not."""
        request = pb.SubmitTaskRequest(
            type=type,
            payload=payload.encode() if isinstance(payload, str) else payload,
            idempotency_key=idempotency_key,
            priority=priority,
            labels=dict(labels or {}),
            selector=pb.Selector(capabilities=dict(capabilities or {}), tags=list(tags)),
        )
        for field, seconds in (
            ("schedule_to_start", schedule_to_start),
            ("start_to_close", start_to_close),
            ("heartbeat_timeout", heartbeat_timeout),
        ):
            if seconds is not None:
                getattr(request, field).CopyFrom(duration(seconds))
        if max_attempts:
            request.retry.max_attempts = max_attempts
        answer = await self.call(self.stub.SubmitTask, request, retry=bool(idempotency_key))
        task: pb.Task = answer.task
        return task

    async def get(self, task_id: str) -> pb.Task:
        """One task (``NotFound`` when there is none)."""
        return await self.call(self.stub.GetTask, pb.GetTaskRequest(task_id=task_id), retry=True)

    async def cancel(self, task_id: str, reason: str = "") -> pb.Task:
        """Cancels a task that has not ended (its agent is told to stop)."""
        return await self.call(
            self.stub.CancelTask, pb.CancelTaskRequest(task_id=task_id, reason=reason), retry=True
        )

    async def watch(self, task_id: str) -> AsyncIterator[pb.Task]:
        """The task now, then each change, until it ends."""
        call = self.stub.WatchTask(pb.WatchTaskRequest(task_id=task_id), metadata=self.metadata())
        try:
            async for task in call:
                yield task
                if task.state in TERMINAL:
                    return
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def wait(self, task_id: str, timeout: float | None = None) -> pb.Task:
        """Waits until the task ends (``TimeoutError`` after ``timeout`` seconds)."""

        async def last() -> pb.Task:
            while True:
                async for task in self.watch(task_id):
                    if task.state in TERMINAL:
                        return task
                # The watch ended early (a leader change, the task forgotten): look again.
                task = await self.get(task_id)
                if task.state in TERMINAL:
                    return task
                await asyncio.sleep(0.2)

        return await asyncio.wait_for(last(), timeout)

    async def acquire_agent(
        self,
        *,
        type: str = "",
        capabilities: Mapping[str, str] | None = None,
        tags: Iterable[str] = (),
        zone: str = "",
        strategy: int = pb.STRATEGY_UNSPECIFIED,
        affinity_key: str = "",
        exclude: Iterable[str] = (),
        ttl: float = 60.0,
    ) -> pb.AcquireAgentResponse:
        """Reserves one slot of a matching agent for ``ttl`` seconds (``ResourceExhausted``
        with ``retry_delay`` when none is free); give it back with :meth:`release_agent`."""
        request = pb.AcquireAgentRequest(
            selector=pb.Selector(
                type=type, capabilities=dict(capabilities or {}), tags=list(tags), zone=zone
            ),
            strategy=strategy,  # type: ignore[arg-type]
            affinity_key=affinity_key,
            exclude=list(exclude),
            ttl=duration(ttl),
        )
        return await self.call(self.stub.AcquireAgent, request)

    async def release_agent(
        self,
        reservation_id: str,
        *,
        outcome: int = pb.OUTCOME_SUCCESS,
        latency: float | None = None,
    ) -> None:
        """Gives a reserved slot back, saying how the work went (feeds the agent's circuit
        breaker and latency)."""
        request = pb.ReleaseAgentRequest(reservation_id=reservation_id, outcome=outcome)  # type: ignore[arg-type]
        if latency is not None:
            request.latency.CopyFrom(duration(latency))
        await self.call(self.stub.ReleaseAgent, request, retry=True)

    async def list_agents(self) -> list[pb.Agent]:
        answer = await self.call(self.stub.ListAgents, pb.ListAgentsRequest(), retry=True)
        return list(answer.agents)
