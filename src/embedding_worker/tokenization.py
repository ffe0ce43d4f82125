"""Token counts, and one tokenization per text where the engine would repeat it.

The worker tokenizes every input before the engine sees it: `usage` and the token limits need exact
counts. Infinity then tokenizes the same texts again in its pre-processing thread. For an embedder
whose own tokenization the worker can reproduce exactly (checked on probe texts when the model loads),
each counted text carries its encoding to the engine, and the engine's tokenize step only pads them.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np

from .logs import get_logger

log = get_logger(__name__)

# Requests of up to this many texts are counted one text at a time. encode_batch hands even one
# text to the tokenizer's thread pool, whose threads then compete with the model's for the CPU:
# one-text requests through the local server reached 0.86x the engine with it, 0.95x without.
_ONE_BY_ONE_MAX = 8

# The check that reuse gives the engine exactly what its own tokenize step gives: surrounding
# spaces, case, accents, CJK, an emoji, and lengths that need padding.
PROBE_TEXTS = (
    "Hello world",
    "  Leading and trailing spaces \n",
    "MiXeD CaSe, punctuation!? and numbers 12345",
    "naïve café, Ærøskøbing, 東京, 🙂",
    "x",
)

_FEATURE_NAMES = ("input_ids", "token_type_ids", "attention_mask")


class TokenizedText(str):
    """A text with the encoding the worker counted for it (the text as the model's tokenize step sees
    it, special tokens included, not truncated). Engines that cannot use it see a plain string."""

    encoding: Any


class TokenCounter:
    """Counts tokens exactly as the model's tokenizer does, special tokens included.

    Uses its own copy of the Rust tokenizer with truncation and padding off: the engine's copy is
    used from Infinity's threads, and a fast tokenizer whose settings change while another thread
    encodes raises "Already borrowed".
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = copy.deepcopy(backend) if backend is not None else None
        if self._fast is not None:
            self._fast.no_truncation()
            self._fast.no_padding()
        # What the model's tokenize step does to a text first (sentence-transformers strips it).
        self.prepare: Callable[[str], str] | None = None
        # Texts of up to this many tokens carry their encoding to the engine (0: none do).
        self.reuse_up_to = 0

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _encode_batch(self, inputs: list[Any]) -> list[Any]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: ~20% less time, same ids.
        encode = getattr(self._fast, "encode_batch_fast", None) or self._fast.encode_batch
        return encode(inputs)

    def _encode(self, texts: Sequence[str]) -> list[Any]:
        assert self._fast is not None
        if self.prepare is not None:
            texts = [self.prepare(text) for text in texts]
        if len(texts) <= _ONE_BY_ONE_MAX:
            return [self._fast.encode(text) for text in texts]
        return self._encode_batch(list(texts))

    def count(self, texts: Sequence[str]) -> list[int]:
        if self._fast is not None:
            return [len(e.ids) for e in self._encode(texts)]
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]

    def tokenize(self, texts: Sequence[str]) -> tuple[list[str], list[int]]:
        """The texts to hand to the engine, and their token counts.

        With reuse on, each text that fits the model untruncated becomes a `TokenizedText`; a longer
        one stays plain (the engine truncates it its own way).
        """
        if not self.reuse_up_to:
            return list(texts), self.count(texts)
        encodings = self._encode(texts)
        lengths = [len(e.ids) for e in encodings]
        out: list[str] = []
        for text, encoding, length in zip(texts, encodings, lengths):
            if length <= self.reuse_up_to:
                text = TokenizedText(text)
                text.encoding = encoding
            out.append(text)
        return out, lengths

    def count_pairs(self, query: str, docs: Sequence[str]) -> list[int]:
        if self._fast is not None:
            return [len(e.ids) for e in self._encode_batch([(query, d) for d in docs])]
        encoded = self.tokenizer([query] * len(docs), list(docs), truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        # The engine tokenizes text again and adds the model's special tokens itself.
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class PaddedBatch:
    """Pads encodings into the tensors a Hugging Face tokenizer returns for a batch (padding to the
    longest, on the tokenizer's side, with its pad ids)."""

    def __init__(self, tokenizer: Any) -> None:
        self.names = [name for name in tokenizer.model_input_names if name in _FEATURE_NAMES]
        self.complete = len(self.names) == len(tokenizer.model_input_names)
        self.left = tokenizer.padding_side == "left"
        self.pad_id = tokenizer.pad_token_id
        self.pad_type_id = tokenizer.pad_token_type_id

    def __call__(self, encodings: Sequence[Any]) -> dict[str, Any]:
        import torch

        rows, width = len(encodings), max(len(e.ids) for e in encodings)
        arrays = {
            "input_ids": np.full((rows, width), self.pad_id, dtype=np.int64),
            "token_type_ids": np.full((rows, width), self.pad_type_id, dtype=np.int64),
            "attention_mask": np.zeros((rows, width), dtype=np.int64),
        }
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            cols = slice(width - n, width) if self.left else slice(0, n)
            arrays["input_ids"][row, cols] = encoding.ids
            arrays["token_type_ids"][row, cols] = encoding.type_ids
            arrays["attention_mask"][row, cols] = 1
        return {name: torch.from_numpy(arrays[name]) for name in self.names}


def _same_features(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        isinstance(a[k], torch.Tensor)
        and isinstance(b[k], torch.Tensor)
        and a[k].dtype == b[k].dtype
        and torch.equal(a[k], b[k])
        for k in a
    )


class ReusedEncodings:
    """An embedder's tokenize step (Infinity's `encode_pre`) that pads the encodings the worker made
    when counting. A batch in which any text lacks one (token-id input, a text that must be truncated,
    a caller that is not the worker) goes through the replica's own step, unchanged."""

    def __init__(self, own_step: Callable[[list[Any]], dict[str, Any]], pad: PaddedBatch) -> None:
        self.own_step = own_step
        self.pad = pad

    def __call__(self, sentences: list[Any]) -> dict[str, Any]:
        encodings = [getattr(s, "encoding", None) for s in sentences]
        if any(e is None for e in encodings):
            return self.own_step(sentences)
        return self.pad(encodings)


def reuse_encodings(replica: Any, counter: TokenCounter) -> bool:
    """Let `replica` (an Infinity sentence-transformers embedder) take the counter's encodings instead
    of tokenizing again. Installed only when the reuse gives exactly the tensors of the replica's own
    tokenize step on the probe texts; returns whether it was installed.
    """
    first = getattr(replica, "_first_module", lambda: None)()
    tokenizer = getattr(first, "tokenizer", None)
    max_length = getattr(first, "max_seq_length", None)
    if counter._fast is None or tokenizer is None or not max_length or not hasattr(first, "do_lower_case"):
        return False
    pad = PaddedBatch(tokenizer)
    if not pad.complete or pad.pad_id is None:
        return False

    def prepare(text: str) -> str:  # sentence_transformers.models.Transformer.tokenize, first steps
        text = text.strip()
        return text.lower() if first.do_lower_case else text

    own_step = replica.encode_pre
    counter.prepare, counter.reuse_up_to = prepare, int(max_length)
    probes, _ = counter.tokenize(list(PROBE_TEXTS))
    try:
        reusable = all(isinstance(p, TokenizedText) for p in probes) and _same_features(
            pad([p.encoding for p in probes]), own_step(list(PROBE_TEXTS))
        )
    except Exception as exc:  # a tokenizer this cannot reproduce: keep the engine's own step
        log.debug("token reuse check failed: %s", exc)
        reusable = False
    if not reusable:
        counter.prepare, counter.reuse_up_to = None, 0
        return False
    replica.encode_pre = ReusedEncodings(own_step, pad)
    return True
