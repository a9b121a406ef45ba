"""The clients inferq's users already run, each against a running inferq: xinference-client,
Cohere's v1 and v2 clients, Jina's rerank shape, the request bodies of Dify's and
RAGFlow's Xinference integrations, LangChain and LlamaIndex on the `openai` client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.cluster import ADMIN_KEY, running_cluster
from tests.procs import Proc, start_api, start_worker

QUERY = "where do pandas live"
DOCS = [
    "Giant pandas live in the mountain forests of central China.",
    "The stock market closed higher on Friday.",
    "Bamboo makes up almost all of a panda's diet.",
]


@pytest.fixture(scope="module")
def workers(inferq_env: dict[str, str], log_dir: Path, minilm_worker: Proc) -> Iterator[None]:
    procs = [
        start_worker(inferq_env, log_dir, "tiny-rerank"),
        start_worker(inferq_env, log_dir, "smollm2"),
    ]
    yield
    for proc in procs:
        proc.stop()


def _vector(api: str, text: str) -> np.ndarray:
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    return np.array(client.embeddings.create(model="minilm", input=text).data[0].embedding)


def _ranking(api: str) -> list[int]:
    body = {"model": "tiny-rerank", "query": QUERY, "documents": DOCS}
    reply = httpx.post(f"{api}/v1/rerank", json=body, timeout=60).json()
    return [r["index"] for r in reply["results"]]


# ---- xinference-client ------------------------------------------------------------------


def test_xinference_client_lists_describes_and_uses_every_kind(api: str, workers: None) -> None:
    from xinference_client import RESTfulClient
    from xinference_client.client.restful.restful_client import (
        RESTfulChatModelHandle,
        RESTfulEmbeddingModelHandle,
        RESTfulRerankModelHandle,
    )

    client = RESTfulClient(api)
    listed = client.list_models()
    assert {listed[m]["model_type"] for m in ("minilm", "tiny-rerank", "smollm2")} == {
        "embedding",
        "rerank",
        "LLM",
    }

    embedder = client.get_model("minilm")
    assert isinstance(embedder, RESTfulEmbeddingModelHandle)
    reply = embedder.create_embedding("hello pandas")
    got = np.array(reply["data"][0]["embedding"])
    assert np.abs(got - _vector(api, "hello pandas")).max() < 1e-6

    reranker = client.get_model("tiny-rerank")
    assert isinstance(reranker, RESTfulRerankModelHandle)
    ranked = reranker.rerank(DOCS, QUERY, top_n=2, return_documents=True)
    assert [r["index"] for r in ranked["results"]] == _ranking(api)[:2]
    assert ranked["results"][0]["document"]["text"] == DOCS[ranked["results"][0]["index"]]
    assert ranked["meta"]["tokens"]["input_tokens"] > 0

    chat = client.get_model("smollm2")
    assert isinstance(chat, RESTfulChatModelHandle)
    messages = [{"role": "user", "content": "Say hello."}]
    answer = chat.chat(messages, generate_config={"max_tokens": 8, "temperature": 0})
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] <= 8
    chunks = list(chat.chat(messages, generate_config={"max_tokens": 8, "stream": True}))
    assert chunks and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    described = client.describe_model("minilm")
    assert described["model_type"] == "embedding" and described["dimensions"] == 384
    assert described["context_length"] == described["max_tokens"] > 0
    assert client.describe_model("smollm2")["context_length"] == 1024  # n_ctx

    # Failures reach the client's message: it reads `detail`.
    with pytest.raises(RuntimeError, match="'nope' does not exist"):
        client.get_model("nope")
    with pytest.raises(RuntimeError, match="must be a non-empty list"):
        reranker.rerank([], QUERY)


def test_xinference_client_launches_and_terminates_a_model(
    inferq_env: dict[str, str], log_dir: Path, tmp_path: Path
) -> None:
    """launch_model waits until the model serves, as Xinference's does, then the handle
    works at once; the fields it sends besides ours are used, warned about or refused."""
    from xinference_client import RESTfulClient

    with running_cluster(inferq_env, "xinference", log_dir, tmp_path) as cluster:
        cluster.add_node("node-x")
        client = RESTfulClient(cluster.base, api_key=ADMIN_KEY)  # /v1/cluster/auth: true
        uid = client.launch_model(
            model_name="minilm",
            model_type="embedding",
            model_uid="xinf-minilm",
            request_limits=8,
            max_tokens=64,  # an engine keyword: joins the model's options
        )
        assert uid == "xinf-minilm"
        vector = client.get_model(uid).create_embedding("launched")["data"][0]["embedding"]
        assert len(vector) == 384
        card = client.describe_model(uid)
        assert card["context_length"] == 64  # the keyword reached the engine
        assert card["registry_entry"]["options"]["max_tokens"] == 64

        with pytest.raises(RuntimeError, match="LoRA adapters"):
            client.launch_model(
                model_name="minilm",
                model_type="embedding",
                model_uid="xinf-lora",
                peft_model_config={"lora_list": [{"lora_name": "a", "local_path": "/m/a"}]},
            )
        with pytest.raises(RuntimeError, match="envs chooses the worker's environment"):
            client.launch_model(model_name="minilm", model_uid="xinf-env", envs={"A": "1"})

        # A model whose engine cannot load ends the wait with the worker's reason.
        with pytest.raises(RuntimeError, match=r"failed to load.*the replicas stay placed"):
            client.launch_model(model_name="broken-model", model_type="embedding")
        client.terminate_model("broken-model")

        client.terminate_model(uid)
        assert uid not in client.list_models()


def test_a_launch_answers_with_its_warnings() -> None:
    """What xinference-client sends and inferq does not use is said, not dropped silently."""
    from api.launcher import xinference_extras
    from app.protocol.launch import LaunchRequest

    request = LaunchRequest.model_validate(
        {
            "model_name": "minilm",
            "request_limits": 4,
            "enable_thinking": True,
            "quantization": "none",
            "n_worker": 1,
            "peft_model_config": None,
            "replica_config": None,
        }
    )
    warnings = xinference_extras(request)
    assert len(warnings) == 2 and "request_limits" in warnings[0]
    assert "enable_thinking" in warnings[1]


def test_the_cluster_calls_xinference_clients_make_at_start(api: str) -> None:
    assert httpx.get(f"{api}/v1/cluster/auth").json() == {"auth": False}
    assert httpx.get(f"{api}/v1/cluster/version").json()["version"]


# ---- Dify and RAGFlow -------------------------------------------------------------------


def test_difys_xinference_helper_reads_what_it_needs(api: str, workers: None) -> None:
    """Dify's helper reads GET /v1/models/{uid} for the handle type, context and abilities."""
    for uid, handle in (("smollm2", "chat"), ("minilm", "embedding")):
        card = httpx.get(f"{api}/v1/models/{uid}", headers={}, timeout=10).json()
        ability = card.get("model_ability", [])
        if card.get("model_type") == "embedding":
            found = "embedding"
        elif card.get("model_format", "ggmlv3") == "ggmlv3" and "chatglm" in card["model_name"]:
            found = "chatglm"
        elif "generate" in ability:
            found = "generate"
        elif "chat" in ability:
            found = "chat"
        else:
            found = "unsupported"
        assert found == handle, card
        assert isinstance(card.get("context_length"), int)
        assert isinstance(card.get("max_tokens"), int)
    assert "tools" not in httpx.get(f"{api}/v1/models/smollm2").json()["model_ability"]


def test_ragflows_xinference_rerank_and_embedding_bodies(api: str, workers: None) -> None:
    """RAGFlow posts booleans as strings and reads results[].index/relevance_score and
    meta.tokens; it embeds through the `openai` client at base_url + /v1."""
    body = {
        "model": "tiny-rerank",
        "query": QUERY,
        "return_documents": "true",
        "return_len": "true",
        "documents": DOCS,
    }
    headers = {"Content-Type": "application/json", "Authorization": "Bearer xxxxxxx"}
    reply = httpx.post(f"{api}/v1/rerank", headers=headers, json=body, timeout=60).json()
    scores = np.zeros(len(DOCS))
    for d in reply["results"]:
        scores[d["index"]] = d["relevance_score"]
    assert list(np.argsort(-scores)) == _ranking(api)
    tokens = reply["meta"]["tokens"]
    assert tokens["input_tokens"] + tokens["output_tokens"] > 0

    client = openai.OpenAI(base_url=f"{api}/v1", api_key="xxxxxxx", max_retries=0)
    out = client.embeddings.create(input=DOCS, model="minilm", encoding_format="float")
    assert [len(d.embedding) for d in out.data] == [384] * 3


# ---- rerank shapes -----------------------------------------------------------------------


def test_cohere_v1_and_v2_clients_rerank(api: str, workers: None) -> None:
    import cohere

    want = _ranking(api)
    v2 = cohere.ClientV2(api_key="unused", base_url=api)
    ranked = v2.rerank(model="tiny-rerank", query=QUERY, documents=DOCS, top_n=2)
    assert [r.index for r in ranked.results] == want[:2]
    assert ranked.results[0].relevance_score >= ranked.results[1].relevance_score

    v1 = cohere.Client(api_key="unused", base_url=api)
    ranked = v1.rerank(
        model="tiny-rerank",
        query=QUERY,
        documents=[{"text": d} for d in DOCS],
        return_documents=True,
    )
    assert [r.index for r in ranked.results] == want
    assert ranked.results[0].document.text == DOCS[want[0]]


def test_jinas_rerank_shape(api: str, workers: None) -> None:
    body = {
        "model": "tiny-rerank",
        "query": QUERY,
        "documents": DOCS,
        "top_n": 3,
        "return_documents": True,
    }
    reply = httpx.post(f"{api}/v1/rerank", json=body, timeout=60).json()
    assert reply["model"] == "tiny-rerank" and reply["usage"]["total_tokens"] > 0
    assert [r["document"]["text"] for r in reply["results"]] == [DOCS[i] for i in _ranking(api)]


# ---- model metadata ----------------------------------------------------------------------


def test_the_model_list_says_how_to_size_requests(api: str, workers: None) -> None:
    models = {m["id"]: m for m in httpx.get(f"{api}/v1/models").json()["data"]}
    minilm = models["minilm"]
    assert minilm["dimensions"] == 384 and minilm["dimensions_accepted"] == [384]
    assert minilm["context_length"] == minilm["max_input_tokens"] > 0
    assert minilm["max_inputs_per_request"] == 2048 and minilm["token_id_input"] is True
    assert models["idle-model"]["token_id_input"] is False  # the default
    assert models["tiny-rerank"]["context_length"] == 128
    assert models["smollm2"]["max_model_len"] == 1024
    assert models["smollm2"]["abilities"] == ["chat"]
    for model in models.values():
        assert "registry_entry" not in model and "path" not in json.dumps(model)


# ---- LangChain and LlamaIndex ------------------------------------------------------------


def test_token_ids_from_another_tokenizer_are_refused_with_the_langchain_setting(
    api: str, workers: None
) -> None:
    """LangChain's OpenAIEmbeddings sends tiktoken ids by default (its encoding files come
    from the internet, so this test sends the body it would): refused, naming the fix,
    by a model whose registry entry does not say it takes token ids."""
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="idle-model", input=[[9906, 1917]])
    error = info.value.body
    assert error["code"] == "token_ids_not_accepted"
    assert "check_embedding_ctx_length=False" in error["message"]


def test_langchain_embeddings_and_chat(api: str, workers: None) -> None:
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="minilm", base_url=f"{api}/v1", api_key="unused", check_embedding_ctx_length=False
    )
    vectors = embeddings.embed_documents(DOCS[:2])
    assert np.abs(np.array(vectors[0]) - _vector(api, DOCS[0])).max() < 1e-6
    assert len(embeddings.embed_query(QUERY)) == 384

    chat = ChatOpenAI(
        model="smollm2", base_url=f"{api}/v1", api_key="unused", max_tokens=8, max_retries=0
    )
    message = chat.invoke("Say hello.")
    assert isinstance(message.content, str)
    assert message.usage_metadata["output_tokens"] <= 8
    streamed = list(chat.stream("Say hello."))
    assert streamed and all(isinstance(c.content, str) for c in streamed)


def test_llamaindex_openai_like_and_embeddings(api: str, workers: None) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        model="smollm2",
        api_base=f"{api}/v1",
        api_key="unused",
        is_chat_model=True,
        context_window=1024,
        max_tokens=8,
    )
    answer = llm.chat([ChatMessage(role="user", content="Say hello.")])
    assert answer.message.role == "assistant" and isinstance(answer.message.content, str)

    embed = OpenAIEmbedding(model_name="minilm", api_base=f"{api}/v1", api_key="unused")
    vector = embed.get_text_embedding(DOCS[0])
    assert np.abs(np.array(vector) - _vector(api, DOCS[0])).max() < 1e-6


# ---- long streams ------------------------------------------------------------------------


def test_a_stream_waiting_for_its_first_token_gets_keep_alives(
    inferq_env: dict[str, str], log_dir: Path, workers: None
) -> None:
    """A stream queued behind another (the one chat slot is busy) is idle between its role
    chunk and its first token: SSE comments keep proxies from cutting it, and the
    `openai` client reads the stream as usual."""
    import threading

    env = {**inferq_env, "INFERQ_SSE_KEEPALIVE_S": "0.2"}
    proc, base = start_api(env, log_dir)
    try:
        story = [{"role": "user", "content": "Write a long story about a dragon."}]
        ahead = {"model": "smollm2", "max_tokens": 400, "stream": True, "messages": story}
        generating = threading.Event()

        def hold_the_slot() -> None:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=ahead, timeout=120) as r:
                for line in r.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        generating.set()  # its first token: the worker's one slot is taken
            generating.set()

        first = threading.Thread(target=hold_the_slot)
        first.start()
        assert generating.wait(60)
        body = {**ahead, "max_tokens": 4}
        lines: list[str] = []
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = list(r.iter_lines())
        first.join()
        assert ": keep-alive" in lines, lines[:10]
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(**body)
        assert [c for c in stream if c.choices and c.choices[0].finish_reason]
    finally:
        proc.stop()


def test_a_models_own_timeout_and_a_caller_lengthening_it() -> None:
    from api.services import Services
    from app.registry import ModelSpec
    from app.settings import Settings

    settings = Settings(request_timeout_s=120, max_request_timeout_s=900)
    services = Services.__new__(Services)
    services.settings = settings
    plain = ModelSpec(name="e", kind="embedding", engine="sentence_transformers", path="/m")
    slow = plain.model_copy(update={"request_timeout_s": 600.0})
    assert services.timeout_for(plain, None) == 120
    assert services.timeout_for(slow, None) == 600
    assert services.timeout_for(plain, 30) == 30  # shortened
    assert services.timeout_for(plain, 500) == 500  # lengthened, within the maximum
    assert services.timeout_for(slow, 5000) == 900  # never past INFERQ_MAX_REQUEST_TIMEOUT_S
