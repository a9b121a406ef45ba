"""One request followed across the API's and the worker's logs by its X-Request-Id,
in JSON lines (`INFERQ_LOG_FORMAT=json`)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.procs import Proc, start_api, start_worker


def _json_lines(proc: Proc) -> list[dict[str, Any]]:
    found = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found


def _lines_of(proc: Proc, request_id: str, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [r for r in _json_lines(proc) if r.get("request_id") == request_id]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_a_request_id_is_in_the_api_and_worker_log_lines(
    inferq_env: dict[str, str], log_dir: Path
) -> None:
    env = {
        **inferq_env,
        "INFERQ_LOG_FORMAT": "json",
        "INFERQ_KEY_PREFIX": f"{inferq_env['INFERQ_KEY_PREFIX']}-ids",
    }
    worker = start_worker(env, log_dir, "minilm")
    api, base = start_api(env, log_dir, loglevel="info")
    try:
        body = {"model": "minilm", "input": ["followed"]}
        given = httpx.post(
            f"{base}/v1/embeddings", json=body, headers={"X-Request-Id": "trace-7f3a"}, timeout=60
        )
        assert given.status_code == 200 and given.headers["X-Request-Id"] == "trace-7f3a"
        made = httpx.post(f"{base}/v1/embeddings", json=body, timeout=60)
        made_id = made.headers["X-Request-Id"]
        assert len(made_id) == 32 and made_id != "trace-7f3a"
        # An id that could forge log lines or flood them is replaced.
        odd = httpx.post(
            f"{base}/v1/embeddings", json=body, headers={"X-Request-Id": "x" * 300}, timeout=60
        )
        assert odd.headers["X-Request-Id"] != "x" * 300

        for request_id in ("trace-7f3a", made_id):
            (api_line,) = _lines_of(api, request_id)
            assert api_line["message"].startswith("POST /v1/embeddings 200")
            assert {"time", "level", "name"} <= set(api_line)
            worker_lines = _lines_of(worker, request_id)
            assert any("minilm answered in" in r["message"] for r in worker_lines), worker_lines
    finally:
        api.stop()
        worker.stop()
