"""Rerank with a sentence-transformers CrossEncoder from a local directory (CPU or CUDA)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.engines.base import Pair, RerankEngine
from app.engines.torch_env import prepare_torch_env

if TYPE_CHECKING:
    import numpy as np

    from app.registry import ModelSpec


class CrossEncoderEngine(RerankEngine):
    def __init__(self, model: Any, device: str) -> None:
        import torch

        self._torch = torch
        self._model = model
        self._device = device
        self._tokenizer = model.tokenizer
        self.max_tokens = int(model.max_seq_length)
        self.vocab_size = len(self._tokenizer)
        self._pad = self._tokenizer.pad_token_id or 0

    @classmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> CrossEncoderEngine:
        prepare_torch_env()
        import torch
        from sentence_transformers import CrossEncoder

        path = spec.resolved_path()
        if not path.is_dir():
            raise FileNotFoundError(f"model {spec.name!r}: directory {path} does not exist")
        device = str(spec.options.get("device", "cpu"))
        if device == "cpu":
            torch.set_num_threads(len(devices) or os.cpu_count() or 1)
        model = CrossEncoder(str(path), device=device, local_files_only=True)
        model.eval()
        if "max_tokens" in spec.options:
            model.max_seq_length = min(int(spec.options["max_tokens"]), model.max_seq_length)
        return cls(model, device)

    def encode_pairs(
        self, query: str, documents: Sequence[str], truncate: bool
    ) -> tuple[list[Pair], list[int]]:
        docs = list(documents)
        encoded = self._tokenizer(
            [query] * len(docs), docs, truncation=False, return_token_type_ids=True, verbose=False
        )
        pairs = [
            Pair(list(ids), list(types))
            for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"], strict=True)
        ]
        long = [i for i, pair in enumerate(pairs) if len(pair.ids) > self.max_tokens]
        if long and not truncate:
            self.refuse_over_long(long[0], len(pairs[long[0]].ids))
        # Cut the document first; the query too only when it alone is too long.
        strategy = "only_second" if self._query_fits(query) else "longest_first"
        for i in long:
            cut = self._tokenizer(
                query, docs[i], truncation=strategy, max_length=self.max_tokens, verbose=False
            )
            pairs[i] = Pair(list(cut["input_ids"]), list(cut["token_type_ids"]))
        return pairs, long

    def _query_fits(self, query: str) -> bool:
        return len(self._tokenizer(query)["input_ids"]) + 2 < self.max_tokens

    def score(self, batch: Sequence[Pair], pad_to: int | None = None) -> np.ndarray:
        torch = self._torch
        longest = max(pad_to or 0, *(len(p.ids) for p in batch))
        input_ids = torch.full((len(batch), longest), self._pad, dtype=torch.long)
        types = torch.zeros((len(batch), longest), dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, pair in enumerate(batch):
            n = len(pair.ids)
            input_ids[row, :n] = torch.tensor(pair.ids, dtype=torch.long)
            types[row, :n] = torch.tensor(pair.type_ids, dtype=torch.long)
            attention[row, :n] = 1
        features = {
            "input_ids": input_ids.to(self._device),
            "token_type_ids": types.to(self._device),
            "attention_mask": attention.to(self._device),
        }
        with torch.inference_mode():
            logits = self._model(features)["scores"]
            scores = self._model.activation_fn(logits)
        return scores.float().reshape(len(batch), -1)[:, 0].cpu().numpy()
