"""An agent that takes tasks: `python examples/agent.py --id py-1` against `agentmesh dev`.

Task types: `py.upper` (the payload in capitals), `py.sleep` (sleeps the payload's seconds,
reporting progress each tenth; stops when cancelled), `py.fail` (fails, retryably).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from agentmesh import Agent, Task, TaskFailure


def build(agent_id: str, scheduler: str, capacity: int) -> Agent:
    agent = Agent(id=agent_id, type="python-example", capacity=capacity, scheduler=scheduler)

    @agent.task("py.upper")
    def upper(task: Task) -> str:
        return task.text().upper()

    @agent.task("py.sleep")
    async def sleep(task: Task) -> str:
        seconds = float(task.text() or "1")
        for step in range(10):
            await asyncio.sleep(seconds / 10)
            await task.progress((step + 1) / 10, f"step {step + 1} of 10")
        return f"slept {seconds} s on {agent_id}"

    @agent.task("py.fail")
    async def fail(task: Task) -> None:
        raise TaskFailure(f"failing on purpose: {task.text()}")

    return agent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scheduler", default="http://127.0.0.1:7102")
    parser.add_argument("--id", default="py-example-1")
    parser.add_argument("--capacity", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    agent = build(args.id, args.scheduler, args.capacity)

    async def run() -> None:
        runner = asyncio.create_task(agent.run())
        await agent.wait_ready()
        print(f"ready: {args.id}", flush=True)
        await runner

    asyncio.run(run())


if __name__ == "__main__":
    main()
