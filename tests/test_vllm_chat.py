"""Chat on real vLLM (its CPU build, `.venv-vllm`) behind real inferq workers, driven with
the official `openai` client.

Each vLLM model here is a tiny one built in seconds (tests/vllm_models.py): random
weights for plain generation and structured output, and "scripted" weights that
always emit one tool call, or one reasoning block and an answer, under greedy
decoding. Every replica's server listens on a port the test chose, so what inferq
answers can be compared with what the same server answers directly. The servers
are shared by the whole module: each takes about a minute to start here.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from app.embedded_redis import free_port
from tests.cluster import ADMIN_KEY, ready_workers
from tests.procs import ROOT, Proc, alive_replica_count, db_upgrade, start_api, start_node

VLLM_PYTHON = Path(os.environ.get("INFERQ_TEST_VLLM_PYTHON", ROOT / ".venv-vllm/bin/python"))
MESSAGES = [{"role": "user", "content": "hello there"}]
INFERQ = [sys.executable, "-m", "app"]
#: Started under a node agent, restarted by it when its server is killed.
NODE_MODEL = "think-vllm"


def _registry(models: dict[str, Path], ports: dict[str, int]) -> str:
    common = (
        f"python: {VLLM_PYTHON}, max_model_len: 1024, max_num_seqs: 24, dtype: bfloat16, "
        "env: {VLLM_CPU_KVCACHE_SPACE: 1}, startup_timeout_s: 900, "
        # Without torch.compile a server here is up in ~35 s instead of ~90 s.
        "enforce_eager: true"
    )
    return f"""
models:
  - name: tiny-vllm
    kind: chat
    engine: vllm
    path: {models["tiny-llama"]}
    options: {{{common}, port: {ports["tiny-vllm"]}}}
  - name: tools-vllm
    kind: chat
    engine: vllm
    path: {models["tool-caller"]}
    options: {{{common}, port: {ports["tools-vllm"]}, tool_call_parser: hermes}}
  - name: {NODE_MODEL}
    kind: chat
    engine: vllm
    path: {models["thinker"]}
    options: {{{common}, port: {ports[NODE_MODEL]}, reasoning_parser: deepseek_r1}}
"""


@dataclass
class VllmStack:
    env: dict[str, str]
    base: str
    ports: dict[str, int]
    api: Proc
    workers: dict[str, Proc] = field(default_factory=dict)
    node: Proc | None = None

    def client(self, key: str = ADMIN_KEY, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=timeout
        )

    def direct(self, model: str) -> openai.OpenAI:
        """The same replica's vLLM server, without inferq in between."""
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.ports[model]}/v1", api_key="-", max_retries=0
        )

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        return httpx.Client(base_url=self.base, headers=headers, timeout=120)

    def server_metric(self, model: str, name: str) -> float:
        url = f"http://127.0.0.1:{self.ports[model]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def view(self) -> dict[str, Any]:
        with self.http() as http:
            return http.get("/v1/cluster").json()


def _wait(what: str, check: Callable[[], bool], timeout: float, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s\n{logs()}")
        time.sleep(0.3)


def _settle(stack: VllmStack, model: str, timeout: float = 20) -> None:
    """Wait until the server runs and holds no request and its token count stands still."""
    deadline = time.monotonic() + timeout
    last = -1.0
    while True:
        busy = stack.server_metric(model, "vllm:num_requests_running") + stack.server_metric(
            model, "vllm:num_requests_waiting"
        )
        count = stack.server_metric(model, "vllm:generation_tokens_total")
        if busy == 0 and count == last:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{model}'s server did not go idle within {timeout:g}s")
        last = count
        time.sleep(0.5)


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert VLLM_PYTHON.exists(), f"{VLLM_PYTHON} is missing: `make install` sets up .venv-vllm"
    out = tmp_path_factory.mktemp("vllm-models")
    subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_models.py"), str(out)],
        check=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return {p.name: p for p in out.iterdir() if p.is_dir()}


@pytest.fixture(scope="module")
def stack(
    inferq_env: dict[str, str],
    vllm_models: dict[str, Path],
    log_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VllmStack]:
    root = tmp_path_factory.mktemp("vllm-stack")
    ports = {name: free_port() for name in ("tiny-vllm", "tools-vllm", NODE_MODEL)}
    registry = root / "registry.yaml"
    registry.write_text(_registry(vllm_models, ports))
    env = {
        **inferq_env,
        "INFERQ_KEY_PREFIX": f"{inferq_env['INFERQ_KEY_PREFIX']}-vllm",
        "INFERQ_REGISTRY": str(registry),
        "INFERQ_DATABASE_URL": f"sqlite:///{root / 'jobs.db'}",
        "INFERQ_API_KEYS": ADMIN_KEY,
        "INFERQ_REQUEST_TIMEOUT_S": "120",
        "INFERQ_JOB_SWEEP_INTERVAL_S": "0.5",
        "INFERQ_BULK_POLL_INTERVAL_S": "0.3",
        "INFERQ_NODE_RECONCILE_S": "1",
        "INFERQ_NODE_HEARTBEAT_S": "0.5",
        "INFERQ_NODE_HEARTBEAT_TTL_S": "10",
        # A generating vLLM CPU server stalls every other process of this machine for
        # up to ~1.5 s at a time (README, "Tests"): heartbeats get room for that.
        "INFERQ_HEARTBEAT_INTERVAL_S": "1",
        "INFERQ_HEARTBEAT_TTL_S": "10",
        "INFERQ_NODE_STOP_GRACE_S": "20",
    }
    db_upgrade(env)
    api, base = start_api(env, log_dir)
    built = VllmStack(env, base, ports, api)
    try:
        # All three servers start at once: their start-ups overlap.
        for model in ("tiny-vllm", "tools-vllm"):
            argv = [sys.executable, "-m", "app", "worker", "--model", model]
            built.workers[model] = Proc(f"worker-{model}", argv, env, log_dir)
        built.node = start_node(env, log_dir, "vllm-node")
        launched = subprocess.Popen(
            [
                *INFERQ,
                "launch",
                NODE_MODEL,
                "--timeout",
                "900",
                "--api",
                base,
                "--api-key",
                ADMIN_KEY,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for model, proc in built.workers.items():

            def up(model: str = model, proc: Proc = proc) -> bool:
                assert proc.popen.poll() is None, proc.tail(60)
                return alive_replica_count(env, model) > 0

            _wait(f"{model} ready", up, 900, proc.tail)
        out, _ = launched.communicate(timeout=900)
        assert launched.returncode == 0, out
        yield built
    finally:
        for proc in built.workers.values():
            proc.stop(timeout=60)
        if built.node is not None:
            built.node.stop(timeout=90)
        api.stop()


def _text(response: Any) -> str:
    return response.choices[0].message.content or ""


# ---- the plain surface ---------------------------------------------------------------


def test_answers_equal_the_servers_own_with_exact_usage(stack: VllmStack) -> None:
    body = {"model": "tiny-vllm", "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    ours = stack.client().chat.completions.create(**body)
    theirs = stack.direct("tiny-vllm").chat.completions.create(**body)
    assert _text(ours) == _text(theirs) and ours.choices[0].finish_reason == "length"
    assert ours.usage.completion_tokens == 12
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens > 0
    assert ours.usage.total_tokens == ours.usage.prompt_tokens + 12
    assert ours.model == "tiny-vllm" and ours.id.startswith("chatcmpl-")


def test_streams_carry_the_same_text_and_usage_only_when_asked(stack: VllmStack) -> None:
    client = stack.client()
    body = {"model": "tiny-vllm", "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    whole = _text(client.chat.completions.create(**body))
    chunks = list(
        client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    plain = list(client.chat.completions.create(**body, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


def test_stop_sequences_and_completions_with_vllm_fields(stack: VllmStack) -> None:
    client = stack.client()
    body = {"model": "tiny-vllm", "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    whole = _text(client.chat.completions.create(**body))
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    cut = client.chat.completions.create(**body, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert whole.startswith(_text(cut)) and stop not in _text(cut)
    # vLLM's own sampling fields reach it: exactly min_tokens with ignore_eos.
    done = client.completions.create(
        model="tiny-vllm",
        prompt="one two three",
        max_tokens=7,
        extra_body={"ignore_eos": True, "min_tokens": 7, "top_k": 5, "repetition_penalty": 1.1},
    )
    assert done.usage.completion_tokens == 7 and done.choices[0].finish_reason == "length"
    assert done.id.startswith("cmpl-") and done.object == "text_completion"


def test_logprobs_and_several_choices(stack: VllmStack) -> None:
    out = stack.client().chat.completions.create(
        model="tiny-vllm",
        messages=MESSAGES,
        max_tokens=5,
        n=3,
        logprobs=True,
        top_logprobs=2,
        seed=11,
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice in out.choices:
        tokens = choice.logprobs.content
        assert len(tokens) == 5 and all(len(t.top_logprobs) == 2 for t in tokens)
        assert all(t.logprob <= 0 for t in tokens)
    assert out.usage.completion_tokens == 15


def test_json_schema_output_validates_against_its_schema(stack: VllmStack) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    for seed in (1, 2, 3):
        out = stack.client().chat.completions.create(
            model="tiny-vllm",
            messages=MESSAGES,
            max_tokens=200,
            seed=seed,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": schema, "strict": True},
            },
        )
        value = json.loads(_text(out))
        assert set(value) == {"name", "age"}
        assert isinstance(value["name"], str) and len(value["name"]) <= 12
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
    out = stack.client().chat.completions.create(
        model="tiny-vllm",
        messages=MESSAGES,
        max_tokens=200,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(_text(out)), dict)


def test_the_servers_refusals_keep_their_status_as_openai_errors(stack: VllmStack) -> None:
    client = stack.client()
    too_long = [{"role": "user", "content": "word " * 1500}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="tiny-vllm", messages=too_long, max_tokens=8, stream=stream
            )
        error = caught.value.body
        assert "maximum context length" in error["message"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
    with stack.http() as http:
        bad_schema = http.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-vllm",
                "messages": MESSAGES,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
                },
            },
        )
        assert bad_schema.status_code == 400, bad_schema.text
        assert set(bad_schema.json()["error"]) == {"message", "type", "param", "code"}


# ---- tools and reasoning -------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize(
    "tool_choice", ["auto", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_tool_calls_streamed_and_not(stack: VllmStack, tool_choice: Any) -> None:
    client = stack.client()
    body = {
        "model": "tools-vllm",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": tool_choice,
        "temperature": 0,
        "max_tokens": 20,
    }
    out = client.chat.completions.create(**body)
    (call,) = out.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id
    if tool_choice == "auto":
        assert out.choices[0].finish_reason == "tool_calls"
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(**body, stream=True):
        for delta_call in chunk.choices[0].delta.tool_calls or ():
            name += delta_call.function.name or ""
            arguments += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}
    if tool_choice == "auto":
        assert finish == "tool_calls"


def test_reasoning_split_by_vllms_parser_when_the_template_opens_think(
    stack: VllmStack,
) -> None:
    client = stack.client()
    body = {"model": NODE_MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 30}
    out = client.chat.completions.create(**body)
    message = out.choices[0].message.model_dump()
    assert message["reasoning_content"] and "</think>" not in message["reasoning_content"]
    assert message["content"] and "<think>" not in message["content"]
    assert "</think>" not in message["content"]
    reasoning = content = ""
    for chunk in client.chat.completions.create(**body, stream=True):
        delta = chunk.choices[0].delta.model_dump()
        reasoning += delta.get("reasoning_content") or ""
        content += delta.get("content") or ""
    assert (reasoning, content) == (message["reasoning_content"], message["content"])


# ---- concurrency and cancellation ----------------------------------------------------


def test_sixteen_streams_are_served_by_one_replica_at_once(stack: VllmStack) -> None:
    client = stack.client(timeout=300)
    starts: list[float] = []
    ends: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(16)
    running: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            running.append(stack.server_metric("tiny-vllm", "vllm:num_requests_running"))
            time.sleep(0.05)

    def one(i: int) -> int:
        ready.wait()
        stream = client.chat.completions.create(
            model="tiny-vllm",
            messages=[{"role": "user", "content": f"stream {i}"}],
            max_tokens=600,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        first, pieces = None, 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                pieces += 1
        with lock:
            starts.append(first or 0.0)
            ends.append(time.monotonic())
        return pieces

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            pieces = list(pool.map(one, range(16)))
        assert all(n >= 300 for n in pieces), pieces  # 600 tokens each, streamed
    finally:
        done.set()
        watcher.join()
    # The server itself ran (nearly) all of them at once, and most streams had their
    # first token before half of them had their last (a stall of this machine can hold
    # back a straggler's events for a second or more).
    middle = sorted(ends)[8]
    assert sum(start < middle for start in starts) >= 12, (sorted(starts), sorted(ends))
    assert max(running) >= 12, running
    assert len(ready_workers(stack.view(), "tiny-vllm")) == 1


def test_a_caller_that_disconnects_frees_its_slot_within_a_few_tokens(
    stack: VllmStack,
) -> None:
    """1,000 tokens take this server about three seconds; a caller that leaves after
    three events costs a part of them, and the request leaves the server."""
    tokens = "vllm:generation_tokens_total"
    for _ in range(2):
        # Earlier tests' requests must have left the server and its counter settled,
        # or their tokens would be counted as this one's.
        _settle(stack, "tiny-vllm")
        before = stack.server_metric("tiny-vllm", tokens)
        with (
            stack.http() as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "tiny-vllm",
                    "messages": MESSAGES,
                    "max_tokens": 1000,
                    "stream": True,
                    "ignore_eos": True,
                },
            ) as response,
        ):
            assert response.status_code == 200
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: {")
                if seen >= 3:
                    break
        # The connection is closed: the worker closes its upstream request and vLLM
        # aborts it.
        _settle(stack, "tiny-vllm")
        generated = stack.server_metric("tiny-vllm", tokens) - before
        # Cancelled, the request ends well short of its 1,000 tokens (a stall of this
        # machine can hold the worker back for a second or more while vLLM runs on).
        assert generated < 800, generated


# ---- jobs and batches ----------------------------------------------------------------


def test_the_same_request_as_an_async_job_and_as_a_batch_line(stack: VllmStack) -> None:
    body = {"model": "tiny-vllm", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    sync = stack.client().chat.completions.create(**body)
    with stack.http() as http:
        job = http.post("/v1/jobs", json={"endpoint": "/v1/chat/completions", "body": body})
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 120
        while (state := http.get(f"/v1/jobs/{job.json()['id']}").json())["status"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert state["status"] == "succeeded", state
        result = state["result"]
        assert result["object"] == "chat.completion"
        assert result["choices"][0]["message"]["content"] == _text(sync)
        assert result["usage"]["completion_tokens"] == 10
    client = stack.client()
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    uploaded = client.files.create(
        file=("chat.jsonl", io.BytesIO((json.dumps(line) + "\n").encode())), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    assert batch.status == "completed", batch
    (row,) = [json.loads(r) for r in client.files.content(batch.output_file_id).text.splitlines()]
    assert row["custom_id"] == "a"
    assert row["response"]["body"]["choices"][0]["message"]["content"] == _text(sync)


# ---- failures ------------------------------------------------------------------------


def _server_of(stack: VllmStack, model: str) -> psutil.Process:
    """The vLLM server process listening on the model's port."""
    port = stack.ports[model]
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        listens = "--port" in cmdline and cmdline[cmdline.index("--port") + 1] == str(port)
        if listens and "app.child_guard" not in cmdline:
            return proc
    raise AssertionError(f"no server process listens on {port}")


def test_a_killed_server_is_reported_and_the_node_restarts_its_worker(
    stack: VllmStack,
) -> None:
    server = _server_of(stack, NODE_MODEL)
    worker = server.parent()
    assert worker is not None and "worker" in " ".join(worker.cmdline())
    server.kill()
    worker.wait(30)  # the worker reports, then stops: the node sees a crash
    view_events: list[str] = []

    def restarted() -> bool:
        view = stack.view()
        view_events[:] = [json.dumps(e) for n in view["nodes"] for e in n.get("events", [])]
        ready = ready_workers(view, NODE_MODEL)
        return bool(ready) and all(w.get("pid") != worker.pid for w in ready)

    _wait("a restarted replica", restarted, 600, lambda: stack.node.tail(60) if stack.node else "")
    assert any("vLLM server stopped" in e for e in view_events), view_events
    out = stack.client().chat.completions.create(
        model=NODE_MODEL, messages=MESSAGES, max_tokens=5, temperature=0
    )
    assert out.choices[0].message.model_dump()["reasoning_content"]


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error_and_its_server(
    stack: VllmStack,
) -> None:
    server = _server_of(stack, "tiny-vllm")
    worker = stack.workers["tiny-vllm"]
    events: list[str] = []
    started = time.monotonic()
    with (
        stack.http() as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "tiny-vllm",
                "messages": MESSAGES,
                "max_tokens": 900,
                "stream": True,
                "ignore_eos": True,
            },
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3:
                worker.kill()
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "stopped" in events[-2]
    assert time.monotonic() - started < 30
    server.wait(30)  # no server outlives its worker
    assert not psutil.pid_exists(server.pid) or server.status() == psutil.STATUS_ZOMBIE
