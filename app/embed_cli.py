"""`inferq embed INPUT --model NAME --out OUTPUT`: a corpus job from the command line.

It uploads the file, starts a corpus job on the API, draws a progress line
from the job's `progress` fields until it ends, and downloads the result. The
work itself runs on the cluster's workers, not here; the CLI only talks HTTP.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

OUTPUT_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet", ".npy": "npy"}


def output_format_for(path: Path, given: str | None) -> str:
    if given:
        return given
    return OUTPUT_SUFFIXES.get(path.suffix.lower(), "jsonl")


def _bar(progress: dict[str, Any], width: int = 30) -> str:
    total = progress.get("texts_total") or 0
    done = progress.get("texts_done") or 0
    filled = int(width * done / total) if total else 0
    rate = progress.get("texts_per_s")
    eta = progress.get("eta_s")
    rate_text = f"{rate:,.1f} texts/s" if rate else "-- texts/s"
    eta_text = f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None else "ETA --:--"
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}  {rate_text}  {eta_text}"


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise SystemExit(f"inferq embed: {response.status_code}: {message}")
    body: dict[str, Any] = response.json()
    return body


def run_embed(
    base_url: str,
    api_key: str | None,
    source: Path,
    model: str,
    out: Path,
    *,
    output_format: str | None = None,
    text_field: str | None = None,
    id_field: str | None = None,
    shard_size: int | None = None,
    poll_s: float = 0.5,
    stream: TextIO = sys.stderr,
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    fmt = output_format_for(out, output_format)
    with httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=600) as http:
        with source.open("rb") as handle:
            uploaded = _check(
                http.post(
                    "/v1/files",
                    data={"purpose": "corpus"},
                    files={"file": (source.name, handle, "application/octet-stream")},
                )
            )
        request: dict[str, Any] = {"file_id": uploaded["id"], "model": model, "output_format": fmt}
        for key, value in (
            ("text_field", text_field),
            ("id_field", id_field),
            ("shard_size", shard_size),
        ):
            if value is not None:
                request[key] = value
        job = _check(http.post("/v1/corpus-jobs", json=request))
        interactive = stream.isatty()
        last_line = ""
        while job["status"] in ("validating", "in_progress", "assembling"):
            time.sleep(poll_s)
            job = _check(http.get(f"/v1/corpus-jobs/{job['id']}"))
            line = f"{job['status']:<11} {_bar(job['progress'])}"
            if interactive:
                stream.write("\r" + line.ljust(len(last_line)))
            elif line != last_line:
                stream.write(line + "\n")
            stream.flush()
            last_line = line
        if interactive:
            stream.write("\n")
        if job["status"] != "completed":
            error = (job.get("error") or {}).get("message", "")
            raise SystemExit(f"inferq embed: the job ended {job['status']}: {error}")
        _download(http, job["output_file_id"], out)
        if job.get("ids_file_id"):
            _download(http, job["ids_file_id"], out.with_name(out.name + ".ids.jsonl"))
        stream.write(f"wrote {job['progress']['texts_total']:,} vectors to {out}\n")
        return job


def _download(http: httpx.Client, file_id: str, target: Path) -> None:
    tmp = target.with_name(target.name + ".part")
    with http.stream("GET", f"/v1/files/{file_id}/content") as response:
        if response.status_code >= 400:
            response.read()
            _check(response)
        with tmp.open("wb") as handle:
            for chunk in response.iter_bytes(1024 * 1024):
                handle.write(chunk)
    tmp.replace(target)
