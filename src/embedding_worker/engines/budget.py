"""Batches bounded by padded tokens, and forward passes that an out-of-memory error splits.

Infinity and the LLM reranker cut batches by count (BATCH_SIZES), but a forward pass costs memory by
its padded size: rows times the longest row's tokens (and attention by the square of that length).
32 texts of 8192 tokens need 64 times the memory of 32 of 128. So every batch is also cut so that
rows x longest stays within the model's MAX_BATCH_TOKENS, and a text longer than that goes alone.

The default budget is the batch size times `TYPICAL_TEXT_TOKENS`: batches of texts up to that long
keep BATCH_SIZES rows, and only longer texts go in fewer. Batches of short texts (none longer than
`SHORT_TEXT_TOKENS`) may hold up to `ROWS_PER_BATCH_SIZE` times BATCH_SIZES, within the budget:
on a CPU, wider batches of short texts take fewer CPU seconds a text, where wider batches of
medium texts take more (docs/design.md, "Batches bounded by tokens").

When a forward pass still runs out of memory (a GPU shared with another process, fragmentation),
`SplitOnOutOfMemory` runs the batch again in halves, down to one row, instead of failing its
requests; a row alone that does not fit raises its error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from ..logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

# Tokens of a typical text, times the batch size: the default MAX_BATCH_TOKENS.
TYPICAL_TEXT_TOKENS = 512


# Batches whose longest text has at most SHORT_TEXT_TOKENS tokens may hold ROWS_PER_BATCH_SIZE
# times BATCH_SIZES texts (engines batched by Infinity); other batches, BATCH_SIZES.
SHORT_TEXT_TOKENS = 32
ROWS_PER_BATCH_SIZE = 8


def default_max_batch_tokens(batch_size: int) -> int:
    return batch_size * TYPICAL_TEXT_TOKENS


def max_batch_rows(batch_size: int) -> int:
    return batch_size * ROWS_PER_BATCH_SIZE


def token_bounded(
    items: Iterable[T],
    tokens_of: Callable[[T], int],
    max_tokens: int,
    max_rows: Callable[[int], int] | None = None,
) -> Iterator[list[T]]:
    """Consecutive runs of `items` whose padded size (rows x the longest row's tokens) stays within
    `max_tokens`, and whose rows stay within `max_rows(longest)` where given; an item over the
    budget alone. Items sorted by length pad least and cut fewest runs."""
    batch: list[T] = []
    longest = 0
    for item in items:
        tokens = tokens_of(item)
        width = max(longest, tokens)
        rows = len(batch) + 1
        too_many = max_rows is not None and rows > max_rows(width)
        if batch and (width * rows > max_tokens or too_many):
            yield batch
            batch, width = [], tokens
        batch.append(item)
        longest = width
    if batch:
        yield batch


def rows_allowed(batch_size: int, longest: int) -> int:
    """The most texts a batch may hold, by its longest text's tokens (SHORT_TEXT_TOKENS)."""
    return max_batch_rows(batch_size) if longest <= SHORT_TEXT_TOKENS else batch_size


def rows_for(batch_size: int) -> Callable[[int], int]:
    """`rows_allowed` for one batch size, as `token_bounded` takes it."""
    return functools.partial(rows_allowed, batch_size)


# What the allocators say when they cannot give memory: torch's CUDA and CPU allocators (c10's
# DefaultCPUAllocator), cuBLAS asking for its workspace, and MPS.
_OUT_OF_MEMORY_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cublas_status_alloc_failed",
    "failed to allocate",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (CUDA or CPU), the kind a smaller batch avoids."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(
        message in str(exc).lower() for message in _OUT_OF_MEMORY_MESSAGES
    )


def rows_of(features: Any) -> int:
    """The rows of a forward step's input: a mapping of tensors (a tokenizer's output) or a list."""
    if isinstance(features, Mapping):
        return min((len(v) for v in features.values() if hasattr(v, "__len__")), default=0)
    return len(features)


def _halves(features: Any) -> tuple[Any, Any]:
    """The first and second half of the rows, each still padded to the batch's width (so their
    outputs join, and each row is computed at the same padded length as in the whole batch)."""
    half = rows_of(features) // 2
    if isinstance(features, Mapping):
        first = {k: v[:half] if hasattr(v, "__len__") else v for k, v in features.items()}
        second = {k: v[half:] if hasattr(v, "__len__") else v for k, v in features.items()}
        rebuild: Any = type(features)  # dict, or transformers' BatchEncoding
        return rebuild(first), rebuild(second)
    return features[:half], features[half:]


def _joined(first: Any, second: Any) -> Any:
    """The outputs of two halves as the output of the whole: tensors, arrays, lists, or a dict of
    them (Infinity's ColBERT mode)."""
    if isinstance(first, dict):
        return {k: _joined(first[k], second[k]) for k in first}
    if isinstance(first, list):
        return first + second
    import numpy as np
    import torch

    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    return np.concatenate([first, second])


def _free_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back, so the halves find room."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SplitOnOutOfMemory:
    """A forward step that runs a batch again in halves when it runs out of memory.

    The halves keep the batch's padded width, so the output equals the whole batch's, row for row.
    Each split is logged; a single row that does not fit raises the original error.
    """

    def __init__(self, step: Callable[[Any], Any], model_name: str) -> None:
        self.step = step
        self.model_name = model_name

    def __call__(self, features: Any) -> Any:
        try:
            return self.step(features)
        except Exception as exc:
            rows = rows_of(features)
            if rows < 2 or not is_out_of_memory(exc):
                raise
            log.warning(
                "model '%s' ran out of memory on a batch of %d rows (%s); running it in halves",
                self.model_name,
                rows,
                type(exc).__name__,
            )
        # Outside the except block: the traceback (and the tensors it holds) is freed first.
        _free_cached_memory()
        first, second = _halves(features)
        return _joined(self(first), self(second))
