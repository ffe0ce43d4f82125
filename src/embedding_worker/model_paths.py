"""Where a model's files already are on disk, so a cold start can skip the hub.

Two places are looked in, in this order, for a hub id such as ``BAAI/bge-small-en-v1.5``:

- the image's baked models: ``<MODELS_DIR>/<org>/<name>`` (written by builder/bake_models.py);
- RunPod's model cache (and the Hugging Face cache on a network volume, which has the same layout):
  ``<MODEL_CACHE_DIR>/models--<org>--<name>/snapshots/<revision>/``.

The model is still served under its hub id; only the loader is pointed at the local copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

BAKED_MODELS_DIR = "/models"
RUNPOD_VOLUME = "/runpod-volume"
# RunPod mounts its cached models here, in the Hugging Face hub cache layout.
RUNPOD_MODEL_CACHE = f"{RUNPOD_VOLUME}/huggingface-cache/hub"

# "org/name" or a bare legacy "name"; no "..", no absolute paths.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def is_model_dir(path: Path) -> bool:
    """A folder a loader can read: a transformers config or a sentence-transformers module list."""
    return (path / "config.json").is_file() or (path / "modules.json").is_file()


def baked_model_dir(models_dir: Path, hub_id: str) -> Path:
    """Where the image keeps a baked model: the hub id as a relative path."""
    if not is_hub_id(hub_id):
        raise ValueError(f"not a Hugging Face model id: {hub_id!r}")
    return models_dir / hub_id


def cached_snapshot(cache_dir: Path, hub_id: str) -> Path | None:
    """The snapshot of `hub_id` in a Hugging Face hub cache, if one is complete enough to load.

    The revision named by refs/main wins; otherwise the most recently written snapshot.
    """
    repo = cache_dir / f"models--{hub_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if is_model_dir(snapshot):
            return snapshot
    snapshots_dir = repo / "snapshots"
    if not snapshots_dir.is_dir():
        return None
    candidates = [p for p in snapshots_dir.iterdir() if p.is_dir() and is_model_dir(p)]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def find_local_model(hub_id: str, models_dir: Path, cache_dirs: list[Path]) -> Path | None:
    """The local copy of a hub model (baked first, then caches), or None to download it."""
    if not is_hub_id(hub_id):
        return None
    baked = baked_model_dir(models_dir, hub_id)
    if is_model_dir(baked):
        return baked
    for cache_dir in cache_dirs:
        snapshot = cached_snapshot(cache_dir, hub_id)
        if snapshot is not None:
            return snapshot
    return None


def volume_download_home(volume: Path) -> Path | None:
    """HF_HOME on an attached network volume, so a download is kept for the next cold start.

    None when no volume is mounted or the cache folder on it cannot be written (RunPod's model cache
    may be mounted there without a writable volume); the download then goes to the container disk.
    """
    home = volume / "huggingface-cache"
    hub = home / "hub"
    target = hub if hub.exists() else home if home.exists() else volume
    if volume.is_dir() and os.access(target, os.W_OK):
        return home
    return None


def model_file(source: str, name: str) -> str | None:
    """The path of one of a model's files (its local folder, else the hub cache, fetched there if
    the hub can be reached), or None if the model has no such file."""
    local = Path(source)
    if local.is_dir():
        path = local / name
        return str(path) if path.is_file() else None
    from transformers.utils import cached_file

    return cached_file(
        source,
        name,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
