"""BACKEND=optimum (ONNX Runtime) and BACKEND=ctranslate2 through the worker, against
sentence-transformers in torch float32 (what the torch path serves): every family the torch path
serves, its cross-encoders and classifiers; the export cache; int8 and its measured quality; and
the models a backend refuses, before any model loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.engines import (
    ModelLoadError,
    ModelRegistry,
    backends,
    compiled,
    ctranslate2,
    onnx,
)
from tests import model_factory
from tests.family_models import CROSS_ENCODERS, EMBEDDERS, make_family
from tests.helpers import answer, decode_vectors

pytest.importorskip("onnxruntime")
pytest.importorskip("ctranslate2")
onnx_format = pytest.importorskip("onnx")

TEXTS = [
    "The capital of China is Beijing.",
    "  Gravity is a force that attracts two bodies towards each other; it gives weight to "
    "physical objects.  ",
    "no",
    "naïve café, Ærøskøbing, 東京 and <unk>-looking text",
    "Water boils at one hundred degrees Celsius at sea level. " * 30,  # past the maximum length
]
QUERY = "what is the boiling point of water?"

# CTranslate2 converts BERT-like encoders only: the families it serves here.
CT2_EMBEDDERS = ("bert-cls", "bert-mean", "xlm-roberta", "roberta")
CT2_CROSS_ENCODERS = ("xlm-roberta-cross",)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def family(families: Path, name: str) -> Path:
    path = families / name
    if not (path / "config.json").is_file():
        make_family(name, path)
    return path


def worker_for(path: Path, backend: str, cache: Path, dtype: str = "float32", **env: str):
    config = load_config(
        {
            "MODEL_NAMES": str(path),
            "BACKEND": backend,
            "DTYPES": dtype,
            "ONNX_CACHE_DIR": str(cache),
            **env,
        }
    )
    return Worker.from_config(config)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def torch_vectors(path: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)


def torch_scores(path: Path, query: str, docs: list[str]) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    # Infinity's reranker: the pair stripped, the logit's sigmoid.
    pairs = [(query.strip(), d.strip()) for d in docs]
    return np.asarray(CrossEncoder(str(path), device="cpu").predict(pairs), dtype=np.float64)


async def embed_through(worker: Worker, texts: list[str]) -> np.ndarray:
    await worker.start()
    try:
        body = await answer(worker, input=texts, model=worker.registry.ids[0])
    finally:
        await worker.stop()
    return decode_vectors(body)


async def rerank_through(worker: Worker, query: str, docs: list[str]) -> np.ndarray:
    await worker.start()
    try:
        body = await answer(worker, query=query, documents=docs, model=worker.registry.ids[0])
    finally:
        await worker.stop()
    scores = np.empty(len(docs))
    for item in body["results"]:
        scores[item["index"]] = item["relevance_score"]
    return scores


# --------------------------------------------------------------------------- optimum


@pytest.mark.parametrize("name", list(EMBEDDERS))
async def test_optimum_embeds_every_family_as_torch_float32(families, tmp_path, name):
    path = family(families, name)
    vectors = await embed_through(worker_for(path, "optimum", tmp_path), TEXTS)
    expected = torch_vectors(path, TEXTS)
    assert vectors.shape == expected.shape
    assert cosines(vectors, expected).min() >= 0.99999
    # The model's own modules end in Normalize: unit vectors, as torch gives them.
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", CROSS_ENCODERS)
async def test_optimum_reranks_every_cross_encoder_family_as_torch(families, tmp_path, name):
    path = family(families, name)
    scores = await rerank_through(worker_for(path, "optimum", tmp_path), QUERY, TEXTS)
    np.testing.assert_allclose(scores, torch_scores(path, QUERY, TEXTS), atol=1e-5)


async def test_optimum_classifies_as_torch(models_dir, tmp_path):
    path = model_factory.make_bert_classifier(models_dir / "tiny-classifier-onnx")
    worker = worker_for(path, "optimum", tmp_path)
    await worker.start()
    try:
        model = worker.registry.models[0]
        got = await model.classify(TEXTS, tokens=len(TEXTS))
    finally:
        await worker.stop()
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(path), device="cpu", top_k=None)
    for text, labels in zip(TEXTS, got):
        expected = {
            item["label"]: item["score"] for item in pipe([text.strip()], truncation=True)[0]
        }
        assert [label for label, _ in labels] == ["negative", "neutral", "positive"]
        for label, score in labels:
            assert score == pytest.approx(expected[label], abs=1e-5)


async def test_an_export_is_made_once_and_then_loaded_from_the_cache(
    families, tmp_path, monkeypatch
):
    path = family(families, "bert-mean")
    first = await embed_through(worker_for(path, "optimum", tmp_path), TEXTS[:2])
    (exported,) = tmp_path.glob("*/model.onnx")

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx, "_export", no_export)
    again = await embed_through(worker_for(path, "optimum", tmp_path), TEXTS[:2])
    np.testing.assert_array_equal(first, again)
    assert exported.is_file() and not list(tmp_path.glob("*/.partial-*"))


async def test_the_models_own_onnx_file_is_used(families, tmp_path, monkeypatch):
    source = family(families, "bert-cls")
    await embed_through(worker_for(source, "optimum", tmp_path / "first"), TEXTS[:2])
    (exported,) = (tmp_path / "first").glob("*/model.onnx")
    own = tmp_path / "with-onnx" / "bert-cls"
    shutil.copytree(source, own)
    (own / "onnx").mkdir()
    shutil.copy(exported, own / "onnx" / "model.onnx")

    monkeypatch.setattr(onnx, "_export", lambda *a, **k: pytest.fail("exported"))
    empty_cache = tmp_path / "cache"
    vectors = await embed_through(worker_for(own, "optimum", empty_cache), TEXTS)
    assert cosines(vectors, torch_vectors(source, TEXTS)).min() >= 0.99999
    assert not empty_cache.exists() or not list(empty_cache.glob("*/model.onnx"))


async def int8_entry_and_cosines(families: Path, cache: Path, backend: str):
    """A tiny BERT's /v1/models entry with DTYPES=int8 on `backend`, and the cosine of its
    answers for QUALITY_TEXTS to torch float32's."""
    path = family(families, "bert-mean")
    worker = worker_for(path, backend, cache, dtype="int8")
    float32 = torch_vectors(path, list(compiled.QUALITY_TEXTS))
    await worker.start()
    try:
        (entry,) = (await answer(worker, openai_route="/v1/models"))["data"]
        body = await answer(worker, input=list(compiled.QUALITY_TEXTS), model=entry["id"])
    finally:
        await worker.stop()
    return entry, cosines(decode_vectors(body), float32)


@pytest.mark.parametrize("backend", ["optimum", "ctranslate2"])
async def test_int8_reports_its_measured_cosine_to_float32(families, tmp_path, backend):
    entry, measured = await int8_entry_and_cosines(families, tmp_path, backend)
    quality = entry["int8_cosine_to_float32"]
    assert entry["backend"] == backend and entry["dtype"] == "int8"
    # What /v1/models shows is what the int8 answers are, to float32's rounding.
    assert quality["min"] == pytest.approx(float(measured.min()), abs=1e-4)
    assert quality["mean"] == pytest.approx(float(measured.mean()), abs=1e-4)
    assert 0.9 < quality["min"] <= quality["mean"] <= 1.0


async def test_int8_under_the_bar_keeps_the_down_projections_in_float32(
    families, tmp_path, monkeypatch
):
    # Above any cosine: the fully quantised file always falls short of it.
    monkeypatch.setattr(onnx, "INT8_MIN_COSINE", 1.01)
    entry, measured = await int8_entry_and_cosines(families, tmp_path, "optimum")
    assert entry["int8_scheme"] == onnx.MIXED_INT8
    # The answers are the mixed file's: the cosine shown is theirs.
    assert entry["int8_cosine_to_float32"]["min"] == pytest.approx(float(measured.min()), abs=1e-4)
    (exported,) = tmp_path.glob("*/model.onnx")
    (mixed,) = tmp_path.glob("*/model_int8_mixed.onnx")
    kept = set(onnx.down_projections(exported))
    nodes = {n.name: n.op_type for n in onnx_format.load(str(mixed)).graph.node}
    assert kept and all(nodes[name] == "MatMul" for name in kept)
    assert any("Integer" in op or "Quantize" in op for op in nodes.values())


async def test_the_down_projections_are_each_layers_feed_forward_output(families, tmp_path):
    path = family(families, "bert-mean")
    await embed_through(worker_for(path, "optimum", tmp_path), TEXTS[:1])
    (exported,) = tmp_path.glob("*/model.onnx")
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    names = onnx.down_projections(exported)
    assert len(names) == layers
    assert all("/output/dense/" in n and "attention" not in n for n in names)


# --------------------------------------------------------------------------- ctranslate2


@pytest.mark.parametrize("name", CT2_EMBEDDERS)
async def test_ctranslate2_embeds_its_families_as_torch_float32(families, tmp_path, name):
    path = family(families, name)
    vectors = await embed_through(worker_for(path, "ctranslate2", tmp_path), TEXTS)
    assert cosines(vectors, torch_vectors(path, TEXTS)).min() >= 0.99999


@pytest.mark.parametrize("name", CT2_CROSS_ENCODERS)
async def test_ctranslate2_reranks_as_torch(families, tmp_path, name):
    path = family(families, name)
    scores = await rerank_through(worker_for(path, "ctranslate2", tmp_path), QUERY, TEXTS)
    np.testing.assert_allclose(scores, torch_scores(path, QUERY, TEXTS), atol=1e-5)


async def test_ctranslate2_reranks_a_bert_cross_encoder_as_torch(bert_reranker, tmp_path):
    scores = await rerank_through(worker_for(bert_reranker, "ctranslate2", tmp_path), QUERY, TEXTS)
    np.testing.assert_allclose(scores, torch_scores(bert_reranker, QUERY, TEXTS), atol=1e-5)


# --------------------------------------------------------------------------- refusals


def refused(env: dict[str, str], monkeypatch) -> str:
    """The start error for `env`, checking that no model was loaded on the way."""
    loaded: list[str] = []
    real = backends.load

    def recording(spec, *args, **kwargs):
        loaded.append(spec.served_id)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(backends, "load", recording)
    config = load_config(env)
    with pytest.raises(ModelLoadError) as error:
        ModelRegistry.load(config.models, config.engine_settings)
    assert loaded == []
    return str(error.value)


@pytest.mark.parametrize("backend", ["optimum", "ctranslate2"])
def test_a_bge_m3_model_is_refused_before_any_model_loads(
    bert_embedder, bge_m3, backend, monkeypatch
):
    message = refused({"MODEL_NAMES": f"{bert_embedder};{bge_m3}", "BACKEND": backend}, monkeypatch)
    assert "tiny-bge-m3" in message and f"BACKEND={backend}" in message
    assert "three outputs" in message and "use BACKEND=torch" in message


@pytest.mark.parametrize("backend", ["optimum", "ctranslate2"])
def test_an_llm_reranker_is_refused(qwen3_reranker, backend, monkeypatch):
    message = refused({"MODEL_NAMES": str(qwen3_reranker), "BACKEND": backend}, monkeypatch)
    assert qwen3_reranker.name in message and "LLM reranker" in message
    assert "use BACKEND=torch" in message


def test_clip_is_refused(models_dir, monkeypatch):
    path = model_factory.make_clip(models_dir / "tiny-clip-refused")
    message = refused({"MODEL_NAMES": str(path), "BACKEND": "optimum"}, monkeypatch)
    assert "tiny-clip-refused" in message and "clip image-and-text model" in message
    assert "BACKEND=torch" in message


def test_ctranslate2_refuses_a_last_token_pooled_decoder(qwen3_embedder, monkeypatch):
    message = refused({"MODEL_NAMES": str(qwen3_embedder), "BACKEND": "ctranslate2"}, monkeypatch)
    assert qwen3_embedder.name in message and "BACKEND=ctranslate2" in message
    assert "last token" in message and "use BACKEND=optimum or BACKEND=torch" in message


@pytest.mark.parametrize("name", ["mpnet", "modernbert", "deberta-cross"])
def test_ctranslate2_refuses_families_it_cannot_convert(families, name, monkeypatch):
    path = family(families, name)
    message = refused({"MODEL_NAMES": str(path), "BACKEND": "ctranslate2"}, monkeypatch)
    assert f"'{path.parent.name}/{name}'" in message and "CTranslate2 runs" in message


def test_a_dtype_the_backend_lacks_is_refused(bert_embedder, monkeypatch):
    env = {"MODEL_NAMES": str(bert_embedder), "BACKEND": "optimum", "DTYPES": "bfloat16"}
    message = refused(env, monkeypatch)
    assert "DTYPES=bfloat16" in message and "int8" in message


def refused_on_cuda(families, tmp_path, role: str, backend: str) -> tuple[Path, str]:
    """`role`'s tiny model and its start error on BACKEND=`backend` and CUDA device 0."""
    path = family(families, role)
    config = load_config(
        {
            "MODEL_NAMES": str(path),
            "BACKEND": backend,
            "DEVICES": "0",
            "ONNX_CACHE_DIR": str(tmp_path),
        }
    )
    with pytest.raises(ModelLoadError) as error:
        ModelRegistry.load(config.models, config.engine_settings)
    return path, str(error.value)


@pytest.mark.parametrize("role", ["bert-mean", "xlm-roberta-cross"])
def test_ctranslate2_on_a_gpu_without_cuda_12s_cublas_is_refused_before_converting(
    families, tmp_path, role, monkeypatch
):
    # CTranslate2 would fail on the GPU at run time: torch's CUDA 13 build has no cuBLAS 12.
    if ctranslate2.cublas_wheel_copies():
        pytest.skip("CUDA 12's cuBLAS is installed here")
    monkeypatch.setattr(ctranslate2, "_converted", lambda *a, **k: pytest.fail("converted"))
    path, message = refused_on_cuda(families, tmp_path, role, "ctranslate2")
    assert path.name in message and "CUDA device 0" in message and ctranslate2.CUBLAS in message
    assert "ctranslate2-gpu" in message and "DEVICES=cpu" in message


def test_cuda_12s_cublas_is_found_where_its_wheel_installs_it(tmp_path, monkeypatch):
    lib = tmp_path / "nvidia" / "cublas" / "lib"
    lib.mkdir(parents=True)
    (lib / ctranslate2.CUBLAS).write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ctranslate2.cublas_wheel_copies()[0] == lib / ctranslate2.CUBLAS
    # a file that is not a loadable library is passed over, and the refusal says so
    with pytest.raises(ModelLoadError, match="cuBLAS"):
        ctranslate2.load_cublas(("0",), "m")
    ctranslate2.load_cublas((ctranslate2.CPU,), "m")  # the CPU needs none


@pytest.mark.parametrize("role", ["bert-mean", "xlm-roberta-cross"])
def test_optimum_on_a_gpu_without_onnx_runtimes_cuda_provider_is_refused_before_exporting(
    families, tmp_path, role, monkeypatch
):
    # ONNX Runtime would run on the CPU with a warning alone: a GPU worker at CPU speed.
    import onnxruntime

    if onnx.CUDA_PROVIDER in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has its CUDA provider")
    monkeypatch.setattr(onnx, "_export", lambda *a, **k: pytest.fail("exported"))
    path, message = refused_on_cuda(families, tmp_path, role, "optimum")
    assert path.name in message and "CUDA device 0" in message
    assert "onnxruntime-gpu" in message and "DEVICES=cpu" in message
