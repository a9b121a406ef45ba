from __future__ import annotations

from pathlib import Path

import pytest

from app.registry import DEFAULT_EMBEDDING_MODEL, RegistryError, load_registry
from app.settings import Settings, parse_device_list


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_builtin_registry_serves_the_packaged_minilm() -> None:
    registry = load_registry(None)
    spec = registry.require(DEFAULT_EMBEDDING_MODEL)
    assert spec.kind == "embedding"
    assert spec.queue == f"model.{DEFAULT_EMBEDDING_MODEL}"
    assert (spec.resolved_path() / "model.safetensors").is_file()
    assert spec.replica_device_groups() == [[]]


def test_placements_split_devices_into_tp_groups(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
models:
  - name: qwen3
    kind: embedding
    engine: sentence_transformers
    path: /models/qwen3
    placements:
      - host: node-a
        devices: "16-19"
        tp: 2
      - host: node-b
        devices: [0, 1]
""",
    )
    spec = load_registry(path).require("qwen3")
    assert spec.replica_device_groups() == [["16", "17"], ["18", "19"], ["0"], ["1"]]
    assert spec.replica_device_groups("node-a") == [["16", "17"], ["18", "19"]]
    assert spec.replica_device_groups("node-c") == []


def test_cpu_placement_replica_count(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
models:
  - {name: m, kind: embedding, engine: sentence_transformers, path: /m,
     placements: [{replicas: 3}]}
""",
    )
    assert load_registry(path).require("m").replica_device_groups() == [[], [], []]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "  - {name: good, kind: embedding, engine: sentence_transformers, path: /m}\n"
            "  - {name: bad-tp, kind: embedding, engine: sentence_transformers, path: /m,\n"
            "     placements: [{devices: [0, 1, 2], tp: 2}]}\n",
            ["model 'bad-tp'", "field 'placements.0'", "groups of tp=2"],
        ),
        (
            "  - {name: e, kind: embedding, engine: warp-drive, path: /m}\n",
            ["model 'e'", "field 'engine'", "unknown engine 'warp-drive'"],
        ),
        (
            "  - {name: k, kind: painting, engine: sentence_transformers, path: /m}\n",
            ["model 'k'", "field 'kind'"],
        ),
        (
            "  - {kind: embedding, engine: sentence_transformers, path: /m}\n",
            ["model #1", "field 'name'", "Field required"],
        ),
        (
            "  - {name: x, kind: embedding, engine: sentence_transformers, path: /m,\n"
            "     colour: red}\n",
            ["model 'x'", "field 'colour'"],
        ),
        (
            "  - {name: d, kind: embedding, engine: sentence_transformers, path: /m}\n"
            "  - {name: d, kind: embedding, engine: sentence_transformers, path: /m}\n",
            ["appears twice"],
        ),
    ],
)
def test_validation_errors_name_file_model_and_field(
    tmp_path: Path, body: str, expected: list[str]
) -> None:
    path = write(tmp_path, "models:\n" + body)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "missing.yaml")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(write(tmp_path, "models: [unclosed"))
    with pytest.raises(RegistryError, match="mapping"):
        load_registry(write(tmp_path, "- just a list"))


def test_missing_package_path_is_explained() -> None:
    from app.registry import ModelSpec

    spec = ModelSpec(
        name="x", kind="embedding", engine="sentence_transformers", path="package:no_such_pkg/m"
    )
    with pytest.raises(FileNotFoundError, match="no_such_pkg"):
        spec.resolved_path()


def test_device_lists_and_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_device_list("0-3,8") == ["0", "1", "2", "3", "8"]
    assert parse_device_list("") == []
    with pytest.raises(ValueError):
        parse_device_list("5-2")
    monkeypatch.setenv("INFERQ_WORKER_DEVICES", "16-17")
    monkeypatch.setenv("INFERQ_REQUEST_TIMEOUT_S", "7.5")
    settings = Settings(_env_file=None)
    assert settings.worker_devices == ["16", "17"]
    assert settings.request_timeout_s == 7.5
