"""The served models behind one interface: capabilities, kinds, and the registry that owns them."""

from .base import (
    Capability,
    Classifier,
    Embedder,
    Health,
    ImageEmbedder,
    ModelEngine,
    ModelLoadError,
    Reranker,
)
from .kinds import KIND_NAMES, EngineKind, kind_of
from .registry import ModelRegistry
from .spec import EngineSettings, ModelSpec

__all__ = [
    "KIND_NAMES",
    "Capability",
    "Classifier",
    "Embedder",
    "EngineKind",
    "EngineSettings",
    "Health",
    "ImageEmbedder",
    "ModelEngine",
    "ModelLoadError",
    "ModelRegistry",
    "ModelSpec",
    "Reranker",
    "kind_of",
]
