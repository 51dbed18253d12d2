"""The event bus client: publish (one, or many pipelined), subscribe with explicit
acknowledgements, request/reply. Generated messages: :mod:`agentmesh.eventbus.v1.eventbus_pb2`.

    async with EventBus("http://127.0.0.1:7101") as bus:
        await bus.publish("orders.created", {"id": "o-1"}, type="order.created")
        async with bus.subscribe("orders.>", queue_group="billing") as sub:
            async for message in sub:
                print(message.json())
                await message.ack()
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from .. import tracing
from .._base import Client, duration
from ..errors import AgentmeshError, from_rpc_error
from .v1 import eventbus_pb2 as pb
from .v1 import eventbus_pb2_grpc as pb_grpc

__all__ = ["EventBus", "Message", "PublishResult", "Subscription", "make_event", "pb"]

#: Default address of the event bus.
DEFAULT_ADDRESS = "http://127.0.0.1:7101"

Data = bytes | str | Mapping[str, Any] | list[Any] | None


def make_event(
    subject: str,
    data: Data = None,
    *,
    type: str = "",
    id: str = "",
    source: str = "",
    headers: Mapping[str, str] | None = None,
    priority: int = pb.PRIORITY_UNSPECIFIED,
    correlation_id: str = "",
    content_type: str = "",
    reply_to: str = "",
    ordering_key: str = "",
    ttl: float | None = None,
) -> pb.Event:
    """An event. ``data``: bytes as they are; a str as UTF-8 (``text/plain``); a dict or list as
    JSON (``application/json``). An empty ``id`` is filled by the bus (a ULID); giving one makes
    a retried publish a duplicate the bus drops (within its dedup window, 2 min). The current
    OpenTelemetry trace context goes into the headers."""
    if isinstance(data, bytes):
        body = data
    elif isinstance(data, str):
        body, content_type = data.encode(), content_type or "text/plain"
    elif data is None:
        body = b""
    else:
        body, content_type = json.dumps(data).encode(), content_type or "application/json"
    all_headers = tracing.headers()
    all_headers.update(headers or {})
    event = pb.Event(
        id=id,
        subject=subject,
        type=type,
        source=source,
        headers=all_headers,
        priority=priority,  # type: ignore[arg-type]
        correlation_id=correlation_id,
        content_type=content_type,
        reply_to=reply_to,
        ordering_key=ordering_key,
        data=body,
    )
    if ttl is not None:
        event.ttl.CopyFrom(duration(ttl))
    return event


@dataclass(frozen=True)
class PublishResult:
    """What the bus answered for one event: its ``id``, whether it was a ``duplicate`` (seen
    within the dedup window, not delivered again), its ``sequence`` and ``stream`` on a durable
    subject; for :meth:`EventBus.publish_many`, ``error`` when the bus refused that event."""

    id: str
    duplicate: bool = False
    sequence: int = 0
    stream: str = ""
    error: AgentmeshError | None = None


class Message:
    """One delivery. Acknowledge it (``ack``), ask for it again later (``nak``), ask for more
    time (``in_progress``), dead-letter it (``terminate``) or answer a request (``reply``)."""

    def __init__(self, subscription: Subscription, delivery: pb.Delivery) -> None:
        self._subscription = subscription
        self.event = delivery.event
        self.delivery_id = delivery.delivery_id
        #: 1 on the first delivery.
        self.delivery_count = delivery.delivery_count
        #: The event's place in its durable stream (0 on an ephemeral subject).
        self.sequence = delivery.sequence

    @property
    def subject(self) -> str:
        return self.event.subject

    @property
    def data(self) -> bytes:
        return self.event.data

    def json(self) -> Any:
        """The data parsed as JSON."""
        return json.loads(self.event.data)

    async def ack(self) -> None:
        await self._subscription._send(
            pb.SubscribeRequest(ack=pb.Ack(delivery_ids=[self.delivery_id]))
        )

    async def nak(self, delay: float | None = None) -> None:
        """Deliver it again after ``delay`` seconds (unset: the subscription's back-off)."""
        nak = pb.Nak(delivery_id=self.delivery_id)
        if delay is not None:
            nak.delay.CopyFrom(duration(delay))
        await self._subscription._send(pb.SubscribeRequest(nak=nak))

    async def in_progress(self) -> None:
        """Still working on it: the ack wait starts again."""
        await self._subscription._send(
            pb.SubscribeRequest(in_progress=pb.InProgress(delivery_id=self.delivery_id))
        )

    async def terminate(self, reason: str = "") -> None:
        """Dead-letter it now."""
        await self._subscription._send(
            pb.SubscribeRequest(terminate=pb.Terminate(delivery_id=self.delivery_id, reason=reason))
        )

    async def reply(self, data: Data = None, **fields: Any) -> None:
        """Answers a request (counts as the ack)."""
        event = make_event("", data, **fields)
        await self._subscription._send(
            pb.SubscribeRequest(reply=pb.Reply(delivery_id=self.delivery_id, event=event))
        )


class Subscription:
    """An open subscription: ``async for message in subscription``; ``close()`` (or leaving
    ``async with``) ends it, and the bus delivers what was not acknowledged to others."""

    def __init__(self, bus: EventBus, open: pb.SubscribeOpen) -> None:
        self._bus = bus
        self._open = open
        self._outbox: asyncio.Queue[pb.SubscribeRequest | None] = asyncio.Queue()
        self._call: Any = None
        self._drained = asyncio.Event()
        # Deliveries read by a background task (so a caller's timeout on the next message
        # does not cancel the stream's read); an exception, or None at the end.
        self._inbox: asyncio.Queue[pb.Delivery | BaseException | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        #: Set once open: the subscription's id, and its durable stream ("" when ephemeral).
        self.subscription_id = ""
        self.stream = ""
        #: The last advisory the bus sent (events shed, expired or dead-lettered).
        self.last_advisory: pb.Advisory | None = None

    async def _requests(self) -> AsyncIterator[pb.SubscribeRequest]:
        yield pb.SubscribeRequest(open=self._open)
        while (request := await self._outbox.get()) is not None:
            yield request
        self._drained.set()

    async def start(self) -> Subscription:
        """Opens it; raises the bus's error (e.g. ``InvalidArgument`` naming ``open.*``)."""
        stub = pb_grpc.EventBusStub(self._bus.channel)
        self._call = stub.Subscribe(self._requests(), metadata=self._bus.metadata())
        try:
            first = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        if first is grpc.aio.EOF or not first.HasField("subscribed"):
            raise AgentmeshError(
                grpc.StatusCode.INTERNAL, "the bus did not confirm the subscription"
            )
        self.subscription_id = first.subscribed.subscription_id
        self.stream = first.subscribed.stream
        self._reader = asyncio.create_task(self._pump())
        return self

    async def _pump(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                kind = response.WhichOneof("kind")
                if kind == "deliveries":
                    for delivery in response.deliveries.deliveries:
                        self._inbox.put_nowait(delivery)
                elif kind == "advisory":
                    self.last_advisory = response.advisory
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self._inbox.put_nowait(from_rpc_error(e))
        except asyncio.CancelledError:
            pass
        finally:
            self._inbox.put_nowait(None)

    async def _send(self, request: pb.SubscribeRequest) -> None:
        await self._outbox.put(request)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        item = await self._inbox.get()
        if item is None:
            self._inbox.put_nowait(None)  # ended: stays ended
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return Message(self, item)

    async def close(self) -> None:
        """Ends the subscription once the acknowledgements already given are sent."""
        await self._outbox.put(None)
        if self._call is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), 2.0)
            # Half-closed: the bus ends the stream; wait for that a moment.
            with contextlib.suppress(asyncio.TimeoutError, grpc.aio.AioRpcError):
                await asyncio.wait_for(self._call.code(), 0.5)
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> Subscription:
        return await self.start() if self._call is None else self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def start_position(start: str | int | datetime.datetime | None) -> pb.StartPosition | None:
    """``"new"``, ``"all"``, ``"last"``, a sequence number or a time (durable subjects)."""
    if start is None:
        return None
    if start == "new":
        return pb.StartPosition(new_only=True)
    if start == "all":
        return pb.StartPosition(all=True)
    if start == "last":
        return pb.StartPosition(last=True)
    if isinstance(start, int):
        return pb.StartPosition(sequence=start)
    if isinstance(start, datetime.datetime):
        at = timestamp_pb2.Timestamp()
        at.FromDatetime(start)
        return pb.StartPosition(time=at)
    raise ValueError(f"start: 'new', 'all', 'last', a sequence or a datetime, not {start!r}")


class EventBus(Client):
    """Client of ``agentmesh.eventbus.v1.EventBus`` (any event bus member)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options: Any) -> None:
        super().__init__(address, **options)
        self.stub = pb_grpc.EventBusStub(self.channel)

    async def publish(self, subject: str, data: Data = None, **fields: Any) -> PublishResult:
        """Publishes one event (see :func:`make_event` for ``fields``). Retried on UNAVAILABLE
        only when it has an ``id`` (the bus drops the repeat)."""
        event = make_event(subject, data, **fields)
        answer = await self.call(
            self.stub.Publish, pb.PublishRequest(event=event), retry=bool(event.id)
        )
        return PublishResult(answer.id, answer.duplicate, answer.sequence, answer.stream)

    async def publish_many(self, events: Iterable[pb.Event]) -> list[PublishResult]:
        """Publishes events over one stream, pipelined (no wait per event): one result each, in
        order; a refused event has ``error`` set and the others go on."""
        requests = [pb.PublishRequest(event=e) for e in events]

        async def send() -> AsyncIterator[pb.PublishRequest]:
            for request in requests:
                yield request

        call = self.stub.PublishStream(send(), metadata=self.metadata())
        results: list[PublishResult] = []
        try:
            async for answer in call:
                error = None
                if answer.HasField("error"):
                    code = getattr(grpc.StatusCode, answer.error.code, grpc.StatusCode.UNKNOWN)
                    error = from_code(code, answer.error.message, answer.error.field)
                results.append(
                    PublishResult(
                        answer.id, answer.duplicate, answer.sequence, answer.stream, error
                    )
                )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        return results

    def subscribe(
        self,
        subject: str,
        *,
        queue_group: str = "",
        durable_name: str = "",
        max_in_flight: int = 64,
        ack_wait: float | None = None,
        max_deliveries: int = 0,
        backoff: Iterable[float] = (),
        dead_letter_subject: str = "",
        types: Iterable[str] = (),
        headers: Mapping[str, str] | None = None,
        min_priority: int = pb.PRIORITY_UNSPECIFIED,
        start: str | int | datetime.datetime | None = None,
        auto_ack: bool = False,
    ) -> Subscription:
        """A subscription to open with ``async with`` (or ``await sub.start()``).

        ``max_in_flight`` (1–10000) deliveries may be unacknowledged at once; one not
        acknowledged within ``ack_wait`` seconds (default 30) is delivered again, after the
        ``backoff`` delays, and dead-lettered after ``max_deliveries`` (default 5).
        ``auto_ack`` makes the bus count each delivery done once sent (at most once).
        """
        open = pb.SubscribeOpen(
            subject=subject,
            queue_group=queue_group,
            durable_name=durable_name,
            max_in_flight=max_in_flight,
            max_deliveries=max_deliveries,
            backoff=[duration(s) for s in backoff],
            dead_letter_subject=dead_letter_subject,
            types=list(types),
            headers=dict(headers or {}),
            min_priority=min_priority,  # type: ignore[arg-type]
            ack_policy=pb.ACK_POLICY_NONE if auto_ack else pb.ACK_POLICY_EXPLICIT,
        )
        if ack_wait is not None:
            open.ack_wait.CopyFrom(duration(ack_wait))
        position = start_position(start)
        if position is not None:
            open.start.CopyFrom(position)
        return Subscription(self, open)

    async def request(
        self, subject: str, data: Data = None, *, timeout: float = 5.0, **fields: Any
    ) -> pb.Event:
        """Sends a request to one subscriber of ``subject`` and returns its reply event;
        ``Unavailable`` when nobody subscribes, ``DeadlineExceeded`` without a reply in time."""
        request = pb.RequestRequest(
            event=make_event(subject, data, **fields), timeout=duration(timeout)
        )
        answer = await self.call(self.stub.Request, request, timeout=timeout + 1.0)
        reply: pb.Event = answer.reply
        return reply


def from_code(code: grpc.StatusCode, message: str, field: str = "") -> AgentmeshError:
    """An error of ``code`` (naming ``field`` when the bus named one)."""
    from ..errors import _BY_CODE, FieldViolation

    violations = (FieldViolation(field, message),) if field else ()
    return _BY_CODE.get(code, AgentmeshError)(code, message, violations)
