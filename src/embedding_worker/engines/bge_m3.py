"""bge-m3 and the models of its layout: one encoder, three outputs, per FlagEmbedding's recipe.

BAAI/bge-m3 is an XLM-RoBERTa encoder with two heads beside its weights, `sparse_linear.pt`
(Linear(hidden, 1)) and `colbert_linear.pt` (Linear(hidden, dim)). Infinity serves only its dense
vector, so models with both heads run here, beside Infinity's AsyncEngineArray, behind the same
`Embedder` interface (same queue bound, timeouts and errors), batched by the worker's scheduler as
the LLM rerankers are (batching.py).

The recipe (FlagEmbedding's M3Embedder, `encode` of one device), from one forward pass:
- tokens: the tokenizer with truncation to the maximum length, special tokens added, right padding;
- dense: the hidden state of the first token (CLS), L2-normalised;
- sparse: relu(sparse_linear(hidden state)) for every token; per token id the largest weight over
  the text; weights of 0 and the tokenizer's cls, eos, pad and unk tokens dropped;
- multi-vector: colbert_linear(hidden state) of every token but the first (CLS), padding dropped,
  each vector L2-normalised.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ..model_paths import model_file
from .base import (
    DENSE,
    MULTI_VECTOR,
    SPARSE,
    Health,
    ModelLoadError,
    MultiOutputEmbedder,
    SparseEmbedding,
    TextEmbeddings,
)
from .batching import Item, SelfBatching, TokenIds
from .dtype import resolve_dtype, torch_dtype
from .spec import EngineSettings, ModelSpec
from .tokenization import ModelInput, Text, TokenCounter, pad_ids

KIND = "bge-m3"
SPARSE_HEAD = "sparse_linear.pt"
COLBERT_HEAD = "colbert_linear.pt"
# The tokenizer's tokens that carry no sparse weight (the recipe's `unused_tokens`).
_UNWEIGHTED_TOKENS = ("cls_token", "eos_token", "pad_token", "unk_token")


def _is_encoder(spec: ModelSpec, trust_remote_code: bool) -> bool:
    """Whether the model's config reads here and names no decoder or classifier architecture."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
    except Exception:
        return False
    architectures = getattr(config, "architectures", None) or []
    heads = ("ForCausalLM", "ForSequenceClassification")
    return not any(a.endswith(heads) for a in architectures)


def detect(spec: ModelSpec, trust_remote_code: bool) -> bool:
    """A bge-m3 model: an encoder with both heads' files beside its weights."""
    heads = all(model_file(spec.source, name) is not None for name in (SPARSE_HEAD, COLBERT_HEAD))
    return heads and _is_encoder(spec, trust_remote_code)


def _load_head(spec: ModelSpec, name: str) -> Any:
    """A head's Linear, shaped by its state dict (the ColBERT width may differ from hidden)."""
    import torch

    path = model_file(spec.source, name)
    if path is None:
        raise ModelLoadError(f"model '{spec.served_id}' cannot be a bge-m3 model: it has no {name}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    out_features, in_features = state["weight"].shape
    head = torch.nn.Linear(in_features, out_features)
    head.load_state_dict(state)
    return head


def _max_length(config: Any, tokenizer: Any) -> int:
    """The model's maximum tokens: its tokenizer's, within its positions (RoBERTa's count from
    pad_token_id + 1: 8194 positions are 8192 tokens)."""
    positions = int(getattr(config, "max_position_embeddings", 512))
    if "roberta" in getattr(config, "model_type", ""):
        positions -= int(config.pad_token_id or 0) + 1
    return min(positions, int(tokenizer.model_max_length))


class BGEM3Embedder(SelfBatching, MultiOutputEmbedder):
    """A bge-m3-layout model: dense, sparse and multi-vector outputs from one forward pass."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        encoder: Any,
        sparse_head: Any,
        colbert_head: Any,
        tokenizer: Any,
        max_length: int,
        device: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(spec, TokenCounter(tokenizer), max_length, **kwargs)
        self.encoder = encoder
        self.sparse_head = sparse_head
        self.colbert_head = colbert_head
        # The worker thread's own copy: the recipe's call sets truncation on the Rust tokenizer,
        # which fails ("Already borrowed") while the event loop decodes with the original.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.device = device
        self.batch_size = spec.batch_size
        self.dimensions = int(encoder.config.hidden_size)
        self.multi_vector_dimensions = int(colbert_head.out_features)
        self.unweighted_ids = np.array(
            sorted(
                {
                    tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[name])
                    for name in _UNWEIGHTED_TOKENS
                    if name in tokenizer.special_tokens_map
                }
            ),
            dtype=np.int64,
        )
        self.reuses_token_ids = (
            self.settings.optimisations.reuse_token_ids and self._reuse_token_ids()
        )
        self._init_batching(self.settings.optimisations.wide_short_batches)

    @classmethod
    def load(cls, spec: ModelSpec, settings: EngineSettings, health: Health) -> BGEM3Embedder:
        import torch
        from transformers import AutoModel, AutoTokenizer

        trust_remote_code = settings.trust_remote_code
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if not _is_encoder(spec, trust_remote_code):
            raise ModelLoadError(
                f"model '{spec.served_id}' cannot be a bge-m3 model: its config is not an encoder's"
            )
        # The embedders' policy: bfloat16 where the CPU computes it natively, float32 otherwise.
        dtype = torch_dtype(resolve_dtype(spec.dtype, spec.backend), device)
        sparse_head, colbert_head = _load_head(spec, SPARSE_HEAD), _load_head(spec, COLBERT_HEAD)
        tokenizer = AutoTokenizer.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
        encoder = AutoModel.from_pretrained(
            spec.source, dtype=dtype, trust_remote_code=trust_remote_code
        )
        hidden = int(encoder.config.hidden_size)
        if sparse_head.in_features != hidden or colbert_head.in_features != hidden:
            raise ModelLoadError(
                f"model '{spec.served_id}': its heads do not take the encoder's {hidden} numbers"
            )
        return cls(
            spec,
            encoder=encoder.to(device).eval(),
            sparse_head=sparse_head.to(device=device, dtype=dtype).eval(),
            colbert_head=colbert_head.to(device=device, dtype=dtype).eval(),
            tokenizer=tokenizer,
            max_length=_max_length(encoder.config, tokenizer),
            device=device,
            settings=settings,
            health=health,
        )

    def _reuse_token_ids(self) -> bool:
        """Let texts carry the ids the worker makes when it counts them, so the worker thread does
        not tokenize them again: only if, on the probe texts, they are the recipe's ids exactly."""
        model_input = ModelInput(
            prepare=lambda text: text,  # the recipe hands the text to the tokenizer as it is
            max_length=self.max_length,
            truncation_side=self.tokenizer.truncation_side,
            with_type_ids=False,
        )

        def reproduces(texts: list[str], tokenized: list[Text]) -> bool:
            return [t.fed_ids.tolist() for t in tokenized] == self._tokenize_texts(texts)

        return self.tokens.carry_token_ids(model_input, reproduces)

    # --------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self._start_batching(f"bge-m3-{self.served_id}")

    async def stop(self) -> None:
        await self._stop_batching()

    async def _embed_outputs(
        self, texts: list[Text], outputs: frozenset[str]
    ) -> list[TextEmbeddings]:
        return await self._submit(texts, outputs)

    # --------------------------------------------------------------------------- worker thread

    def _tokenize_texts(self, texts: list[str]) -> list[list[int]]:
        """The recipe's tokenization: truncated to the maximum length, special tokens added."""
        return self.tokenizer(
            texts, truncation=True, max_length=self.max_length, return_attention_mask=False
        )["input_ids"]

    def _tokenize(self, texts: list[str]) -> list[TokenIds]:
        """The recipe's ids of texts that carry none (batching.py uses the ids a `Text`
        carries)."""
        return list(self._tokenize_texts(texts))

    def _forward_items(self, items: list[Item]) -> list[TextEmbeddings]:
        """Every output any call of the batch asks, each call given the ones it asked."""
        import torch

        asked: frozenset[str] = frozenset().union(*(item.options for item in items))
        rows = [item.ids for item in items if item.ids is not None]
        lengths = [len(ids) for ids in rows]
        padded = pad_ids(rows, self.tokenizer.pad_token_id)
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        dense = weights = colbert = None
        with torch.inference_mode():
            hidden = self.encoder(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).last_hidden_state
            if DENSE in asked:
                dense = torch.nn.functional.normalize(hidden[:, 0], dim=-1).float().cpu().numpy()
            if SPARSE in asked:
                weights = torch.relu(self.sparse_head(hidden)).squeeze(-1).float().cpu().numpy()
            if MULTI_VECTOR in asked:
                vectors = self.colbert_head(hidden[:, 1:])
                colbert = torch.nn.functional.normalize(vectors, dim=-1).float().cpu().numpy()
        results = []
        for row, item in enumerate(items):
            wants = item.options
            n = lengths[row]
            results.append(
                TextEmbeddings(
                    dense=dense[row] if dense is not None and DENSE in wants else None,
                    sparse=(
                        self._sparse(input_ids[row, :n].numpy(), weights[row, :n])
                        if weights is not None and SPARSE in wants
                        else None
                    ),
                    multi_vector=(
                        colbert[row, : n - 1]
                        if colbert is not None and MULTI_VECTOR in wants
                        else None
                    ),
                )
            )
        return results

    def _sparse(self, ids: np.ndarray, weights: np.ndarray) -> SparseEmbedding:
        """The largest weight of each token id, weightless and unweighted tokens dropped."""
        keep = (weights > 0) & ~np.isin(ids, self.unweighted_ids)
        indices, first = np.unique(ids[keep], return_inverse=True)
        values = np.zeros(len(indices), dtype=np.float32)
        np.maximum.at(values, first, weights[keep])
        return SparseEmbedding(indices=indices.astype(np.int64), values=values)
