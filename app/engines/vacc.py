"""Embedding and rerank on Vastai VACC cards through vaststreamx.

A VACC model is a directory with one compiled model per sequence length
(`512/ 1024/ ... 8192/`), each holding `mod.so`, `mod.json`, `mod.params` and
`tokenizer/` (tokenizer.json, tokenizer_config.json, and vacc_config.json =
`{"batch_size": B, "max_seqlen": L}`). Every bucket is loaded on the worker's
die; the batcher sends each input to the smallest bucket that holds it and
pads the batch to that bucket's compiled length.

Everything but `VsxRunner` is plain Python and tested here; `VsxRunner` talks
to the device and needs vaststreamx, which ships in the vendor's VACC image
(it is not on PyPI), so it is imported only when a VACC worker starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from app.batcher import Bucket
from app.devices import VACC_DIES_ENV
from app.engines.base import EmbeddingEngine, Pair, RerankEngine

if TYPE_CHECKING:
    from app.registry import ModelSpec

MODEL_FILES = ("mod.so", "mod.json", "mod.params")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vacc_config.json")


class VaccLayoutError(ValueError):
    """The model directory does not have the bucketed VACC layout."""


@dataclass(frozen=True)
class VaccBucket:
    seqlen: int
    batch_size: int
    directory: Path

    @property
    def prefix(self) -> str:
        """What `vsx.Model` takes: the bucket's path plus the `mod` file stem."""
        return str(self.directory / "mod")

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / "tokenizer"


def read_layout(root: Path, expected: Sequence[int] = ()) -> list[VaccBucket]:
    """Validate a bucketed model directory and return its buckets, shortest first."""
    if not root.is_dir():
        raise VaccLayoutError(f"{root}: the model directory does not exist")
    found = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    missing = sorted(set(expected) - set(found))
    if missing:
        raise VaccLayoutError(
            f"{root}: missing bucket(s) {', '.join(map(str, missing))} "
            f"(found {', '.join(map(str, found)) or 'none'})"
        )
    if not found:
        raise VaccLayoutError(
            f"{root}: no bucket directories; expected subdirectories named by sequence "
            "length such as 512/ 1024/ 2048/"
        )
    buckets = []
    for seqlen in found if not expected else sorted(expected):
        directory = root / str(seqlen)
        wanted = [*MODEL_FILES, *(f"tokenizer/{name}" for name in TOKENIZER_FILES)]
        absent = [name for name in wanted if not (directory / name).is_file()]
        if absent:
            raise VaccLayoutError(f"{directory}: missing {', '.join(absent)}")
        buckets.append(VaccBucket(seqlen, _batch_size(directory, seqlen), directory))
    return buckets


def _batch_size(directory: Path, seqlen: int) -> int:
    path = directory / "tokenizer" / "vacc_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VaccLayoutError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise VaccLayoutError(f"{path}: expected an object with batch_size and max_seqlen")
    batch, length = config.get("batch_size"), config.get("max_seqlen")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise VaccLayoutError(f"{path}: batch_size must be a positive integer, not {batch!r}")
    if length != seqlen:
        raise VaccLayoutError(
            f"{path}: max_seqlen is {length!r} but the bucket directory is {seqlen}"
        )
    return batch


def pack_sample(ids: Sequence[int], seqlen: int, type_ids: Sequence[int] = ()) -> list[np.ndarray]:
    """The six int32 [1, seqlen] inputs a compiled VACC BERT model takes for one sample:
    input_ids, attention_mask, token_type_ids, then the attention mask three more times."""
    if len(ids) > seqlen:
        raise ValueError(f"{len(ids)} tokens do not fit a {seqlen}-token bucket")
    input_ids = np.zeros((1, seqlen), dtype=np.int32)
    input_ids[0, : len(ids)] = ids
    mask = np.zeros((1, seqlen), dtype=np.int32)
    mask[0, : len(ids)] = 1
    types = np.zeros((1, seqlen), dtype=np.int32)
    if type_ids:
        types[0, : len(type_ids)] = type_ids
    return [input_ids, mask, types, mask.copy(), mask.copy(), mask.copy()]


def cls_rows(outputs: Sequence[np.ndarray]) -> np.ndarray:
    """Row 0 (the CLS position) of each sample's output: the pooled embedding or logit."""
    return np.stack(
        [np.asarray(out, dtype=np.float32).reshape(-1, out.shape[-1])[0] for out in outputs]
    )


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class Runner(Protocol):
    def run(self, seqlen: int, samples: list[list[np.ndarray]]) -> list[np.ndarray]:
        """One output array per sample, from the model compiled for `seqlen`."""


class VsxRunner:
    """Holds one compiled model per bucket on one die and runs batches through it."""

    def __init__(self, buckets: Sequence[VaccBucket], die: int) -> None:
        try:
            import vaststreamx as vsx
        except ImportError as exc:
            raise ImportError(
                "vaststreamx is not installed; it ships in the Vastai VACC image, not on PyPI",
                name="vaststreamx",
            ) from exc
        self._vsx = vsx
        self._die = die
        if vsx.set_device(die) != 0:
            raise RuntimeError(f"vaststreamx could not select die {die}")
        self._streams: dict[int, tuple[Any, Any]] = {}
        for bucket in buckets:
            model = vsx.Model(bucket.prefix, bucket.batch_size)
            embedding_op = vsx.Operator(vsx.OpType.BERT_EMBEDDING_OP)
            model_op = vsx.ModelOperator(model)
            graph = vsx.Graph()
            graph.add_operators(embedding_op, model_op)
            stream = vsx.Stream(graph, vsx.StreamBalanceMode.ONCE)
            stream.register_operator_output(model_op)
            stream.build()
            self._streams[bucket.seqlen] = (stream, model_op)

    def run(self, seqlen: int, samples: list[list[np.ndarray]]) -> list[np.ndarray]:
        vsx = self._vsx
        stream, _ = self._streams[seqlen]
        tensors = [[vsx.from_numpy(a, self._die) for a in sample] for sample in samples]
        outputs = stream.run_sync(tensors)
        return [vsx.as_numpy(out[0]).astype(np.float32) for out in outputs]


class _VaccBase:
    pad_to_bucket: ClassVar[bool] = True

    def __init__(self, layout: list[VaccBucket], tokenizer: Any, runner: Runner) -> None:
        self.layout = layout
        self._tokenizer = tokenizer
        self._runner = runner
        self.max_tokens = layout[-1].seqlen
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def _open(cls, spec: ModelSpec, devices: list[str]) -> tuple[list[VaccBucket], Any, Runner]:
        from tokenizers import Tokenizer

        expected = [int(b) for b in spec.options.get("buckets", [])]
        layout = read_layout(spec.resolved_path(), expected)
        tokenizer = Tokenizer.from_file(str(layout[-1].tokenizer_dir / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        dies = devices or [d for d in os.environ.get(VACC_DIES_ENV, "").split(",") if d]
        runner = VsxRunner(layout, int(dies[0]) if dies else 0)
        return layout, tokenizer, runner

    def buckets(self, options: dict[str, Any]) -> list[Bucket]:
        """From the compiled model, not the registry: shapes are fixed at compile time."""
        return [Bucket(b.seqlen, b.batch_size) for b in self.layout]

    def _run(self, samples: list[list[np.ndarray]], pad_to: int) -> np.ndarray:
        return cls_rows(self._runner.run(pad_to, samples))


class VaccEmbeddingEngine(_VaccBase, EmbeddingEngine):
    def __init__(
        self, layout: list[VaccBucket], tokenizer: Any, runner: Runner, normalize: bool = True
    ) -> None:
        super().__init__(layout, tokenizer, runner)
        self._normalize = normalize
        self.dimensions = 0

    @classmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> VaccEmbeddingEngine:
        layout, tokenizer, runner = cls._open(spec, devices)
        engine = cls(layout, tokenizer, runner, bool(spec.options.get("normalize", True)))
        engine.dimensions = int(spec.options.get("dimensions", 0)) or engine._probe_dimensions()
        return engine

    def _probe_dimensions(self) -> int:
        return int(self.embed([[0]], pad_to=self.layout[0].seqlen).shape[1])

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tokenizer.encode_batch(list(texts))]

    def add_special_tokens(self, ids: Sequence[int]) -> list[int]:
        # Learn what the tokenizer puts around a text by comparing one with and without.
        plain = self._tokenizer.encode("a", add_special_tokens=False).ids
        full = self._tokenizer.encode("a").ids
        at = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
        return [*full[:at], *ids, *full[at + len(plain) :]]

    def truncate(self, ids: list[int], limit: int) -> list[int]:
        return ids if len(ids) <= limit else [*ids[: limit - 1], ids[-1]]

    def embed(self, batch: Sequence[Sequence[int]], pad_to: int | None = None) -> np.ndarray:
        seqlen = pad_to or self.bucket_length(max(len(ids) for ids in batch))
        vectors = self._run([pack_sample(ids, seqlen) for ids in batch], seqlen)
        return normalise(vectors) if self._normalize else vectors

    def bucket_length(self, length: int) -> int:
        return next(b.seqlen for b in self.layout if length <= b.seqlen)


class VaccRerankEngine(_VaccBase, RerankEngine):
    @classmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> VaccRerankEngine:
        return cls(*cls._open(spec, devices))

    def encode_pairs(
        self, query: str, documents: Sequence[str], truncate: bool
    ) -> tuple[list[Pair], list[int]]:
        encoded = self._tokenizer.encode_batch([(query, d) for d in documents])
        pairs = [Pair(list(e.ids), list(e.type_ids)) for e in encoded]
        long = [i for i, p in enumerate(pairs) if len(p.ids) > self.max_tokens]
        if long and not truncate:
            self.refuse_over_long(long[0], len(pairs[long[0]].ids))
        if long:
            self._tokenizer.enable_truncation(self.max_tokens, strategy="only_second")
            try:
                for i in long:
                    e = self._tokenizer.encode(query, documents[i])
                    pairs[i] = Pair(list(e.ids), list(e.type_ids))
            finally:
                self._tokenizer.no_truncation()
        return pairs, long

    def score(self, batch: Sequence[Pair], pad_to: int | None = None) -> np.ndarray:
        seqlen = pad_to or next(
            b.seqlen for b in self.layout if max(len(p.ids) for p in batch) <= b.seqlen
        )
        samples = [pack_sample(p.ids, seqlen, p.type_ids) for p in batch]
        return sigmoid(self._run(samples, seqlen)[:, 0])


def load_vacc_engine(spec: ModelSpec, devices: list[str]) -> VaccEmbeddingEngine | VaccRerankEngine:
    """One registry engine name for both kinds: the model's kind picks the class."""
    if spec.kind == "rerank":
        return VaccRerankEngine.load(spec, devices)
    return VaccEmbeddingEngine.load(spec, devices)
