"""An agent: registers with the scheduler, keeps a heartbeat stream (with the process's real CPU
and memory), runs the tasks it is assigned with the handlers you register, reports progress,
stops a task the scheduler cancels, reconnects with back-off, and drains on SIGTERM — the same
behaviour as the Rust SDK (``crates/agent``).

    agent = Agent(id="summarizer-1", type="summarizer", capacity=4)

    @agent.task("summarize")
    async def summarize(task: Task) -> bytes:
        await task.progress(0.5, "half way")
        return task.payload.upper()

    asyncio.run(agent.run())
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import logging
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from . import tracing
from ._base import duration, open_channel
from .errors import AgentmeshError, from_rpc_error
from .scheduler.v1 import scheduler_pb2 as pb
from .scheduler.v1 import scheduler_pb2_grpc as pb_grpc

__all__ = ["Agent", "AgentStopped", "Task", "TaskFailure"]

log = logging.getLogger("agentmesh.agent")

#: Longest task message the scheduler takes, bytes; longest output.
MAX_MESSAGE = 1024
MAX_OUTPUT = 1024 * 1024
#: How long a unary call to the scheduler may take, seconds.
CALL_TIMEOUT = 5.0


class TaskFailure(Exception):
    """Raised by a handler: the attempt failed. ``retryable`` (the default) lets the scheduler
    try again (elsewhere, after its back-off, up to the task's attempts); ``retryable=False``
    fails the task at once."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class AgentStopped(AgentmeshError):
    """The scheduler refused this agent for good: fenced by a newer registration of its id, or
    its registration is invalid or not allowed."""


@dataclass
class Task:
    """One attempt of a task, as its handler sees it."""

    id: str
    attempt: int
    type: str
    payload: bytes
    #: When the attempt must end (Unix seconds), or None.
    deadline: float | None
    #: The submitter's W3C trace context (the handler runs inside it with OpenTelemetry).
    trace_context: Mapping[str, str]
    _agent: Agent = field(repr=False)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def text(self) -> str:
        return self.payload.decode()

    def json(self) -> Any:
        return json.loads(self.payload)

    async def progress(self, fraction: float | None = None, message: str = "") -> None:
        """Reports progress (0–1; None = unknown) and a message; also counts as the task's
        heartbeat (tasks submitted with a heartbeat timeout must report within it)."""
        update = pb.TaskUpdate(
            task_id=self.id,
            attempt=self.attempt,
            kind=pb.TASK_UPDATE_KIND_PROGRESS,
            progress=fraction or 0.0,
            message=truncate(message),
        )
        self._agent._send(update)

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()


Handler = Callable[[Task], Awaitable[Any] | Any]


def truncate(message: str) -> str:
    """At most 1024 bytes of UTF-8, cut on a character boundary."""
    data = message.encode()
    if len(data) <= MAX_MESSAGE:
        return message
    return data[:MAX_MESSAGE].decode(errors="ignore")


def output_bytes(value: Any) -> bytes:
    """A handler's return value as task output: bytes as they are, str as UTF-8, None empty,
    anything else as JSON."""
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


class _Process:
    """This process's CPU (percent of one core since the last sample) and memory (RSS)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def cpu_percent(self) -> float:
        now, cpu = time.monotonic(), time.process_time()
        last, self._last = self._last, (now, cpu)
        if last is None or now <= last[0]:
            return 0.0
        return max(0.0, (cpu - last[1]) / (now - last[0]) * 100.0)

    @staticmethod
    def memory_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0


class Agent:
    """An agent of ``type`` with ``capacity`` slots. ``scheduler`` is any scheduler instance;
    ``token``/``token_file`` (re-read on every connect) and the TLS files as the scheduler
    takes them."""

    def __init__(
        self,
        *,
        id: str,
        type: str,
        capacity: int = 1,
        capabilities: Mapping[str, str] | None = None,
        tags: list[str] | None = None,
        labels: Mapping[str, str] | None = None,
        weight: int = 1,
        zone: str = "",
        endpoint: str = "",
        version: str = "python",
        scheduler: str = "http://127.0.0.1:7102",
        token: str | None = None,
        token_file: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        shutdown_grace: float = 30.0,
    ) -> None:
        self.id, self.type, self.capacity = id, type, capacity
        self._spec = pb.RegisterAgentRequest(
            agent_id=id,
            type=type,
            capabilities=dict(capabilities or {}),
            tags=list(tags or []),
            capacity=capacity,
            weight=weight,
            zone=zone,
            endpoint=endpoint,
            version=version,
            labels=dict(labels or {}),
        )
        self._scheduler = scheduler
        self._token, self._token_file = token, token_file
        self._tls = (tls_ca_file, tls_cert_file, tls_key_file)
        self._reconnect = (reconnect_min, reconnect_max)
        self._grace = shutdown_grace
        self._handlers: dict[str, Handler] = {}
        self._running: dict[tuple[str, int], tuple[Task, asyncio.Task[None]]] = {}
        # Task updates not yet handed to a stream, oldest first; kept across reconnects.
        self._pending: collections.deque[pb.TaskUpdate] = collections.deque()
        self._pending_ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._epoch = 0
        # Report sequences keep counting across reconnects.
        self._sequence = 0
        self._errors = 0
        self._latency_us = 0.0
        self._process = _Process()
        #: connecting, ready, draining, stopped.
        self.status = "connecting"
        self._ready = asyncio.Event()

    def task(self, task_type: str) -> Callable[[Handler], Handler]:
        """Registers the decorated function (sync or async, taking a :class:`Task`) as the
        handler of ``task_type``. Its return value is the output (bytes, str, or JSON of any
        other value); raising :class:`TaskFailure` fails the attempt (another exception fails it
        retryably); a cancelled task's handler is cancelled (sync ones should check
        ``task.is_cancelled()``)."""

        def register(handler: Handler) -> Handler:
            self._handlers[task_type] = handler
            return handler

        return register

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until the agent is registered and its heartbeat stream is open."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    def stop(self) -> None:
        """Asks the agent to stop: running tasks get up to ``shutdown_grace`` seconds to end
        (the scheduler sends it no new ones meanwhile), then it deregisters."""
        self._stop.set()

    def _metadata(self) -> list[tuple[str, str]]:
        token = self._token
        if self._token_file:
            with open(self._token_file) as f:
                token = f.read().strip()
        return [("authorization", f"Bearer {token}")] if token else []

    def _channel(self) -> grpc.aio.Channel:
        ca, cert, key = self._tls
        return open_channel(self._scheduler, tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key)

    async def run(self, *, handle_signals: bool = True) -> None:
        """Runs until :meth:`stop` (or SIGTERM/SIGINT when ``handle_signals``), a drain by an
        operator, or a refusal (:class:`AgentStopped`)."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
        delay, (low, high) = self._reconnect[0], self._reconnect
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    if await self._session():
                        break
                except AgentStopped:
                    raise
                except Exception as e:  # a broken session: reconnect
                    log.warning("agent %s: session ended: %s; reconnecting", self.id, e)
                self._ready.clear()
                self.status = "connecting"
                if time.monotonic() - started > high:
                    delay = low
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, high)
        finally:
            self.status = "stopped"
            # Whatever still runs is the scheduler's to give to another agent now.
            for task, runner in list(self._running.values()):
                task.cancelled.set()
                runner.cancel()
            await asyncio.gather(
                *(runner for _, runner in self._running.values()), return_exceptions=True
            )
            await self._deregister()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)

    async def _deregister(self) -> None:
        if not self._epoch:
            return
        async with self._channel() as channel:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                await pb_grpc.SchedulerStub(channel).DeregisterAgent(
                    pb.DeregisterAgentRequest(agent_id=self.id, epoch=self._epoch),
                    metadata=self._metadata(),
                    timeout=2.0,
                )

    async def _register(self, stub: pb_grpc.SchedulerStub) -> float:
        """Registers (again, with the same epoch after the first time); the heartbeat interval."""
        request = pb.RegisterAgentRequest()
        request.CopyFrom(self._spec)
        request.epoch = self._epoch
        request.task_types.extend(sorted(self._handlers))
        try:
            answer = await stub.RegisterAgent(
                request, metadata=self._metadata(), timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as e:
            error = from_rpc_error(e)
            if e.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                raise AgentStopped(error.code, error.message, error.violations) from None
            raise error from None
        self._epoch = answer.epoch
        interval = answer.heartbeat_interval.ToNanoseconds() / 1e9
        return interval if interval > 0 else 1.0

    async def _session(self) -> bool:
        """One connection; True when the agent should stop (stopped or drained)."""
        async with self._channel() as channel:
            stub = pb_grpc.SchedulerStub(channel)
            interval = await self._register(stub)
            outbox: asyncio.Queue[pb.HeartbeatRequest | None] = asyncio.Queue(maxsize=8)
            await outbox.put(
                pb.HeartbeatRequest(hello=pb.Hello(agent_id=self.id, epoch=self._epoch))
            )

            async def requests() -> AsyncIterator[pb.HeartbeatRequest]:
                while (request := await outbox.get()) is not None:
                    yield request

            call = stub.Heartbeat(requests(), metadata=self._metadata())
            self.status = "ready"
            self._ready.set()
            drain_deadline: list[float] = []
            helpers = [
                asyncio.create_task(self._report(outbox, interval)),
                asyncio.create_task(self._forward(outbox)),
            ]
            reader = asyncio.create_task(self._read(call, drain_deadline))
            stopping = asyncio.create_task(self._stop.wait())
            try:
                done, _ = await asyncio.wait(
                    {reader, stopping}, return_when=asyncio.FIRST_COMPLETED
                )
                if reader in done:
                    reader.result()  # the stream ended: its error, or a clean end
                    return bool(drain_deadline)
                # Stopping: tell the scheduler (no new tasks), let running ones finish.
                if self._running:
                    self.status = "draining"
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.DrainAgent(
                            pb.DrainAgentRequest(
                                agent_id=self.id,
                                deadline=duration(self._grace + 1.0),
                                reason="agent shutting down",
                                on_expiry=pb.DRAIN_EXPIRY_REQUEUE,
                            ),
                            metadata=self._metadata(),
                            timeout=CALL_TIMEOUT,
                        )
                    until = time.monotonic() + self._grace
                    while time.monotonic() < until and not reader.done():
                        if not self._running:
                            break
                        await asyncio.sleep(0.05)
                # The last updates go out before the stream is closed.
                until = time.monotonic() + 2.0
                while (self._pending or not outbox.empty()) and time.monotonic() < until:
                    if reader.done():
                        break
                    await asyncio.sleep(0.02)
                return True
            finally:
                for t in (*helpers, stopping):
                    t.cancel()
                # Updates queued for this stream but not sent go out on the next one.
                unsent = []
                while not outbox.empty():
                    request = outbox.get_nowait()
                    if request is not None and request.HasField("task"):
                        unsent.append(request.task)
                self._pending.extendleft(reversed(unsent))
                outbox.put_nowait(None)
                with contextlib.suppress(asyncio.TimeoutError, grpc.aio.AioRpcError):
                    await asyncio.wait_for(asyncio.shield(reader), 2.0)
                reader.cancel()
                call.cancel()

    async def _report(
        self, outbox: asyncio.Queue[pb.HeartbeatRequest | None], interval: float
    ) -> None:
        while True:
            self._sequence += 1
            active = len(self._running)
            report = pb.LoadReport(
                sequence=self._sequence,
                cpu_percent=self._process.cpu_percent(),
                memory_bytes=self._process.memory_bytes(),
                active=active,
                free_slots=max(self.capacity - active, 0),
                errors=self._errors,
            )
            if self._latency_us > 0:
                report.latency.CopyFrom(duration(self._latency_us / 1e6))
            self._errors = 0
            await outbox.put(pb.HeartbeatRequest(report=report))
            await asyncio.sleep(interval)

    async def _forward(self, outbox: asyncio.Queue[pb.HeartbeatRequest | None]) -> None:
        while True:
            await self._pending_ready.wait()
            while self._pending:
                # Taken off only once the stream's queue has it.
                await outbox.put(pb.HeartbeatRequest(task=self._pending[0]))
                self._pending.popleft()
            self._pending_ready.clear()

    async def _read(self, call: Any, drain_deadline: list[float]) -> None:
        try:
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind == "assign":
                    self._start(message.assign)
                elif kind == "cancel":
                    entry = self._running.get((message.cancel.task_id, message.cancel.attempt))
                    if entry is not None:
                        entry[0].cancelled.set()
                        entry[1].cancel()
                elif kind == "drain":
                    # No new tasks; the scheduler ends the stream at the deadline.
                    self.status = "draining"
                    drain_deadline.append(message.drain.deadline.ToNanoseconds() / 1e9)
        except grpc.aio.AioRpcError as e:
            if drain_deadline and e.code() == grpc.StatusCode.NOT_FOUND:
                return  # removed at the end of a drain
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                error = from_rpc_error(e)
                raise AgentStopped(error.code, error.message) from None
            raise from_rpc_error(e) from None

    def _start(self, assignment: pb.TaskAssignment) -> None:
        key = (assignment.task_id, assignment.attempt)
        handler = self._handlers.get(assignment.type)
        if handler is None:
            self._send(
                pb.TaskUpdate(
                    task_id=assignment.task_id,
                    attempt=assignment.attempt,
                    kind=pb.TASK_UPDATE_KIND_FAILED,
                    message=f'this agent has no handler for task type "{assignment.type}"',
                    retryable=True,
                )
            )
            return
        task = Task(
            id=assignment.task_id,
            attempt=assignment.attempt,
            type=assignment.type,
            payload=assignment.payload,
            deadline=(
                assignment.deadline.ToNanoseconds() / 1e9
                if assignment.HasField("deadline")
                else None
            ),
            trace_context=dict(assignment.trace_context),
            _agent=self,
        )
        runner = asyncio.create_task(self._run_task(task, handler))
        self._running[key] = (task, runner)

    def _send(self, update: pb.TaskUpdate) -> None:
        """Queues an update; past 1024 waiting (a long disconnection) progress reports are
        dropped, never a task's start or result."""
        if update.kind == pb.TASK_UPDATE_KIND_PROGRESS and len(self._pending) >= 1024:
            return
        self._pending.append(update)
        self._pending_ready.set()

    async def _run_task(self, task: Task, handler: Handler) -> None:
        key = (task.id, task.attempt)
        started = time.monotonic()

        def update(kind: int, **fields: Any) -> pb.TaskUpdate:
            return pb.TaskUpdate(task_id=task.id, attempt=task.attempt, kind=kind, **fields)  # type: ignore[arg-type]

        try:
            self._send(update(pb.TASK_UPDATE_KIND_STARTED))
            with tracing.attached(task.trace_context):
                if inspect.iscoroutinefunction(handler):
                    result = await handler(task)
                else:
                    result = await asyncio.to_thread(handler, task)
                    if inspect.isawaitable(result):
                        result = await result
            output = output_bytes(result)
            if len(output) > MAX_OUTPUT:
                self._errors += 1
                self._send(
                    update(
                        pb.TASK_UPDATE_KIND_FAILED,
                        message=f"output of {len(output)} bytes is over the 1 MiB limit",
                        retryable=False,
                    )
                )
            else:
                self._send(update(pb.TASK_UPDATE_KIND_SUCCEEDED, output=output))
        except asyncio.CancelledError:
            if not task.cancelled.is_set():
                raise
            # Cancelled by the scheduler: it expects nothing more.
        except TaskFailure as e:
            self._errors += 1
            self._send(
                update(
                    pb.TASK_UPDATE_KIND_FAILED, message=truncate(e.message), retryable=e.retryable
                )
            )
        except Exception as e:
            self._errors += 1
            self._send(
                update(
                    pb.TASK_UPDATE_KIND_FAILED,
                    message=truncate(f"{type(e).__name__}: {e}"),
                    retryable=True,
                )
            )
        finally:
            us = (time.monotonic() - started) * 1e6
            self._latency_us = us if self._latency_us == 0 else (7 * self._latency_us + us) / 8
            self._running.pop(key, None)
