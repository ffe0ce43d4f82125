"""Classification: POST /v1/classify (each input's labels with their scores), a standard-flavour
job whose `input` goes to a classifier, and Infinity's /classify at the root in Infinity's shape."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from ..engines import Capability, Classifier, ModelEngine, ModelRegistry
from ..engines.base import LabelScores
from ..engines.tokenization import Text, counted
from ..errors import APIError
from ..limits import ENVELOPE_BYTES
from .base import (
    Context,
    ModelName,
    Operation,
    RequestModel,
    answer_id,
    chars,
    check_count,
    check_lengths,
    created,
    model_for,
    nonempty_texts,
    off_loop,
    parse,
    usage,
)


class ClassifyRequest(RequestModel):
    model: ModelName | None = None
    input: list[str]
    top_k: int | None = Field(default=None, ge=1)  # the best k labels of each input; all without
    raw_scores: bool = False  # the logits instead of softmax / sigmoid
    truncate: bool = True

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> list[str]:
        return nonempty_texts(value)


def _counted_texts(model: Classifier, texts: list[str]) -> tuple[list[Text], list[int]]:
    """The texts carrying their token counts, and the counts: one call, one thread for both."""
    lengths = model.tokens.count(texts)
    return counted(texts, lengths), lengths


async def _classified(
    context: Context, body: dict[str, Any]
) -> tuple[ModelEngine, list[LabelScores], int]:
    request = await parse(ClassifyRequest, body)
    model = model_for(context.registry, request.model, Capability.CLASSIFY)
    assert isinstance(model, Classifier)
    check_count(len(request.input), context.limits, "input")
    model.check_room(len(request.input), len(request.input))  # before the texts are counted
    texts, lengths = await off_loop(chars(request.input), _counted_texts, model, request.input)
    tokens = check_lengths(model, lengths, request.truncate, context.limits, "input")
    labels = await model.classify(texts, request.raw_scores, tokens=tokens)
    ranked = [sorted(each, key=lambda pair: -pair[1])[: request.top_k] for each in labels]
    return model, ranked, tokens


async def classify(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    model, ranked, tokens = await _classified(context, body)
    return {
        "object": "list",
        "data": [
            {
                "object": "classification",
                "index": i,
                "label": labels[0][0],
                "labels": [{"label": label, "score": score} for label, score in labels],
            }
            for i, labels in enumerate(ranked)
        ],
        "model": model.served_id,
        "usage": usage(tokens),
        "id": answer_id("classify"),
        "created": created(),
    }


async def infinity_classify(context: Context, body: dict[str, Any]) -> dict[str, Any]:
    """Infinity's shape: `data` holds, for each input, its labels and scores best first."""
    model, ranked, tokens = await _classified(context, body)
    return {
        "object": "classify",
        "data": [[{"label": label, "score": score} for label, score in each] for each in ranked],
        "model": model.served_id,
        "usage": usage(tokens),
        "id": answer_id("classify"),
        "created": created(),
    }


def names_a_classifier(registry: ModelRegistry, job_input: dict[str, Any]) -> bool:
    """A standard-flavour job's `input` is classified when its model is a classifier: the one it
    names, or, unnamed, the only one served where no model embeds. Any other job with `input`,
    one that names no served model included, is an embeddings job, whose errors say why."""
    name = job_input.get("model")
    if name is None:
        models = registry.models
        return not any(m.can(Capability.EMBED) for m in models) and any(
            m.can(Capability.CLASSIFY) for m in models
        )
    if not isinstance(name, str):
        return False
    try:
        return registry.resolve(name, Capability.CLASSIFY).can(Capability.CLASSIFY)
    except APIError:
        return False


# '{"label": ..., "score": 0.12345678901234567}, ' less the label; and an item's own fields.
LABEL_BYTES = 48
ITEM_BYTES = 96


def estimate_answer(context: Context, body: dict[str, Any]) -> int:
    """An upper estimate of the answer to `body`: every label of the model for every input, the
    best label named twice (a batch job's bound)."""
    value = body.get("input")
    items = len(value) if isinstance(value, list) else 1
    check_count(items, context.limits, "input")
    name = body.get("model")
    model = model_for(
        context.registry, name if isinstance(name, str) else None, Capability.CLASSIFY
    )
    labels: list[str] = list(getattr(model, "labels", None) or [""])
    top_k = body.get("top_k")
    if type(top_k) is int and top_k >= 1:
        labels = sorted(labels, key=len, reverse=True)[:top_k]
    per_item = ITEM_BYTES + max(map(len, labels)) + sum(LABEL_BYTES + len(x) for x in labels)
    return ENVELOPE_BYTES + items * per_item


OPERATION = Operation(
    name="classify",
    run=classify,
    route="/v1/classify",
    job_fields=("input",),
    job_applies=names_a_classifier,
    batch_line=True,
    answer_bytes=estimate_answer,
)
INFINITY = Operation(name="infinity-classify", run=infinity_classify, route="/classify")
