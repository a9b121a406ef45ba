"""What a loaded model takes: its context, embedding widths, what it can do.

Only the worker knows these for sure (the API host may not hold the model's
files), so each worker writes them to Redis once its engine is loaded and the
API shows them in `/v1/models`. They outlive the replica (`FACTS_TTL_S`), so a
model whose replicas are restarting still says how to size requests; facts
written for another engine or path (a model relaunched under the same name)
are not shown.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
import redis.asyncio as aioredis

from app.keys import KeySpace
from app.registry import ModelKind, ModelSpec

log = logging.getLogger(__name__)

#: A week: long enough for a model that is down, short enough to forget a removed one.
FACTS_TTL_S = 7 * 24 * 3600


def engine_facts(spec: ModelSpec, engine: Any) -> dict[str, Any]:
    """The facts of a loaded engine, keyed as `/v1/models` shows them."""
    facts: dict[str, Any] = {"engine": spec.engine, "path": spec.path}
    if spec.kind == ModelKind.embedding:
        facts["context_length"] = int(engine.max_tokens)
        facts["dimensions"] = int(engine.dimensions)
        facts["dimensions_accepted"] = sorted(
            {int(engine.dimensions), *(int(d) for d in engine.matryoshka_dimensions)}
        )
    elif spec.kind == ModelKind.rerank:
        facts["context_length"] = int(engine.max_tokens)
    else:
        length = getattr(engine, "context_length", None)
        facts["context_length"] = int(length) if length else None
        facts["parallel"] = int(getattr(engine, "parallel", 1))
    return facts


def publish_facts(client: redis.Redis, keys: KeySpace, spec: ModelSpec, engine: Any) -> None:
    """Best effort: a model serves without its facts shown."""
    try:
        facts = json.dumps(engine_facts(spec, engine))
        client.set(keys.model_facts(spec.name), facts, ex=FACTS_TTL_S)
    except redis.RedisError as exc:
        log.warning("could not publish the model's facts: %s", exc)


async def read_facts(
    client: aioredis.Redis, keys: KeySpace, models: list[str]
) -> dict[str, dict[str, Any]]:
    if not models:
        return {}
    raw = await client.mget([keys.model_facts(m) for m in models])
    found: dict[str, dict[str, Any]] = {}
    for model, value in zip(models, raw, strict=True):
        if not value:
            continue
        try:
            record = json.loads(value)
        except ValueError:
            continue
        if isinstance(record, dict):
            found[model] = record
    return found


def facts_for(spec: ModelSpec, facts: dict[str, Any] | None) -> dict[str, Any]:
    """The facts that belong to this spec: none from another engine or path."""
    if not facts or facts.get("engine") != spec.engine or facts.get("path") != spec.path:
        return {}
    return {k: v for k, v in facts.items() if k not in ("engine", "path")}
