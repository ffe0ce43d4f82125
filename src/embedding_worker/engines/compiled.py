"""What the compiled backends share (backends.py runs them; onnx.py and ctranslate2.py load them):
a `Runtime`, what a loader gives (`Loaded`), the padding of a batch, the sentence-transformers
modules after the transformer (`run_head`), and the measure of int8's cost (`int8_quality`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .tokenization import pad_ids

INT8 = "int8"

# Texts the int8 vectors are compared on with float32's at load: short and long, several scripts.
QUALITY_TEXTS = (
    "hello world",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Machine learning models map sentences to vectors so that similar meanings lie close.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "A short one.",
    "Embeddings of long passages average many token vectors: " + "words of a passage " * 40,
    "def add(a, b):\n    return a + b",
    "Rain is expected tomorrow afternoon, with clearing skies by evening.",
    "The committee approved the budget after a lengthy debate on infrastructure spending.",
)


class Runtime(Protocol):
    """The compute of one model on one device: a padded batch in, the transformer's output out
    (token vectors [rows, tokens, dims] of an embedder, logits [rows, labels] of a cross-encoder
    or classifier), float32."""

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass
class Loaded:
    """What a backend's loader gives: one runtime per device, and how the model is fed."""

    runtimes: list[Runtime]
    tokenizer: Any
    max_length: int
    input_names: tuple[str, ...]  # of input_ids, attention_mask, token_type_ids: those fed
    lowercase: bool = False  # sentence-transformers' do_lower_case
    quality: dict[str, float] | None = None  # int8: cosine of its vectors to float32's
    int8_scheme: str | None = None  # int8: which matmuls are quantised, where that varies


def cross_encoder_max_length(config: Any, tokenizer: Any) -> int:
    """The most tokens a pair is fed: the tokenizer's maximum, within the model's positions
    (RoBERTa-like models count theirs from pad_token_id + 1)."""
    positions = int(getattr(config, "max_position_embeddings", 0) or 0)
    if (
        positions
        and "roberta" in getattr(config, "model_type", "")
        or "camembert" in getattr(config, "model_type", "")
    ):
        positions -= int(getattr(config, "pad_token_id", 0) or 0) + 1
    limit = int(tokenizer.model_max_length)
    return min(limit, positions) if positions > 0 else limit


def fed_inputs(tokenizer: Any, accepted: Callable[[str], bool]) -> tuple[str, ...]:
    """Which of input_ids, attention_mask and token_type_ids the model is fed: those its
    tokenizer gives and its forward takes."""
    given = set(tokenizer.model_input_names) | {"input_ids", "attention_mask"}
    return tuple(
        name
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if name in given and accepted(name)
    )


def example_batch(tokenizer: Any, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """A small padded batch for tracing and checks."""
    encoded = tokenizer(
        ["hello world", "a longer example sentence to trace the model with"],
        padding=True,
        return_tensors="np",
    )
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in input_names}


def int8_quality(float32: Runtime, int8: Runtime, loaded: Loaded, head: Any) -> dict[str, float]:
    """The cosine of the int8 runtime's vectors to float32's on QUALITY_TEXTS (min and mean):
    what quantisation costs this model, logged and shown in /v1/models."""
    texts = list(QUALITY_TEXTS)
    encoded = loaded.tokenizer(
        [t.lower() if loaded.lowercase else t for t in texts],
        truncation=True,
        max_length=loaded.max_length,
    )
    rows = encoded["input_ids"]
    types = encoded.get("token_type_ids") if "token_type_ids" in loaded.input_names else None
    batch = padded(rows, loaded, types)
    a = head(float32(batch), batch)
    b = head(int8(batch), batch)
    a = a.reshape(len(texts), -1)
    b = b.reshape(len(texts), -1)
    cos = (a * b).sum(-1) / np.maximum(
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12
    )
    return {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}


def padded(
    rows: Sequence[Sequence[int] | np.ndarray], loaded: Loaded, types: Sequence[Any] | None = None
) -> dict[str, np.ndarray]:
    """The runtime's inputs for a batch of token id rows, padded on the right."""
    pad = loaded.tokenizer.pad_token_id
    tensors = pad_ids(
        rows,
        0 if pad is None else int(pad),
        type_ids=None
        if "token_type_ids" not in loaded.input_names
        else [None if types is None else np.asarray(t) for t in (types or [None] * len(rows))],
    )
    return {name: tensors[name].numpy() for name in loaded.input_names if name in tensors}


def run_head(head: Sequence[Any], tokens: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The sentence-transformers modules after the transformer, on the runtime's token vectors."""
    import torch

    features: dict[str, Any] = {
        "token_embeddings": torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32)),
        "attention_mask": torch.from_numpy(batch["attention_mask"]),
    }
    with torch.inference_mode():
        for module in head:
            features = module(features)
    return features["sentence_embedding"].float().numpy()
