"""Chunked embeddings and late chunking written out with plain torch and transformers on token
ids: the reference tests/test_long_inputs.py holds the worker to.

- a text's content ids: the tokenizer's ids of the stripped text, without special tokens;
- a window: [CLS] ids [SEP] for a BERT tokenizer, ids <eos> for one without [CLS]/[SEP]
  (Qwen3-Embedding's), with at most max_length - specials content ids, consecutive, no overlap;
- each window runs alone (no padding), pooled by the model's pooling: the mean of its hidden
  states, the first one (CLS) or the last one (last token);
- chunked: the windows' pooled vectors averaged weighted by their content ids, then L2-normalised
  (the models here end in Normalize);
- late chunking: the content ids of all chunks concatenated, cut into windows as above, each
  window's hidden states of its content ids (special tokens dropped) joined in order, and each
  chunk the mean of its own rows, L2-normalised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


class Recipe:
    def __init__(self, path: Path, max_length: int, pooling: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.max_length = max_length
        self.pooling = pooling
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        if cls is not None and sep is not None:
            self.prefix, self.suffix = [cls], [sep]
        else:
            self.prefix, self.suffix = [], [self.tokenizer.eos_token_id]
        self.keep = max_length - len(self.prefix) - len(self.suffix)

    def content_ids(self, text: str) -> list[int]:
        return self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]

    def windows(self, ids: list[int]) -> list[list[int]]:
        return [
            self.prefix + ids[start : start + self.keep] + self.suffix
            for start in range(0, len(ids), self.keep)
        ]

    def hidden(self, window: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([window])).last_hidden_state[0]

    def pooled(self, window: list[int]) -> np.ndarray:
        states = self.hidden(window)
        if self.pooling == "mean":
            vector = states.mean(0)
        elif self.pooling == "cls":
            vector = states[0]
        else:
            vector = states[-1]
        return vector.numpy()

    def chunked(self, text: str) -> tuple[np.ndarray, int]:
        """A text's vector window by window, and the tokens embedded."""
        windows = self.windows(self.content_ids(text))
        weights = np.array([len(w) - len(self.prefix) - len(self.suffix) for w in windows])
        vectors = np.stack([self.pooled(w) for w in windows])
        combined = (vectors * weights[:, None]).sum(0) / weights.sum()
        return combined / np.linalg.norm(combined), sum(len(w) for w in windows)

    def late_chunked(self, chunks: list[str]) -> tuple[np.ndarray, int]:
        """One vector a chunk, and the tokens of the pass."""
        ids = [self.content_ids(chunk) for chunk in chunks]
        windows = self.windows([i for chunk in ids for i in chunk])
        rows = torch.cat(
            [self.hidden(w)[len(self.prefix) : len(w) - len(self.suffix)] for w in windows]
        )
        vectors, start = [], 0
        for chunk in ids:
            vector = rows[start : start + len(chunk)].mean(0).numpy()
            vectors.append(vector / np.linalg.norm(vector))
            start += len(chunk)
        return np.stack(vectors), sum(len(w) for w in windows)
