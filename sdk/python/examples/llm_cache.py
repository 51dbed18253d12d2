"""An LLM call wrapped in the semantic cache: a prompt whose answer is cached (for the same
model and parameters) is answered from the cache; otherwise the model runs and its answer is
stored. The "model" is a deterministic local stand-in, so the example runs offline.

    python examples/llm_cache.py "What is the capital of France?" "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib

from agentmesh import Cache

MODEL = "stand-in-llm"
PARAMETERS = "temperature=0"


def stand_in_model(prompt: str) -> str:
    """A deterministic "completion" (slow-ish, as a model is)."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:12]
    return f"answer-{digest}"


async def ask(cache: Cache, prompt: str) -> tuple[str, bool]:
    """The answer, and whether it came from the cache."""
    hit = await cache.semantic_get("examples-llm", prompt, model=MODEL, parameters=PARAMETERS)
    if hit.found:
        return hit.answer.decode(), True
    await asyncio.sleep(0.2)  # the model's latency
    answer = stand_in_model(prompt)
    await cache.semantic_put(
        "examples-llm", prompt, answer, model=MODEL, parameters=PARAMETERS, ttl=3600
    )
    return answer, False


async def run(address: str, prompts: list[str]) -> list[tuple[str, bool]]:
    async with Cache(address) as cache:
        return [await ask(cache, p) for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default="http://127.0.0.1:7103")
    parser.add_argument("prompts", nargs="+")
    args = parser.parse_args()
    answers = asyncio.run(run(args.cache, args.prompts))
    for prompt, (answer, cached) in zip(args.prompts, answers, strict=True):
        print(f"{'cache' if cached else 'model'}: {prompt!r} -> {answer}")


if __name__ == "__main__":
    main()
