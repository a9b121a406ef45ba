"""Chat on vLLM: the worker runs vLLM's own OpenAI server as its child and relays to it.

Why a child server and not vLLM inside the worker: the server already has
continuous batching, the tool-call and reasoning parsers, guided decoding,
logprobs, `n`, its tokenizer and chat-template handling, all matching the vLLM
version installed, and Vastai's VACC build ships a vLLM of its own with pins
that are not inferq's. So the server is started from an interpreter of its own
(`python:` in the registry, e.g. `.venv-vllm/bin/python`, or a whole
`command:`), pinned to the worker's devices through the environment the worker
was started with, on a loopback port; the worker holds up to `max_num_seqs`
messages and forwards each request body to it (app/engines/openai_relay.py).

Nothing here imports vLLM: the registry rules and the flag mapping are plain
Python, and the server is another process.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.devices import VACC_DIES_ENV
from app.engines.base import RelayEngine
from app.engines.openai_relay import OpenAIRelay

if TYPE_CHECKING:
    from app.registry import ModelSpec

log = logging.getLogger("inferq.vllm")

#: Model directories of the vendor's deployment guide -> the served model name it uses.
FAMILIES: list[tuple[str, str]] = [
    (r"deepseek-v3(-0324|\.1)?([-_].*)?$", "deepseek-v3"),
    (r"deepseek-r1(-0528)?([-_].*)?$", "deepseek-r1"),
    (r"qwen3-30b-a3b(-(instruct|thinking)-2507)?-fp8$", "qwen3"),
]
DEEPSEEK_TP = 32
DEEPSEEK_MAX_MODEL_LEN = 65536
QWEN3_TP = (2, 4)

#: Sequences one replica runs at once when the registry does not say: the worker
#: holds this many messages, and the server is told the same number.
DEFAULT_MAX_NUM_SEQS = 256
#: The vLLM module that serves the OpenAI API (the `vllm` console script may be missing:
#: the CPU build's distribution is not named `vllm`).
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: A DeepSeek-V3/R1 load across 32 dies takes long; a server not healthy by then failed.
DEFAULT_STARTUP_TIMEOUT_S = 3600.0

#: Registry option -> vLLM server flag, for options that take a value.
VALUE_FLAGS: dict[str, str] = {
    "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "dtype": "--dtype",
    "quantization": "--quantization",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "kv_cache_dtype": "--kv-cache-dtype",
    "reasoning_parser": "--reasoning-parser",
    "tool_call_parser": "--tool-call-parser",
    "chat_template": "--chat-template",
    "seed": "--seed",
}
#: Registry option -> vLLM flag, for switches (true: the flag is given).
SWITCH_FLAGS: dict[str, str] = {
    "enable_prefix_caching": "--enable-prefix-caching",
    "trust_remote_code": "--trust-remote-code",
    "enforce_eager": "--enforce-eager",
}
#: Options that shape the server process rather than become flags.
PROCESS_OPTIONS = frozenset(
    {
        *("python", "command", "env", "port", "extra_args", "startup_timeout_s"),
        *("mtp", "speculative_config", "enable_auto_tool_choice"),
    }
)
KNOWN_OPTIONS = frozenset(VALUE_FLAGS) | frozenset(SWITCH_FLAGS) | PROCESS_OPTIONS


def family_of(path: str) -> str | None:
    import re

    name = path.rstrip("/").rsplit("/", 1)[-1]
    return next((f for pattern, f in FAMILIES if re.match(pattern, name, re.I)), None)


def device_kinds_for(path: str, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The vendor guide's DeepSeek and Qwen3 models need accelerators; any other model
    may also run on vLLM's CPU build."""
    if family_of(path) is None:
        return kinds
    return tuple(k for k in kinds if k != "cpu")


def validate_spec(spec: ModelSpec) -> None:
    """The vendor guide's rules, and options this engine knows; raises ValueError."""
    unknown = sorted(set(spec.options) - KNOWN_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown vllm option(s) {', '.join(unknown)}; pass other server flags "
            "through options.extra_args"
        )
    if "python" in spec.options and "command" in spec.options:
        raise ValueError("options.python and options.command exclude each other")
    extra = spec.options.get("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str | int | float) for a in extra):
        raise ValueError("options.extra_args is a list of strings (server flags and values)")
    env = spec.options.get("env", {})
    if not isinstance(env, dict):
        raise ValueError("options.env maps environment variable names to values")
    family = family_of(spec.path)
    if family is None:
        return
    if spec.name != family:
        raise ValueError(f"a {family} model directory is served under the name {family!r}")
    tps = {p.tp for p in spec.placements}
    max_len = spec.options.get("max_model_len")
    if family in ("deepseek-v3", "deepseek-r1"):
        if tps != {DEEPSEEK_TP}:
            raise ValueError(f"{family} runs with tp {DEEPSEEK_TP}, not {sorted(tps)}")
        if max_len is None or int(max_len) > DEEPSEEK_MAX_MODEL_LEN:
            raise ValueError(
                f"{family} needs options.max_model_len of at most {DEEPSEEK_MAX_MODEL_LEN}"
            )
    elif not tps <= set(QWEN3_TP):
        raise ValueError(f"qwen3 (30B-A3B FP8) runs with tp 2 or 4, not {sorted(tps)}")


def max_num_seqs(options: dict[str, Any]) -> int:
    return int(options.get("max_num_seqs", DEFAULT_MAX_NUM_SEQS))


def _program(options: dict[str, Any]) -> list[str]:
    """The server program: a whole `command`, or `python -m <vLLM's server module>`.

    A relative `python` path is taken from the working directory (where an
    operator typed `inferq worker`), like any relative path on a command line.
    """
    command = options.get("command")
    if command:
        return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    python = str(options.get("python") or sys.executable)
    if os.sep in python and not os.path.isabs(python):
        python = os.path.abspath(python)
    return [python, "-m", SERVER_MODULE]


def server_argv(
    spec: ModelSpec, devices: list[str], port: int, device_kind: str = "cuda"
) -> list[str]:
    """The command line of one replica's server on `devices` (its tensor-parallel group).

    On CPU the devices are cores the worker is pinned to, not a tensor-parallel group.
    """
    options = spec.options
    tp = 1 if device_kind == "cpu" else max(1, len(devices))
    argv = [
        *_program(options),
        "--model",
        str(spec.resolved_path()),
        "--served-model-name",
        spec.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(tp),
        "--max-num-seqs",
        str(max_num_seqs(options)),
    ]
    for key, flag in VALUE_FLAGS.items():
        if key in options and key != "max_num_seqs":
            argv += [flag, str(options[key])]
    for key, flag in SWITCH_FLAGS.items():
        if options.get(key):
            argv.append(flag)
    if options.get("tool_call_parser") and options.get("enable_auto_tool_choice", True):
        argv.append("--enable-auto-tool-choice")
    speculative = options.get("speculative_config")
    if options.get("mtp") and speculative is None:
        # DeepSeek multi-token prediction is vLLM's speculative decoding with the
        # model's own MTP layers as the draft.
        speculative = {"method": "deepseek_mtp", "num_speculative_tokens": int(options["mtp"])}
    if speculative is not None:
        argv += ["--speculative-config", json.dumps(speculative, separators=(",", ":"))]
    argv += [str(a) for a in options.get("extra_args", [])]
    return argv


def server_env(spec: ModelSpec) -> dict[str, str]:
    """The worker's environment (device pinning included) plus the registry's `env`.

    On NVIDIA the worker's CUDA_VISIBLE_DEVICES pins the server. On VACC the dies
    are also given as VACC_VISIBLE_DEVICES; which variable Vastai's vLLM build
    reads has not been checked on hardware, so `env:` in the registry can set the
    one it does (and it wins over both).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    dies = os.environ.get(VACC_DIES_ENV)
    if dies is not None:
        env[VACC_DIES_ENV] = dies
        env.setdefault("VACC_VISIBLE_DEVICES", dies)
    # The server is its own program: inferq's other settings are not its business.
    env.update({str(k): str(v) for k, v in spec.options.get("env", {}).items()})
    return env


class ServerFailed(RuntimeError):
    """The server did not come up, or it stopped while serving."""


class VllmServer:
    """vLLM's OpenAI server as a child process: start, wait for health, watch, stop.

    It runs in a session of its own, so stopping it reaches vLLM's own children
    (engine core, tensor-parallel workers) as one process group, and under
    `app.child_guard`, so it is signalled when the worker dies without saying
    goodbye (SIGKILL, OOM): no server outlives its worker.
    """

    def __init__(self, argv: list[str], env: dict[str, str], port: int) -> None:
        self.argv = argv
        self.env = env
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._last_lines: collections.deque[str] = collections.deque(maxlen=30)
        self._stopping = False

    def start(self) -> None:
        # Started from the worker's main thread: the parent-death signal fires when
        # the thread that started the child ends, and the main thread lives longest.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.child_guard", str(os.getpid()), *self.argv],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._copy_output, name="vllm-output", daemon=True).start()

    def _copy_output(self) -> None:
        """The server's log goes to the worker's log, and its last lines are kept for
        the reason a failed start or a crash is reported with."""
        assert self.process is not None and self.process.stdout is not None
        # The process's own stderr: Celery turns sys.stderr into a logger of its own.
        out = sys.__stderr__ or sys.stderr
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._last_lines.append(line)
            # Draining must go on whatever happens to our stderr: a full pipe would
            # block the server's logging, and with it the server.
            with contextlib.suppress(Exception):
                out.write(f"[vllm] {line}\n")
                out.flush()

    def last_words(self) -> str:
        lines = [line for line in self._last_lines if line.strip()]
        return " | ".join(lines[-3:])[-1000:]

    def exit_text(self) -> str:
        code = self.process.poll() if self.process else None
        if code is not None and code < 0:
            return f"killed by signal {-code}"
        return f"exit code {code}"

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                self.stop()  # what it started (engine core, TP workers) goes too
                raise ServerFailed(
                    f"the vLLM server stopped while starting ({self.exit_text()}): "
                    f"{self.last_words()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(f"the vLLM server was not healthy within {timeout:g}s")
            time.sleep(0.5)

    def max_model_len(self) -> int | None:
        """The context the server chose (vLLM's `/v1/models` reports it as `max_model_len`),
        for a registry entry that does not declare it."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=5) as resp:
                models = json.load(resp).get("data") or []
        except (OSError, ValueError, urllib.error.URLError) as exc:
            log.warning("could not read the vLLM server's model card: %s", exc)
            return None
        lengths = [m.get("max_model_len") for m in models if isinstance(m, dict)]
        return next((int(n) for n in lengths if isinstance(n, int) and n > 0), None)

    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Call `on_exit(reason)` from a thread if the server stops while it should serve."""

        def wait() -> None:
            assert self.process is not None
            self.process.wait()
            if not self._stopping:
                on_exit(f"the vLLM server stopped ({self.exit_text()}): {self.last_words()}")

        threading.Thread(target=wait, name="vllm-watch", daemon=True).start()

    def stop(self, grace_s: float = 30.0) -> None:
        self._stopping = True
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("the vLLM server did not stop in %.0fs; killing it", grace_s)
        # Whatever of its process group is left (engine core, TP workers) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmEngine(RelayEngine):
    """One replica: a vLLM server child and the relay that forwards requests to it."""

    def __init__(self, server: VllmServer, relay: OpenAIRelay, spec: ModelSpec) -> None:
        self.server = server
        self.relay = relay
        self.parallel = max_num_seqs(spec.options)
        self.context_length = int(spec.options.get("max_model_len", 0)) or server.max_model_len()
        self.reasoning = bool(spec.options.get("reasoning_parser"))

    @classmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> VllmEngine:
        path = spec.resolved_path()
        if not Path(path).exists():
            raise FileNotFoundError(f"model {spec.name!r}: directory {path} does not exist")
        from app.settings import get_settings

        port = int(spec.options.get("port") or free_port())
        argv = server_argv(spec, devices, port, get_settings().worker_device_kind or "cuda")
        log.info("starting the vLLM server: %s", shlex.join(argv))
        server = VllmServer(argv, server_env(spec), port)
        try:
            server.start()
        except OSError as exc:
            raise ServerFailed(f"the vLLM server could not be started ({argv[0]}): {exc}") from None
        server.wait_healthy(float(spec.options.get("startup_timeout_s", DEFAULT_STARTUP_TIMEOUT_S)))
        relay = OpenAIRelay(server.base_url, max_num_seqs(spec.options) + 8)
        return cls(server, relay, spec)

    def watch(self, on_exit: Callable[[str], None]) -> None:
        self.server.watch(on_exit)

    def close(self) -> None:
        self.relay.close()
        self.server.stop()
