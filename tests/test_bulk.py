"""Files, OpenAI batches and corpus embedding jobs end to end, on real processes."""

from __future__ import annotations

import contextlib
import io
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.procs import ROOT, Proc, alive_replica_count, start_api, start_worker
from tests.stack import KEY_A, KEY_B, Stack, running_stack

UPLOAD_LIMIT = 4 * 1024 * 1024
LINE_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def stack(
    inferq_env: dict[str, str],
    database_urls: Callable[[str, str], str],
    log_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    files = tmp_path_factory.mktemp("files")
    with running_stack(
        inferq_env,
        "bulk",
        database_urls("sqlite", "bulk"),
        log_dir,
        ("minilm", "smollm2"),
        {
            "INFERQ_FILES_DIR": str(files),
            "INFERQ_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
            "INFERQ_BULK_MAX_LINE_BYTES": str(LINE_LIMIT),
        },
    ) as built:
        yield built


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key=KEY_A, max_retries=0, timeout=60)


def _jsonl(rows: list[Any]) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def _wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_files_api_round_trip_and_limits(client: openai.OpenAI, stack: Stack) -> None:
    payload = b"hello\nworld\n"
    created = client.files.create(file=("texts.txt", io.BytesIO(payload)), purpose="batch")
    assert created.object == "file" and created.bytes == len(payload)
    assert created.filename == "texts.txt" and created.purpose == "batch"
    assert client.files.retrieve(created.id).id == created.id
    assert created.id in {f.id for f in client.files.list()}
    assert client.files.content(created.id).content == payload
    other = openai.OpenAI(base_url=f"{stack.base}/v1", api_key=KEY_B, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(created.id)
    assert client.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(
            file=("big.jsonl", io.BytesIO(b"x" * (UPLOAD_LIMIT + 1024))), purpose="batch"
        )
    assert too_big.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.txt", io.BytesIO(b"a")), purpose="fine-tune")


def test_openai_batch_runs_good_lines_and_reports_bad_ones(client: openai.OpenAI) -> None:
    good = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "minilm", "input": [f"batch text {i}", f"and another {i}"]},
        }
        for i in range(12)
    ]
    bad = [
        "{this is not json",
        {**good[0], "body": {"model": "minilm", "input": "dup"}},  # duplicate custom_id
        {**good[1], "custom_id": "wrong-url", "url": "/v1/images/generations"},
        {**good[2], "custom_id": "other-model", "body": {"model": "smollm2", "input": "x"}},
        {**good[3], "custom_id": "no-input", "body": {"model": "minilm"}},
        {**good[4], "custom_id": "x" * 513},  # wider than the job store's column
        {**good[5], "custom_id": "nul\u0000id"},  # PostgreSQL cannot store it
    ]
    rows: list[Any] = [*good[:6], *bad, *good[6:]]
    uploaded = client.files.create(file=("batch.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={"suite": "bulk"},
    )
    assert batch.status == "validating"
    done = _wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == len(rows)
    assert done.request_counts.completed == len(good)
    assert done.request_counts.failed == len(bad)
    assert done.metadata == {"suite": "bulk"}
    assert done.completed_at and done.in_progress_at and done.finalizing_at

    output = _lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == [g["custom_id"] for g in good]
    for line, request in zip(output, good, strict=True):
        assert line["error"] is None and line["response"]["status_code"] == 200
        sync = client.embeddings.create(**request["body"])
        got = [d["embedding"] for d in line["response"]["body"]["data"]]
        np.testing.assert_allclose(got, [d.embedding for d in sync.data], atol=1e-5)
        assert line["response"]["body"]["usage"]["prompt_tokens"] == sync.usage.prompt_tokens

    errors = _lines(client, done.error_file_id)
    assert len(errors) == len(bad)
    codes = sorted(e["error"]["code"] for e in errors)
    assert codes == sorted(
        [
            "invalid_json",
            "duplicate_custom_id",
            "invalid_url",
            "model_mismatch",
            "invalid_body",
            "invalid_custom_id",
            "invalid_custom_id",
        ]
    )
    assert {e["custom_id"] for e in errors} >= {"wrong-url", "other-model", "no-input"}


def test_chat_batch_bodies_equal_the_sync_responses(client: openai.OpenAI) -> None:
    bodies = [
        {
            "model": "smollm2",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 10,
            "temperature": 0,
        }
        for question in ("Name a fruit.", "Name a planet.")
    ]
    rows = [
        {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        for i, b in enumerate(bodies)
    ]
    uploaded = client.files.create(file=("chat.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = _wait_batch(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    for line, body in zip(_lines(client, done.output_file_id), bodies, strict=True):
        sync = client.chat.completions.create(**body)
        got = line["response"]["body"]
        assert got["choices"][0]["message"]["content"] == sync.choices[0].message.content
        assert got["usage"]["completion_tokens"] == sync.usage.completion_tokens


def test_cancelling_a_batch_keeps_partial_output_and_consistent_counts(
    client: openai.OpenAI,
) -> None:
    rows = [
        {
            "custom_id": f"slow-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2",
                "messages": [{"role": "user", "content": f"Tell a long story number {i}."}],
                "max_tokens": 60,
                "temperature": 0,
            },
        }
        for i in range(30)
    ]
    uploaded = client.files.create(file=("slow.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _wait_batch(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    output = _lines(client, done.output_file_id)
    errors = _lines(client, done.error_file_id)
    counts = done.request_counts
    assert counts.total == len(rows)
    assert counts.completed == len(output) >= 2
    assert counts.failed == len(errors)
    assert counts.completed + counts.failed < counts.total
    assert len({line["custom_id"] for line in output}) == len(output)


def _corpus(path: Path, count: int) -> list[str]:
    texts = [f"corpus line {i}: " + " ".join(["word"] * (i % 17 + 1)) for i in range(count)]
    with path.open("w") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"doc": f"d{i:05d}", "body": text}) + "\n")
    return texts


def _embed(stack: Stack, args: list[str]) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "app", "embed", *args, "--api", stack.base, "--api-key", KEY_A]
    return subprocess.Popen(
        argv, env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _read_jsonl_vectors(path: Path) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["id"] for r in rows], np.array([r["embedding"] for r in rows])


def test_inferq_embed_writes_one_vector_per_input_in_order(
    stack: Stack, tmp_path: Path, reference_model: Any
) -> None:
    source = tmp_path / "corpus.jsonl"
    texts = _corpus(source, 2500)
    out = tmp_path / "vectors.jsonl"
    proc = _embed(
        stack,
        [
            str(source),
            "--model",
            "minilm",
            "--out",
            str(out),
            "--text-field",
            "body",
            "--id-field",
            "doc",
            "--shard-size",
            "300",
        ],
    )
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert "2,500/2,500" in log and "texts/s" in log
    ids, vectors = _read_jsonl_vectors(out)
    assert ids == [f"d{i:05d}" for i in range(len(texts))]
    sample = list(range(0, len(texts), 25))
    expected = reference_model.encode([texts[i] for i in sample], normalize_embeddings=True)
    np.testing.assert_allclose(vectors[sample], expected, atol=1e-4)


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_embed_reads_text_and_csv_and_writes_npy_and_parquet(
    stack: Stack, tmp_path: Path, reference_model: Any, fmt: str
) -> None:
    texts = [f"short text {i} " + "x" * (i % 9) for i in range(240)]
    if fmt == "npy":
        source = tmp_path / "plain.txt"
        source.write_text("\n".join(texts) + "\n")
        extra: list[str] = []
    else:
        source = tmp_path / "table.csv"
        source.write_text("key,text\n" + "".join(f"k{i},{t}\n" for i, t in enumerate(texts)))
        extra = ["--id-field", "key"]
    out = tmp_path / f"out.{fmt}"
    proc = _embed(stack, [str(source), "--model", "minilm", "--out", str(out), *extra])
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    expected = reference_model.encode(texts, normalize_embeddings=True)
    if fmt == "npy":
        vectors = np.load(out)
        ids = [json.loads(line) for line in (tmp_path / "out.npy.ids.jsonl").read_text().split()]
        assert ids == [str(i) for i in range(len(texts))]
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        assert table.column("id").to_pylist() == [f"k{i}" for i in range(len(texts))]
        vectors = np.array(table.column("embedding").to_pylist())
    np.testing.assert_allclose(vectors, expected, atol=1e-4)


def test_corpus_job_survives_sigkill_of_a_worker(
    stack: Stack, tmp_path: Path, log_dir: Path
) -> None:
    source = tmp_path / "victim.jsonl"
    texts = _corpus(source, 2400)
    out = tmp_path / "victim.jsonl.out"
    first = start_worker(stack.env, log_dir, "minilm-victim")
    second: Proc | None = None
    proc = _embed(
        stack,
        [
            str(source),
            "--model",
            "minilm-victim",
            "--out",
            str(out),
            "--format",
            "jsonl",
            "--text-field",
            "body",
            "--id-field",
            "doc",
            "--shard-size",
            "200",
        ],
    )
    try:
        deadline = time.monotonic() + 120
        while stack.worker_stats(first, "minilm-victim").get("jobs_succeeded", 0) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, first.tail()
            time.sleep(0.2)
        first.kill()
        while alive_replica_count(stack.env, "minilm-victim"):
            time.sleep(0.2)
        second = start_worker(stack.env, log_dir, "minilm-victim", replica=1)
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
    finally:
        if proc.poll() is None:
            proc.kill()
        first.kill()
        if second:
            second.stop()
    ids, vectors = _read_jsonl_vectors(out)
    assert ids == [f"d{i:05d}" for i in range(len(texts))]  # no gap, no duplicate
    assert vectors.shape == (len(texts), 384)


def test_corpus_job_resumes_after_the_api_and_every_worker_restart(
    stack: Stack, tmp_path: Path, log_dir: Path
) -> None:
    source = tmp_path / "resume.jsonl"
    texts = _corpus(source, 2000)
    first = start_worker(stack.env, log_dir, "minilm-victim")
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=stack.base, headers=headers, timeout=60) as http:
        with source.open("rb") as handle:
            file_id = http.post(
                "/v1/files", data={"purpose": "corpus"}, files={"file": ("r.jsonl", handle)}
            ).json()["id"]
        job = http.post(
            "/v1/corpus-jobs",
            json={
                "file_id": file_id,
                "model": "minilm-victim",
                "text_field": "body",
                "id_field": "doc",
                "shard_size": 200,
            },
        ).json()
        deadline = time.monotonic() + 120
        while http.get(f"/v1/corpus-jobs/{job['id']}").json()["progress"]["shards_done"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    # Everything stops at once: the API and the only worker.
    first.kill()
    stack.api.kill()
    while alive_replica_count(stack.env, "minilm-victim"):
        time.sleep(0.2)
    stack.api, stack.base = start_api(stack.env, log_dir)
    second = start_worker(stack.env, log_dir, "minilm-victim", replica=1)
    try:
        with httpx.Client(base_url=stack.base, headers=headers, timeout=60) as http:
            deadline = time.monotonic() + 240
            while (state := http.get(f"/v1/corpus-jobs/{job['id']}").json())["status"] not in (
                "completed",
                "failed",
                "cancelled",
            ):
                assert time.monotonic() < deadline, state
                time.sleep(0.3)
            assert state["status"] == "completed", state
            content = http.get(f"/v1/files/{state['output_file_id']}/content").text
        rows = [json.loads(line) for line in content.splitlines()]
        assert [r["id"] for r in rows] == [f"d{i:05d}" for i in range(len(texts))]
        redone = int(stack.worker_stats(second, "minilm-victim").get("jobs_succeeded", 0))
        assert redone <= state["progress"]["shards_total"] - 3  # finished shards not redone
    finally:
        second.stop()


# ---- one owner's bad file never holds back another's work ----------------------------


def _upload(http: httpx.Client, name: str, data: bytes, purpose: str) -> str:
    resp = http.post("/v1/files", data={"purpose": purpose}, files={"file": (name, data)})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def _wait_corpus(http: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (state := http.get(f"/v1/corpus-jobs/{job_id}").json())["status"] not in (
        "completed",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, state
        time.sleep(0.3)
    return dict(state)


def test_poison_files_end_alone_and_another_owners_batch_still_runs(stack: Stack) -> None:
    """A line nested 5,000 deep, a line over the length bound, a corpus whose JSON
    nesting breaks the parser and a batch whose file vanished from disk: each ends as
    an error line or a failed item, and another owner's batch behind them completes."""
    line = {"custom_id": "ok", "method": "POST", "url": "/v1/embeddings"}
    good = {**line, "body": {"model": "minilm", "input": "fine"}}
    rows = [
        good,
        "[" * 5000,
        {**line, "custom_id": "long", "body": {"model": "minilm", "input": "y" * LINE_LIMIT}},
        {**good, "custom_id": "after"},
    ]
    with stack.http() as http:
        poisoned = http.post(
            "/v1/batches",
            json={
                "input_file_id": _upload(http, "p.jsonl", _jsonl(rows), "batch"),
                "endpoint": "/v1/embeddings",
                "completion_window": "24h",
            },
        ).json()
        corpus = http.post(
            "/v1/corpus-jobs",
            json={
                "file_id": _upload(http, "c.jsonl", b'{"text": "a"}\n' + b"[" * 5000, "corpus"),
                "model": "minilm",
            },
        ).json()
        vanished_id = _upload(http, "v.jsonl", _jsonl([good]), "batch")
        for path in Path(stack.env["INFERQ_FILES_DIR"]).rglob(vanished_id):
            path.unlink()
        vanished = http.post(
            "/v1/batches",
            json={
                "input_file_id": vanished_id,
                "endpoint": "/v1/embeddings",
                "completion_window": "24h",
            },
        ).json()
    client = openai.OpenAI(base_url=f"{stack.base}/v1", api_key=KEY_A, max_retries=0)
    other = openai.OpenAI(base_url=f"{stack.base}/v1", api_key=KEY_B, max_retries=0)
    uploaded = other.files.create(file=("b.jsonl", io.BytesIO(_jsonl([good]))), purpose="batch")
    theirs = other.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    assert _wait_batch(other, theirs.id, timeout=60).status == "completed"

    done = _wait_batch(client, poisoned["id"])
    assert done.status == "completed", done
    errors = sorted(
        (e["error"]["message"].split(":")[0], e["custom_id"], e["error"])
        for e in _lines(client, done.error_file_id)
    )
    assert [(line, custom_id) for line, custom_id, _ in errors] == [
        ("line 2", None),
        ("line 3", None),
    ], errors
    nested, long_line = (error for _, _, error in errors)
    assert nested["code"] == "invalid_json" and "nested" in nested["message"], nested
    assert long_line["code"] == "line_too_long", long_line
    assert f"at most {LINE_LIMIT}" in long_line["message"], long_line
    assert [r["custom_id"] for r in _lines(client, done.output_file_id)] == ["ok", "after"]
    assert _wait_batch(client, vanished["id"]).status == "failed"
    with stack.http() as http:
        state = _wait_corpus(http, corpus["id"])
    assert state["status"] == "failed" and state["error"]["code"] == "invalid_file", state


def test_shards_of_a_corpus_that_fails_part_way_never_run(stack: Stack) -> None:
    """Shards are written in pages while the file is read; none may be sent before the
    whole file was read. A record near the end without text fails the job after more
    than 500 shards were written: not one of them runs."""
    before = stack.settled_stats(stack.workers["minilm"], "minilm")
    records = [json.dumps({"text": f"t{i}"}) for i in range(1300)] + ['{"other": 1}']
    with stack.http() as http:
        job = http.post(
            "/v1/corpus-jobs",
            json={
                "file_id": _upload(http, "f.jsonl", "\n".join(records).encode(), "corpus"),
                "model": "minilm",
                "shard_size": 2,
            },
        ).json()
        state = _wait_corpus(http, job["id"])
        assert state["status"] == "failed", state
        time.sleep(3)  # several sweeps: a sendable shard would be sent by now
    after = stack.settled_stats(stack.workers["minilm"], "minilm")
    ran = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("jobs_")}
    assert not any(ran.values()), ran


def test_a_corpus_of_600_shards_completes(stack: Stack) -> None:
    texts = [f"short text {i}" for i in range(1200)]
    records = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    with stack.http() as http:
        job = http.post(
            "/v1/corpus-jobs",
            json={
                "file_id": _upload(http, "many.jsonl", records.encode(), "corpus"),
                "model": "minilm",
                "shard_size": 2,
            },
        ).json()
        state = _wait_corpus(http, job["id"], timeout=300)
        assert state["status"] == "completed", state
        assert state["progress"]["shards_total"] == 600
        content = http.get(f"/v1/files/{state['output_file_id']}/content").text
    assert len(content.splitlines()) == len(texts)


def test_a_chunked_upload_is_cut_off_as_it_passes_the_limit(stack: Stack) -> None:
    """No Content-Length: the API must count the bytes as they come and answer 413 once
    they pass INFERQ_MAX_UPLOAD_BYTES, not spool the whole stream to disk first."""
    host, port = stack.base.removeprefix("http://").split(":")
    boundary = "inferqboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"'
        "\r\nContent-Type: application/octet-stream\r\n\r\n"
    ).encode()
    piece = b"x" * (256 * 1024)
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    endless = 64 * UPLOAD_LIMIT
    sent, answer, reset = 0, b"", False
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY_A}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        pending = b"%x\r\n%s\r\n" % (len(head), head)
        stalled = time.monotonic() + 10
        try:
            while sent < endless and time.monotonic() < stalled:
                readable, writable, _ = select.select([sock], [sock], [], 1)
                if readable:
                    break
                if writable:
                    done = sock.send(pending or chunk)
                    pending = (pending or chunk)[done:]
                    sent += done
                    stalled = time.monotonic() + 10
            while b"\r\n\r\n" not in answer and (more := sock.recv(65536)):
                answer += more
        except (BrokenPipeError, ConnectionResetError):
            reset = True  # the server closed with the rest unread: a reset may beat its 413
    assert answer.startswith(b"HTTP/1.1 413") or (reset and not answer), answer[:200]
    assert not answer or b"INFERQ_MAX_UPLOAD_BYTES" in answer
    # The server stopped reading near the limit (kernel buffers hold a few MB more).
    assert sent < UPLOAD_LIMIT + 16 * 1024 * 1024, f"{sent} bytes went in before the 413"


@contextlib.contextmanager
def _api(stack: Stack, **settings: str) -> Iterator[httpx.Client]:
    """Another API process on the stack's database and files, with other settings, and a
    key of its own (so its owner starts with no files)."""
    env = {**stack.env, "INFERQ_API_KEYS": "quota-key", **settings}
    proc, base = start_api(env, stack.log_dir)
    try:
        with httpx.Client(
            base_url=base, headers={"Authorization": "Bearer quota-key"}, timeout=60
        ) as http:
            yield http
    finally:
        proc.stop()


def test_uploads_stay_within_the_owners_quota(stack: Stack) -> None:
    with _api(
        stack, INFERQ_FILES_MAX_PER_OWNER="2", INFERQ_FILES_MAX_BYTES_PER_OWNER="1000"
    ) as http:
        first = _upload(http, "a.txt", b"a" * 600, "corpus")
        over = http.post(
            "/v1/files", data={"purpose": "corpus"}, files={"file": ("b.txt", b"b" * 600)}
        )
        assert over.status_code == 413, over.text
        assert over.json()["error"]["code"] == "storage_quota_exceeded"
        assert "INFERQ_FILES_MAX_BYTES_PER_OWNER" in over.json()["error"]["message"]
        _upload(http, "c.txt", b"c" * 300, "corpus")
        third = http.post("/v1/files", data={"purpose": "corpus"}, files={"file": ("d", b"d")})
        assert third.status_code == 413 and "2 files" in third.json()["error"]["message"]
        listed = http.get("/v1/files").json()["data"]
        assert sorted(f["bytes"] for f in listed) == [300, 600]  # the refused left nothing
        assert http.delete(f"/v1/files/{first}").status_code == 200
        _upload(http, "e.txt", b"e" * 600, "corpus")


def test_files_expire_after_the_time_their_upload_asked_for(stack: Stack) -> None:
    import sqlalchemy as sa

    with stack.http() as http:
        response = http.post(
            "/v1/files",
            data={
                "purpose": "batch",
                "expires_after[anchor]": "created_at",
                "expires_after[seconds]": "3600",
            },
            files={"file": ("soon.jsonl", b"{}\n")},
        )
        assert response.status_code == 200, response.text
        record = response.json()
        assert record["expires_at"] == record["created_at"] + 3600
        for seconds in ("60", "x", "99999999"):
            bad = http.post(
                "/v1/files",
                data={"purpose": "batch", "expires_after[anchor]": "created_at",
                      "expires_after[seconds]": seconds},
                files={"file": ("bad.jsonl", b"{}\n")},
            )  # fmt: skip
            assert bad.status_code == 400 and "expires_after" in bad.json()["error"]["param"]
        path = next(Path(stack.env["INFERQ_FILES_DIR"]).rglob(record["id"]))
        engine = sa.create_engine(stack.env["INFERQ_DATABASE_URL"])
        with engine.begin() as conn:  # an hour later
            conn.execute(
                sa.text("UPDATE files SET expires_at = '2000-01-01 00:00:00' WHERE id = :id"),
                {"id": record["id"]},
            )
        engine.dispose()
        deadline = time.monotonic() + 30
        while http.get(f"/v1/files/{record['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the expired file was not deleted"
            time.sleep(0.5)
    assert not path.exists()


def test_an_ended_corpus_jobs_working_files_are_deleted(stack: Stack) -> None:
    work = Path(stack.env["INFERQ_FILES_DIR"]) / "corpus"
    with stack.http() as http:
        done = http.post(
            "/v1/corpus-jobs",
            json={"file_id": _upload(http, "w.txt", b"one\ntwo\n", "corpus"), "model": "minilm"},
        ).json()
        failed = http.post(
            "/v1/corpus-jobs",
            json={"file_id": _upload(http, "w.jsonl", b'{"no": 1}\n', "corpus"), "model": "minilm"},
        ).json()
        assert _wait_corpus(http, done["id"])["status"] == "completed"
        assert _wait_corpus(http, failed["id"])["status"] == "failed"
        deadline = time.monotonic() + 30
        while (work / done["id"]).exists() or (work / failed["id"]).exists():
            assert time.monotonic() < deadline, sorted(p.name for p in work.iterdir())
            time.sleep(0.5)
        output = http.get(f"/v1/corpus-jobs/{done['id']}").json()["output_file_id"]
        assert http.get(f"/v1/files/{output}/content").status_code == 200
