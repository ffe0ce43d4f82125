"""Reading settings from environment variables: one parser per kind of value, each failure a
`ConfigError` whose message names the variable."""

from __future__ import annotations

from collections.abc import Mapping


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


def split_list(env: Mapping[str, str], name: str) -> list[str] | None:
    """A `;`-separated list, each entry trimmed; None when unset or blank."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    return [part.strip() for part in raw.split(";")]


def per_model(env: Mapping[str, str], name: str, count: int, default: str) -> list[str]:
    """One value for every model, or exactly one per model."""
    values = split_list(env, name)
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


def whole_number(name: str, raw: str, minimum: int = 1) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def int_var(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    return whole_number(name, raw, minimum) if raw else default


def float_var(env: Mapping[str, str], name: str, default: float) -> float:
    """A positive, finite number."""
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


def bool_var(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {env[name]!r}")


def auto_bool_var(env: Mapping[str, str], name: str) -> bool | None:
    """true / false, or None for auto (unset, empty or "auto")."""
    if env.get(name, "").strip().lower() in ("", "auto"):
        return None
    try:
        return bool_var(env, name, False)
    except ConfigError:
        raise ConfigError(f"{name} must be auto, true or false, got {env[name]!r}") from None
