"""A service that publishes events under a rate limit: each event first takes one unit of the
``publisher/<name>`` allowance (10 per second); a denied one waits the ``retry_after`` the
limiter gives, so the events go out at the allowed pace.

    python examples/publisher.py --count 25
"""

from __future__ import annotations

import argparse
import asyncio
import time

from agentmesh import EventBus, RateLimiter


async def publish(bus_address: str, limiter_address: str, count: int, rate: int) -> float:
    """Publishes ``count`` events on ``examples.published`` at most ``rate`` per second; the
    seconds it took."""
    started = time.monotonic()
    async with EventBus(bus_address) as bus, RateLimiter(limiter_address) as limiter:
        for n in range(count):
            while True:
                decision = await limiter.check("publisher", "example", limit=rate, period=1.0)
                if decision.allowed:
                    break
                await asyncio.sleep(decision.retry_after)
            await bus.publish("examples.published", {"n": n}, type="example.tick")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eventbus", default="http://127.0.0.1:7101")
    parser.add_argument("--ratelimit", default="http://127.0.0.1:7104")
    parser.add_argument("--count", type=int, default=25)
    parser.add_argument("--rate", type=int, default=10)
    args = parser.parse_args()
    took = asyncio.run(publish(args.eventbus, args.ratelimit, args.count, args.rate))
    print(f"published {args.count} events in {took:.2f} s (at most {args.rate}/s)")


if __name__ == "__main__":
    main()
