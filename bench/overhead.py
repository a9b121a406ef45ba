"""The cost of inferq's own path, in front of a model that costs almost nothing.

    .venv/bin/python -m bench.overhead               # ~6 minutes
    .venv/bin/python -m bench.overhead --quick       # 3 s per level, 1/16/64 clients
    .venv/bin/python -m bench.overhead --skip-peer   # inferq and the raw engine only

A 1-layer, 32-wide BERT with random weights and MiniLM's tokenizer is built
here, then, in one run on the same machine:
  raw    the engine in-process, batches of 32 one-text inputs (texts/s)
  inferq an API process and one worker holding only that model
  peer   infinity-emb serving the same directory, from .venv-infinity
         (`make infinity` makes it; the run makes it itself when it is missing)
each loaded by bench/load.py (aiohttp, closed loop, one short text per request)
at 1, 16, 64 and 256 concurrent clients: requests/s, p50/p99 latency, and CPU
seconds per request of each server process, of Redis (its INFO counters) and of
the load client itself, read from /proc. Writes bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import redis

from app.embedded_redis import free_port
from bench.harness import ROOT, Deployment, machine, percentile, write_results

PEER_VENV = ROOT / ".venv-infinity"
LEVELS = (1, 16, 64, 256)
BODY = {"model": "tiny", "input": "a short query about batch number {i}"}
#: The level profiled with --profile.
PROFILED_LEVEL = 64
#: Above this many clients a level is driven by two client processes.
ONE_CLIENT_PROCESS_MAX = 64


def build_tiny_model(path: Path) -> Path:
    """A sentence-transformers directory in the classic layout, which both inferq's
    sentence-transformers and infinity's older one load (see PEERS.md)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from app.registry import load_registry

    source = load_registry(None).require("all-MiniLM-L6-v2").resolved_path()
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    torch.manual_seed(3)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.model_max_length = 256
    tokenizer.save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 256, "do_lower_case": False})
    )
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    return path


def raw_engine(path: Path, seconds: float) -> dict[str, Any]:
    """What the engine takes when nothing stands in front of it."""
    import torch

    from app.engines import load_engine
    from app.registry import ModelSpec

    torch.set_num_threads(os.cpu_count() or 1)
    spec = ModelSpec(name="tiny", kind="embedding", engine="sentence_transformers", path=str(path))
    engine = load_engine(spec, [])
    texts = [BODY["input"].replace("{i}", str(n)) for n in range(32)]
    for _ in range(20):
        engine.embed(engine.tokenize(texts))
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        engine.embed(engine.tokenize(texts))
        done += len(texts)
    elapsed = time.perf_counter() - began
    return {"texts": done, "seconds": round(elapsed, 3), "texts_per_s": round(done / elapsed, 1)}


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds so far of these processes and all their children."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


def redis_cpu(client: redis.Redis | None) -> float:
    if client is None:
        return 0.0
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def load(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """Run bench/load.py in one or two processes and merge what they saw."""
    processes = 1 if concurrency <= ONE_CLIENT_PROCESS_MAX else 2
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    outputs = [Path(tempfile.mkstemp(prefix="inferq-load-", suffix=".json")[1]) for _ in shares]
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.load",
                "--url",
                url,
                "--body",
                json.dumps(BODY),
                "--concurrency",
                str(share),
                "--seconds",
                str(seconds),
                "--warmup",
                "1.5",
                "--out",
                str(out),
            ],
            cwd=ROOT,
        )
        for share, out in zip(shares, outputs, strict=True)
    ]
    for proc in clients:
        proc.wait(timeout=seconds + 120)
    outs = [json.loads(out.read_text()) for out in outputs]
    for out in outputs:
        out.unlink(missing_ok=True)
    latencies = [ms for out in outs for ms in out["latencies_ms"]]
    errors: dict[str, int] = {}
    for out in outs:
        for status, n in out["errors"].items():
            errors[status] = errors.get(status, 0) + n
    elapsed = max(out["seconds"] for out in outs)
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "client_cpu_s": sum(out["client_cpu_s"] for out in outs),
        "client_processes": processes,
    }


def measure(
    name: str,
    url: str,
    parts: dict[str, list[int]],
    levels: tuple[int, ...],
    seconds: float,
    redis_client: redis.Redis | None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Each level's load, and the CPU each part of the server spent per answered request."""
    rows: dict[str, Any] = {}
    for concurrency in levels:
        before = {part: tree_cpu(pids) for part, pids in parts.items()}
        redis_before = redis_cpu(redis_client)
        spies = (
            start_profiles(profile, f"{name}-c{concurrency}", parts, seconds)
            if profile and concurrency == PROFILED_LEVEL
            else []
        )
        row = load(url, concurrency, seconds)
        for spy in spies:
            spy.wait(60)
        spent = {part: tree_cpu(pids) - before[part] for part, pids in parts.items()}
        if redis_client is not None:
            spent["redis"] = redis_cpu(redis_client) - redis_before
        answered = max(1, row["requests"])
        # The server's CPU covers the warm-up too: count its requests at the measured rate.
        warm = row["requests_per_s"] * 1.5
        row["cpu_ms_per_request"] = {
            part: round(cpu * 1000 / (answered + warm), 3) for part, cpu in spent.items()
        }
        row["client_cpu_ms_per_request"] = round(row["client_cpu_s"] * 1000 / answered, 3)
        row["client_cores"] = round(row["client_cpu_s"] / row["seconds"], 2)
        rows[str(concurrency)] = {
            k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
        }
        print(
            f"{name:7} c={concurrency:<4} {row['requests_per_s']:8.1f} req/s  "
            f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
            f"cpu/request {row['cpu_ms_per_request']}  client {row['client_cores']} cores  "
            f"errors {row['errors'] or 0}",
            flush=True,
        )
    return rows


def start_profiles(
    into: Path, label: str, parts: dict[str, list[int]], seconds: float
) -> list[subprocess.Popen[bytes]]:
    """py-spy on each server process while the level runs (after the client's warm-up),
    as collapsed stacks (`--format raw`): one line per stack with its sample count."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    into.mkdir(parents=True, exist_ok=True)
    argv = [spy, "record", "--format", "raw", "--nonblocking", "--subprocesses", "--rate", "200"]
    return [
        subprocess.Popen(
            [
                *argv,
                "-d",
                str(int(seconds)),
                "-o",
                str(into / f"{label}-{part}.txt"),
                "-p",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for part, pids in parts.items()
        for pid in pids
    ]


def ensure_peer_venv() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not (PEER_VENV / ".installed").exists():
        print("making .venv-infinity (a few minutes, once) ...", flush=True)
        subprocess.run(["make", "infinity"], cwd=ROOT, check=True)
    return python


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer {url}")


def run_peer(
    model: Path, levels: tuple[int, ...], seconds: float, logs: Path, profile: Path | None
) -> dict[str, Any]:
    python = ensure_peer_venv()
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    }
    argv = [
        str(python.parent / "infinity_emb"), "v2", "--model-id", str(model),
        "--served-model-name", "tiny", "--port", str(port), "--engine", "torch",
        "--device", "cpu", "--batch-size", "32",
    ]  # fmt: skip
    with open(logs / "infinity.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/models", proc, "infinity-emb")
        return measure(
            "peer", f"http://127.0.0.1:{port}/embeddings", {"server": [proc.pid]},
            levels, seconds, None, profile,
        )  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_inferq(
    model: Path,
    levels: tuple[int, ...],
    seconds: float,
    settings: dict[str, str],
    profile: Path | None,
) -> dict[str, Any]:
    registry = f"""
models:
  - name: tiny
    kind: embedding
    engine: sentence_transformers
    path: {model}
    options: {{batch_size: 32}}
"""
    deployment = Deployment(registry, settings=settings)
    deployment.start()
    try:
        with deployment.worker("tiny") as worker:
            client = redis.Redis.from_url(deployment.env["INFERQ_REDIS_URL"])
            api = [p.pid for p in deployment.procs if p is not worker]
            return measure(
                "inferq", f"{deployment.base_url}/v1/embeddings",
                {"api": api, "worker": [worker.pid]}, levels, seconds, client, profile,
            )  # fmt: skip
    finally:
        deployment.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per level")
    parser.add_argument("--quick", action="store_true", help="3 s per level, 1/16/64 clients")
    parser.add_argument("--skip-peer", action="store_true", help="leave infinity-emb out")
    parser.add_argument("--levels", help="client counts, comma-separated (default 1,16,64,256)")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help=f"py-spy each server process at {PROFILED_LEVEL} clients, stacks into DIR",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="INFERQ_X=V",
        help="a setting of the inferq processes (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    levels = (1, 16, 64) if args.quick else LEVELS
    if args.levels:
        levels = tuple(int(n) for n in args.levels.split(","))
    seconds = 3.0 if args.quick else args.seconds
    settings = dict(item.split("=", 1) for item in args.set)
    with tempfile.TemporaryDirectory(prefix="inferq-overhead-") as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        raw = raw_engine(model, 3.0)
        print(f"raw     batches of 32 {raw['texts_per_s']:10.1f} texts/s", flush=True)
        inferq = run_inferq(model, levels, seconds, settings, args.profile)
        peer = None if args.skip_peer else run_peer(model, levels, seconds, Path(tmp), args.profile)
    ratios: dict[str, Any] = {}
    for level in map(str, levels):
        rate = inferq[level]["requests_per_s"]
        ratios[level] = {
            "inferq/raw": round(rate / raw["texts_per_s"], 4),
            "inferq/peer": round(rate / peer[level]["requests_per_s"], 2) if peer else None,
        }
    print("\nclients  inferq req/s  peer req/s  inferq/peer  inferq/raw")
    for level in map(str, levels):
        peer_rate = f"{peer[level]['requests_per_s']:10.1f}" if peer else "       n/a"
        shown = ratios[level]["inferq/peer"]
        print(
            f"{level:>7}  {inferq[level]['requests_per_s']:12.1f}  {peer_rate}  "
            f"{'n/a' if shown is None else f'{shown:.2f}':>11}  {ratios[level]['inferq/raw']:10.4f}"
        )
    print("target: inferq/peer >= 1.5 at 64 clients")
    path = write_results(
        "overhead",
        {
            "machine": machine(),
            "model": "1-layer 32-wide BERT, random weights, MiniLM tokenizer",
            "body": BODY,
            "settings": settings,
            "seconds_per_level": seconds,
            "raw": raw,
            "inferq": inferq,
            "peer": peer,
            "ratios": ratios,
            "target": {"inferq/peer at 64": 1.5},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
