"""EventBus against a real `agentmesh dev`: publish/subscribe with acks and redelivery,
pipelined publish_many with a refused event, request/reply, errors with field violations."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Cluster

from agentmesh import EventBus
from agentmesh.errors import InvalidArgument, Unavailable
from agentmesh.eventbus import make_event


def test_publish_subscribe_ack_and_redelivery(cluster: Cluster) -> None:
    async def run() -> None:
        async with EventBus(cluster.grpc["eventbus"]) as bus:
            async with bus.subscribe("py.orders.>", max_in_flight=10, ack_wait=0.5) as sub:
                first = await bus.publish(
                    "py.orders.created", {"id": "o-1"}, type="order.created", id="py-o-1"
                )
                assert first.id == "py-o-1" and not first.duplicate
                again = await bus.publish("py.orders.created", {"id": "o-1"}, id="py-o-1")
                assert again.duplicate, "the same id within the dedup window is dropped"
                message = await asyncio.wait_for(sub.__anext__(), 5)
                assert message.json() == {"id": "o-1"}
                assert message.event.type == "order.created"
                assert message.delivery_count == 1
                # Not acknowledged: delivered again after the ack wait.
                redelivered = await asyncio.wait_for(sub.__anext__(), 5)
                assert redelivered.event.id == first.id
                assert redelivered.delivery_count == 2
                await redelivered.ack()

    asyncio.run(run())


def test_publish_many_is_pipelined_and_reports_each_event(cluster: Cluster) -> None:
    async def run() -> None:
        async with EventBus(cluster.grpc["eventbus"]) as bus:
            results = await bus.publish_many(
                [
                    make_event("py.batch.a", "one"),
                    make_event("py.batch.*", "bad subject"),
                    make_event("py.batch.b", b"three"),
                ]
            )
            assert [r.error is None for r in results] == [True, False, True]
            error = results[1].error
            assert isinstance(error, InvalidArgument)
            assert error.violations and error.violations[0].field.startswith("event")

    asyncio.run(run())


def test_request_reply_and_no_responders(cluster: Cluster) -> None:
    async def run() -> None:
        async with EventBus(cluster.grpc["eventbus"]) as bus:
            with pytest.raises(Unavailable):
                await bus.request("py.nobody", "ping", timeout=1)
            async with bus.subscribe("py.echo", queue_group="echoers") as sub:

                async def respond() -> None:
                    async for message in sub:
                        await message.reply(message.data.upper())
                        return

                responder = asyncio.create_task(respond())
                reply = await bus.request("py.echo", "ping", timeout=5)
                assert reply.data == b"PING"
                await responder

    asyncio.run(run())


def test_errors_name_every_bad_field(cluster: Cluster) -> None:
    async def run() -> None:
        async with EventBus(cluster.grpc["eventbus"]) as bus:
            with pytest.raises(InvalidArgument) as caught:
                await bus.subscribe("py.x", max_in_flight=0, backoff=[7200]).start()
            fields = {v.field for v in caught.value.violations}
            assert "open.max_in_flight" in fields, caught.value.violations
            assert any(f.startswith("open.backoff") for f in fields), fields

    asyncio.run(run())


def test_acks_given_before_close_are_sent(cluster: Cluster) -> None:
    async def run() -> None:
        async with EventBus(cluster.grpc["eventbus"]) as bus:
            async with bus.subscribe("py.acked", queue_group="g", max_in_flight=10) as other:
                first = bus.subscribe("py.acked", queue_group="g", max_in_flight=10)
                await first.start()
                # Both members are open; whichever gets the event acks it and closes.
                await bus.publish("py.acked", "once")
                got = None
                for sub in (first, other):
                    try:
                        got = await asyncio.wait_for(sub.__anext__(), 1)
                        holder = sub
                        break
                    except asyncio.TimeoutError:
                        continue
                assert got is not None, "delivered to one member"
                await got.ack()
                await holder.close()
                # Acked before the close: not redelivered to the member left.
                remaining = other if holder is first else first
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(remaining.__anext__(), 1.5)
                await first.close()

    asyncio.run(run())
