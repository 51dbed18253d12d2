"""RateLimiter, Cache and Health against a real `agentmesh dev`, and the examples that use
them run as their own processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cluster

from agentmesh import Cache, Health, RateLimiter
from agentmesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from agentmesh.health import pb as health_pb

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_rate_limits_leases_and_budgets(cluster: Cluster) -> None:
    async def run() -> None:
        async with RateLimiter(cluster.grpc["ratelimit"]) as rl:
            decisions = [await rl.check("py", "k1", limit=3, period=60) for _ in range(4)]
            assert [d.allowed for d in decisions] == [True, True, True, False]
            assert decisions[3].retry_after > 0
            with pytest.raises(InvalidArgument) as caught:
                await rl.check("", "k1", limit=3)
            assert caught.value.violations, "the bad field is named"

            async with rl.lease("py", "gpu", limit=1, ttl=10) as held:
                assert held.acquired
                with pytest.raises(ResourceExhausted):
                    async with rl.lease("py", "gpu", limit=1, ttl=10, wait=0.2):
                        pass
            async with rl.lease("py", "gpu", limit=1, ttl=10, wait=2):
                pass  # released on exit: free again

            async with rl.budget("py", "team", estimate=600, limit=1000) as spend:
                spend.actual = 400
            assert spend.usage.spent == 400
            with pytest.raises(ResourceExhausted):
                async with rl.budget("py", "team", estimate=700, limit=1000):
                    pass
            with pytest.raises(RuntimeError):
                async with rl.budget("py", "team", estimate=500, limit=1000):
                    raise RuntimeError("the work failed: the reservation is cancelled")
            async with rl.budget("py", "team", estimate=600, limit=1000) as spend:
                pass
            assert spend.usage.spent == 1000, "the cancelled reservation freed its estimate"

    asyncio.run(run())


def test_cache_values_leases_and_the_semantic_cache(cluster: Cluster) -> None:
    async def run() -> None:
        async with Cache(cluster.grpc["cache"]) as cache:
            assert not (await cache.get("py", "k")).found
            version = await cache.set("py", "k", "v1", ttl=60)
            got = await cache.get("py", "k")
            assert got.found and got.value == b"v1" and got.version == version
            with pytest.raises(FailedPrecondition):
                await cache.set("py", "k", "v2", if_version=version + 100)
            await cache.delete("py", "k")
            assert not (await cache.get("py", "k")).found

            calls = 0

            async def compute() -> bytes:
                nonlocal calls
                calls += 1
                await asyncio.sleep(0.3)
                return b"expensive"

            values = await asyncio.gather(
                *(cache.get_or_compute("py", "once", compute, ttl=60) for _ in range(20))
            )
            assert values == [b"expensive"] * 20
            assert calls == 1, "one computation for 20 callers"

            prompt = "What is the capital of France?"
            await cache.semantic_put("py-llm", prompt, "Paris", model="m")
            hit = await cache.semantic_get("py-llm", prompt, model="m")
            assert hit.found and hit.answer == b"Paris"
            other_model = await cache.semantic_get("py-llm", prompt, model="other")
            assert not other_model.found, "answers are kept per model"

    asyncio.run(run())


def test_cluster_health_and_its_changes(cluster: Cluster) -> None:
    async def run() -> None:
        async with Health(cluster.grpc["health"]) as health:
            now = await health.cluster()
            assert now.components
            assert now.state in (health_pb.STATE_UP, health_pb.STATE_DEGRADED, health_pb.STATE_DOWN)
            async for update in health.watch():
                assert update.snapshot
                break

    asyncio.run(run())


def test_the_examples_run_against_the_cluster(cluster: Cluster) -> None:
    published = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "publisher.py"),
            "--eventbus",
            cluster.grpc["eventbus"],
            "--ratelimit",
            cluster.grpc["ratelimit"],
            "--count",
            "15",
            "--rate",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    took = float(published.split(" in ")[1].split(" s")[0])
    assert took >= 0.4, f"15 events at 10/s cannot all go in the first window: {published}"

    prompt = "What is the capital of France?"
    answered = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "llm_cache.py"),
            "--cache",
            cluster.grpc["cache"],
            prompt,
            prompt,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert answered[0].startswith("model:") and answered[1].startswith("cache:"), answered
    assert answered[0].split("-> ")[1] == answered[1].split("-> ")[1]
