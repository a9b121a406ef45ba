"""The vacc engine without a VACC card: layout, tokenisation, packing, buckets, post-processing.

What runs on the device (vaststreamx's Model/Stream calls in `VsxRunner`) cannot
run here; `RecordingRunner` stands in for it and records exactly what the
engine would hand the device.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.batcher import BucketBatcher
from app.engines import EngineLoadError, load_engine
from app.engines.vacc import (
    VaccEmbeddingEngine,
    VaccLayoutError,
    VaccRerankEngine,
    VsxRunner,
    cls_rows,
    pack_sample,
    read_layout,
    sigmoid,
)
from app.registry import DEFAULT_EMBEDDING_MODEL, ModelSpec, load_registry

HIDDEN = 8


def make_layout(root: Path, buckets: dict[int, int]) -> Path:
    source = load_registry(None).require(DEFAULT_EMBEDDING_MODEL).resolved_path()
    for seqlen, batch in buckets.items():
        tok = root / str(seqlen) / "tokenizer"
        tok.mkdir(parents=True)
        for name in ("mod.so", "mod.json", "mod.params"):
            (root / str(seqlen) / name).write_bytes(b"compiled")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / name, tok / name)
        (tok / "vacc_config.json").write_text(
            json.dumps({"batch_size": batch, "max_seqlen": seqlen})
        )
    return root


class RecordingRunner:
    """Stands in for the device: records each call; row 0 of each output encodes the input."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[list[np.ndarray]]]] = []

    def run(self, seqlen: int, samples: list[list[np.ndarray]]) -> list[np.ndarray]:
        self.calls.append((seqlen, samples))
        outputs = []
        for sample in samples:
            out = np.zeros((seqlen, HIDDEN), dtype=np.float32)
            out[0, 0] = sample[1].sum()  # real tokens
            out[0, 1] = sample[0][0, 0]  # first token id
            out[0, 2] = sample[2].sum()  # token types set
            out[1:, :] = 99.0  # other positions must be ignored
            outputs.append(out)
        return outputs


@pytest.fixture
def layout_dir(tmp_path: Path) -> Path:
    return make_layout(tmp_path / "bge-m3", {512: 4, 1024: 2})


def tokenizer_for(layout_dir: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(layout_dir / "1024" / "tokenizer" / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def test_layout_is_read_with_batch_sizes_from_vacc_config(layout_dir: Path) -> None:
    buckets = read_layout(layout_dir)
    assert [(b.seqlen, b.batch_size) for b in buckets] == [(512, 4), (1024, 2)]
    assert buckets[0].prefix == str(layout_dir / "512" / "mod")


def _config(root: Path) -> Path:
    return root / "512" / "tokenizer" / "vacc_config.json"


DAMAGE = {
    "bucket missing": (lambda d: None, "missing bucket(s) 2048"),
    "params missing": (lambda d: (d / "1024" / "mod.params").unlink(), "1024: missing mod.params"),
    "config missing": (lambda d: _config(d).unlink(), "tokenizer/vacc_config.json"),
    "config not json": (lambda d: _config(d).write_text("{oops"), "not valid JSON"),
    "batch size zero": (
        lambda d: _config(d).write_text('{"batch_size": 0, "max_seqlen": 512}'),
        "batch_size must be a positive integer",
    ),
    "seqlen mismatch": (
        lambda d: _config(d).write_text('{"batch_size": 4, "max_seqlen": 256}'),
        "max_seqlen is 256 but the bucket directory is 512",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_layout_errors_are_clear(layout_dir: Path, case: str) -> None:
    damage, message = DAMAGE[case]
    damage(layout_dir)
    expected = [512, 1024, 2048] if case == "bucket missing" else [512, 1024]
    with pytest.raises(VaccLayoutError) as info:
        read_layout(layout_dir, expected)
    assert message in str(info.value)


def test_empty_or_absent_directories(tmp_path: Path) -> None:
    with pytest.raises(VaccLayoutError, match="does not exist"):
        read_layout(tmp_path / "nowhere")
    with pytest.raises(VaccLayoutError, match="no bucket directories"):
        read_layout(tmp_path)


def test_pack_sample_makes_six_int32_arrays_of_the_bucket_length() -> None:
    arrays = pack_sample([101, 7, 8, 102], 512, type_ids=[0, 0, 1, 1])
    assert len(arrays) == 6
    assert all(a.shape == (1, 512) and a.dtype == np.int32 for a in arrays)
    ids, mask, types, *masks = arrays
    assert ids[0, :5].tolist() == [101, 7, 8, 102, 0]
    assert mask.sum() == 4 and mask[0, :4].tolist() == [1, 1, 1, 1]
    assert types[0, :4].tolist() == [0, 0, 1, 1]
    assert all(np.array_equal(m, mask) for m in masks)
    assert pack_sample([1, 2], 16)[2].sum() == 0  # token types default to zeros
    with pytest.raises(ValueError, match="do not fit"):
        pack_sample(list(range(600)), 512)


def test_post_processing_takes_the_cls_row_and_sigmoid() -> None:
    outputs = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((3, 4), np.float32)]
    assert cls_rows(outputs).tolist() == [[0, 1, 2, 3], [1, 1, 1, 1]]
    assert sigmoid(np.array([0.0, 100.0, -100.0])).tolist() == pytest.approx([0.5, 1.0, 0.0])


def test_embedding_engine_tokenises_pads_to_the_bucket_and_reads_cls(layout_dir: Path) -> None:
    from transformers import AutoTokenizer

    runner = RecordingRunner()
    engine = VaccEmbeddingEngine(read_layout(layout_dir), tokenizer_for(layout_dir), runner, False)
    hf = AutoTokenizer.from_pretrained(str(layout_dir / "512" / "tokenizer"))
    assert engine.tokenize(["hello world"]) == [hf("hello world")["input_ids"]]
    assert engine.add_special_tokens([7592, 2088]) == hf("hello world")["input_ids"]
    assert engine.max_tokens == 1024
    long_ids = engine.tokenize(["word " * 1500])[0]
    cut = engine.truncate(long_ids, 1024)
    assert len(cut) == 1024 and cut[-1] == long_ids[-1] == 102

    batcher = BucketBatcher(engine.buckets({}), lambda b, n: engine.embed(b, pad_to=n),
                            max_wait_ms=1, pad_to_bucket=engine.pad_to_bucket)  # fmt: skip
    try:
        short, medium = engine.tokenize(["a short text"])[0], list(range(1000, 1700))
        rows = batcher.submit([short, medium], [len(short), len(medium)]).result(timeout=5)
    finally:
        batcher.stop()
    assert sorted(seqlen for seqlen, _ in runner.calls) == [512, 1024]  # smallest that holds
    by_len = {seqlen: samples for seqlen, samples in runner.calls}
    assert all(a.shape == (1, 512) for a in by_len[512][0])
    assert rows[0][:2].tolist() == [len(short), short[0]]
    assert rows[1][:2].tolist() == [700, 1000]


def test_rerank_engine_truncates_documents_and_scores_with_sigmoid(layout_dir: Path) -> None:
    runner = RecordingRunner()
    engine = VaccRerankEngine(read_layout(layout_dir), tokenizer_for(layout_dir), runner)
    pairs, truncated = engine.encode_pairs("query", ["short doc", "long " * 2000], True)
    assert truncated == [1]
    assert len(pairs[1].ids) == 1024 and pairs[1].ids[:3] == pairs[0].ids[:3]
    assert pairs[0].type_ids.count(1) == len(pairs[0].ids) - 3  # document tokens + [SEP]
    scores = engine.score(pairs[:1], pad_to=512)
    assert scores.tolist() == pytest.approx(sigmoid(np.array([len(pairs[0].ids)])).tolist())
    with pytest.raises(Exception, match=r"documents\[1\] with the query has"):
        engine.encode_pairs("query", ["short doc", "long " * 2000], False)


def test_without_vaststreamx_the_worker_says_what_is_missing(layout_dir: Path) -> None:
    with pytest.raises(ImportError, match="ships in the Vastai VACC image"):
        VsxRunner(read_layout(layout_dir), 0)
    spec = ModelSpec(name="bge", kind="embedding", engine="vacc", path=str(layout_dir))
    with pytest.raises(EngineLoadError, match="VACC image"):
        load_engine(spec, ["0"])
