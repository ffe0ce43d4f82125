"""Configuration from the environment: parsed once, validated, errors name the variable."""

from __future__ import annotations

import pytest

from embedding_worker.config import (
    DEFAULT_MODEL_ID,
    ConfigError,
    bundled_model_path,
    load_config,
)


def test_default_serves_the_bundled_model_without_network():
    config = load_config({})
    (model,) = config.models
    assert model.served_id == DEFAULT_MODEL_ID
    assert model.source == str(bundled_model_path())
    assert (bundled_model_path() / "model.safetensors").is_file()
    assert config.queue_size == 48_000
    assert config.max_concurrency == 300
    assert config.trust_remote_code is False


def test_model_names_are_trimmed_and_local_dirs_served_by_last_two_segments(tmp_path):
    model_dir = tmp_path / "org" / "my-model"
    model_dir.mkdir(parents=True)
    config = load_config({"MODEL_NAMES": f" BAAI/bge-small-en-v1.5 ; {model_dir} "})
    assert [m.served_id for m in config.models] == ["BAAI/bge-small-en-v1.5", "org/my-model"]
    assert config.models[1].source == str(model_dir)


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"MODEL_NAMES": "a/b;;c/d"}, "MODEL_NAMES has an empty entry"),
        ({"MODEL_NAMES": "a/b;"}, "MODEL_NAMES has an empty entry"),
        ({"MODEL_NAMES": "a/b;a/b"}, "more than once"),
        ({"MODEL_NAMES": "a/b;c/d", "BATCH_SIZES": "8;16;32"}, "BATCH_SIZES has 3 entries"),
        ({"MODEL_NAMES": "a/b;c/d;e/f", "DTYPES": "fp16;auto"}, "DTYPES has 2 entries"),
        ({"BATCH_SIZES": "big"}, "BATCH_SIZES"),
        ({"BATCH_SIZES": "0"}, "BATCH_SIZES must be at least 1"),
        ({"DTYPES": "float64"}, "DTYPES has unknown dtype 'float64'"),
        ({"BACKEND": "tensorrt"}, "BACKEND must be one of torch, optimum, ctranslate2"),
        ({"INFINITY_QUEUE_SIZE": "-1"}, "INFINITY_QUEUE_SIZE must be at least 1"),
        ({"RUNPOD_MAX_CONCURRENCY": "lots"}, "RUNPOD_MAX_CONCURRENCY must be a whole number"),
        ({"TRUST_REMOTE_CODE": "maybe"}, "TRUST_REMOTE_CODE must be true or false"),
        ({"KEEP_FREED_MEMORY": "2"}, "KEEP_FREED_MEMORY must be auto, true or false"),
        ({"REQUEST_TIMEOUT": "nan"}, "REQUEST_TIMEOUT must be a positive number"),
    ],
)
def test_invalid_values_name_the_variable(env, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config(env)


def test_one_value_applies_to_every_model_and_short_dtype_names_map_to_infinitys():
    config = load_config({"MODEL_NAMES": "a/b;c/d", "BATCH_SIZES": "8", "DTYPES": "fp16;bf16"})
    assert [m.batch_size for m in config.models] == [8, 8]
    assert [m.dtype for m in config.models] == ["float16", "bfloat16"]
    config = load_config({"MODEL_NAMES": "a/b;c/d", "BATCH_SIZES": "8;64", "DTYPES": "FP32"})
    assert [m.batch_size for m in config.models] == [8, 64]
    assert [m.dtype for m in config.models] == ["float32", "float32"]


def test_numbers_and_flags():
    config = load_config(
        {
            "INFINITY_QUEUE_SIZE": "100",
            "RUNPOD_MAX_CONCURRENCY": "7",
            "TRUST_REMOTE_CODE": "true",
            "BACKEND": "optimum",
            "KEEP_FREED_MEMORY": "off",
        }
    )
    assert (config.queue_size, config.max_concurrency, config.trust_remote_code) == (100, 7, True)
    assert config.keep_freed_memory is False
    assert load_config({"KEEP_FREED_MEMORY": "yes"}).keep_freed_memory is True
    assert load_config({}).keep_freed_memory is None  # auto
    assert load_config({"KEEP_FREED_MEMORY": " Auto "}).keep_freed_memory is None
    assert config.models[0].backend == "optimum"


def test_request_image_limits():
    limits = load_config({}).limits
    assert limits.max_request_image_pixels == 250_000_000
    assert limits.image_url_bytes_in_flight == 64_000_000
    limits = load_config(
        {"IMAGE_MAX_REQUEST_PIXELS": "1000000", "IMAGE_URL_BYTES_IN_FLIGHT": "20000000"}
    ).limits
    assert (limits.max_request_image_pixels, limits.image_url_bytes_in_flight) == (
        1_000_000,
        20_000_000,
    )
    # Each download holds room for a whole image: one must fit.
    with pytest.raises(ConfigError, match="IMAGE_URL_BYTES_IN_FLIGHT .* at least IMAGE_MAX_BYTES"):
        load_config({"IMAGE_URL_BYTES_IN_FLIGHT": "5000000"})
    with pytest.raises(ConfigError, match="IMAGE_MAX_REQUEST_PIXELS must be at least 1"):
        load_config({"IMAGE_MAX_REQUEST_PIXELS": "0"})
