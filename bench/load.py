"""A closed-loop HTTP load client that is cheap enough not to be what is measured.

    python -m bench.load --url http://127.0.0.1:8000/v1/embeddings --body '{"input": "hi"}' \
        --concurrency 64 --seconds 6

Each of `--concurrency` coroutines posts the JSON body, waits for the answer and
posts again, over one aiohttp connection pool, until `--seconds` have passed
(after `--warmup` seconds that are not counted). `{i}` in a string of the body is
replaced by a running number, so no two requests carry the same text. It prints
one JSON line: requests answered, errors, seconds, latencies (ms) and this
process's own CPU seconds, so a reader can check the client was not the limit.
Run from bench/overhead.py in processes of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import sys
import time
from typing import Any

import aiohttp


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fill(template: Any, n: int) -> Any:
    if isinstance(template, str):
        return template.replace("{i}", str(n))
    if isinstance(template, list):
        return [fill(item, n) for item in template]
    if isinstance(template, dict):
        return {key: fill(value, n) for key, value in template.items()}
    return template


async def drive(url: str, body: Any, concurrency: int, seconds: float, warmup: float) -> dict:
    counter = itertools.count()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counting = False
    stop_at = float("inf")
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def client() -> None:
            while time.perf_counter() < stop_at:
                payload = json.dumps(fill(body, next(counter))).encode()
                started = time.perf_counter()
                try:
                    async with http.post(
                        url, data=payload, headers={"content-type": "application/json"}
                    ) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                if not counting:
                    continue
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        counting = True
        cpu0, began = cpu_seconds(), time.perf_counter()
        stop_at = began + seconds
        await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - began, cpu_seconds() - cpu0
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "latencies_ms": latencies,
        "client_cpu_s": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="the JSON body; {i} is a running number")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", help="write the JSON here instead of to stdout")
    args = parser.parse_args()
    work = drive(args.url, json.loads(args.body), args.concurrency, args.seconds, args.warmup)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(work)
    else:
        result = uvloop.run(work)
    result["pid"] = os.getpid()
    if args.out:
        with open(args.out, "w") as out:
            json.dump(result, out)
    else:
        sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
