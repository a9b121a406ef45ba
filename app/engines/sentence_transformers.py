"""Embeddings with sentence-transformers from a local model directory (CPU or CUDA)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.engines.base import EmbeddingEngine
from app.engines.torch_env import prepare_torch_env

if TYPE_CHECKING:
    import numpy as np

    from app.registry import ModelSpec


class SentenceTransformersEngine(EmbeddingEngine):
    def __init__(self, model: Any, device: str, matryoshka: frozenset[int]) -> None:
        import torch

        self._torch = torch
        self._model = model
        self._device = device
        tokenizer = model.tokenizer
        self._tokenizer = tokenizer
        self.max_tokens = int(model.max_seq_length)
        self.dimensions = int(model.get_embedding_dimension())
        self.matryoshka_dimensions = matryoshka
        self.vocab_size = len(tokenizer)
        self._cls = tokenizer.cls_token_id
        self._sep = tokenizer.sep_token_id
        self._pad = tokenizer.pad_token_id or 0

    @classmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> SentenceTransformersEngine:
        prepare_torch_env()
        path = spec.resolved_path()  # before the heavy imports: a wrong path fails at once
        if not path.is_dir():
            raise FileNotFoundError(f"model {spec.name!r}: directory {path} does not exist")
        import torch
        from sentence_transformers import SentenceTransformer

        device = str(spec.options.get("device", "cpu"))
        if device == "cpu":
            threads = int(spec.options.get("threads", 0)) or len(devices) or os.cpu_count() or 1
            torch.set_num_threads(threads)
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
        model.eval()
        if "max_tokens" in spec.options:
            model.max_seq_length = min(int(spec.options["max_tokens"]), model.max_seq_length)
        matryoshka = frozenset(int(d) for d in spec.options.get("matryoshka_dimensions", []))
        return cls(model, device, matryoshka)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self._tokenizer(
            list(texts), add_special_tokens=True, truncation=False, verbose=False
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def add_special_tokens(self, ids: Sequence[int]) -> list[int]:
        head = [self._cls] if self._cls is not None else []
        tail = [self._sep] if self._sep is not None else []
        return [*head, *ids, *tail]

    def truncate(self, ids: list[int], limit: int) -> list[int]:
        if len(ids) <= limit:
            return ids
        if self._sep is not None and ids and ids[-1] == self._sep:
            return [*ids[: limit - 1], self._sep]
        return ids[:limit]

    def embed(self, batch: Sequence[Sequence[int]], pad_to: int | None = None) -> np.ndarray:
        torch = self._torch
        longest = max(pad_to or 0, *(len(ids) for ids in batch))
        input_ids = torch.full((len(batch), longest), self._pad, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
        features = {
            "input_ids": input_ids.to(self._device),
            "attention_mask": attention.to(self._device),
            "token_type_ids": torch.zeros_like(input_ids).to(self._device),
        }
        with torch.inference_mode():
            out = self._model(features)["sentence_embedding"]
        return out.float().cpu().numpy()
