"""The Agent class and the Scheduler client against a real `agentmesh dev`: a task taken and
its output returned, progress, a cancellation reaching the handler, a failure, an agent killed
mid-task (`kill -9`) whose task is retried on another, and a drain on SIGTERM that lets the
running task finish."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Cluster

from agentmesh import Agent, Scheduler, Task, TaskFailure
from agentmesh.errors import NotFound
from agentmesh.scheduler import pb

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent.py"


def example_agent(cluster: Cluster, agent_id: str) -> subprocess.Popen[str]:
    """The example agent in its own process, once it says it is ready."""
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--scheduler", cluster.grpc["scheduler"], "--id", agent_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("ready"), line
    return process


async def wait_for(predicate: object, what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_agent_takes_tasks_reports_progress_and_is_cancelled(cluster: Cluster) -> None:
    async def run() -> None:
        agent = Agent(
            id="py-in-process", type="python", capacity=2, scheduler=cluster.grpc["scheduler"]
        )
        cancelled = asyncio.Event()

        @agent.task("py.reverse")
        def reverse(task: Task) -> bytes:
            return task.payload[::-1]

        @agent.task("py.wait")
        async def wait(task: Task) -> None:
            await task.progress(0.25, "waiting")
            try:
                await asyncio.sleep(60)
            finally:
                cancelled.set()

        @agent.task("py.refuse")
        async def refuse(task: Task) -> None:
            raise TaskFailure("not this one", retryable=False)

        runner = asyncio.create_task(agent.run(handle_signals=False))
        await agent.wait_ready(10)
        async with Scheduler(cluster.grpc["scheduler"]) as s:
            task = await s.submit("py.reverse", "abc", idempotency_key="py-reverse-1")
            again = await s.submit("py.reverse", "abc", idempotency_key="py-reverse-1")
            assert again.task_id == task.task_id, "one task per idempotency key"
            done = await s.wait(task.task_id, timeout=15)
            assert done.state == pb.TASK_STATE_SUCCEEDED, done
            assert done.output == b"cba"
            assert done.agent_id == "py-in-process"

            waiting = await s.submit("py.wait")

            async def reported() -> bool:
                t = await s.get(waiting.task_id)
                return t.message == "waiting" and abs(t.progress - 0.25) < 1e-9

            await wait_for(reported, "the progress report")
            await s.cancel(waiting.task_id, "no longer needed")
            await asyncio.wait_for(cancelled.wait(), 10)
            assert (await s.get(waiting.task_id)).state == pb.TASK_STATE_CANCELLED

            refused = await s.submit("py.refuse", max_attempts=3)
            ended = await s.wait(refused.task_id, timeout=15)
            assert ended.state == pb.TASK_STATE_FAILED
            assert "not this one" in ended.error
            assert len(ended.attempts) == 1, "a fatal failure is not retried"

            with pytest.raises(NotFound):
                await s.get("0" * 32)
            agents = {a.agent_id: a for a in await s.list_agents()}
            assert agents["py-in-process"].capacity == 2
        agent.stop()
        await asyncio.wait_for(runner, 15)

    asyncio.run(run())


def test_a_task_on_a_killed_agent_is_retried_on_another(cluster: Cluster) -> None:
    victim = example_agent(cluster, "py-victim")
    try:

        async def run() -> None:
            async with Scheduler(cluster.grpc["scheduler"]) as s:
                task = await s.submit("py.sleep", "3", max_attempts=3)

                async def running() -> bool:
                    t = await s.get(task.task_id)
                    return t.state == pb.TASK_STATE_RUNNING and t.agent_id == "py-victim"

                await wait_for(running, "the task to run on py-victim")
                os.kill(victim.pid, signal.SIGKILL)
                rescuer = example_agent(cluster, "py-rescuer")
                try:
                    done = await s.wait(task.task_id, timeout=30)
                finally:
                    rescuer.terminate()
                    rescuer.wait(20)
                assert done.state == pb.TASK_STATE_SUCCEEDED, done
                assert done.agent_id == "py-rescuer"
                assert done.attempt >= 2
                assert b"py-rescuer" in done.output

        asyncio.run(run())
    finally:
        victim.kill()
        victim.wait()


def test_sigterm_drains_the_agent_and_its_running_task_finishes(cluster: Cluster) -> None:
    agent = example_agent(cluster, "py-drained")
    try:

        async def run() -> None:
            async with Scheduler(cluster.grpc["scheduler"]) as s:
                task = await s.submit("py.sleep", "2")

                async def running() -> bool:
                    return (await s.get(task.task_id)).state == pb.TASK_STATE_RUNNING

                await wait_for(running, "the task to run")
                agent.send_signal(signal.SIGTERM)
                done = await s.wait(task.task_id, timeout=20)
                assert done.state == pb.TASK_STATE_SUCCEEDED, done
                assert done.attempt == 1, "finished where it ran, not retried"
                assert agent.wait(15) == 0

                async def gone() -> bool:
                    return "py-drained" not in {a.agent_id for a in await s.list_agents()}

                await wait_for(gone, "the agent to deregister")

        asyncio.run(run())
    finally:
        agent.kill()
        agent.wait()


def test_an_agent_reconnects_to_a_restarted_scheduler_and_keeps_working() -> None:
    from conftest import start_dev

    first = start_dev()
    second = None
    try:

        async def run() -> None:
            nonlocal second
            agent = Agent(
                id="py-reconnects",
                type="python",
                scheduler=first.grpc["scheduler"],
                reconnect_max=1.0,
            )

            @agent.task("py.upper")
            def upper(task: Task) -> str:
                return task.text().upper()

            runner = asyncio.create_task(agent.run(handle_signals=False))
            await agent.wait_ready(10)
            # The scheduler goes away and comes back (empty: `agentmesh dev` keeps nothing).
            first.process.kill()
            first.process.wait()
            await wait_for(
                lambda: asyncio.sleep(0, result=agent.status == "connecting"), "the agent to notice"
            )
            second = start_dev(first.ports)
            await agent.wait_ready(15)
            async with Scheduler(second.grpc["scheduler"]) as s:
                task = await s.submit("py.upper", "again")
                done = await s.wait(task.task_id, timeout=15)
                assert done.state == pb.TASK_STATE_SUCCEEDED, done
                assert done.output == b"AGAIN"
                assert done.agent_id == "py-reconnects"
            agent.stop()
            await asyncio.wait_for(runner, 15)

        asyncio.run(run())
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_the_callers_trace_reaches_the_task_and_its_handler(cluster: Cluster) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("agentmesh-tests")

    async def run() -> None:
        agent = Agent(id="py-traced", type="python", scheduler=cluster.grpc["scheduler"])
        seen: list[str] = []

        @agent.task("py.traced")
        async def traced(task: Task) -> None:
            seen.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))

        runner = asyncio.create_task(agent.run(handle_signals=False))
        await agent.wait_ready(10)
        async with Scheduler(cluster.grpc["scheduler"]) as s:
            with tracer.start_as_current_span("caller") as span:
                trace_id = format(span.get_span_context().trace_id, "032x")
                task = await s.submit("py.traced")
            done = await s.wait(task.task_id, timeout=15)
            assert done.state == pb.TASK_STATE_SUCCEEDED, done
            assert trace_id in done.trace_context["traceparent"], dict(done.trace_context)
        assert seen == [trace_id], "the handler ran in the caller's trace"
        agent.stop()
        await asyncio.wait_for(runner, 15)

    asyncio.run(run())
