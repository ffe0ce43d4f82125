"""Token counts, and one tokenization per text where the engine would repeat it.

The worker tokenizes every input before the engine sees it: `usage` and the token limits need exact
counts. Infinity then tokenizes the same texts again in its pre-processing thread. For an embedder
whose own tokenization the worker can reproduce exactly (checked on probe texts when the model
loads), each counted text carries its token ids to the engine, and the engine's tokenize step only
pads them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..logs import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

# Requests of up to this many texts, and this many characters in all, are counted one text at a
# time. encode_batch hands even one text to the tokenizer's thread pool, whose threads then compete
# with the model's for the CPU (docs/design.md, "Token counts of small requests"). But `encode`
# holds the GIL for the whole text, every other thread stopped, the event loop included, and
# encode_batch releases it: long texts take encode_batch whatever their number.
_ONE_BY_ONE_MAX = 8
_ONE_BY_ONE_CHARS = 16_384

# `Encoding.truncate` splits every token past the cut into overflowing encodings of the cut's
# length, and `post_process` adds the special tokens to each, both holding the GIL: 2.2 s for a
# text of 4.4 million tokens. A text of more than this many times the cut is encoded again by a copy
# of the tokenizer that cuts while it encodes, with the GIL released; the same Rust steps, so the
# same ids.
_CUT_IN_ENCODER = 8

# The check that reuse gives the engine exactly what its own tokenize step gives: surrounding
# spaces, case, accents, CJK, an emoji, and lengths that need padding (and one that needs a cut).
PROBE_TEXTS = (
    "Hello world",
    "  Leading and trailing spaces \n",
    "MiXeD CaSe, punctuation!? and numbers 12345",
    "naïve café, Ærøskøbing, 東京, 🙂",
    "x",
)

_FEATURE_NAMES = ("input_ids", "token_type_ids", "attention_mask")


@dataclass(eq=False, slots=True)
class Text:
    """A text as the worker hands it to an engine: the text, the tokens the model is fed for it
    (special tokens included, before the cut to the model's maximum), which the scheduler bounds
    batches by (scheduler.py), and, where the engine takes the worker's token ids
    (`TokenCounter.carry_token_ids`), those ids, prepared, cut and with special tokens as the
    model's own tokenize step makes them.

    The ids are plain int64 arrays, not the tokenizer's Encoding: that holds the token strings and
    masks too, many times the ids' size, and texts wait in the queue with them (docs/design.md)."""

    text: str
    tokens: int
    ids: np.ndarray | None = None
    type_ids: np.ndarray | None = None  # only where the model takes token_type_ids
    request: Any = None  # the request's metrics record (metrics.tag_inputs), where metrics are on

    @property
    def fed_ids(self) -> np.ndarray:
        """The ids the model is fed (only for a text that carries them)."""
        assert self.ids is not None, "a text without its token ids"
        return self.ids

    @property
    def tokens_fed(self) -> int:
        return len(self.fed_ids)

    @classmethod
    def uncounted(cls, text: str) -> Text:
        """A text whose tokens nobody counted (a caller outside the worker's operations): its
        characters stand for them, which most tokenizers do not exceed."""
        return cls(text, len(text))


def as_texts(texts: Sequence[str | Text]) -> list[Text]:
    """`texts` as `Text`s: plain strings `Text.uncounted`."""
    return [text if isinstance(text, Text) else Text.uncounted(text) for text in texts]


def _one_by_one(encodings: list[Any]) -> Iterator[Any]:
    """Each encoding of the list, which lets go of it once read: an encoding is freed holding the
    GIL (0.25 s for 4 million tokens), so one at a time lets other threads in between."""
    for i, encoding in enumerate(encodings):
        encodings[i] = None
        yield encoding


def counted(texts: Sequence[str], lengths: Sequence[int]) -> list[Text]:
    """`texts` as `Text`s of `lengths` tokens each."""
    return [Text(text, tokens) for text, tokens in zip(texts, lengths)]


@dataclass(frozen=True)
class ModelInput:
    """What a model's own tokenize step does to a text, for the worker to do the same."""

    prepare: Callable[[str], str]  # first, on the text (sentence-transformers strips it)
    max_length: int  # special tokens included
    truncation_side: str  # "right" or "left"
    with_type_ids: bool  # whether the model takes token_type_ids


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
        # Set by `carry_token_ids` when the engine takes the counter's ids: texts then carry them.
        self.model_input: ModelInput | None = None
        self._cutter: Any = None  # a copy that cuts to `model_input`, made when first needed

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _encode_batch(self, inputs: list[Any], add_special_tokens: bool = True) -> list[Any]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: less time, the same
        # ids.
        assert self._fast is not None
        encode = getattr(self._fast, "encode_batch_fast", None) or self._fast.encode_batch
        return encode(inputs, add_special_tokens=add_special_tokens)

    def _encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Any]:
        assert self._fast is not None
        if self.model_input is not None:
            texts = [self.model_input.prepare(text) for text in texts]
        if len(texts) <= _ONE_BY_ONE_MAX and sum(map(len, texts)) <= _ONE_BY_ONE_CHARS:
            return [
                self._fast.encode(text, add_special_tokens=add_special_tokens) for text in texts
            ]
        return self._encode_batch(list(texts), add_special_tokens)

    def count(self, texts: Sequence[str]) -> list[int]:
        if self._fast is not None:
            return [len(e) for e in _one_by_one(self._encode(texts))]
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]

    def content_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's token ids, uncut and without special tokens, as the model's own step makes
        them (the text prepared as `model_input` says, where the engine takes the ids)."""
        if self._fast is None:
            ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            return [np.array(row, dtype=np.int64) for row in ids]
        spec = self.model_input
        prepared = [spec.prepare(text) for text in texts] if spec is not None else list(texts)
        encodings = self._encode_batch(prepared, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in _one_by_one(encodings)]

    def tokenize(self, texts: Sequence[str]) -> tuple[list[Text], list[int]]:
        """The texts to hand to the engine, and their token counts (untruncated).

        Each text becomes a `Text`; when the engine takes the counter's ids, one that carries
        them, cut to the model's maximum the way its tokenizer cuts (the count is taken
        before the cut).
        """
        spec = self.model_input
        if spec is None or self._fast is None:
            lengths = self.count(texts)
            return counted(texts, lengths), lengths
        specials = self._fast.num_special_tokens_to_add(False)
        keep = spec.max_length - specials
        out: list[Text] = []
        lengths = []
        encodings = self._encode(texts, add_special_tokens=False)
        for text, encoding in zip(texts, _one_by_one(encodings)):
            lengths.append(len(encoding) + specials)
            if len(encoding) > _CUT_IN_ENCODER * keep:
                del encoding  # its tokens, freed before the copy's
                encoding = self._cut(spec, text)
            else:
                if len(encoding) > keep:
                    encoding.truncate(keep, direction=spec.truncation_side)
                encoding = self._fast.post_process(encoding)
            type_ids = None
            if spec.with_type_ids:
                type_ids = np.array(encoding.type_ids, dtype=np.int64)
            ids = np.array(encoding.ids, dtype=np.int64)
            out.append(Text(text, lengths[-1], ids, type_ids))
        return out, lengths

    def carry_token_ids(
        self,
        model_input: ModelInput,
        reproduces: Callable[[list[str], list[Text]], bool],
    ) -> bool:
        """From now on `tokenize` gives each text the ids the model is fed for it, as
        `model_input` describes the model's tokenize step, so that the engine need not tokenize
        it again; only if `reproduces(texts, tokenized)`, the caller's comparison with the
        model's own step, holds on the probe texts and one longer than the model's maximum (and
        the counts stay those of `count`). Returns whether the texts carry their ids."""
        if self._fast is None:
            return False
        self.model_input = model_input
        texts = [*PROBE_TEXTS, "many words " * model_input.max_length]
        try:
            tokenized, lengths = self.tokenize(texts)
            carried = lengths == self.count(texts) and reproduces(texts, tokenized)
        except Exception as exc:  # a tokenizer this cannot reproduce: the engine tokenizes
            log.debug("token reuse check failed: %s", exc)
            carried = False
        if not carried:
            self.model_input = None
        return carried

    def _cut(self, spec: ModelInput, text: str) -> Any:
        """The encoding of a long text, cut and with its special tokens, made with the GIL
        released."""
        assert self._fast is not None
        cutter = self._cutter
        if cutter is None:  # two threads may both make one: either will do
            cutter = copy.deepcopy(self._fast)
            cutter.enable_truncation(spec.max_length, direction=spec.truncation_side)
            self._cutter = cutter
        encode = getattr(cutter, "encode_batch_fast", None) or cutter.encode_batch
        return encode([spec.prepare(text)], add_special_tokens=True)[0]

    def keep_end(self, text: str, tokens: int) -> str:
        """The end of `text` that holds at most `tokens` tokens (special tokens not counted), cut
        where a word starts, so that the kept words tokenize as they did in the whole text: what
        truncating at the start keeps. A text short enough is kept whole."""
        tokens = max(tokens, 1)
        if self._fast is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return text if len(ids) <= tokens else self.decode(ids[-tokens:])
        # encode_batch with offsets: `encode` would hold the GIL for all of a long text.
        encoding = self._fast.encode_batch([text], add_special_tokens=False)[0]
        first = len(encoding) - tokens
        if first <= 0:
            return text
        # Not inside a word: a word's second piece ("##ing") alone would tokenize otherwise. One
        # token at a time: `word_ids` and `offsets` would copy a list as long as the text.
        word = encoding.token_to_word
        while (
            first < len(encoding) - 1 and word(first) is not None and word(first) == word(first - 1)
        ):
            first += 1
        span = encoding.token_to_chars(first)
        assert span is not None
        return text[span[0] :]

    def count_pairs(self, query: str, docs: Sequence[str]) -> list[int]:
        if self._fast is not None:
            return [len(e) for e in self._encode_batch([(query, d) for d in docs])]
        encoded = self.tokenizer([query] * len(docs), list(docs), truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # Skipped by default: the engine tokenizes text again and adds the model's special tokens
        # itself.
        if self._fast is not None:
            if len(ids) > _ONE_BY_ONE_CHARS:  # `decode` holds the GIL: 3.4 s for 2 million ids
                return self._fast.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
            return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def has_offsets(self) -> bool:
        """Whether `tokens_of` can answer: only a fast tokenizer knows its tokens' offsets."""
        return self._fast is not None

    def tokens_of(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Tokens]:
        """Each text's tokens as `count` counts them (the model's own preparation of the text
        included, when the engine takes the counter's ids): ids, token strings, which are special,
        and character offsets into the text.

        The preparation strips the text (sentence-transformers' step): offsets are moved by what
        it stripped from the start, so they index the text itself. Where it also lower-cases a
        character into more characters, they index the prepared text."""
        assert self._fast is not None
        spec = self.model_input
        prepared = [spec.prepare(text) for text in texts] if spec is not None else list(texts)
        # encode_batch, not `encode`: it releases the GIL for long texts, and keeps the offsets.
        encodings = self._fast.encode_batch(prepared, add_special_tokens=add_special_tokens)
        out = []
        for text, ready, encoding in zip(texts, prepared, _one_by_one(encodings)):
            lead = len(text) - len(text.lstrip())
            shift = lead if ready != text and len(ready) == len(text.strip()) else 0
            out.append(
                Tokens(
                    ids=encoding.ids,
                    strings=encoding.tokens,
                    special=[bool(flag) for flag in encoding.special_tokens_mask],
                    offsets=[(start + shift, stop + shift) for start, stop in encoding.offsets],
                )
            )
        return out


@dataclass(frozen=True)
class Tokens:
    """One text's tokens, for callers who count or inspect them (`tokens_of`)."""

    ids: list[int]
    strings: list[str]  # each token's string in the vocabulary ("##ing", "Ġthe")
    special: list[bool]  # added by the tokenizer ([CLS], </s>) or a special token in the text
    offsets: list[tuple[int, int]]  # character offsets into the text; (0, 0) for an added one


def pad_ids(
    rows: Sequence[Sequence[int] | np.ndarray],
    pad_id: int,
    *,
    left: bool = False,
    type_ids: Sequence[np.ndarray | None] | None = None,
    pad_type_id: int = 0,
    width: int = 0,
) -> dict[str, torch.Tensor]:
    """The int64 tensors of a batch of token ids, as a Hugging Face tokenizer pads them: each row
    padded with `pad_id` to the longest row (or to `width` if that is longer), on the left or the
    right, and its `attention_mask`; with `type_ids` (a row's None: all `pad_type_id`), the
    `token_type_ids` too. Every engine that pads ids itself pads them here, so that a row's
    tensors are the same whichever engine or batch it is in."""
    import torch

    count, width = len(rows), max(width, *(len(ids) for ids in rows))
    input_ids = np.full((count, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((count, width), dtype=np.int64)
    token_types = None if type_ids is None else np.full((count, width), pad_type_id, np.int64)
    for row, ids in enumerate(rows):
        n = len(ids)
        cols = slice(width - n, width) if left else slice(0, n)
        input_ids[row, cols] = ids
        attention_mask[row, cols] = 1
        if token_types is not None and type_ids is not None and type_ids[row] is not None:
            token_types[row, cols] = type_ids[row]
    tensors = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
    }
    if token_types is not None:
        tensors["token_type_ids"] = torch.from_numpy(token_types)
    return tensors


class PaddedBatch:
    """Pads the ids of `Text`s into the tensors a Hugging Face tokenizer returns for a
    batch: to the longest, on the tokenizer's padding side, with its pad ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.names = [name for name in tokenizer.model_input_names if name in _FEATURE_NAMES]
        self.complete = len(self.names) == len(tokenizer.model_input_names)
        self.left = tokenizer.padding_side == "left"
        self.pad_id = tokenizer.pad_token_id
        self.pad_type_id = tokenizer.pad_token_type_id

    @property
    def with_type_ids(self) -> bool:
        return "token_type_ids" in self.names

    def __call__(self, texts: Sequence[Text], width: int = 0) -> dict[str, Any]:
        """The batch's tensors, padded to the longest text, or to `width` if that is longer."""
        padded = pad_ids(
            [text.fed_ids for text in texts],
            self.pad_id,
            left=self.left,
            type_ids=[text.type_ids for text in texts] if self.with_type_ids else None,
            pad_type_id=self.pad_type_id,
            width=width,
        )
        return {name: padded[name] for name in self.names}


def _same_features(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        isinstance(a[k], torch.Tensor)
        and isinstance(b[k], torch.Tensor)
        and a[k].dtype == b[k].dtype
        and torch.equal(a[k], b[k])
        for k in a
    )


def bucket_width(tokens: int) -> int:
    """The padded length of a text of `tokens` tokens in a batch-invariant batch: the next multiple
    of 16 up to 64 tokens, of 32 up to 256, of 64 beyond. Short texts, whose batches cost the
    least, are padded the least; a batch of mixed lengths pads less than to its longest text."""
    step = 16 if tokens <= 64 else 32 if tokens <= 256 else 64
    return -(-tokens // step) * step


class Buckets(list):
    """A batch split by padded length: (the batch's rows, their tensors) for each length. The
    forward pass (`BucketedForward`) runs each and puts the vectors back in the batch's order."""

    rows: int


class BucketedForward:
    """An embedder's forward step (Infinity's `encode_core`) that runs a `Buckets` batch one
    padded length at a time. In bfloat16 the padded length changes a vector's rounding (CPU
    kernels switch their blocking with it); the batch size and the other rows do not. Padded to a
    length that only its own length decides, a text's vector is the same bits whatever batch it
    is in, alone or not."""

    def __init__(self, own_step: Callable[[Any], Any]) -> None:
        self.own_step = own_step

    def __call__(self, features: Any) -> Any:
        if not isinstance(features, Buckets):
            return self.own_step(features)
        import torch

        vectors = None
        for rows, tensors in features:
            out = self.own_step(tensors)
            if vectors is None:
                vectors = torch.empty((features.rows, *out.shape[1:]), dtype=out.dtype)
            vectors[rows] = out
        return vectors


class ReusedTokenIds:
    """An embedder's tokenize step (Infinity's `encode_pre`) that pads the token ids the worker made
    when counting, or with `bucketed` groups them by padded length (`bucket_width`) for
    `BucketedForward`. A batch in which any text has none (token-id input, decoded; a caller that
    is not the worker) goes through the replica's own step, unchanged."""

    def __init__(
        self,
        own_step: Callable[[list[Any]], dict[str, Any]],
        pad: PaddedBatch,
        bucketed: bool = False,
    ) -> None:
        self.own_step = own_step
        self.pad = pad
        self.bucketed = bucketed

    def __call__(self, sentences: list[Any]) -> Any:
        if not all(isinstance(s, Text) and s.ids is not None for s in sentences):
            return self.own_step([s.text if isinstance(s, Text) else s for s in sentences])
        if not self.bucketed:
            return self.pad(sentences)
        by_width: dict[int, list[int]] = {}
        for row, text in enumerate(sentences):
            by_width.setdefault(bucket_width(text.tokens_fed), []).append(row)
        buckets = Buckets(
            (rows, self.pad([sentences[r] for r in rows], width))
            for width, rows in sorted(by_width.items())
        )
        buckets.rows = len(sentences)
        return buckets


def reuse_token_ids(
    replica: Any, first: Any, counter: TokenCounter, batch_invariant: bool = False
) -> bool:
    """Let `replica` (an Infinity sentence-transformers embedder, whose first module is `first`)
    take the counter's token ids
    instead of tokenizing again. Installed only when the reuse gives exactly the tensors of the
    replica's own tokenize step on the probe texts; returns whether it was installed. With
    `batch_invariant`, batches are also split by padded length (`BucketedForward`).
    """
    tokenizer = getattr(first, "tokenizer", None)
    max_length = getattr(first, "max_seq_length", None)
    if tokenizer is None or not max_length:
        return False
    if first is None or not hasattr(first, "do_lower_case"):  # not an ST models.Transformer
        return False
    pad = PaddedBatch(tokenizer)
    if not pad.complete or pad.pad_id is None:
        return False

    def prepare(text: str) -> str:  # sentence_transformers.models.Transformer.tokenize, first steps
        text = text.strip()
        return text.lower() if first.do_lower_case else text

    own_step = replica.encode_pre
    model_input = ModelInput(
        prepare=prepare,
        max_length=int(max_length),
        truncation_side=getattr(tokenizer, "truncation_side", "right"),
        with_type_ids=pad.with_type_ids,
    )

    def reproduces(texts: list[str], tokenized: list[Text]) -> bool:
        return _same_features(pad(tokenized), own_step(texts))

    if not counter.carry_token_ids(model_input, reproduces):
        return False
    bucketed = batch_invariant and not getattr(replica, "mode_colbert", False)
    replica.encode_pre = ReusedTokenIds(own_step, pad, bucketed)
    if bucketed:
        replica.encode_core = BucketedForward(replica.encode_core)
    return True
