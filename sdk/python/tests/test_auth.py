"""Tokens against `agentmesh dev --auth required`: a call without one is refused
(Unauthenticated), a service token publishes and submits, an agent token (read from a file)
registers its own agent id and takes a task, and an agent token for another id stops the agent
(AgentStopped: PERMISSION_DENIED)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cluster, start_dev

from agentmesh import Agent, AgentStopped, EventBus, Scheduler, Task
from agentmesh.errors import Unauthenticated
from agentmesh.scheduler import pb

SECRET = "a python auth test secret that is long enough"
ISSUER = "https://id.agentmesh.test"
AUDIENCE = "agentmesh"


def token(roles: list[str], agent_id: str | None = None) -> str:
    """An HS256 JWT as the services accept it."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    claims: dict[str, object] = {
        "sub": "python-tests",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "roles": roles,
    }
    if agent_id:
        claims["agent_id"] = agent_id
    signing = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + "."
        + b64(json.dumps(claims).encode())
    )
    signature = hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64(signature)


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[Cluster, Path]]:
    with tempfile.TemporaryDirectory() as directory:
        d = Path(directory)
        (d / "secret").write_text(SECRET)
        (d / "own-token").write_text(token(["service", "operator"]))
        cluster = start_dev(
            env={
                "AGENTMESH_AUTH": "required",
                "AGENTMESH_AUTH_HS256_SECRET_FILE": str(d / "secret"),
                "AGENTMESH_AUTH_TOKEN_FILE": str(d / "own-token"),
                "AGENTMESH_AUTH_ISSUER": ISSUER,
                "AGENTMESH_AUTH_AUDIENCE": AUDIENCE,
            }
        )
        try:
            yield cluster, d
        finally:
            cluster.stop()


def test_tokens_are_sent_and_refusals_raised(secured: tuple[Cluster, Path]) -> None:
    cluster, directory = secured
    agent_token = directory / "agent-token"
    agent_token.write_text(token(["agent"], agent_id="py-auth"))

    async def run() -> None:
        async with EventBus(cluster.grpc["eventbus"]) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.publish("py.secured", "no token")
        async with EventBus(cluster.grpc["eventbus"], token=token(["service"])) as bus:
            assert (await bus.publish("py.secured", "with a token")).id

        agent = Agent(
            id="py-auth",
            type="python",
            scheduler=cluster.grpc["scheduler"],
            token_file=str(agent_token),
        )

        @agent.task("py.secured")
        def secured_task(task: Task) -> str:
            return "done as py-auth"

        runner = asyncio.create_task(agent.run(handle_signals=False))
        await agent.wait_ready(10)
        async with Scheduler(cluster.grpc["scheduler"], token=token(["service"])) as s:
            task = await s.submit("py.secured")
            done = await s.wait(task.task_id, timeout=15)
            assert done.state == pb.TASK_STATE_SUCCEEDED, done
            assert done.output == b"done as py-auth"
        agent.stop()
        await asyncio.wait_for(runner, 15)

        impostor = Agent(
            id="py-someone-else",
            type="python",
            scheduler=cluster.grpc["scheduler"],
            token=token(["agent"], agent_id="py-auth"),
        )
        with pytest.raises(AgentStopped) as stopped:
            await asyncio.wait_for(impostor.run(handle_signals=False), 15)
        assert "PERMISSION_DENIED" in str(stopped.value)

    asyncio.run(run())
