"""The dtype policy: what DTYPES=auto means on this machine, for Infinity and for the engines the
worker runs itself (LLM rerankers, bge-m3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..cpu import cpu_flags


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX), not by emulation.

    oneDNN also runs bfloat16 on plain AVX-512 by converting, which is slower than float32; only
    the native instructions make it pay.
    """
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)  # private torch API: fall back to the flags below
        if check is not None and check():
            return True
    return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


def is_sequence_classifier(source: str) -> bool:
    """Whether the model's config.json names a *ForSequenceClassification architecture (a reranker
    or classifier), read from its folder or the hub cache (no network: the kind detection has
    fetched it already). A config that cannot be read here counts as not."""
    path = Path(source) / "config.json"
    try:
        if not path.is_file():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
            if not isinstance(cached, str):
                return False
            path = Path(cached)
        architectures = json.loads(path.read_text(encoding="utf-8")).get("architectures") or []
    except Exception:  # a name that is no repo id, an unreadable file: the loader reports it
        return False
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def resolve_dtype(dtype: str, backend: str, source: str | None = None) -> str:
    """The dtype handed to Infinity: what DTYPES=auto means on this machine.

    Infinity's own `auto` is bfloat16/float16 on a GPU (kept) but always float32 on a CPU. On a CPU
    with native bfloat16 the worker picks bfloat16 for embedders: faster than float32, with
    vectors close to float32's (docs/design.md; bench/run.py measures both). Rerankers
    (`source` names a sequence classifier) stay float32: a relevance score is one logit, and
    bfloat16's three significant digits can reorder close documents.
    """
    if dtype != "auto" or backend != "torch":
        return dtype
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return "auto"
    if not cpu_has_native_bf16():
        return "float32"
    if source is not None and is_sequence_classifier(source):
        return "float32"
    return "bfloat16"


def torch_dtype(dtype: str, device: str) -> Any:
    """The torch dtype of an engine the worker runs itself (LLM rerankers, bge-m3): `auto` is
    bfloat16 (or float16) on a GPU and float32 on a CPU, where a reranker's one logit needs the
    precision (bge-m3 resolves `auto` as embedders do first: `resolve_dtype`)."""
    import torch

    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype in ("float32", "float16", "bfloat16"):
        return getattr(torch, dtype)
    raise ValueError(
        f"dtype '{dtype}' is not available for LLM rerankers and bge-m3 models; "
        "use auto, float32, float16 or bfloat16"
    )
