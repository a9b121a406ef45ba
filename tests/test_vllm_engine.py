"""The vllm engine's registry rules and how its options become the server's command line.

The server itself runs in tests/test_vllm_chat.py (vLLM's CPU build).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.engines import load_engine
from app.engines.vllm import (
    DEFAULT_MAX_NUM_SEQS,
    SERVER_MODULE,
    ServerFailed,
    family_of,
    server_argv,
)
from app.registry import ModelSpec, RegistryError, load_registry


def registry(tmp_path: Path, entry: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n" + entry)
    return path


@pytest.mark.parametrize(
    ("directory", "family"),
    [
        ("/models/DeepSeek-V3", "deepseek-v3"),
        ("/models/DeepSeek-V3-0324", "deepseek-v3"),
        ("/models/DeepSeek-V3.1", "deepseek-v3"),
        ("/models/DeepSeek-R1", "deepseek-r1"),
        ("/models/DeepSeek-R1-0528/", "deepseek-r1"),
        ("/models/Qwen3-30B-A3B-FP8", "qwen3"),
        ("/models/Qwen3-30B-A3B-Instruct-2507-FP8", "qwen3"),
        ("/models/Qwen3-30B-A3B-Thinking-2507-FP8", "qwen3"),
        ("/models/Llama-3-8B", None),
    ],
)
def test_model_families_of_the_vendor_guide(directory: str, family: str | None) -> None:
    assert family_of(directory) == family


DEEPSEEK = """  - name: {name}
    kind: chat
    engine: vllm
    path: /models/DeepSeek-R1
    options: {{max_model_len: {max_len}, mtp: 1}}
    placements: [{{devices: "0-31", tp: {tp}}}]
"""


def test_deepseek_rules(tmp_path: Path) -> None:
    good = load_registry(
        registry(tmp_path, DEEPSEEK.format(name="deepseek-r1", max_len=65536, tp=32))
    )
    spec = good.require("deepseek-r1")
    assert spec.replica_device_groups() == [[str(i) for i in range(32)]]
    for name, max_len, tp, message in [
        ("deepseek-r1", 65536, 16, "tp 32"),
        ("deepseek-r1", 131072, 32, "max_model_len of at most 65536"),
        ("r1", 65536, 32, "served under the name 'deepseek-r1'"),
    ]:
        with pytest.raises(RegistryError, match=message):
            load_registry(registry(tmp_path, DEEPSEEK.format(name=name, max_len=max_len, tp=tp)))


def test_qwen3_tensor_parallel_rule(tmp_path: Path) -> None:
    entry = """  - name: qwen3
    kind: chat
    engine: vllm
    path: /models/Qwen3-30B-A3B-FP8
    options: {{reasoning_parser: qwen3}}
    placements: [{{devices: "16-19", tp: {tp}}}]
"""
    spec = load_registry(registry(tmp_path, entry.format(tp=2))).require("qwen3")
    assert spec.replica_device_groups() == [["16", "17"], ["18", "19"]]
    load_registry(registry(tmp_path, entry.format(tp=4)))
    with pytest.raises(RegistryError, match="tp 2 or 4"):
        load_registry(registry(tmp_path, entry.format(tp=1)))


def test_registry_options_become_server_flags(tmp_path: Path) -> None:
    model_dir = tmp_path / "DeepSeek-R1"
    spec = ModelSpec(
        name="deepseek-r1",
        kind="chat",
        engine="vllm",
        path=str(model_dir),
        options={
            "python": ".venv-vllm/bin/python",
            "max_model_len": 32768,
            "mtp": 1,
            "gpu_memory_utilization": 0.9,
            "max_num_seqs": 128,
            "dtype": "bfloat16",
            "quantization": "fp8",
            "kv_cache_dtype": "fp8",
            "enable_prefix_caching": True,
            "reasoning_parser": "deepseek_r1",
            "tool_call_parser": "deepseek_v3",
            "chat_template": "/models/r1.jinja",
            "extra_args": ["--block-size", 64],
        },
        placements=[{"devices": list(range(32)), "tp": 32}],
    )
    argv = server_argv(spec, [str(i) for i in range(32)], 8123)
    assert argv[:3] == [str(Path(".venv-vllm/bin/python").absolute()), "-m", SERVER_MODULE]

    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert flag("--model") == str(model_dir) and flag("--served-model-name") == "deepseek-r1"
    assert flag("--host") == "127.0.0.1" and flag("--port") == "8123"
    assert flag("--tensor-parallel-size") == "32" and flag("--max-num-seqs") == "128"
    assert flag("--max-model-len") == "32768" and flag("--gpu-memory-utilization") == "0.9"
    assert flag("--dtype") == "bfloat16" and flag("--quantization") == "fp8"
    assert flag("--kv-cache-dtype") == "fp8" and "--enable-prefix-caching" in argv
    assert flag("--reasoning-parser") == "deepseek_r1"
    assert flag("--tool-call-parser") == "deepseek_v3" and "--enable-auto-tool-choice" in argv
    assert flag("--chat-template") == "/models/r1.jinja"
    assert json.loads(flag("--speculative-config")) == {
        "method": "deepseek_mtp",
        "num_speculative_tokens": 1,
    }
    assert argv[-2:] == ["--block-size", "64"]
    assert argv.count("--max-num-seqs") == 1


def test_a_whole_command_replaces_the_interpreter(tmp_path: Path) -> None:
    spec = ModelSpec(
        name="q", kind="chat", engine="vllm", path=str(tmp_path),
        options={"command": "docker exec vacc-vllm python3 -m vllm.entrypoints.openai.api_server"},
    )  # fmt: skip
    argv = server_argv(spec, ["0", "1"], 9000)
    assert argv[:4] == ["docker", "exec", "vacc-vllm", "python3"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--max-num-seqs") + 1] == str(DEFAULT_MAX_NUM_SEQS)


def test_worker_concurrency_follows_max_num_seqs() -> None:
    from app.engines import ENGINES

    assert ENGINES["vllm"].slots({"max_num_seqs": 48}) == 48
    assert ENGINES["vllm"].slots({}) == DEFAULT_MAX_NUM_SEQS
    assert ENGINES["llama_cpp"].slots({"parallel": 3}) == 3
    assert ENGINES["llama_cpp"].slots({}) == 1


def test_unknown_options_and_bad_shapes_are_refused(tmp_path: Path) -> None:
    base = "  - name: c\n    kind: chat\n    engine: vllm\n    path: /m\n    options: {opts}\n"
    for opts, message in [
        ("{max_num_seq: 8}", "unknown vllm option"),
        ("{python: a, command: b}", "exclude each other"),
        ("{extra_args: --x}", "extra_args is a list"),
        ("{env: [A]}", "options.env maps"),
    ]:
        with pytest.raises(RegistryError, match=message):
            load_registry(registry(tmp_path, base.format(opts=opts)))


def test_a_server_that_cannot_start_is_a_load_failure_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    spec = ModelSpec(
        name="m", kind="chat", engine="vllm", path=str(tmp_path / "model"),
        options={"python": str(tmp_path / "no-such-venv/bin/python"), "startup_timeout_s": 30},
    )  # fmt: skip
    with pytest.raises(ServerFailed, match=r"stopped while starting \(exit code 127\).*cannot run"):
        load_engine(spec, [])


def test_reasoning_parser_must_be_known(tmp_path: Path) -> None:
    entry = """  - name: c
    kind: chat
    engine: llama_cpp
    path: /m.gguf
    options: {reasoning_parser: telepathy}
"""
    with pytest.raises(RegistryError, match="reasoning_parser 'telepathy'"):
        load_registry(registry(tmp_path, entry))


def test_on_cpu_the_devices_are_cores_not_a_tensor_parallel_group(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", kind="chat", engine="vllm", path=str(tmp_path))
    argv = server_argv(spec, ["0", "1"], 9000, device_kind="cpu")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "1"


def test_the_guarded_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed with SIGKILL (no chance to clean up) takes its guarded child along."""
    import subprocess
    import sys
    import time

    import psutil

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-m', 'app.child_guard', "
            "str(os.getpid()), 'sleep', '120'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(120)\n",
        ],
    )
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = psutil.Process(int(pid_file.read_text()))
    deadline = time.monotonic() + 20
    while "sleep" not in child.name():  # exec'd into the program
        assert time.monotonic() < deadline
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    child.wait(10)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
