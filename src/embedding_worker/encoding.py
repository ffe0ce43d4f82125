"""Vector encodings for embedding answers: "float" (JSON numbers) and "base64" (OpenAI's format)."""

from __future__ import annotations

import base64
from typing import Literal

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
    # results) then writes ~13 bytes a number instead of ~22 for float32 widened by tolist().
    return orjson.loads(orjson.dumps(matrix, option=orjson.OPT_SERIALIZE_NUMPY))
