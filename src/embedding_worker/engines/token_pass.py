"""Forward passes of a sentence-transformers embedder on token ids the worker cut itself: texts
longer than the model's maximum, embedded window by window (`chunked`), and the chunks of one
document encoded together and pooled each from its own tokens (`late_chunked`).

Both need what the engine's own step does not give: the pooled vector before the model's
Normalize module (windows are averaged before normalisation), and the hidden state of every token
(a chunk is pooled from its own span). So the pass runs the model's modules itself: the
Transformer module on padded ids, then the Pooling module or the span means, then the modules
after pooling (Dense) but Normalize, which is applied after combining.

Windows are framed with the model's own special tokens, as the tokenizer frames a text
(`SpecialFrame`), and padded as the engine pads (`tokenization.pad_ids`). Each window waits in the
pass's scheduler (batching.py, scheduler.py) as the texts of the self-run engines do: windows of
several requests share batches, cut to the model's token budget, with service tiers, skipped when
their caller has gone, halved when memory runs out, counted in the metrics and traced. The forward
passes run on the pass's one thread, so the event loop never waits on one.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import current_record
from .batching import Item, SelfBatching, TokenIds
from .spec import ModelSpec
from .tokenization import Text, pad_ids

MEAN = "mean"


@dataclass(frozen=True)
class SpecialFrame:
    """The special tokens a tokenizer puts around one text's tokens ([CLS] ... [SEP], ...
    <|endoftext|>), with their token type ids and the content's."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    suffix_types: tuple[int, ...]
    content_type: int

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.suffix)

    @staticmethod
    def of(tokenizer: Any) -> SpecialFrame:
        """Found by encoding a probe text with and without special tokens."""
        probe = "frame probe"
        bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        full = tokenizer(probe, add_special_tokens=True, return_token_type_ids=True)
        ids = list(full["input_ids"])
        types = list(full.get("token_type_ids") or [0] * len(ids))
        start = next(
            (i for i in range(len(ids) - len(bare) + 1) if ids[i : i + len(bare)] == bare), None
        )
        if start is None:
            raise ValueError("the tokenizer's special tokens change a text's own tokens")
        stop = start + len(bare)
        return SpecialFrame(
            prefix=tuple(ids[:start]),
            suffix=tuple(ids[stop:]),
            prefix_types=tuple(types[:start]),
            suffix_types=tuple(types[stop:]),
            content_type=types[start] if bare else 0,
        )

    def types_of(self, window_tokens: int) -> np.ndarray:
        """The token type ids of a framed window of `window_tokens` tokens."""
        return np.concatenate(
            [
                np.array(self.prefix_types, np.int64),
                np.full(window_tokens - self.size, self.content_type, np.int64),
                np.array(self.suffix_types, np.int64),
            ]
        )

    def framed(self, content: np.ndarray) -> np.ndarray:
        """A window's ids: the content between the special tokens (`types_of` gives its token
        type ids)."""
        return np.concatenate(
            [
                np.array(self.prefix, np.int64),
                content.astype(np.int64),
                np.array(self.suffix, np.int64),
            ]
        )


def window_bounds(content_tokens: int, keep: int) -> list[tuple[int, int]]:
    """Consecutive windows of at most `keep` content tokens, no overlap, covering them all."""
    return [(start, min(start + keep, content_tokens)) for start in range(0, content_tokens, keep)]


@dataclass(frozen=True)
class PassResult:
    """What a pass computed: one vector a text or chunk (float32), and the tokens it embedded."""

    vectors: np.ndarray
    tokens: int


class Wanted(enum.Enum):
    """What a window's forward pass gives back."""

    POOLED = "pooled"  # its pooled vector, through the modules after pooling but Normalize
    STATES = "states"  # its content tokens' hidden states


class TokenPass(SelfBatching):
    """An embedder's modules, run on token ids: `chunked` and `late_chunked`. Their windows are
    batched by the pass's scheduler and computed on its thread (`start` before use)."""

    def __init__(
        self,
        modules: Sequence[Any],
        tokenizer: Any,
        max_length: int,
        *,
        spec: ModelSpec,
        device: Any,
        progressed: Callable[[], None],
        batch_formed: Callable[[Sequence[int], Sequence[Any]], None],
        wide_short_batches: bool = True,
    ) -> None:
        from sentence_transformers.models import Normalize, Pooling

        pooling_at = next(i for i, m in enumerate(modules) if isinstance(m, Pooling))
        self.transformer = modules[0]
        self.pooling = modules[pooling_at]
        self.after = [m for m in modules[pooling_at + 1 :] if not isinstance(m, Normalize)]
        self.normalizes = any(isinstance(m, Normalize) for m in modules)
        self.pooling_mode: str = self.pooling.get_pooling_mode_str()
        self.frame = SpecialFrame.of(tokenizer)
        self.max_length = max_length
        self.keep = max_length - self.frame.size  # content tokens a window holds
        if self.keep < 1:
            raise ValueError("the model's maximum leaves no room inside its special tokens")
        self.with_type_ids = "token_type_ids" in tokenizer.model_input_names
        self.left = tokenizer.padding_side == "left"
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.device = device
        self.spec = spec
        self.served_id = spec.served_id
        self.batch_size = spec.batch_size
        self.progressed = progressed
        self.batch_formed = batch_formed
        self._init_batching(wide_short_batches)

    @staticmethod
    def of(replica: Any, tokenizer: Any, max_length: int, **kwargs: Any) -> TokenPass | None:
        """The pass of a sentence-transformers model (a torch module sequence: Transformer,
        Pooling, ...), or None for any other layout."""
        try:
            from sentence_transformers.models import Pooling, Transformer
        except ImportError:  # pragma: no cover - a dependency of the engine
            return None
        try:
            modules = list(replica)
        except TypeError:
            return None
        if not modules or not isinstance(modules[0], Transformer):
            return None
        if not any(isinstance(m, Pooling) for m in modules):
            return None
        try:
            return TokenPass(modules, tokenizer, max_length, **kwargs)
        except ValueError:
            return None

    async def start(self) -> None:
        await self._start_batching(f"pass-{self.served_id}")

    async def stop(self) -> None:
        await self._stop_batching()

    # ------------------------------------------------------------------------- token arithmetic

    def window_tokens(self, tokens: int) -> int:
        """The tokens embedded for a text of `tokens` tokens (special tokens included) when it
        is embedded window by window."""
        content = max(tokens - self.frame.size, 0)
        windows = max(1, -(-content // self.keep))
        return content + windows * self.frame.size

    # ------------------------------------------------------------------------- the work

    async def chunked(self, contents: Sequence[np.ndarray]) -> PassResult:
        """Each text's vector from its windows: the pooled vectors before normalisation, averaged
        weighted by their content tokens, then normalised as the model's modules do."""
        windows: list[np.ndarray] = []
        owner: list[int] = []
        for text, content in enumerate(contents):
            for ids in self._windows(content):
                windows.append(ids)
                owner.append(text)
        pooled = np.stack(await self._submit(self._texts(windows), Wanted.POOLED))
        weight = np.array([max(len(ids) - self.frame.size, 1) for ids in windows], np.float64)
        sums = np.zeros((len(contents), pooled.shape[1]), np.float64)
        totals = np.zeros(len(contents), np.float64)
        np.add.at(sums, owner, pooled.astype(np.float64) * weight[:, None])
        np.add.at(totals, owner, weight)
        combined = (sums / totals[:, None]).astype(np.float32)
        return PassResult(self._unit(combined), sum(len(ids) for ids in windows))

    async def late_chunked(self, lead: np.ndarray, chunks: Sequence[np.ndarray]) -> PassResult:
        """One vector per chunk of one document: the content tokens of `lead` (a prompt: context
        that belongs to no chunk) and of the chunks, in order, encoded in consecutive windows of
        the model's maximum, each chunk mean-pooled over its own tokens' hidden states."""
        assert self.pooling_mode == MEAN
        content = np.concatenate([lead, *chunks]) if len(chunks) else lead
        windows = self._windows(content)
        states = await self._submit(self._texts(windows), Wanted.STATES)
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._thread, self._chunk_means, states, lead, chunks)
        return PassResult(self._unit(vectors), sum(len(ids) for ids in windows))

    def _texts(self, windows: Sequence[np.ndarray]) -> list[Text]:
        record = current_record.get()
        return [Text("", len(ids), ids=ids, request=record) for ids in windows]

    def _tokenize(self, texts: list[str]) -> list[TokenIds]:
        raise AssertionError("every window carries its ids")

    def _forward_items(self, items: list[Item]) -> list[Any]:
        """One forward pass over windows; each gives what its call asked (`Wanted`)."""
        import torch

        with torch.inference_mode():
            features = self.transformer(self._features([item.text.fed_ids for item in items]))
            results: list[Any] = [None] * len(items)
            if any(item.options is Wanted.POOLED for item in items):
                vectors = self._finish(self.pooling(dict(features))["sentence_embedding"])
                for i, item in enumerate(items):
                    if item.options is Wanted.POOLED:
                        results[i] = vectors[i]
            hidden = features["token_embeddings"]
            mask = features["attention_mask"].bool()
            for i, item in enumerate(items):
                if item.options is Wanted.STATES:
                    own = hidden[i][mask[i]]
                    results[i] = own[len(self.frame.prefix) : len(own) - len(self.frame.suffix)]
        return results

    def _chunk_means(
        self, states: Sequence[Any], lead: np.ndarray, chunks: Sequence[np.ndarray]
    ) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = torch.cat(list(states))  # one row a content token, in order
            start = len(lead)
            means = []
            for chunk in chunks:
                span = tokens[start : start + len(chunk)]
                means.append(span.float().mean(0).to(span.dtype))
                start += len(chunk)
            return self._finish(torch.stack(means))

    def _features(self, windows: Sequence[np.ndarray]) -> dict[str, Any]:
        padded = pad_ids(
            windows,
            self.pad_id,
            left=self.left,
            type_ids=[self.frame.types_of(len(ids)) for ids in windows]
            if self.with_type_ids
            else None,
        )
        return {name: tensor.to(self.device) for name, tensor in padded.items()}

    def _finish(self, pooled: Any) -> np.ndarray:
        """The modules after pooling but Normalize, as float32 rows."""
        features = {"sentence_embedding": pooled}
        for module in self.after:
            features = module(features)
        return features["sentence_embedding"].float().cpu().numpy()

    def _windows(self, content: np.ndarray) -> list[np.ndarray]:
        return [
            self.frame.framed(content[a:b]) for a, b in window_bounds(len(content), self.keep)
        ] or [self.frame.framed(content[:0])]

    def _unit(self, vectors: np.ndarray) -> np.ndarray:
        if not self.normalizes:
            return vectors
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, np.finfo(np.float32).tiny)
