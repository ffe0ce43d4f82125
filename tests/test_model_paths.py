"""Models found on disk: baked into the image, in RunPod's model cache; served under their hub
ids."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.model_paths import (
    cached_snapshot,
    find_local_model,
    is_hub_id,
    volume_download_home,
)
from embedding_worker.startup import prepare_hub_environment

HUB_ID = "acme/tiny-embedder"


def hub_cache_entry(cache: Path, hub_id: str, model: Path, revision: str, ref: bool = True) -> Path:
    """A Hugging Face hub cache entry as huggingface_hub writes it: blobs, symlinked snapshot,
    ref."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for path in model.rglob("*"):
        if path.is_dir():
            continue
        relative = path.relative_to(model)
        blob = repo / "blobs" / f"{revision}-{str(relative).replace('/', '_')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snapshot


def bake_by_hand(models_dir: Path, hub_id: str, model: Path) -> Path:
    target = models_dir / hub_id
    shutil.copytree(model, target)
    return target


def test_a_baked_model_loads_from_disk_under_its_hub_id(tmp_path, bert_embedder):
    baked = bake_by_hand(tmp_path / "models", HUB_ID, bert_embedder)
    cfg = load_config({"MODEL_NAMES": HUB_ID, "MODELS_DIR": str(tmp_path / "models")})
    (model,) = cfg.models
    assert Path(model.source) == baked
    assert model.served_id == HUB_ID
    assert cfg.all_local


def test_a_model_in_runpods_cache_loads_from_its_snapshot(tmp_path, bert_embedder):
    snapshot = hub_cache_entry(tmp_path / "hub", HUB_ID, bert_embedder, "abc123")
    env = {
        "MODEL_NAMES": HUB_ID,
        "MODEL_CACHE_DIR": str(tmp_path / "hub"),
        "MODELS_DIR": str(tmp_path / "none"),
    }
    (model,) = load_config(env).models
    assert Path(model.source) == snapshot
    assert model.served_id == HUB_ID  # not "snapshots/abc123"


def test_baked_wins_over_cached(tmp_path, bert_embedder):
    hub_cache_entry(tmp_path / "hub", HUB_ID, bert_embedder, "abc123")
    baked = bake_by_hand(tmp_path / "models", HUB_ID, bert_embedder)
    assert find_local_model(HUB_ID, tmp_path / "models", [tmp_path / "hub"]) == baked


def test_refs_main_names_the_snapshot_else_the_newest_complete_one(tmp_path, bert_embedder):
    cache = tmp_path / "hub"
    pinned = hub_cache_entry(cache, HUB_ID, bert_embedder, "old")
    newer = hub_cache_entry(cache, HUB_ID, bert_embedder, "new", ref=False)
    assert cached_snapshot(cache, HUB_ID) == pinned
    (cache / f"models--{HUB_ID.replace('/', '--')}" / "refs" / "main").unlink()
    past = time.time() - 100
    os.utime(pinned, (past, past))
    assert cached_snapshot(cache, HUB_ID) == newer


def test_an_incomplete_copy_is_not_used(tmp_path, bert_embedder):
    partial = tmp_path / "models" / HUB_ID
    partial.mkdir(parents=True)
    (partial / "tokenizer.json").write_text("{}")  # an interrupted bake: no config
    cache = tmp_path / "hub"
    (cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / "abc").mkdir(parents=True)
    (model,) = load_config(
        {
            "MODEL_NAMES": HUB_ID,
            "MODELS_DIR": str(tmp_path / "models"),
            "MODEL_CACHE_DIR": str(cache),
        }
    ).models
    assert model.source == HUB_ID  # downloaded as usual
    assert not load_config({"MODEL_NAMES": HUB_ID}).all_local


def test_only_hub_ids_are_looked_up(tmp_path, bert_embedder):
    bake_by_hand(tmp_path / "models", "acme/x", bert_embedder)
    for name in ("../models/acme/x", "/etc/passwd", "a/b/c", "acme/..", ""):
        assert not is_hub_id(name)
        assert find_local_model(name, tmp_path / "models" / "acme", [tmp_path]) is None
    assert is_hub_id("BAAI/bge-small-en-v1.5") and is_hub_id("bert-base-uncased")


def test_directories_and_the_bundled_model_keep_their_ids(tmp_path, bert_embedder):
    cfg = load_config({"MODEL_NAMES": f"{DEFAULT_MODEL_ID};{bert_embedder}"})
    assert [m.served_id for m in cfg.models] == [
        DEFAULT_MODEL_ID,
        "/".join(bert_embedder.resolve().parts[-2:]),
    ]
    assert cfg.all_local


def test_all_local_models_start_offline(tmp_path, bert_embedder):
    environ: dict[str, str] = {}
    prepare_hub_environment(load_config({"MODEL_NAMES": str(bert_embedder)}), environ, tmp_path)
    assert environ == {"HF_HUB_OFFLINE": "1"}


def test_downloads_go_to_a_writable_network_volume(tmp_path):
    cfg = load_config({"MODEL_NAMES": HUB_ID})
    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    environ = {"HF_HOME": ""}  # an empty Hub input must not put the cache in the working directory
    prepare_hub_environment(cfg, environ, volume)
    assert environ == {"HF_HOME": str(volume / "huggingface-cache")}
    # ...which is where the next start looks (MODEL_CACHE_DIR's default is
    # <volume>/huggingface-cache/hub).
    assert volume_download_home(volume) / "hub" == volume / "huggingface-cache" / "hub"


def test_no_volume_or_a_chosen_home_is_left_alone(tmp_path):
    cfg = load_config({"MODEL_NAMES": HUB_ID})
    environ: dict[str, str] = {}
    prepare_hub_environment(cfg, environ, tmp_path / "absent")
    assert environ == {}
    environ = {"HF_HOME": "/data/hf"}
    prepare_hub_environment(cfg, environ, tmp_path)
    assert environ == {"HF_HOME": "/data/hf"}
