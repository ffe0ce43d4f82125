"""Image embeddings on /v1/embeddings: tiny random CLIP and SigLIP models give transformers' own
vectors (get_image_features / get_text_features, normalised) through the one dispatch, in both
RunPod flavours, on the local server (plain HTTP and the openai SDK) and in batch files; bad images
are typed errors naming the item, and the worker keeps serving."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from embedding_worker.config import load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.batch_files import run_batch
from embedding_worker.transports.http import create_app
from embedding_worker.transports.runpod import answer_job, runpod_handler
from tests import model_factory
from tests.helpers import answer, bound_queue, decode_vectors
from tests.test_batch import options, read_output
from tests.test_server import ServerThread

TEXTS = [
    "a photo of a cat",
    # Over Infinity's own cut of 20 tokens, under CLIP's 77.
    "The quick brown fox jumps over the lazy dog while the children read books by the river",
    # Over 77 tokens: cut to the model's maximum, as its processor cuts it.
    "Paris is the capital of France and a popular destination for tourists. " * 8,
]


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def data_uri(data: bytes, subtype: str = "png") -> str:
    return f"data:image/{subtype};base64," + base64.b64encode(data).decode()


# Every decoded format and a few modes and shapes: images 3 pixels high included, whose channels
# an image processor left to guess would take for the first axis.
IMAGES = {
    "png": encoded(_noise(40, 30, seed=1)),
    "jpeg": encoded(_noise(64, 48, seed=2), "JPEG"),
    "webp": encoded(_noise(33, 50, seed=3), "WEBP"),
    "gif": encoded(_noise(20, 20, seed=4).convert("P"), "GIF"),
    "rgba-png": encoded(_noise(25, 40, "RGBA", seed=5)),
    "grey-png": encoded(_noise(36, 36, "L", seed=6)),
    "thin-png": encoded(_noise(50, 3, seed=7)),
}
SUBTYPES = {"png": "png", "jpeg": "jpeg", "webp": "webp", "gif": "gif"}


def uri_of(name: str) -> str:
    return data_uri(IMAGES[name], SUBTYPES.get(name, "png"))


@pytest.fixture(scope="module")
def clip(models_dir):
    return model_factory.make_clip(models_dir / "tiny-clip")


@pytest.fixture(scope="module")
def siglip(models_dir):
    return model_factory.make_siglip(models_dir / "tiny-siglip")


@pytest.fixture(scope="module")
async def image_worker(clip, siglip, bert_embedder):
    env = {
        "MODEL_NAMES": f"{clip};{siglip};{bert_embedder}",
        "DTYPES": "float32",
        "BATCH_SIZES": "4",
    }
    worker = Worker.from_config(load_config(env))
    await worker.start()
    yield worker
    await worker.stop()


@pytest.fixture(scope="module")
def names(image_worker):
    by_tail = {m.served_id.rsplit("/", 1)[-1]: m.served_id for m in image_worker.registry.models}
    return {
        "clip": by_tail["tiny-clip"],
        "siglip": by_tail["tiny-siglip"],
        "text": by_tail["tiny-bert-embedder"],
    }


def expected(path, items: list) -> np.ndarray:
    """The model's own recipe: its processor, get_text_features / get_image_features, L2."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    padding = "max_length" if model.config.model_type == "siglip" else True
    rows = []
    with torch.no_grad():
        for item in items:
            if isinstance(item, str):
                inputs = processor(
                    text=[item], padding=padding, truncation=True, return_tensors="pt"
                )
                row = model.get_text_features(**inputs)
            else:
                image = Image.open(io.BytesIO(item)).convert("RGB")
                pixels = processor(
                    images=[image], return_tensors="pt", input_data_format="channels_last"
                )
                row = model.get_image_features(**pixels)
            rows.append(torch.nn.functional.normalize(row, dim=-1)[0].numpy())
    return np.stack(rows)


def mixed_items() -> tuple[list, list]:
    """Request items (texts, data URIs and image objects mixed) and what each one is."""
    request = [TEXTS[0], uri_of("png"), {"type": "image_url", "image_url": {"url": uri_of("jpeg")}}]
    request += [{"type": "text", "text": TEXTS[1]}, {"type": "image", "image": uri_of("webp")}]
    request += [uri_of(name) for name in ("gif", "rgba-png", "grey-png", "thin-png")] + [TEXTS[2]]
    meaning = [TEXTS[0], IMAGES["png"], IMAGES["jpeg"], TEXTS[1], IMAGES["webp"]]
    meaning += [IMAGES[name] for name in ("gif", "rgba-png", "grey-png", "thin-png")] + [TEXTS[2]]
    return request, meaning


@pytest.mark.parametrize("model", ["clip", "siglip"])
async def test_vectors_are_the_models_own_in_both_flavours(
    image_worker, names, model, clip, siglip
):
    request, meaning = mixed_items()
    want = expected(clip if model == "clip" else siglip, meaning)
    standard = await answer(image_worker, model=names[model], input=request)
    np.testing.assert_allclose(decode_vectors(standard), want, atol=1e-5)
    reply = await answer_job(
        image_worker,
        {
            "openai_route": "/v1/embeddings",
            "openai_input": {"model": names[model], "input": request, "encoding_format": "base64"},
        },
    )
    assert reply.status == 200
    np.testing.assert_allclose(decode_vectors(reply.body), want, atol=1e-5)
    # Images count no tokens; the texts count their own.
    tokens = image_worker.registry.resolve(names[model], None).tokens
    max_length = image_worker.registry.resolve(names[model], None).max_length
    assert standard["usage"]["prompt_tokens"] == sum(
        min(n, max_length) for n in tokens.count([m for m in meaning if isinstance(m, str)])
    )


async def test_an_image_alone_equals_it_among_others_and_modality_image(image_worker, names, clip):
    alone = decode_vectors(await answer(image_worker, model=names["clip"], input=uri_of("png")))
    among = decode_vectors(await answer(image_worker, model=names["clip"], input=mixed_items()[0]))
    np.testing.assert_allclose(alone[0], among[1], atol=1e-6)
    infinity_style = await answer(
        image_worker, model=names["clip"], input=[uri_of("png")], modality="image"
    )
    np.testing.assert_allclose(decode_vectors(infinity_style)[0], alone[0], atol=1e-6)


async def test_an_unnamed_request_with_images_goes_to_the_image_model(clip, bert_embedder):
    worker = Worker.from_config(
        load_config({"MODEL_NAMES": f"{clip};{bert_embedder}", "DTYPES": "float32"})
    )
    await worker.start()
    try:
        body = await answer(worker, input=[uri_of("png"), "a cat"])
        assert body["model"].endswith("tiny-clip")
    finally:
        await worker.stop()


async def test_infinitys_route_takes_modality_image(image_worker, names, clip):
    reply = await answer_job(
        image_worker,
        {
            "openai_route": "/embeddings",
            "openai_input": {"model": names["clip"], "input": [uri_of("png")], "modality": "image"},
        },
    )
    assert reply.status == 200
    np.testing.assert_allclose(
        decode_vectors(reply.body), expected(clip, [IMAGES["png"]]), atol=1e-5
    )


async def test_an_image_to_a_worker_of_text_models_names_the_item(worker):
    # The shared worker serves two text embedders and no image model: unnamed, the request must
    # name one, as any embeddings request there; the one named refuses the image by its index.
    reply = await answer_job(worker, {"input": ["a cat", uri_of("png")]})
    assert reply.status == 400 and reply.body["error"]["param"] == "model"
    reply = await answer_job(
        worker,
        {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": ["a cat", uri_of("png")]},
    )
    assert reply.body["error"]["code"] == "model_not_image_embedding"
    assert "item 1" in reply.body["error"]["message"]


async def test_models_list_says_which_take_images(image_worker, names):
    reply = await answer_job(image_worker, {"openai_route": "/v1/models"})
    by_id = {entry["id"]: entry for entry in reply.body["data"]}
    assert by_id[names["clip"]]["capabilities"] == ["embed", "embed_images"]
    assert (
        by_id[names["clip"]]["dimensions"] == 24 and by_id[names["clip"]]["max_input_tokens"] == 77
    )
    assert by_id[names["text"]]["capabilities"] == ["embed"]


async def error_of(worker, **body) -> dict:
    reply = await answer_job(worker, body)
    assert reply.status == 400, reply.body
    error = reply.body["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "input"
    text = json.dumps(reply.body)
    assert (
        "iVBOR" not in text and "rawbytes" not in text and "example.com" not in text
    )  # no payload
    return error


async def test_a_text_model_given_an_image_names_the_item(image_worker, names):
    error = await error_of(
        image_worker, model=names["text"], input=["a cat", "a dog", uri_of("png")]
    )
    assert error["code"] == "model_not_image_embedding" and "item 2" in error["message"]
    # A string that is no image data URI is a text, to every model.
    await answer(
        image_worker, model=names["text"], input=["data:text/plain,hello", "https://x.y/z.png"]
    )


def _truncated_png() -> bytes:
    return IMAGES["png"][: len(IMAGES["png"]) // 2]


BAD_IMAGES = [
    pytest.param("data:image/png;base64,not base64!", "base64", id="not-base64"),
    pytest.param("data:image/png,rawbytes", "base64 image data URI", id="not-base64-uri"),
    pytest.param(data_uri(encoded(_noise(8, 8), "BMP"), "bmp"), "type not decoded", id="bmp-type"),
    pytest.param(data_uri(encoded(_noise(8, 8), "BMP")), "can be decoded here", id="bmp-as-png"),
    pytest.param(data_uri(b"plain text, not an image"), "can be decoded here", id="not-an-image"),
    pytest.param(data_uri(_truncated_png()), "damaged or truncated", id="truncated"),
    pytest.param(data_uri(encoded(_noise(2, 9))), "under 3x3", id="too-small"),
    pytest.param(
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        "IMAGE_URL_HOSTS",
        id="url",
    ),
]


@pytest.mark.parametrize("bad, reason", BAD_IMAGES)
async def test_a_bad_image_is_invalid_input_naming_the_item_and_the_worker_serves_on(
    image_worker, names, bad, reason
):
    error = await error_of(image_worker, model=names["clip"], input=["a cat", uri_of("png"), bad])
    assert error["code"] == "invalid_input"
    assert error["message"].startswith("'input' item 2 ") and reason in error["message"]
    assert image_worker.healthy
    await answer(image_worker, model=names["clip"], input=[uri_of("png")])


@pytest.mark.parametrize(
    "shape, reason",
    [
        pytest.param({"type": "image"}, "item 1 of type image needs", id="no-image"),
        pytest.param(
            {"type": "video", "video": "x"}, "item 1 is an object whose 'type'", id="type"
        ),
        pytest.param({"type": "text", "text": ""}, "item 1 of type text needs", id="empty-text"),
        pytest.param([1, 2], "item 1 is not a string or an object", id="token-ids"),
    ],
)
async def test_malformed_items_are_invalid_input(image_worker, names, shape, reason):
    error = await error_of(image_worker, model=names["clip"], input=["a cat", shape])
    assert reason in error["message"]


async def test_modality_text_refuses_image_objects_and_keeps_data_uris_as_text(image_worker, names):
    error = await error_of(
        image_worker,
        model=names["clip"],
        input=[{"type": "image", "image": uri_of("png")}],
        modality="text",
    )
    assert "modality" in error["message"]
    as_text = await answer(
        image_worker, model=names["text"], input=[uri_of("png")], modality="text"
    )
    assert len(as_text["data"]) == 1


@pytest.mark.parametrize(
    "limit, value, reason",
    [
        ("max_image_bytes", 200, "more than 200 bytes (IMAGE_MAX_BYTES)"),
        ("max_image_pixels", 1000, "40x30 pixels, more than 1000 pixels (IMAGE_MAX_PIXELS)"),
        ("max_inputs", 2, "more than the limit of 2"),
    ],
)
async def test_image_limits(image_worker, names, monkeypatch, limit, value, reason):
    monkeypatch.setattr(
        image_worker, "limits", dataclasses.replace(image_worker.limits, **{limit: value})
    )
    error = await error_of(
        image_worker, model=names["clip"], input=["a", uri_of("png"), uri_of("png")]
    )
    assert reason in error["message"]


async def test_images_share_the_queue_bound(image_worker, names, monkeypatch):
    model = image_worker.registry.resolve(names["clip"], None)
    bound_queue(monkeypatch, model, max_items=2)
    monkeypatch.setattr(model.admission, "items", 1)  # one input already waiting
    reply = await answer_job(
        image_worker, {"model": names["clip"], "input": [uri_of("png"), uri_of("png")]}
    )
    assert reply.status == 429 and reply.body["error"]["code"] == "queue_full"


async def test_a_decompression_bomb_is_refused_before_decoding(image_worker, names):
    # Pixels of one colour: PNGs of a few hundred KB that would decode to 40 MB and 1.2 GB, over
    # the worker's limit and over Pillow's own guard.
    for side in (6_000, 20_000):
        bomb = encoded(Image.new("L", (side, side)))
        assert len(bomb) < 1_000_000
        error = await error_of(image_worker, model=names["clip"], input=[data_uri(bomb)])
        assert "pixels (IMAGE_MAX_PIXELS)" in error["message"]


async def test_the_runpod_handler_embeds_images(image_worker, names, clip):
    handler = runpod_handler(image_worker)
    done = await handler(
        {"id": "job-1", "input": {"model": names["clip"], "input": [uri_of("png")]}}
    )
    np.testing.assert_allclose(decode_vectors(done), expected(clip, [IMAGES["png"]]), atol=1e-5)
    failed = await handler(
        {"id": "job-2", "input": {"model": names["text"], "input": [uri_of("png")]}}
    )
    assert set(failed) == {"error"} and "item 0" in failed["error"]


async def test_batch_file_lines_embed_images(image_worker, names, clip, tmp_path):
    source = tmp_path / "images.jsonl"
    lines = [
        {
            "custom_id": "cat",
            "url": "/v1/embeddings",
            "body": {"model": names["clip"], "input": [uri_of("png"), "a cat"]},
        },
        {
            "custom_id": "bad",
            "url": "/v1/embeddings",
            "body": {"model": names["clip"], "input": [data_uri(b"junk")]},
        },
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    await run_batch(image_worker, options(tmp_path, source))
    outputs = {o["custom_id"]: o["response"] for o in read_output(tmp_path / "results.jsonl")}
    want = expected(clip, [IMAGES["png"], "a cat"])
    np.testing.assert_allclose(decode_vectors(outputs["cat"]["body"]), want, atol=1e-5)
    assert outputs["bad"]["status_code"] == 400
    assert "item 0" in outputs["bad"]["body"]["error"]["message"]


def test_the_local_server_and_the_openai_sdk_embed_images(clip, siglip, bert_embedder):
    env = {"MODEL_NAMES": f"{clip};{bert_embedder}", "DTYPES": "float32"}
    worker = Worker.from_config(load_config(env))
    clip_id = next(m.served_id for m in worker.registry.models if m.served_id.endswith("tiny-clip"))
    with ServerThread(create_app(worker)) as server:
        items = [
            uri_of("png"),
            "a photo of a cat",
            {"type": "image_url", "image_url": {"url": uri_of("jpeg")}},
        ]
        want = expected(clip, [IMAGES["png"], "a photo of a cat", IMAGES["jpeg"]])
        body = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": clip_id, "input": items}, timeout=60
        )
        assert body.status_code == 200
        np.testing.assert_allclose(decode_vectors(body.json()), want, atol=1e-5)
        client = openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1")
        # The SDK asks for base64 by default and decodes it itself; it sends the list as it is.
        sdk = client.embeddings.create(model=clip_id, input=items)  # type: ignore[arg-type]
        np.testing.assert_allclose(np.array([d.embedding for d in sdk.data]), want, atol=1e-5)
        with pytest.raises(openai.BadRequestError, match="item 0 is an image"):
            client.embeddings.create(
                model=worker.registry.models[1].served_id, input=[uri_of("png")]
            )


def test_why_the_worker_makes_the_inputs_itself(clip, siglip):
    """Infinity's own pre-processing step (engines/vision.py replaces it): it cuts CLIP texts at
    config.max_length, transformers' generation default of 20 tokens, and pads SigLIP texts to the
    batch's longest instead of the tokenizer's maximum. Should Infinity fix either, this fails and
    the workaround can go."""
    from infinity_emb import EngineArgs
    from infinity_emb.transformer.vision.torch_vision import TIMM

    def own_step(path):
        args = EngineArgs(model_name_or_path=str(path), bettertransformer=False, model_warmup=False)
        return TIMM(engine_args=args)

    clip_replica = own_step(clip)
    assert len(clip_replica.processor.tokenizer(TEXTS[1])["input_ids"]) > 20
    features, _ = clip_replica.encode_pre([TEXTS[1]])
    assert features["input_ids"].shape[1] == 20
    features, _ = own_step(siglip).encode_pre(["a cat"])
    assert features["input_ids"].shape[1] < 16


async def test_dtypes_auto_is_bfloat16_on_a_cpu_that_computes_it(clip):
    """Infinity leaves a CPU replica in float32 whatever its dtype; the worker casts it, so that
    `auto` means for CLIP what it means for every embedder (engines/dtype.py)."""
    worker = Worker.from_config(load_config({"MODEL_NAMES": str(clip), "DTYPES": "bfloat16"}))
    await worker.start()
    try:
        model = worker.registry.models[0]
        assert model.engine._model_replicas[0].model.dtype == torch.bfloat16
        request = [TEXTS[0], uri_of("png"), uri_of("jpeg")]
        got = decode_vectors(await answer(worker, input=request))
        want = expected(clip, [TEXTS[0], IMAGES["png"], IMAGES["jpeg"]])
        assert got.dtype == np.float32 and (got * want).sum(axis=1).min() > 0.999
    finally:
        await worker.stop()


def _count_decodes(monkeypatch) -> list[int]:
    from embedding_worker import images

    decoded: list[int] = []
    real_decode = images.decode

    def counted(data, index, limits, budget=None):
        decoded.append(index)
        return real_decode(data, index, limits, budget)

    monkeypatch.setattr(images, "decode", counted)
    return decoded


async def test_a_request_over_its_pixels_is_refused_before_any_decoding(
    image_worker, names, monkeypatch
):
    # Finding (issue 28): a 3 KB PNG of 5000x5000 one-bit pixels took 0.5 s of CPU to decode, and
    # a 1 MB request of them 127 s. Each counts its 25 million pixels, whatever its bytes.
    from embedding_worker import images

    bomb = encoded(Image.new("1", (5000, 5000)))
    assert len(bomb) < 4_000
    assert images.decoded_pixels(Image.open(io.BytesIO(bomb))) == 25_000_000
    decoded = _count_decodes(monkeypatch)
    limits = image_worker.limits
    assert limits.max_request_image_pixels == 10 * limits.max_image_pixels  # the default
    request = [data_uri(bomb)] * (limits.max_request_image_pixels // 25_000_000 + 1)
    reply = await answer_job(image_worker, {"model": names["clip"], "input": ["a cat", *request]})
    assert reply.status == 413 and reply.body["error"]["code"] == "request_too_large"
    assert reply.body["error"]["param"] == "input"
    assert reply.body["error"]["message"] == (
        "the request's images hold more than 250000000 pixels to decode "
        "(IMAGE_MAX_REQUEST_PIXELS); split them into smaller requests"
    )
    assert decoded == []
    # Within it, the same images are decoded.
    monkeypatch.setattr(
        image_worker,
        "limits",
        dataclasses.replace(limits, max_request_image_pixels=3 * 40 * 30),  # three PNGs
    )
    await answer(image_worker, model=names["clip"], input=[uri_of("png")] * 3)
    assert decoded == [0, 1, 2]
    reply = await answer_job(image_worker, {"model": names["clip"], "input": [uri_of("png")] * 4})
    assert reply.status == 413 and decoded == [0, 1, 2]


def _animation(frames: int) -> bytes:
    images = [_noise(40, 30, seed=seed).convert("P") for seed in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:])
    return out.getvalue()


async def test_an_animation_costs_the_one_frame_decoded(image_worker, names, monkeypatch):
    animation = _animation(30)
    assert Image.open(io.BytesIO(animation)).n_frames == 30
    monkeypatch.setattr(
        image_worker,
        "limits",
        dataclasses.replace(image_worker.limits, max_request_image_pixels=2 * 40 * 30),
    )
    uri = data_uri(animation, "gif")
    alone = decode_vectors(await answer(image_worker, model=names["clip"], input=[uri, uri]))
    first = encoded(Image.open(io.BytesIO(animation)).convert("RGB"))
    still = decode_vectors(await answer(image_worker, model=names["clip"], input=[data_uri(first)]))
    np.testing.assert_allclose(alone[0], still[0], atol=1e-6)  # its first frame, only
    reply = await answer_job(image_worker, {"model": names["clip"], "input": [uri, uri, uri]})
    assert reply.status == 413
