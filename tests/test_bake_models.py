"""builder/bake_models.py, offline: local directories and a hub id served from a Hugging Face cache,
then a cold start of the worker from the baked folder with no hub."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from tests.conftest import ROOT
from tests.test_model_paths import hub_cache_entry

HUB_ID = "acme/tiny-embedder"


@pytest.fixture(scope="module")
def bake_models():
    spec = importlib.util.spec_from_file_location(
        "bake_models", ROOT / "builder" / "bake_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def source_with_extras(tmp_path, bert_embedder) -> Path:
    """A model folder as the hub has them: also ONNX weights and a duplicate pytorch_model.bin."""
    source = tmp_path / "src" / "acme" / "tiny-embedder"
    shutil.copytree(bert_embedder, source)
    assert any(source.glob("*.safetensors"))
    (source / "onnx").mkdir()
    (source / "onnx" / "model.onnx").write_bytes(b"onnx")
    (source / "pytorch_model.bin").write_bytes(b"duplicate weights")
    return source


def test_a_local_directory_is_baked_under_its_served_id(bake_models, tmp_path, source_with_extras):
    dest = tmp_path / "models"
    assert bake_models.main(["--models", str(source_with_extras), "--dest", str(dest)]) == 0
    baked = dest / "acme" / "tiny-embedder"
    expected = {
        p.relative_to(source_with_extras)
        for p in source_with_extras.rglob("*")
        if p.is_file() and p.suffix not in (".onnx", ".bin")
    }
    assert {p.relative_to(baked) for p in baked.rglob("*") if p.is_file()} == expected
    assert not (baked / "onnx").exists() and not (baked / "pytorch_model.bin").exists()
    # The worker, told the served id, finds it there.
    (model,) = load_config({"MODEL_NAMES": "acme/tiny-embedder", "MODELS_DIR": str(dest)}).models
    assert Path(model.source) == baked


def test_a_hub_id_is_baked_from_the_hub_cache_offline(bake_models, tmp_path, bert_embedder, capsys):
    # HF_HUB_OFFLINE=1 (conftest): snapshot_download answers from the cache, as it would after a
    # download on a build machine.
    cache = tmp_path / "hf-cache"
    snapshot = hub_cache_entry(cache, HUB_ID, bert_embedder, "0123abcd")
    dest = tmp_path / "models"
    args = [
        "--models",
        f" {HUB_ID} ; {DEFAULT_MODEL_ID}",
        "--dest",
        str(dest),
        "--download-cache",
        str(cache),
    ]
    assert bake_models.main(args) == 0
    baked = dest / HUB_ID
    assert not any(p.is_symlink() for p in baked.rglob("*"))  # real files, not links into the cache
    for path in snapshot.rglob("*"):
        if path.is_file():
            assert (baked / path.relative_to(snapshot)).read_bytes() == path.read_bytes()
    out = capsys.readouterr().out
    assert f"{DEFAULT_MODEL_ID}: bundled" in out and not (dest / DEFAULT_MODEL_ID).exists()
    # Idempotent: a second run keeps what is there.
    assert bake_models.main(args) == 0
    assert f"{HUB_ID}: already baked" in capsys.readouterr().out


def test_a_model_that_cannot_be_fetched_fails_the_build_naming_it(bake_models, tmp_path, capsys):
    dest = tmp_path / "models"
    code = bake_models.main(
        [
            "--models",
            "no-such-org/no-such-model",
            "--dest",
            str(dest),
            "--download-cache",
            str(tmp_path / "empty-cache"),
        ]
    )
    assert code == 1
    assert "could not download 'no-such-org/no-such-model'" in capsys.readouterr().err
    assert not (dest / "no-such-org" / "no-such-model").exists()  # nothing half-written


def test_bad_names_and_non_model_folders_are_refused(bake_models, tmp_path, capsys):
    not_a_model = tmp_path / "docs" / "readme"
    not_a_model.mkdir(parents=True)
    (not_a_model / "README.md").write_text("hello")
    dest = tmp_path / "models"
    assert bake_models.main(["--models", str(not_a_model), "--dest", str(dest)]) == 1
    assert "not a model folder" in capsys.readouterr().err
    assert not (dest / "docs").exists() or not any((dest / "docs").iterdir())
    assert bake_models.main(["--models", "../etc/passwd", "--dest", str(dest)]) == 1
    assert "neither a local directory nor a Hugging Face model id" in capsys.readouterr().err


def test_no_model_names_bakes_nothing(bake_models, tmp_path):
    assert bake_models.main(["--models", " ; ", "--dest", str(tmp_path / "models")]) == 0
    assert not (tmp_path / "models").exists()


def test_cold_start_from_baked_models_runs_without_the_hub(tmp_path, bert_embedder):
    """The image's start: MODEL_NAMES names hub ids, MODELS_DIR holds them, no hub setting given."""
    baked = tmp_path / "models" / HUB_ID
    shutil.copytree(bert_embedder, baked)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(
        {
            "MODEL_NAMES": HUB_ID,
            "MODELS_DIR": str(tmp_path / "models"),
            "MODEL_CACHE_DIR": str(tmp_path / "no-cache"),
            "HF_ENDPOINT": "http://127.0.0.1:9",  # any hub call would fail
            "RUNPOD_DEBUG_LEVEL": "INFO",
        }
    )
    job = {"input": {"model": HUB_ID, "input": ["baked and offline"]}}
    proc = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps(job)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Job local_test completed successfully" in output
    assert f'"model": "{HUB_ID}"' in output  # served by its id, and the answer is printed
