"""Models served on a compiled runtime: ONNX Runtime (BACKEND=optimum) or CTranslate2
(BACKEND=ctranslate2), in place of Infinity's torch engine.

The runtime computes only the transformer (onnx.py, ctranslate2.py: a `Runtime`, which turns a
padded batch of token ids into the transformer's output). Everything around it is the model's own:
its tokenizer as sentence-transformers calls it, and for an embedder the sentence-transformers
modules after the transformer (Pooling in any of its modes, Dense, Normalize), run as they are on
the runtime's token vectors; for a cross-encoder or classifier the logits, turned into scores as
Infinity does. So the vectors are the torch engine's, within the runtime's rounding. Work is
batched and admitted by the same scheduler as the worker's other self-run engines (batching.py).

Models a runtime cannot serve are refused by `check`, before any model loads, with what to use
instead (`refusal`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import numpy as np

from ..logs import get_logger
from . import bge_m3, llm_reranker, vision
from .base import (
    Classifier,
    Embedder,
    Health,
    LabelScores,
    ModelEngine,
    ModelLoadError,
    Reranker,
)
from .batching import Item, SelfBatching, TokenIds
from .compiled import (
    INT8,
    Loaded,
    padded,
    run_head,
)
from .devices import ReplicaSet
from .spec import AUTO_KIND, EngineSettings, ModelSpec
from .tokenization import Text, TokenCounter

log = get_logger(__name__)

ONNX = "optimum"
CTRANSLATE2 = "ctranslate2"
COMPILED_BACKENDS = (ONNX, CTRANSLATE2)


@dataclass(frozen=True)
class ModelFacts:
    """What the refusal and the loader read from a model's config, without its weights."""

    model_type: str
    architectures: tuple[str, ...]
    num_labels: int
    has_vision: bool

    @property
    def sequence_classifier(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in self.architectures)

    @property
    def causal_lm(self) -> bool:
        return any(a.endswith("ForCausalLM") for a in self.architectures)

    @property
    def role(self) -> str:
        """embed, rerank (one label) or classify, as Infinity decides it."""
        if not self.sequence_classifier:
            return "embed"
        return "rerank" if self.num_labels == 1 else "classify"


def model_facts(spec: ModelSpec, trust_remote_code: bool) -> ModelFacts:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
    return ModelFacts(
        model_type=str(getattr(config, "model_type", "")),
        architectures=tuple(getattr(config, "architectures", None) or ()),
        num_labels=int(getattr(config, "num_labels", 1)),
        has_vision=getattr(config, "vision_config", None) is not None,
    )


# Encoders CTranslate2's converter builds (ctranslate2.converters.TransformersConverter): their
# config's model_type.
CTRANSLATE2_ENCODERS = ("bert", "distilbert", "xlm-roberta", "roberta", "camembert")
# Cross-encoders whose classification head the worker runs after CTranslate2's encoder.
CTRANSLATE2_CROSS_ENCODERS = ("bert", "xlm-roberta", "roberta", "camembert")
# What each backend computes in, by DTYPES value; `auto` is float32 on a CPU.
BACKEND_DTYPES = {
    ONNX: ("auto", "float32", INT8),
    CTRANSLATE2: ("auto", "float32", "float16", "bfloat16", INT8),
}


def refusal(spec: ModelSpec, trust_remote_code: bool) -> str | None:
    """Why `spec.backend` cannot serve this model, naming the model, the backend and what to use
    instead; None when it can (or the backend is torch, which serves every kind)."""
    backend = spec.backend
    if backend not in COMPILED_BACKENDS:
        return None
    named = f"model '{spec.served_id}' cannot be served with BACKEND={backend}"
    if spec.dtype not in BACKEND_DTYPES[backend]:
        return f"{named} in DTYPES={spec.dtype}: use one of {', '.join(BACKEND_DTYPES[backend])}"
    if spec.kind not in (AUTO_KIND, "infinity"):
        return f"{named}: MODEL_KINDS={spec.kind} runs on torch; use BACKEND=torch"
    if bge_m3.detect(spec, trust_remote_code):
        return (
            f"{named}: it is a bge-m3 model with three outputs (dense, sparse, multi-vector), and "
            "the backend gives the dense vector alone; use BACKEND=torch"
        )
    if llm_reranker.detect(spec, trust_remote_code):
        return f"{named}: it is an LLM reranker (a causal LM scoring yes/no); use BACKEND=torch"
    try:
        facts = model_facts(spec, trust_remote_code)
    except Exception as exc:  # the loader would fail the same way: say it now
        return f"{named}: its config cannot be read ({type(exc).__name__}: {exc})"
    if facts.has_vision or facts.model_type in vision.MODEL_TYPES:
        return (
            f"{named}: it is a {facts.model_type} image-and-text model; use BACKEND=torch for "
            "image embeddings"
        )
    if backend == CTRANSLATE2:
        supported = (
            CTRANSLATE2_CROSS_ENCODERS if facts.sequence_classifier else CTRANSLATE2_ENCODERS
        )
        if facts.model_type not in supported:
            what = "cross-encoders" if facts.sequence_classifier else "encoders"
            pooled = ""
            if facts.causal_lm or facts.model_type.startswith(("qwen", "gemma", "llama")):
                pooled = " (a decoder, pooled by its last token or mean)"
            return (
                f"{named}: it is a {facts.model_type} model{pooled}, and CTranslate2 runs "
                f"{', '.join(supported)} {what}; use BACKEND=optimum or BACKEND=torch"
            )
    if facts.causal_lm and facts.role == "embed":
        return (
            f"{named}: it is a causal LM ({', '.join(facts.architectures)}), not an embedding "
            "model; use BACKEND=torch"
        )
    return None


def check(specs: Sequence[ModelSpec], trust_remote_code: bool) -> None:
    """Refuse the first model its backend cannot serve, before any model loads."""
    for spec in specs:
        reason = refusal(spec, trust_remote_code)
        if reason is not None:
            raise ModelLoadError(reason)


# --------------------------------------------------------------------------- loading


class ModelBackend(Protocol):
    """One backend's loaders (onnx.py, ctranslate2.py)."""

    def load_embedder(self, spec: ModelSpec, settings: EngineSettings, st_model: Any) -> Loaded: ...

    def load_cross_encoder(
        self, spec: ModelSpec, settings: EngineSettings, model: Any, tokenizer: Any
    ) -> Loaded: ...


def backend_of(name: str) -> ModelBackend:
    if name == ONNX:
        from .onnx import OnnxBackend

        return OnnxBackend()
    from .ctranslate2 import CTranslate2Backend

    return CTranslate2Backend()


def load(spec: ModelSpec, settings: EngineSettings, health: Health) -> ModelEngine:
    """The model on its backend: an embedder, a reranker or a classifier, as its config says."""
    reason = refusal(spec, settings.trust_remote_code)
    if reason is not None:
        raise ModelLoadError(reason)
    facts = model_facts(spec, settings.trust_remote_code)
    backend = backend_of(spec.backend)
    started = time.perf_counter()
    engine: ModelEngine
    if facts.role == "embed":
        st_model = load_sentence_transformer(spec, settings)
        loaded = backend.load_embedder(spec, settings, st_model)
        engine = CompiledEmbedder(
            spec,
            loaded,
            head=list(st_model)[1:],
            st_model=st_model,
            settings=settings,
            health=health,
        )
    else:
        model, tokenizer = load_cross_encoder(spec, settings)
        loaded = backend.load_cross_encoder(spec, settings, model, tokenizer)
        cls: type[CompiledModel] = (
            CompiledReranker if facts.role == "rerank" else CompiledClassifier
        )
        engine = cls(spec, loaded, config=model.config, settings=settings, health=health)
    log.info(
        "%s: %s on %s (%s), %d replica(s), loaded in %.1f s%s",
        spec.served_id,
        facts.role,
        spec.backend,
        spec.dtype,
        len(loaded.runtimes),
        time.perf_counter() - started,
        "" if not loaded.quality else f"; int8 vs float32 cosine {loaded.quality}",
    )
    return engine


def load_sentence_transformer(spec: ModelSpec, settings: EngineSettings) -> Any:
    """The model as sentence-transformers loads it, on the CPU in float32, with eager attention
    (the form every exporter traces)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(
        spec.source,
        device="cpu",
        trust_remote_code=settings.trust_remote_code,
        model_kwargs={"attn_implementation": "eager"},
    ).eval()


def load_cross_encoder(spec: ModelSpec, settings: EngineSettings) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        spec.source, trust_remote_code=settings.trust_remote_code
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.source,
        trust_remote_code=settings.trust_remote_code,
        attn_implementation="eager",
    ).eval()
    return model, tokenizer


# --------------------------------------------------------------------------- the engines


class Encoded(list[int]):
    """A text's token ids, with its token type ids when the model takes them."""

    type_ids: list[int] | None = None


class CompiledModel(SelfBatching, ModelEngine):
    """A model on a compiled runtime: tokenized here, batched by batching.py, computed by one of
    its replicas (devices.py), one per device."""

    backend_name: ClassVar[str] = ""

    def __init__(self, spec: ModelSpec, loaded: Loaded, **kwargs: Any) -> None:
        super().__init__(spec, TokenCounter(loaded.tokenizer), loaded.max_length, **kwargs)
        import copy

        self.loaded = loaded
        # The worker thread's own copy: the event loop counts tokens with the original.
        self.tokenizer = copy.deepcopy(loaded.tokenizer)
        self.batch_size = spec.batch_size
        self.replicas = ReplicaSet(loaded.runtimes)
        self._init_batching(self.settings.optimisations.wide_short_batches)

    async def start(self) -> None:
        await self._start_batching(f"{self.spec.backend}-{self.served_id}")

    async def stop(self) -> None:
        await self._stop_batching()

    def describe(self) -> dict[str, Any]:
        entry = {**super().describe(), "backend": self.spec.backend, "dtype": self.spec.dtype}
        if self.loaded.quality:
            entry["int8_cosine_to_float32"] = self.loaded.quality
        if self.loaded.int8_scheme:
            entry["int8_scheme"] = self.loaded.int8_scheme
        if len(self.loaded.runtimes) > 1:
            entry["replicas"] = len(self.loaded.runtimes)
        return entry

    def _encode(self, texts: Sequence[Any], pairs: bool) -> list[TokenIds]:
        lowercase = self.loaded.lowercase
        if pairs:
            firsts = [str(q).strip() for q, _ in texts]
            seconds = [str(d).strip() for _, d in texts]
            encoded = self.tokenizer(
                firsts, seconds, truncation="longest_first", max_length=self.max_length
            )
        else:
            cleaned = [str(t).strip() for t in texts]
            if lowercase:
                cleaned = [t.lower() for t in cleaned]
            encoded = self.tokenizer(cleaned, truncation=True, max_length=self.max_length)
        types = encoded.get("token_type_ids")
        rows: list[TokenIds] = []
        for i, ids in enumerate(encoded["input_ids"]):
            row = Encoded(ids)
            if types is not None and "token_type_ids" in self.loaded.input_names:
                row.type_ids = types[i]
            rows.append(row)
        return rows

    def _compute(self, items: list[Item]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        rows = [cast(TokenIds, item.ids) for item in items]
        types = [getattr(ids, "type_ids", None) for ids in rows]
        batch = padded(rows, self.loaded, types)
        return self.replicas.run(batch), batch


class CompiledEmbedder(CompiledModel, Embedder):
    """An embedder: the runtime's token vectors through the model's own modules after the
    transformer (Pooling, Dense, Normalize, ...)."""

    def __init__(
        self, spec: ModelSpec, loaded: Loaded, *, head: list[Any], st_model: Any, **kwargs: Any
    ) -> None:
        super().__init__(spec, loaded, **kwargs)
        self.head = head
        from sentence_transformers.models import Normalize

        self.normalized = any(isinstance(module, Normalize) for module in head)
        self.dimensions = int(st_model.get_sentence_embedding_dimension() or 0) or None
        self.prompts = dict(getattr(st_model, "prompts", None) or {})
        self.default_prompt_name = getattr(st_model, "default_prompt_name", None)

    async def _embed(self, texts: list[Text]) -> np.ndarray:
        return np.stack(await self._submit(texts))

    def _tokenize(self, texts: list[str]) -> list[TokenIds]:
        return self._encode(texts, pairs=False)

    def _forward_items(self, items: list[Item]) -> list[Any]:
        tokens, batch = self._compute(items)
        vectors = run_head(self.head, tokens, batch)
        return list(vectors)


class CompiledCrossEncoder(CompiledModel):
    """A *ForSequenceClassification: the runtime gives the logits of each pair or text."""

    def __init__(self, spec: ModelSpec, loaded: Loaded, *, config: Any, **kwargs: Any) -> None:
        super().__init__(spec, loaded, **kwargs)
        self.config = config

    def _forward_items(self, items: list[Item]) -> list[Any]:
        logits, _ = self._compute(items)
        return list(np.asarray(logits, dtype=np.float64))


class CompiledReranker(CompiledCrossEncoder, Reranker):
    async def _rerank(self, query: str, docs: list[Text], instruction: str | None) -> np.ndarray:
        from .. import errors

        if instruction is not None:
            raise errors.invalid_input(
                f"model '{self.served_id}' takes no instruction", param="instruction"
            )
        # A pair travels as its text: `_encode` tokenizes it as a pair.
        pairs = [Text(cast(str, (query, doc.text)), doc.tokens) for doc in docs]
        logits = await self._submit(pairs)
        raw = np.array([float(row[0]) for row in logits], dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-raw))  # Infinity's relevance score: the logit's sigmoid

    def _tokenize(self, texts: list[str]) -> list[TokenIds]:
        return self._encode(texts, pairs=True)


class CompiledClassifier(CompiledCrossEncoder, Classifier):
    def __init__(self, spec: ModelSpec, loaded: Loaded, *, config: Any, **kwargs: Any) -> None:
        super().__init__(spec, loaded, config=config, **kwargs)
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.multi_label = config.problem_type == "multi_label_classification"

    async def _classify(self, texts: list[Text], raw_scores: bool) -> list[LabelScores]:
        logits = await self._submit(texts)
        answers = []
        for row in logits:
            scores = np.asarray(row, dtype=np.float64)
            if not raw_scores:
                if self.multi_label:
                    scores = 1.0 / (1.0 + np.exp(-scores))
                else:
                    scores = np.exp(scores - scores.max())
                    scores /= scores.sum()
            answers.append(list(zip(self.labels, scores.tolist())))
        return answers

    def _tokenize(self, texts: list[str]) -> list[TokenIds]:
        return self._encode(texts, pairs=False)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
