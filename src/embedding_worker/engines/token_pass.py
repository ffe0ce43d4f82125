"""Forward passes of a sentence-transformers embedder on token ids the worker cut itself: texts
longer than the model's maximum, embedded window by window (`chunked`), and the chunks of one
document encoded together and pooled each from its own tokens (`late_chunked`).

Both need what the engine's own step does not give: the pooled vector before the model's
Normalize module (windows are averaged before normalisation), and the hidden state of every token
(a chunk is pooled from its own span). So the pass runs the model's modules itself: the
Transformer module on padded ids, then the Pooling module or the span means, then the modules
after pooling (Dense) but Normalize, which is applied after combining.

Windows are framed with the model's own special tokens, as the tokenizer frames a text
(`SpecialFrame`), and padded as the engine pads (`tokenization.pad_ids`). Each pass runs on the
model's one token-pass thread, so passes of one model never run at once and the event loop never
waits on a forward pass; its batches are cut to the model's token budget (budget.py).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .budget import rows_for, token_bounded
from .tokenization import pad_ids

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

    def framed(self, content: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A window's ids and token type ids: the content between the special tokens."""
        ids = np.concatenate(
            [
                np.array(self.prefix, np.int64),
                content.astype(np.int64),
                np.array(self.suffix, np.int64),
            ]
        )
        types = np.concatenate(
            [
                np.array(self.prefix_types, np.int64),
                np.full(len(content), self.content_type, np.int64),
                np.array(self.suffix_types, np.int64),
            ]
        )
        return ids, types


def window_bounds(content_tokens: int, keep: int) -> list[tuple[int, int]]:
    """Consecutive windows of at most `keep` content tokens, no overlap, covering them all."""
    return [(start, min(start + keep, content_tokens)) for start in range(0, content_tokens, keep)]


@dataclass(frozen=True)
class PassResult:
    """What a pass computed: one vector a text or chunk (float32), and the tokens it embedded."""

    vectors: np.ndarray
    tokens: int


class TokenPass:
    """An embedder's modules, run on token ids: `chunked` and `late_chunked`, each on the
    model's token-pass thread (`run`)."""

    def __init__(
        self,
        modules: Sequence[Any],
        tokenizer: Any,
        max_length: int,
        *,
        device: Any,
        batch_size: int,
        max_batch_tokens: int,
        progressed: Callable[[], None],
        name: str,
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
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.progressed = progressed
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"pass-{name}")

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

    # ------------------------------------------------------------------------- token arithmetic

    def window_tokens(self, tokens: int) -> int:
        """The tokens embedded for a text of `tokens` tokens (special tokens included) when it
        is embedded window by window."""
        content = max(tokens - self.frame.size, 0)
        windows = max(1, -(-content // self.keep))
        return content + windows * self.frame.size

    # ------------------------------------------------------------------------- the work

    async def run(self, call: Callable[..., PassResult], *args: Any) -> PassResult:
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, call, *args)

    def stop(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Row indices by ascending length, cut to the model's batch size and token budget."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return list(
            token_bounded(
                order, lengths.__getitem__, self.max_batch_tokens, rows_for(self.batch_size)
            )
        )

    def _features(self, windows: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        padded = pad_ids(
            [ids for ids, _ in windows],
            self.pad_id,
            left=self.left,
            type_ids=[types for _, types in windows] if self.with_type_ids else None,
        )
        return {name: tensor.to(self.device) for name, tensor in padded.items()}

    def _finish(self, pooled: Any) -> np.ndarray:
        """The modules after pooling but Normalize, as float32 rows."""
        features = {"sentence_embedding": pooled}
        for module in self.after:
            features = module(features)
        return features["sentence_embedding"].float().cpu().numpy()

    def _windows(self, content: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return [
            self.frame.framed(content[a:b]) for a, b in window_bounds(len(content), self.keep)
        ] or [self.frame.framed(content[:0])]

    def _unit(self, vectors: np.ndarray) -> np.ndarray:
        if not self.normalizes:
            return vectors
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, np.finfo(np.float32).tiny)

    def chunked(self, contents: Sequence[np.ndarray]) -> PassResult:
        """Each text's vector from its windows: the pooled vectors before normalisation, averaged
        weighted by their content tokens, then normalised as the model's modules do."""
        import torch

        windows: list[tuple[np.ndarray, np.ndarray]] = []
        owner: list[int] = []
        weight: list[int] = []
        for text, content in enumerate(contents):
            for ids, types in self._windows(content):
                windows.append((ids, types))
                owner.append(text)
                weight.append(max(len(ids) - self.frame.size, 1))
        pooled = np.empty((len(windows), 0), np.float32)
        for rows in self._batches([len(ids) for ids, _ in windows]):
            with torch.inference_mode():
                features = self._features([windows[r] for r in rows])
                features = self.transformer(features)
                features = self.pooling(features)
                vectors = self._finish(features["sentence_embedding"])
            if pooled.shape[1] == 0:
                pooled = np.empty((len(windows), vectors.shape[1]), np.float32)
            pooled[rows] = vectors
            self.progressed()
        sums = np.zeros((len(contents), pooled.shape[1]), np.float64)
        totals = np.zeros(len(contents), np.float64)
        np.add.at(sums, owner, pooled.astype(np.float64) * np.array(weight)[:, None])
        np.add.at(totals, owner, weight)
        combined = (sums / totals[:, None]).astype(np.float32)
        return PassResult(self._unit(combined), sum(len(ids) for ids, _ in windows))

    def late_chunked(self, lead: np.ndarray, chunks: Sequence[np.ndarray]) -> PassResult:
        """One vector per chunk of one document: the content tokens of `lead` (a prompt: context
        that belongs to no chunk) and of the chunks, in order, encoded in consecutive windows of
        the model's maximum, each chunk mean-pooled over its own tokens' hidden states."""
        import torch

        assert self.pooling_mode == MEAN
        content = np.concatenate([lead, *chunks]) if len(chunks) else lead
        windows = self._windows(content)
        states: list[Any] = [None] * len(windows)
        for rows in self._batches([len(ids) for ids, _ in windows]):
            with torch.inference_mode():
                features = self.transformer(self._features([windows[r] for r in rows]))
                hidden = features["token_embeddings"]
                mask = features["attention_mask"].bool()
                for i, row in enumerate(rows):
                    own = hidden[i][mask[i]]
                    states[row] = own[len(self.frame.prefix) : len(own) - len(self.frame.suffix)]
            self.progressed()
        with torch.inference_mode():
            tokens = torch.cat(states)  # one row a content token, in order
            start = len(lead)
            means = []
            for chunk in chunks:
                span = tokens[start : start + len(chunk)]
                means.append(span.float().mean(0).to(span.dtype))
                start += len(chunk)
            vectors = self._finish(torch.stack(means))
        return PassResult(self._unit(vectors), sum(len(ids) for ids, _ in windows))
