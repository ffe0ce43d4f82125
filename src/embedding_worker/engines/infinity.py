"""Sentence-transformers embedders, cross-encoder rerankers and classifiers on Infinity.

Every Infinity model of the worker is one `AsyncEmbeddingEngine` in one `AsyncEngineArray` (the
registry starts and stops the array); the private names of Infinity it needs are read in
infinity_adapter.py alone. The worker's scheduler (scheduler.py) forms the batches and hands them
to Infinity's threads, which compute them. Five of Infinity's behaviours are worked around, each
in one place: a batch thread that dies silently (`_guard_batch_threads`), a forward pass that
fails its whole batch when memory runs out (`_split_on_out_of_memory`), batches computed after
every request in them has gone (`_link_batches`); the three are layers around a replica's steps,
composed in `_install_stages` alone; a second tokenization of every text
(tokenization.py's `reuse_token_ids`, installed at load when it reproduces Infinity's tensors
exactly), and the inputs of CLIP-like models (vision.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import errors, tracing
from ..logs import get_logger, redacted_traceback
from . import devices, vision
from . import infinity_adapter as adapter
from .base import (
    Classifier,
    Embedder,
    Health,
    ImageEmbedder,
    LabelScores,
    ModelEngine,
    ModelLoadError,
    Reranker,
)
from .budget import SplitOnOutOfMemory
from .dtype import resolve_dtype
from .scheduler import Scheduler
from .spec import EngineSettings, ModelSpec
from .token_pass import TokenPass
from .tokenization import BucketedForward, Text, TokenCounter, reuse_token_ids

if TYPE_CHECKING:
    from PIL.Image import Image

log = get_logger(__name__)

KIND = "infinity"


class _NoTorchDtypeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`torch_dtype` is deprecated" not in str(record.msg)


def quiet_infinity(environ: MutableMapping[str, str]) -> None:
    """Infinity reads defaults for every EngineArgs field it is not given from INFINITY_* variables,
    some unsafe (trust_remote_code) or broken here (bettertransformer needs optimum 1.x); the worker
    passes every field that matters explicitly. Telemetry goes off before infinity_emb is imported.
    Infinity's loader passes `torch_dtype`, which transformers announces as deprecated at every
    start: not the user's to fix, so not shown."""
    environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
    environ.setdefault("DO_NOT_TRACK", "1")
    for name in ("transformers.configuration_utils", "transformers.modeling_utils"):
        notices = logging.getLogger(name)
        if not any(isinstance(f, _NoTorchDtypeNotice) for f in notices.filters):
            notices.addFilter(_NoTorchDtypeNotice())


def engine_args(spec: ModelSpec, settings: EngineSettings) -> Any:
    """The EngineArgs the worker gives Infinity for one model (bench/ builds its baseline with
    it)."""
    from infinity_emb import EngineArgs
    from infinity_emb.primitives import Dtype, InferenceEngine

    dtype = resolve_dtype(spec.dtype, spec.backend, spec.source)
    if dtype != spec.dtype:
        log.info("%s: dtype auto -> %s on this machine", spec.served_id, dtype)
    return EngineArgs(
        model_name_or_path=spec.source,
        served_model_name=spec.served_id,
        batch_size=spec.batch_size,
        dtype=Dtype(dtype),
        engine=InferenceEngine(spec.backend),
        trust_remote_code=settings.trust_remote_code,
        bettertransformer=False,
        model_warmup=False,
        compile=False,
        lengths_via_tokenize=False,
        vector_disk_cache_path="",
        # One replica per device (devices.py); unset, Infinity places one on every visible GPU.
        **devices.engine_placement(settings.devices),
    )


@dataclass(frozen=True)
class Stages:
    """A replica's three steps as Infinity's threads call them: `encode_pre` (tokenize),
    `encode_core` (the forward pass) and `encode_post` (post-process)."""

    encode_pre: Callable[[Any], Any]
    encode_core: Callable[[Any], Any]
    encode_post: Callable[[Any], Any]

    @staticmethod
    def of(replica: Any) -> Stages:
        return Stages(replica.encode_pre, replica.encode_core, replica.encode_post)

    def install(self, replica: Any) -> None:
        replica.encode_pre = self.encode_pre
        replica.encode_core = self.encode_core
        replica.encode_post = self.encode_post


@dataclass(frozen=True)
class AbandonedBatch:
    """What the forward step gives for a batch it skipped: how many rows it had."""

    rows: int


class InfinityModel(ModelEngine):
    """What every Infinity-served model shares: the loaded replica's tokenizer and limits, the
    batch-thread guard and the scheduler. `load` gives an embedder, a reranker or a
    classifier."""

    def __init__(self, spec: ModelSpec, engine: Any, **kwargs: Any) -> None:
        replica = adapter.replicas(engine)[0]
        tokenizer, max_length = self._text_limits(replica)
        super().__init__(spec, TokenCounter(tokenizer), max_length, **kwargs)
        self.engine = engine
        on = self.settings.optimisations
        self.scheduler = Scheduler(
            spec.served_id,
            spec.batch_size,
            replicas=len(adapter.replicas(engine)),
            max_tokens=spec.max_batch_tokens,
            max_length=max_length,
            turn_end_wake=on.turn_end_wake,
            full_batch_wake=on.full_batch_wake,
            wide_short_batches=on.wide_short_batches,
        )
        self.scheduler.on_batch = self.batch_formed
        self._queue: adapter.PacedQueue | None = None  # set by start(): Infinity makes its queue
        self.prompts = dict(getattr(replica, "prompts", None) or {})
        self.default_prompt_name = getattr(replica, "default_prompt_name", None)
        for each_replica in adapter.replicas(engine):
            self._install_stages(each_replica)

    @staticmethod
    def load(spec: ModelSpec, settings: EngineSettings, health: Health) -> InfinityModel:
        quiet_infinity(os.environ)
        from infinity_emb import AsyncEmbeddingEngine

        engine = AsyncEmbeddingEngine.from_args(engine_args(spec, settings))
        capabilities = set(engine.capabilities)
        model_class: type[InfinityModel]
        if "image_embed" in capabilities:
            model_type = adapter.replicas(engine)[0].model.config.model_type
            if model_type not in vision.MODEL_TYPES:
                raise ModelLoadError(
                    f"model '{spec.served_id}' is a {model_type} image model; this worker embeds "
                    f"images with {', '.join(vision.MODEL_TYPES)} models"
                )
            model_class = InfinityImageEmbedder
        elif "embed" in capabilities:
            model_class = InfinityEmbedder
        elif "rerank" in capabilities:
            model_class = InfinityReranker
        elif "classify" in capabilities:
            model_class = InfinityClassifier
        else:
            raise ModelLoadError(
                f"model '{spec.served_id}' is a {'/'.join(sorted(capabilities))} model; "
                "this worker serves embedding, reranking and classification models"
            )
        return model_class(spec, engine, settings=settings, health=health)

    @staticmethod
    def _text_limits(replica: Any) -> tuple[Any, int]:
        """The replica's tokenizer and the most tokens a text may have."""
        tokenizer = adapter.replica_tokenizer(replica)
        max_length = (
            getattr(replica, "max_seq_length", None)
            or getattr(replica, "max_length", None)
            or tokenizer.model_max_length
        )
        return tokenizer, int(max_length)

    def _install_stages(self, replica: Any) -> None:
        """The replica's steps as the worker runs them, composed here and only here, each layer
        a function of the layer inside it, innermost first:
        1. the model's own steps, as the subclass prepares them on the replica
           (`_prepare_replica`: token-id reuse, a classifier's logits, CLIP's inputs);
        2. the out-of-memory split, around the forward pass on plain tensors
           (`_split_on_out_of_memory`), which must see each pass it halves;
        3. the link of each batch to its requests (`_link_batches`), which must see the
           tokenize step's features as the forward step gets them, so outside the split;
        4. outermost, the guard against a dying thread (`_guard_batch_threads`), which must see
           every exception of the layers inside it.
        No layer schedules: the scheduler learns of a pass's end from the link (layer 3)."""
        self._prepare_replica(replica)
        stages = Stages.of(replica)
        stages = self._split_on_out_of_memory(stages)
        stages = self._link_batches(stages)
        stages = self._guard_batch_threads(stages)
        stages.install(replica)

    def _prepare_replica(self, replica: Any) -> None:
        """A step of the subclass's own on each replica, before the worker's layers wrap it."""

    def _split_on_out_of_memory(self, stages: Stages) -> Stages:
        """Infinity's forward step fails every request of its batch when memory runs out (and its
        thread with it: `_guard_batch_threads`). Wrapped in `SplitOnOutOfMemory`, the batch runs
        again in halves instead. A `BucketedForward` (token-id reuse in batch-invariant mode)
        runs one pass per padded length: the split goes around each of those, whose features
        are plain tensors to halve."""
        core = stages.encode_core
        if isinstance(core, BucketedForward):
            split: Any = BucketedForward(SplitOnOutOfMemory(core.own_step, self.served_id))
        else:
            split = SplitOnOutOfMemory(core, self.served_id)
        return replace(stages, encode_core=split)

    def _link_batches(self, stages: Stages) -> Stages:
        """The pre-processing step links a batch's features to its futures
        (infinity_adapter.HandedOver), so that the forward step knows whose batch it computes:
        - a batch whose every request has gone (cancelled, timed out, its client away) by the
          time its forward pass would start is not computed (Infinity computes every batch it
          has been handed, and a request that gave up would otherwise keep the model busy for a
          batch after): the forward step returns an `AbandonedBatch`, and the post-processing
          step placeholders that Infinity hands to futures already done;
        - a forward pass that ends tells the scheduler at once (`Scheduler.forward_finished`), so
          the next batch is handed over and tokenized while this one's answers are
          post-processed and delivered;
        - the requests' traces get the forward pass's span."""
        pre, core, post = stages.encode_pre, stages.encode_core, stages.encode_post
        linked: dict[int, tuple[Any, list[Any]]] = {}  # id(features) -> (features, futures)

        @functools.wraps(pre)
        def encode_pre(inputs: list[Any]) -> Any:
            features = pre(inputs)
            queue = self._queue
            futures = queue.handed_over.futures_of(inputs) if queue is not None else None
            if futures is not None:
                linked[id(features)] = (features, futures)
            return features

        @functools.wraps(core)
        def encode_core(features: Any) -> Any:
            known = linked.pop(id(features), None)
            if known is not None and known[0] is features and all(f.done() for f in known[1]):
                log.debug("%s: a batch nobody waits for is skipped", self.served_id)
                return AbandonedBatch(len(known[1]))
            started = time.time_ns()
            output = core(features)
            if known is not None and known[0] is features:
                self.scheduler.forward_finished(known[1])
                tracing.forward_pass(known[1], started, time.time_ns())
            return output

        @functools.wraps(post)
        def encode_post(output: Any) -> Any:
            if isinstance(output, AbandonedBatch):
                return [0.0] * output.rows  # Infinity refuses None; the futures are done
            return post(output)

        return Stages(encode_pre, encode_core, encode_post)

    def _guard_batch_threads(self, stages: Stages) -> Stages:
        """Infinity's upstream issue #609: an exception in a batch thread (tokenise, forward,
        post-process) kills that thread, and every pending and later request waits for ever.

        Each of the three steps is wrapped so that the first exception reports the engine dead:
        the waiting calls fail at once (503 engine_failed), the worker turns unhealthy and asks
        RunPod for a replacement. The exception is re-raised, so Infinity goes on as it would. A
        forward pass that succeeds tells admission the engine moves."""

        def guarded(stage: str, method: Callable[[Any], Any]) -> Callable[[Any], Any]:
            @functools.wraps(method)
            def step(*args: Any) -> Any:
                try:
                    done = method(*args)
                except Exception as exc:
                    log.error(
                        "model '%s': Infinity batch thread died in %s: %s",
                        self.served_id,
                        stage,
                        redacted_traceback(exc),
                    )
                    self.report_dead(f"its batch thread died in {stage} ({type(exc).__name__})")
                    raise
                else:
                    if stage == "encode_core":
                        self.progressed()
                    return done

            return step

        return Stages(
            guarded("encode_pre", stages.encode_pre),
            guarded("encode_core", stages.encode_core),
            guarded("encode_post", stages.encode_post),
        )

    async def start(self) -> None:
        # Runs after Infinity's own start, which makes a new batch handler (and queue) every time.
        self._queue = adapter.install_queue(self.engine, self.scheduler)
        adapter.give_every_loop_a_thread(self.engine)

    async def _compute(self, items: list[Any], sources: list[Any]) -> list[Any]:
        """The answers of Infinity queue items (infinity_adapter's `text_item`, ...)."""
        return await adapter.compute(self.scheduler, items, sources)


class InfinityEmbedder(InfinityModel, Embedder):
    def __init__(self, spec: ModelSpec, engine: Any, **kwargs: Any) -> None:
        super().__init__(spec, engine, **kwargs)
        replica = adapter.replicas(engine)[0]
        get_dim = getattr(replica, "get_sentence_embedding_dimension", None)
        self.dimensions = get_dim() if get_dim else None
        if not getattr(replica, "mode_colbert", False):
            self.token_pass = TokenPass.of(
                replica,
                self.tokens.tokenizer,
                self.max_length,
                spec=spec,
                device=getattr(replica, "device", "cpu"),
                progressed=self.progressed,
                batch_formed=self.batch_formed,
                wide_short_batches=self.settings.optimisations.wide_short_batches,
            )

    async def start(self) -> None:
        await super().start()
        if self.token_pass is not None:
            await self.token_pass.start()

    async def stop(self) -> None:
        if self.token_pass is not None:
            await self.token_pass.stop()
        await super().stop()

    def _prepare_replica(self, replica: Any) -> None:
        if not own_normalisation(replica):
            # Infinity's post-processing step L2-normalises every sentence-transformers model's
            # vectors; a model without a Normalize module (a dot-product model) then loses its
            # own output, which ranking by dot product needs. The step keeps the model's output,
            # and a request's `normalize` asks for unit vectors.
            replica.normalize_embeddings = False
            self.normalized = False
        if not self.settings.optimisations.reuse_token_ids:
            return
        first = adapter.first_module(replica)
        if reuse_token_ids(replica, first, self.tokens, self.settings.batch_invariant):
            log.debug("%s: the engine reuses the worker's token ids", self.served_id)

    async def _embed(self, texts: list[Text]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        vectors = await self._compute([adapter.text_item(text, loop) for text in texts], texts)
        return np.asarray(vectors, dtype=np.float32)


def own_normalisation(replica: Any) -> bool:
    """Whether a replica's model gives unit vectors itself: a sentence-transformers model whose
    modules include Normalize. Other embedders of Infinity (its ONNX path) normalise in their own
    post-processing, which has no switch: their vectors are unit vectors whatever the model."""
    if not hasattr(replica, "normalize_embeddings"):
        return True
    from sentence_transformers.models import Normalize

    return any(isinstance(module, Normalize) for module in replica)


class InfinityImageEmbedder(InfinityModel, ImageEmbedder):
    """A CLIP-like model: texts and images into one space, through Infinity's own image path
    with the model's own inputs (vision.py)."""

    def __init__(self, spec: ModelSpec, engine: Any, **kwargs: Any) -> None:
        super().__init__(spec, engine, **kwargs)
        self.dimensions = vision.dimensions(adapter.replicas(engine)[0])

    @staticmethod
    def _text_limits(replica: Any) -> tuple[Any, int]:
        return replica.processor.tokenizer, vision.text_limits(replica).max_length

    def _prepare_replica(self, replica: Any) -> None:
        vision.apply_dtype_on_cpu(replica)
        vision.install_preprocess(replica, vision.text_limits(replica))

    def _split_on_out_of_memory(self, stages: Stages) -> Stages:
        """Not for these models: their forward step takes texts' tokens and images' pixels
        together with the order of the two, which halving rows does not split. A batch that runs
        out of memory fails as in Infinity (and BATCH_SIZES bounds its images)."""
        return stages

    def prepare_image(self, image: Image) -> vision.PreparedImage:
        processor = adapter.replicas(self.engine)[0].processor
        return vision.prepare_image(processor.image_processor, image)

    async def _embed_inputs(self, inputs: list[Any]) -> np.ndarray:
        # Infinity's own queue items, as its `embed` and `image_embed` make them: the images go
        # past `image_embed`, which takes only Pillow images, bytes or URLs (vision.py).
        loop = asyncio.get_running_loop()
        items = [
            adapter.text_item(item, loop)
            if isinstance(item, Text)
            else adapter.image_item(item, loop)
            for item in inputs
        ]
        vectors = await self._compute(items, inputs)
        return np.asarray(vectors, dtype=np.float32)


class InfinityReranker(InfinityModel, Reranker):
    async def _rerank(self, query: str, docs: list[Text], instruction: str | None) -> np.ndarray:
        if instruction is not None:
            raise errors.invalid_input(
                f"model '{self.served_id}' takes no instruction", param="instruction"
            )
        # The cross-encoder's logits in document order, and the sigmoid Infinity's `rerank`
        # applies; the worker sorts itself (the same way for every engine kind).
        loop = asyncio.get_running_loop()
        logits = await self._compute([adapter.pair_item(query, doc, loop) for doc in docs], docs)
        scores = 1 / (1 + np.exp(-np.array(logits)))
        return np.asarray(scores, dtype=np.float64)


class InfinityClassifier(InfinityModel, Classifier):
    """A *ForSequenceClassification with several labels (one label is a reranker).

    Infinity runs transformers' text-classification pipeline, which turns the logits into scores
    itself and has no way to ask for the logits per request (Infinity's `raw_scores` does
    nothing). So each replica's pipeline is called with function_to_apply="none" (the logits),
    and the worker applies what the pipeline would: sigmoid where the config's problem_type is
    multi_label_classification, softmax otherwise; `raw_scores` skips it.
    """

    def __init__(self, spec: ModelSpec, engine: Any, **kwargs: Any) -> None:
        super().__init__(spec, engine, **kwargs)
        config = adapter.classifier_pipeline(adapter.replicas(engine)[0]).model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.multi_label = config.problem_type == "multi_label_classification"

    def _prepare_replica(self, replica: Any) -> None:
        pipe = adapter.classifier_pipeline(replica)

        def logits(features: list[str]) -> Any:  # Infinity's encode_core, but for the scores
            return pipe(
                features, batch_size=256, truncation=True, padding=True, function_to_apply="none"
            )

        replica.encode_core = logits

    async def _classify(self, texts: list[Text], raw_scores: bool) -> list[LabelScores]:
        loop = asyncio.get_running_loop()
        ranked = await self._compute([adapter.predict_item(text, loop) for text in texts], texts)
        answers = []
        for labels in ranked:
            by_label = {item["label"]: float(item["score"]) for item in labels}
            row = np.array([by_label[label] for label in self.labels], dtype=np.float64)
            if not raw_scores:
                if self.multi_label:
                    row = 1.0 / (1.0 + np.exp(-row))
                else:
                    row = np.exp(row - row.max())
                    row /= row.sum()
            answers.append(list(zip(self.labels, row.tolist())))
        return answers
