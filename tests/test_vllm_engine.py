"""The vllm engine without vLLM: the vendor's registry rules and the argument mapping.

vLLM's CUDA build cannot run on these CPU machines; what it is handed is checked here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engines import EngineLoadError, load_engine
from app.engines.vllm import engine_args, family_of, sampling_args
from app.protocol.chat import GenerationTask
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


def test_engine_and_sampling_arguments(tmp_path: Path) -> None:
    spec = ModelSpec(
        name="deepseek-r1",
        kind="chat",
        engine="vllm",
        path=str(tmp_path / "DeepSeek-R1"),
        options={
            "max_model_len": 32768,
            "mtp": 1,
            "gpu_memory_utilization": 0.9,
            "max_num_seqs": 128,
        },
        placements=[{"devices": list(range(32)), "tp": 32}],
    )
    args = engine_args(spec, [str(i) for i in range(32)])
    assert args["tensor_parallel_size"] == 32
    assert args["max_model_len"] == 32768 and args["gpu_memory_utilization"] == 0.9
    assert args["speculative_config"] == {"method": "deepseek_mtp", "num_speculative_tokens": 1}
    assert args["served_model_name"] == "deepseek-r1" and args["max_num_seqs"] == 128
    task = GenerationTask(prompt="x", temperature=0.2, stop=["\n\n"], seed=7, frequency_penalty=0.5)
    assert sampling_args(task, 100) == {
        "max_tokens": 100,
        "temperature": 0.2,
        "top_p": 1.0,
        "stop": ["\n\n"],
        "presence_penalty": 0.0,
        "frequency_penalty": 0.5,
        "seed": 7,
    }


def test_without_vllm_the_worker_says_what_to_install(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", kind="chat", engine="vllm", path=str(tmp_path))
    with pytest.raises(EngineLoadError, match=r"needs a library that is not installed \(vllm"):
        load_engine(spec, ["0"])


def test_reasoning_parser_must_be_known(tmp_path: Path) -> None:
    entry = """  - name: c
    kind: chat
    engine: llama_cpp
    path: /m.gguf
    options: {reasoning_parser: telepathy}
"""
    with pytest.raises(RegistryError, match="reasoning_parser 'telepathy'"):
        load_registry(registry(tmp_path, entry))
