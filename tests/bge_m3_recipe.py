"""FlagEmbedding's bge-m3 recipe written out with plain torch and transformers: the reference the
tests (tests/test_bge_m3.py) and the benchmark (bench/bge_m3.py) hold the worker to.

It is M3Embedder's `encode_single_device` with its model's `_dense_embedding`, `_sparse_embedding`
and `_colbert_embedding`: tokenize with truncation, sort by length, pad, one forward, then
- dense: the CLS hidden state, L2-normalised;
- sparse: relu(sparse_linear(hidden)), per token id its largest weight, weights of 0 and the cls,
  eos, pad and unk tokens dropped (`_process_token_weights`);
- multi-vector: colbert_linear(hidden[:, 1:]) masked, L2-normalised, the first tokens_num - 1 rows
  (`_process_colbert_vecs`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


class Recipe:
    def __init__(self, path: Path, max_length: int = 512) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        hidden = self.model.config.hidden_size
        self.sparse_linear = torch.nn.Linear(hidden, 1)
        self.sparse_linear.load_state_dict(torch.load(path / "sparse_linear.pt"))
        self.colbert_linear = torch.nn.Linear(hidden, hidden)
        self.colbert_linear.load_state_dict(torch.load(path / "colbert_linear.pt"))
        self.max_length = max_length
        self.unused_tokens = set()
        for name in ["cls_token", "eos_token", "pad_token", "unk_token"]:
            if name in self.tokenizer.special_tokens_map:
                token = self.tokenizer.special_tokens_map[name]
                self.unused_tokens.add(self.tokenizer.convert_tokens_to_ids(token))

    def _process_token_weights(self, token_weights, input_ids) -> dict[int, float]:
        result: dict[int, float] = defaultdict(int)
        for w, idx in zip(token_weights, input_ids):
            if idx not in self.unused_tokens and w > 0:
                if w > result[idx]:
                    result[idx] = float(w)
        return dict(result)

    @staticmethod
    def _process_colbert_vecs(colbert_vecs, attention_mask) -> np.ndarray:
        tokens_num = int(np.sum(attention_mask))
        return colbert_vecs[: tokens_num - 1]

    @torch.no_grad()
    def encode(
        self,
        sentences: list[str],
        batch_size: int = 256,
        return_dense: bool = True,
        return_sparse: bool = True,
        return_colbert_vecs: bool = True,
    ):
        inputs = self.tokenizer(sentences, truncation=True, max_length=self.max_length)
        all_inputs = [{k: inputs[k][i] for k in inputs.keys()} for i in range(len(sentences))]
        order = np.argsort([-len(x["input_ids"]) for x in all_inputs])
        sorted_inputs = [all_inputs[i] for i in order]
        dense, lexical, colbert = [], [], []
        for start in range(0, len(sentences), batch_size):
            batch = self.tokenizer.pad(
                sorted_inputs[start : start + batch_size], padding=True, return_tensors="pt"
            )
            hidden = self.model(**batch, return_dict=True).last_hidden_state
            if return_dense:
                dense.append(torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy())
            if return_sparse:
                token_weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
                lexical += map(
                    self._process_token_weights,
                    token_weights.numpy(),
                    batch["input_ids"].numpy().tolist(),
                )
            if return_colbert_vecs:
                vecs = self.colbert_linear(hidden[:, 1:])
                vecs = vecs * batch["attention_mask"][:, 1:][:, :, None].float()
                vecs = torch.nn.functional.normalize(vecs, dim=-1)
                colbert += map(
                    self._process_colbert_vecs, vecs.numpy(), batch["attention_mask"].numpy()
                )
        back = np.argsort(order)
        return (
            np.concatenate(dense)[back] if return_dense else None,
            [lexical[i] for i in back] if return_sparse else None,
            [colbert[i] for i in back] if return_colbert_vecs else None,
        )

    def tokens(self, sentences: list[str]) -> list[int]:
        encoded = self.tokenizer(sentences, truncation=True, max_length=self.max_length)
        return [len(ids) for ids in encoded["input_ids"]]
