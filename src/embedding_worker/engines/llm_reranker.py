"""Rerankers that are language models (Qwen3-Reranker), served exactly per the official recipe.

Infinity loads a `Qwen3ForCausalLM` reranker as an embedder and refuses to rerank with it, and it
strips whitespace from the converted single-logit checkpoints (which drops the template's trailing
"\\n\\n" and changes their scores). So these models run here, beside Infinity's AsyncEngineArray,
behind the same `Reranker` interface (same queue bound, timeouts and errors).

The recipe (Qwen3-Reranker model card):
- input: PREFIX + "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}" + SUFFIX;
  only the middle part is tokenised with truncation, to `max_length` less the prefix and suffix
  tokens;
- left padding; score = softmax([logit("no"), logit("yes")])[1] at the last position, which equals
  sigmoid(logit_yes - logit_no). A converted single-logit checkpoint (score weight = W_yes - W_no)
  gives that difference as its one logit: score = sigmoid(logit), the same input.

Batching: pairs from concurrent requests are batched together by the worker's scheduler
(batching.py), tokenised and run on one worker thread per model, under torch.inference_mode, never
on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..logs import get_logger
from ..model_paths import model_file
from .base import Health, ModelLoadError, Reranker
from .batching import Item, SelfBatching, TokenIds
from .dtype import torch_dtype
from .spec import EngineSettings, ModelSpec
from .tokenization import Text, TokenCounter, pad_ids

log = get_logger(__name__)

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".'
    "<|im_end|>\n<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
KIND = "llm-reranker"
MAX_LENGTH = 8192  # the recipe's max_length, prefix and suffix included


def format_pair(query: str, document: str, instruction: str | None) -> str:
    """The middle part of the template (the only part that is truncated)."""
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


# ------------------------------------------------------------------------------------ detection


def _yes_no_ids(tokenizer: Any) -> tuple[int, int] | None:
    """Ids of the single tokens "yes" and "no", or None if either is not a single token."""
    ids = []
    for word in ("yes", "no"):
        token_id = tokenizer.convert_tokens_to_ids(word)
        if token_id is None or token_id == tokenizer.unk_token_id:
            return None
        ids.append(int(token_id))
    return ids[0], ids[1]


def detect(spec: ModelSpec, trust_remote_code: bool) -> bool:
    """Whether the model's files are an LLM reranker.

    LLM rerankers: a `*ForCausalLM` without a sentence-transformers layout (modules.json) whose
    tokenizer has the single tokens "yes" and "no" (Qwen3-Reranker); a single-label
    `Qwen3ForSequenceClassification` with a Qwen tokenizer (its converted checkpoints). Anything
    whose config cannot be read here is not (Infinity's loader then reports the real problem).
    """
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
    except Exception:
        return False
    architectures = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    single_logit = "Qwen3ForSequenceClassification" in architectures and config.num_labels == 1
    if not (causal or single_logit):
        return False
    if causal and model_file(spec.source, "modules.json") is not None:
        return False  # a sentence-transformers embedder built on a causal LM
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
    except Exception:
        return False
    if causal:
        return _yes_no_ids(tokenizer) is not None
    return type(tokenizer).__name__.startswith("Qwen2Tokenizer")


# ------------------------------------------------------------------------------------ the engine


class LLMReranker(SelfBatching, Reranker):
    """A language-model reranker (Qwen3-Reranker or its single-logit conversion)."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        backbone: Any,
        head: Any,
        tokenizer: Any,
        max_length: int,
        device: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(spec, TokenCounter(tokenizer), max_length, **kwargs)
        self.backbone = backbone  # the transformer without its LM head: last hidden states
        # (2, hidden) rows of W_yes and W_no, or (1, hidden) for a single-logit checkpoint
        self.head = head
        self.tokenizer = tokenizer  # used only on the worker thread
        self.device = device
        self.batch_size = spec.batch_size
        self.prefix_ids: list[int] = tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix_ids: list[int] = tokenizer.encode(SUFFIX, add_special_tokens=False)
        self.middle_max = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.middle_max < 1:
            raise ModelLoadError(
                f"model '{spec.served_id}': max length {max_length} leaves no room between the "
                "reranker template's prefix and suffix"
            )
        self._init_batching(self.settings.optimisations.wide_short_batches)

    @classmethod
    def load(cls, spec: ModelSpec, settings: EngineSettings, health: Health) -> LLMReranker:
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        trust_remote_code = settings.trust_remote_code
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch_dtype(spec.dtype, device)
        config = AutoConfig.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
        tokenizer.padding_side = "left"  # the recipe pads on the left; the score is at position -1
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ModelLoadError(f"model '{spec.served_id}': its tokenizer has no pad token")
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out: any token will do
        architectures = list(getattr(config, "architectures", None) or [])
        load_args = dict(dtype=dtype, trust_remote_code=trust_remote_code)
        if any(a.endswith("ForCausalLM") for a in architectures):
            yes_no = _yes_no_ids(tokenizer)
            if yes_no is None:
                raise ModelLoadError(
                    f"model '{spec.served_id}' cannot be an LLM reranker: its tokenizer has no "
                    "single tokens 'yes' and 'no'"
                )
            model = AutoModelForCausalLM.from_pretrained(spec.source, **load_args)
            # Only two rows of the LM head matter: project onto them instead of the whole
            # vocabulary.
            head = model.get_output_embeddings().weight[list(yes_no)].detach().clone()
        elif any(a.endswith("ForSequenceClassification") for a in architectures):
            if config.num_labels != 1:
                raise ModelLoadError(
                    f"model '{spec.served_id}' cannot be an LLM reranker: it has "
                    f"{config.num_labels} labels, not 1"
                )
            model = AutoModelForSequenceClassification.from_pretrained(spec.source, **load_args)
            score = getattr(model, "score", None)
            if score is None or getattr(score, "bias", None) is not None:
                raise ModelLoadError(
                    f"model '{spec.served_id}' cannot be an LLM reranker: no bias-free 'score' head"
                )
            head = score.weight.detach().clone()
        else:
            raise ModelLoadError(
                f"model '{spec.served_id}' cannot be an LLM reranker: architecture "
                f"{', '.join(architectures) or 'unknown'} is neither *ForCausalLM nor "
                "*ForSequenceClassification"
            )
        backbone = model.base_model.to(device).eval()  # the transformer, final norm included
        limits = [MAX_LENGTH, getattr(config, "max_position_embeddings", MAX_LENGTH)]
        return cls(
            spec,
            backbone=backbone,
            head=head.to(device),
            tokenizer=tokenizer,
            max_length=min(limits),
            device=device,
            settings=settings,
            health=health,
        )

    # --------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self._start_batching(f"llm-reranker-{self.served_id}")

    async def stop(self) -> None:
        await self._stop_batching()

    # --------------------------------------------------------------------------- requests

    def rerank_lengths(self, query: str, docs: Sequence[str], instruction: str | None) -> list[int]:
        """Tokens of each full template, untruncated (the prefix and suffix are counted too)."""
        fixed = len(self.prefix_ids) + len(self.suffix_ids)
        middles = [format_pair(query, d, instruction) for d in docs]
        return [fixed + n for n in self.tokens.count(middles)]

    async def _rerank(self, query: str, docs: list[Text], instruction: str | None) -> np.ndarray:
        # Each pair as the model is fed it, with its tokens as the request counted them.
        middles = [Text(format_pair(query, d.text, instruction), d.tokens) for d in docs]
        return np.array(await self._submit(middles), dtype=np.float64)

    # --------------------------------------------------------------------------- worker thread

    def _tokenize(self, texts: list[str]) -> list[TokenIds]:
        """The recipe's tokenisation: only the middle part is truncated, then prefix + it +
        suffix."""
        middles = self.tokenizer(
            texts,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.middle_max,
        )["input_ids"]
        return [self.prefix_ids + ids + self.suffix_ids for ids in middles]

    def _forward_items(self, items: list[Item]) -> list[float]:
        return self._forward([item.ids for item in items if item.ids is not None]).tolist()

    def _forward(self, batch_ids: Sequence[TokenIds]) -> np.ndarray:
        """Scores of one batch: sigmoid(logit_yes - logit_no) (or of the single logit) at the
        end."""
        import torch

        # Left padding with the pad token, masked out (what the recipe's tokenizer.pad builds).
        padded = pad_ids(batch_ids, self.tokenizer.pad_token_id, left=True)
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        with torch.inference_mode():
            hidden = self.backbone(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).last_hidden_state[:, -1, :]
            logits = hidden @ self.head.T
            if logits.shape[1] == 2:
                logits = logits[:, :1] - logits[:, 1:]
            return torch.sigmoid(logits[:, 0].float()).cpu().numpy().astype(np.float64)
