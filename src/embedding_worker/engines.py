"""Inference engines behind one interface, and the registry that owns them.

Every served model is a `ModelEngine`: it knows its role (embed or rerank), its tokenizer and maximum
length, and runs work through `_admit()`, which bounds the queue and the time of every call. The
Infinity-backed models share one AsyncEngineArray; LLM rerankers (llm_reranker.py) run beside it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import numpy as np

from . import errors, pacing
from .config import ModelSpec, WorkerConfig
from .logs import get_logger, redacted_traceback
from .tokenization import TokenCounter, reuse_token_ids

log = get_logger(__name__)

T = TypeVar("T")

# Infinity reads defaults for every EngineArgs field it is not given from INFINITY_* variables, some of
# them unsafe (trust_remote_code) or broken here (bettertransformer needs optimum 1.x). We pass every
# field that matters explicitly; telemetry is switched off before infinity_emb is imported.
os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")


class Role(str, Enum):
    EMBED = "embed"
    RERANK = "rerank"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the reason."""


@dataclass
class Health:
    """Set once an engine is stuck or dead: the worker then asks to be replaced."""

    healthy: bool = True
    reason: str | None = None

    def fail(self, reason: str) -> None:
        if self.healthy:
            log.error("worker marked unhealthy: %s", reason)
        self.healthy = False
        self.reason = reason


class ModelEngine(ABC):
    """One served model. Subclasses implement `_embed` / `_rerank`; callers use `embed` / `rerank`."""

    role: Role
    dimensions: int | None = None
    # Named prompts the model declares (sentence-transformers' config), e.g. {"query": "...", ...}.
    prompts: dict[str, str] = {}
    # The prompt sentence-transformers applies when none is named (config_sentence_transformers.json).
    default_prompt_name: str | None = None

    def __init__(
        self,
        spec: ModelSpec,
        tokens: TokenCounter,
        max_length: int,
        *,
        queue_size: int,
        timeout_s: float,
        health: Health,
    ) -> None:
        self.spec = spec
        self.tokens = tokens
        self.max_length = max_length
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.health = health
        self.pending = 0  # items admitted and not yet answered
        # The tasks waiting in _admit, cancelled at once when the engine is reported dead (instead
        # of each waiting for its timeout), and the loop they run on.
        self._admitted: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead_reason: str | None = None

    @property
    def served_id(self) -> str:
        return self.spec.served_id

    async def start(self) -> None:  # noqa: B027 - engines without a start step
        pass

    async def stop(self) -> None:  # noqa: B027
        pass

    def describe(self) -> dict[str, Any]:
        """This model's entry in /v1/models."""
        entry: dict[str, Any] = {
            "id": self.served_id,
            "object": "model",
            "created": 0,
            "owned_by": self.served_id.split("/")[0] if "/" in self.served_id else "local",
            "role": self.role.value,
            "capabilities": [self.role.value],
            "max_input_tokens": self.max_length,
        }
        if self.dimensions is not None:
            entry["dimensions"] = self.dimensions
        return entry

    def rerank_lengths(self, query: str, docs: Sequence[str], instruction: str | None) -> list[int]:
        """Tokens the model is fed for each (query, document) pair, before truncation."""
        return self.tokens.count_pairs(query, docs)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors for `texts`, one row each, in order (float32)."""
        return await self._admit(len(texts), lambda: self._embed(texts))

    async def rerank(self, query: str, docs: list[str], instruction: str | None = None) -> np.ndarray:
        """Relevance scores in [0, 1] for `docs`, in the order given (not sorted)."""
        return await self._admit(len(docs), lambda: self._rerank(query, docs, instruction))

    @abstractmethod
    async def _embed(self, texts: list[str]) -> np.ndarray: ...

    @abstractmethod
    async def _rerank(self, query: str, docs: list[str], instruction: str | None) -> np.ndarray: ...

    def report_dead(self, reason: str) -> None:
        """The engine cannot answer any more (e.g. a batch thread died). Safe from any thread."""
        self.health.fail(reason)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fail_waiting, reason)

    def _fail_waiting(self, reason: str) -> None:
        # Cancelled calls see `_dead_reason` in _admit and answer 503 engine_failed.
        self._dead_reason = reason
        for task in self._admitted:
            task.cancel()

    async def _admit(self, items: int, call: Callable[[], Awaitable[T]]) -> T:
        """Bounded queue and bounded time for every engine call.

        Infinity's queue is unbounded (INFINITY_QUEUE_SIZE is read only by its own HTTP server), so
        the worker counts what it has handed over and refuses new work beyond the limit. A request is
        always admitted into an empty queue, so a single large request can never be refused forever.
        A call ends at the first of: its answer, REQUEST_TIMEOUT, or the engine reported dead (which
        cancels every waiting call). The call runs in the caller's task: this is on every request's
        path, and a task and `asyncio.wait` per call were 27% of the local server's event-loop time.
        """
        if not self.health.healthy:
            raise errors.unavailable(f"the worker is unhealthy ({self.health.reason}); retry")
        if self.pending and self.pending + items > self.queue_size:
            raise errors.overloaded(
                f"model '{self.served_id}' has {self.pending} inputs queued "
                f"(INFINITY_QUEUE_SIZE={self.queue_size}); retry later"
            )
        task = asyncio.current_task()
        assert task is not None
        self._loop = task.get_loop()
        self._admitted.add(task)
        self.pending += items
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call()  # cancelled with its items if it ends early: Infinity skips them
        except asyncio.CancelledError:
            if self._dead_reason is None:
                raise  # the caller was cancelled (a job cancelled, a client gone)
            task.uncancel()
            raise errors.unavailable(
                f"model '{self.served_id}' failed: {self._dead_reason}; the worker asks to be "
                "replaced, retry",
                code="engine_failed",
            ) from None
        except TimeoutError:
            message = f"model '{self.served_id}' did not answer within {self.timeout_s:g} s"
            self.health.fail(message)
            raise errors.unavailable(message, code="timeout") from None
        finally:
            self._admitted.discard(task)
            self.pending -= items
            log.debug("%s: %d items in %.1f ms", self.served_id, items, 1e3 * (time.monotonic() - started))


class InfinityModel(ModelEngine):
    """A model served by Infinity (sentence-transformers embedders and cross-encoder rerankers)."""

    def __init__(self, spec: ModelSpec, engine: Any, **kwargs: Any) -> None:
        replica = engine._model_replicas[0]  # Infinity keeps the loaded model here; no public API
        tokenizer = getattr(replica, "tokenizer", None) or replica._infinity_tokenizer
        max_length = (
            getattr(replica, "max_seq_length", None)
            or getattr(replica, "max_length", None)
            or tokenizer.model_max_length
        )
        super().__init__(spec, TokenCounter(tokenizer), int(max_length), **kwargs)
        self.engine = engine
        self._paced: pacing.PacedQueue | None = None  # set by start(): Infinity makes its queue there
        self.prompts = dict(getattr(replica, "prompts", None) or {})
        self.default_prompt_name = getattr(replica, "default_prompt_name", None)
        capabilities = set(engine.capabilities)
        if "embed" in capabilities:
            self.role = Role.EMBED
            get_dim = getattr(replica, "get_sentence_embedding_dimension", None)
            self.dimensions = get_dim() if get_dim else None
        elif "rerank" in capabilities:
            self.role = Role.RERANK
        else:
            raise ModelLoadError(
                f"model '{spec.served_id}' is a {'/'.join(sorted(capabilities))} model; "
                "this worker serves embedding and reranking models"
            )
        for each_replica in engine._model_replicas:
            if self.role is Role.EMBED and reuse_token_ids(each_replica, self.tokens):
                log.debug("%s: the engine reuses the worker's token ids", spec.served_id)
            self._guard_batch_threads(each_replica)

    def _guard_batch_threads(self, replica: Any) -> None:
        """Infinity's upstream issue #609: an exception in a batch thread (tokenise, forward,
        post-process) kills that thread, and every pending and later request waits for ever.

        The replica's three stage methods are wrapped so that the first exception reports the engine
        dead: the waiting calls fail at once (503 engine_failed), the worker turns unhealthy and asks
        RunPod for a replacement. The exception is re-raised, so Infinity behaves as before.
        """
        for stage in ("encode_pre", "encode_core", "encode_post"):
            method = getattr(replica, stage)

            @functools.wraps(method)
            def guarded(*args: Any, _method: Any = method, _stage: str = stage) -> Any:
                try:
                    return _method(*args)
                except Exception as exc:
                    log.error(
                        "model '%s': Infinity batch thread died in %s: %s",
                        self.served_id,
                        _stage,
                        redacted_traceback(exc),
                    )
                    self.report_dead(f"its batch thread died in {_stage} ({type(exc).__name__})")
                    raise
                finally:
                    if _stage == "encode_core" and self._paced is not None:
                        self._paced.batch_finished()

            setattr(replica, stage, guarded)

    async def start(self) -> None:
        # Runs after Infinity's own start, which makes a new batch handler (and queue) every time.
        self._paced = pacing.install(self.engine._batch_handler)

    async def _embed(self, texts: list[str]) -> np.ndarray:
        vectors, _ = await self.engine.embed(sentences=texts)
        return np.asarray(vectors, dtype=np.float32)

    async def _rerank(self, query: str, docs: list[str], instruction: str | None) -> np.ndarray:
        if instruction is not None:
            raise errors.invalid_input(
                f"model '{self.served_id}' takes no instruction", param="instruction"
            )
        # Infinity sorts and cuts its answer; the worker wants scores in document order, as plain
        # numbers, and sorts itself (the same way for every engine kind).
        ranked, _ = await self.engine.rerank(query=query, docs=docs, raw_scores=False)
        scores = np.empty(len(docs), dtype=np.float64)
        for item in ranked:
            scores[item.index] = float(item.relevance_score)
        return scores


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
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def is_sequence_classifier(source: str) -> bool:
    """Whether the model's config.json names a *ForSequenceClassification architecture (a reranker or
    classifier), read from its folder or the hub cache (no network: the kind detection has fetched
    it already). A config that cannot be read here counts as not."""
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
    with native bfloat16 the worker picks bfloat16 for embedders: about 1.8x float32's throughput
    with cosine >= 0.9999 to the float32 vectors on MiniLM (bench/run.py measures both). Rerankers
    (`source` names a sequence classifier) stay float32: a relevance score is one logit, and bfloat16's
    three significant digits can reorder close documents.
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


def _engine_args(spec: ModelSpec, config: WorkerConfig) -> Any:
    from infinity_emb import EngineArgs

    dtype = resolve_dtype(spec.dtype, spec.backend, spec.source)
    if dtype != spec.dtype:
        log.info("%s: dtype auto -> %s on this machine", spec.served_id, dtype)
    return EngineArgs(
        model_name_or_path=spec.source,
        served_model_name=spec.served_id,
        batch_size=spec.batch_size,
        dtype=dtype,
        engine=spec.backend,
        trust_remote_code=config.trust_remote_code,
        bettertransformer=False,
        model_warmup=False,
        compile=False,
        lengths_via_tokenize=False,
        vector_disk_cache_path="",
    )


class ModelRegistry:
    """The served models: loading, start and stop, lookup by name and role."""

    def __init__(self, models: Sequence[ModelEngine], health: Health, array: Any = None) -> None:
        self.models = list(models)
        self.health = health
        self._array = array  # Infinity's AsyncEngineArray, started and stopped as one
        self._started = False
        self._start_lock = asyncio.Lock()

    @classmethod
    def load(cls, config: WorkerConfig) -> "ModelRegistry":
        """Load every model now (cold start is paid once, before the first job)."""
        from infinity_emb import AsyncEmbeddingEngine, AsyncEngineArray

        from .llm_reranker import LLMReranker, detect_kind

        health = Health()
        common = dict(queue_size=config.queue_size, timeout_s=config.request_timeout_s, health=health)
        infinity_engines = []
        models: list[ModelEngine] = []
        for spec in config.models:
            try:
                kind = detect_kind(spec, config.trust_remote_code)
                log.info("loading %s from %s (%s)", spec.served_id, spec.source, kind)
                model: ModelEngine
                if kind == "llm-reranker":
                    # Beside the AsyncEngineArray: Infinity cannot run these (see llm_reranker.py).
                    model = LLMReranker.load(
                        spec, trust_remote_code=config.trust_remote_code, **common
                    )
                else:
                    engine = AsyncEmbeddingEngine.from_args(_engine_args(spec, config))
                    model = InfinityModel(spec, engine, **common)
                    infinity_engines.append(engine)
            except ModelLoadError:
                raise
            except Exception as exc:  # any loader failure, named
                raise ModelLoadError(
                    f"could not load model '{spec.served_id}' from {spec.source!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            models.append(model)
        array = AsyncEngineArray(infinity_engines) if infinity_engines else None
        return cls(models, health, array)

    async def start(self) -> None:
        """Start the engines inside the running event loop (once)."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            if self._array is not None:
                await self._array.astart()
            for model in self.models:
                await model.start()
            self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._array is not None:
            await self._array.astop()
        for model in self.models:
            await model.stop()

    def stop_blocking(self) -> None:
        """Stop from outside any event loop (at process exit): Infinity's threads keep it alive."""
        if self._started:
            asyncio.run(self.stop())

    @property
    def ids(self) -> list[str]:
        return [m.served_id for m in self.models]

    def resolve(self, name: str | None, role: Role) -> ModelEngine:
        """The model a request names: its served id, its source, or a unique trailing part of the id.

        With no name, the only model that can do the operation.
        """
        if name is None:
            able = [m for m in self.models if m.role is role]
            if len(able) == 1:
                return able[0]
            if not able:
                raise errors.invalid_input(
                    f"no served model can {role.value}; served models: {', '.join(self.ids)}",
                    param="model",
                )
            raise errors.invalid_input(
                f"'model' is required: several models can {role.value}: "
                f"{', '.join(m.served_id for m in able)}",
                param="model",
            )
        exact = [m for m in self.models if name in (m.served_id, m.spec.source)]
        candidates = exact or [
            m for m in self.models if m.served_id.endswith("/" + name.strip("/"))
        ]
        if len(candidates) != 1:
            what = "is ambiguous" if candidates else "is not served"
            raise errors.model_not_found(
                f"model '{name}' {what}; served models: {', '.join(self.ids)}"
            )
        return candidates[0]

    def describe(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self.models]
