"""The kinds of engine a model can be served by, each with its own detection.

A model's kind is its MODEL_KINDS entry, or with `auto` the first kind in `KINDS` whose detection
accepts the model's files. Infinity comes last and accepts anything: whatever it cannot load, its
loader explains. A new kind is one entry here with its `detect` and `load`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import bge_m3, infinity, llm_reranker
from .base import Health, ModelEngine
from .spec import AUTO_KIND, EngineSettings, ModelSpec


@dataclass(frozen=True)
class EngineKind:
    name: str  # the MODEL_KINDS value
    detect: Callable[[ModelSpec, bool], bool]  # (spec, trust_remote_code): are the files this kind?
    load: Callable[[ModelSpec, EngineSettings, Health], ModelEngine]


def _always(spec: ModelSpec, trust_remote_code: bool) -> bool:
    return True


KINDS: tuple[EngineKind, ...] = (
    # Infinity would serve a bge-m3 model's dense vector alone, without its other two outputs.
    EngineKind(bge_m3.KIND, bge_m3.detect, bge_m3.BGEM3Embedder.load),
    # Infinity would load a Qwen3 reranker as an embedder and refuse to rerank with it.
    EngineKind(llm_reranker.KIND, llm_reranker.detect, llm_reranker.LLMReranker.load),
    EngineKind(infinity.KIND, _always, infinity.InfinityModel.load),
)
KIND_NAMES: tuple[str, ...] = (AUTO_KIND, *(kind.name for kind in KINDS))


def kind_of(spec: ModelSpec, trust_remote_code: bool) -> EngineKind:
    """The kind that serves `spec`: the one it names, or the first whose detection accepts it."""
    if spec.kind != AUTO_KIND:
        return next(kind for kind in KINDS if kind.name == spec.kind)
    return next(kind for kind in KINDS if kind.detect(spec, trust_remote_code))
