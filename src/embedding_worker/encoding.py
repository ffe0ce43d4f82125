"""Vector encodings for embedding answers: "float" (JSON numbers) and "base64" (OpenAI's format),
and Cohere's `embedding_types`, the quantized ones included.

Quantization (`quantize`), as Cohere and sentence-transformers' `quantize_embeddings` define the
types:
- binary / ubinary: one bit a dimension, 1 where the value is positive, packed 8 to a byte, first
  dimension in the highest bit (numpy.packbits); ubinary is the bytes as 0..255, binary the same
  bytes less 128 (-128..127).
- int8 / uint8: calibrated per vector, symmetrically: each vector is scaled so that its largest
  magnitude becomes 127 and rounded (int8, -127..127); uint8 is int8 + 128. A per-vector scale keeps
  every vector's direction, so cosine similarity between int8 vectors ranks as it does in float.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import orjson


def encode_vectors(vectors: np.ndarray, encoding_format: Literal["float", "base64"]) -> list:
    """One encoded vector per row of a float32 matrix."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if encoding_format == "base64":
        # Little-endian float32 bytes: what the openai SDK decodes (np.frombuffer(..., "float32")).
        little = matrix.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    # orjson writes each float32 as its shortest round-tripping text; reading that back gives Python
    # floats whose repr is that same short text. The standard json module (which runpod uses for job
    # results) then writes that short text, not the 17 digits of float32 widened by tolist()
    # (docs/design.md).
    return orjson.loads(orjson.dumps(matrix, option=orjson.OPT_SERIALIZE_NUMPY))


EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


def quantize(vectors: np.ndarray, embedding_type: str) -> np.ndarray:
    """One row per vector, as `embedding_type` defines it (see the module's docstring)."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if embedding_type in ("binary", "ubinary"):
        packed = np.packbits(matrix > 0, axis=1)
        return packed if embedding_type == "ubinary" else packed.astype(np.int16) - 128
    if embedding_type in ("int8", "uint8"):
        scale = np.abs(matrix).max(axis=1, keepdims=True)
        scaled = np.rint(matrix * (127.0 / np.maximum(scale, np.finfo(np.float32).tiny)))
        int8 = np.clip(scaled, -127, 127).astype(np.int16)
        return int8 if embedding_type == "int8" else int8 + 128
    raise ValueError(f"not a quantized type: {embedding_type}")


# The bytes of each quantized type, for its base64 form: int8 and binary signed, the others not.
_BYTE_TYPES = {"int8": np.int8, "binary": np.int8, "uint8": np.uint8, "ubinary": np.uint8}


def encode_types(
    vectors: np.ndarray,
    embedding_types: Sequence[str],
    encoding_format: Literal["float", "base64"] = "float",
) -> dict[str, Any]:
    """Cohere's `embeddings` object: for each type asked, one encoded vector per row.

    With `encoding_format="base64"` (the /v1/embeddings extension), every type is written as the
    base64 of its bytes: float32 little-endian for float and base64, one byte a number for the
    quantized types (a quarter of float32's bytes for int8, a thirty-second for binary), instead
    of JSON numbers, which cost 2 to 5 bytes each whatever their type."""
    encoded: dict[str, Any] = {}
    for kind in embedding_types:
        if kind in ("float", "base64"):
            fmt = "base64" if kind == "base64" else encoding_format
            encoded[kind] = encode_vectors(vectors, fmt)
        elif encoding_format == "base64":
            rows = quantize(vectors, kind).astype(_BYTE_TYPES[kind])
            encoded[kind] = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
        else:
            encoded[kind] = quantize(vectors, kind).tolist()
    return encoded
