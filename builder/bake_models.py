"""Bake models into the image at build time, so a cold start reads them from disk and runs offline.

    python builder/bake_models.py --models "BAAI/bge-small-en-v1.5;BAAI/bge-reranker-base" --dest
    /models

Each MODEL_NAMES entry lands in <dest>/<org>/<name>, where the worker looks first (MODELS_DIR); it
is still served under its hub id. A hub id is downloaded through the Hugging Face cache (HF_TOKEN
for gated models), a local directory is copied under its last two path segments, and the bundled
all-MiniLM-L6-v2 is skipped (it is already inside the image). Weights for other frameworks (ONNX,
TensorFlow, Flax, OpenVINO, GGUF) and pytorch_model.bin next to safetensors are left out.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
import tempfile
from pathlib import Path

from embedding_worker.config import DEFAULT_MODEL_ID, served_id_for
from embedding_worker.model_paths import (
    BAKED_MODELS_DIR,
    baked_model_dir,
    is_hub_id,
    is_model_dir,
)

# Files the torch backend never reads; they would only make the image bigger.
SKIPPED_FILES = [
    "*.onnx",
    "onnx/*",
    "openvino/*",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.gguf",
    "*.mlmodel",
    "coreml/*",
    "flax_model*",
    "tf_model*",
    "rust_model*",
    ".gitattributes",
]


class BakeError(RuntimeError):
    """A model could not be baked; the message names it."""


def parse_names(raw: str) -> list[str]:
    return [name.strip() for name in raw.split(";") if name.strip()]


def _skipped(relative: str, has_safetensors: bool) -> bool:
    if any(fnmatch.fnmatch(relative, pattern) for pattern in SKIPPED_FILES):
        return True
    # The same weights twice: keep the safetensors copy.
    return has_safetensors and fnmatch.fnmatch(Path(relative).name, "pytorch_model*.bin")


def copy_model(source: Path, target: Path) -> None:
    """Copy a model folder (following the hub cache's symlinks), then move it into place whole."""
    has_safetensors = any(source.rglob("*.safetensors"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source).as_posix()
            if (
                path.is_dir()
                or relative.startswith(".cache/")
                or _skipped(relative, has_safetensors)
            ):
                continue
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
        if not is_model_dir(staging):
            raise BakeError(f"{source} has no config.json or modules.json: not a model folder")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download(hub_id: str, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id=hub_id, cache_dir=cache_dir, ignore_patterns=SKIPPED_FILES)
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure stops the build with the model's name
        raise BakeError(f"could not download {hub_id!r}: {type(exc).__name__}: {exc}") from exc


def bake(names: list[str], dest: Path, cache_dir: Path) -> list[Path]:
    """Bake every model; returns the folders written (or already there)."""
    baked = []
    for name in names:
        if name == DEFAULT_MODEL_ID and not Path(name).is_dir():
            print(f"{name}: bundled with the worker, nothing to bake")
            continue
        if Path(name).is_dir():
            source, target = Path(name), dest / served_id_for(name)
        elif is_hub_id(name):
            source, target = None, baked_model_dir(dest, name)
        else:
            raise BakeError(f"{name!r} is neither a local directory nor a Hugging Face model id")
        if is_model_dir(target):
            print(f"{name}: already baked at {target}")
        else:
            if target.exists():
                shutil.rmtree(target)  # an earlier, incomplete attempt
            copy_model(source if source is not None else download(name, cache_dir), target)
            print(f"{name}: baked at {target}")
        baked.append(target)
    return baked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=os.environ.get("MODEL_NAMES", ""),
        help="model ids or directories separated by ';' (default: $MODEL_NAMES)",
    )
    parser.add_argument("--dest", type=Path, default=Path(BAKED_MODELS_DIR))
    parser.add_argument(
        "--download-cache",
        type=Path,
        default=None,
        help="Hugging Face cache to download through (default: a temporary folder, removed after)",
    )
    args = parser.parse_args(argv)

    names = parse_names(args.models)
    if not names:
        print("no MODEL_NAMES given: nothing to bake (the worker serves its bundled model)")
        return 0
    cache_dir = args.download_cache or Path(tempfile.mkdtemp(prefix="hf-bake-"))
    try:
        bake(names, args.dest, cache_dir)
    except BakeError as exc:
        print(f"bake_models: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.download_cache is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
