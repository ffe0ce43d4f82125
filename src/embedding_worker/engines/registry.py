"""The served models: loading, start and stop, lookup by name and capability."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from .. import errors
from ..logs import get_logger
from ..metrics import note_model
from .base import Capability, Health, ModelEngine, ModelLoadError
from .infinity import InfinityModel
from .kinds import kind_of
from .spec import EngineSettings, ModelSpec

log = get_logger(__name__)


class ModelRegistry:
    def __init__(self, models: Sequence[ModelEngine], health: Health, array: Any = None) -> None:
        self.models = list(models)
        self.health = health
        self._array = array  # Infinity's AsyncEngineArray, started and stopped as one
        self._started = False
        self._start_lock = asyncio.Lock()

    @classmethod
    def load(cls, specs: Sequence[ModelSpec], settings: EngineSettings) -> ModelRegistry:
        """Load every model now (cold start is paid once, before the first job)."""
        health = Health()
        models: list[ModelEngine] = []
        for spec in specs:
            try:
                kind = kind_of(spec, settings.trust_remote_code)
                log.info("loading %s from %s (%s)", spec.served_id, spec.source, kind.name)
                started = time.monotonic()
                model = kind.load(spec, settings, health)
                model.load_seconds = time.monotonic() - started
                models.append(model)
            except ModelLoadError:
                raise
            except Exception as exc:  # any loader failure, named
                raise ModelLoadError(
                    f"could not load model '{spec.served_id}' from {spec.source!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        engines = [m.engine for m in models if isinstance(m, InfinityModel)]
        array = None
        if engines:
            from infinity_emb import AsyncEngineArray

            array = AsyncEngineArray(engines)
        return cls(models, health, array)

    async def start(self) -> None:
        """Start the engines inside the running event loop (once)."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            if self._array is not None:
                await self._array.astart()
            for model in self.models:
                await model.start()
            self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._array is not None:
            await self._array.astop()
        for model in self.models:
            await model.stop()

    def stop_blocking(self) -> None:
        """Stop from outside any event loop (at process exit): Infinity's threads keep it alive."""
        if self._started:
            asyncio.run(self.stop())

    @property
    def ids(self) -> list[str]:
        return [m.served_id for m in self.models]

    def resolve(self, name: str | None, capability: Capability) -> ModelEngine:
        """The model a request names: its served id, its source, or a unique trailing part of the
        id.

        With no name, the only model that has the capability.
        """
        if name is None:
            able = [m for m in self.models if m.can(capability)]
            if len(able) == 1:
                note_model(able[0].served_id)
                return able[0]
            if not able:
                raise errors.invalid_input(
                    f"no served model can {capability.value}; served models: {', '.join(self.ids)}",
                    param="model",
                )
            raise errors.invalid_input(
                f"'model' is required: several models can {capability.value}: "
                f"{', '.join(m.served_id for m in able)}",
                param="model",
            )
        exact = [m for m in self.models if name in (m.served_id, m.spec.source)]
        candidates = exact or [
            m for m in self.models if m.served_id.endswith("/" + name.strip("/"))
        ]
        if len(candidates) != 1:
            what = "is ambiguous" if candidates else "is not served"
            raise errors.model_not_found(
                f"model '{name}' {what}; served models: {', '.join(self.ids)}"
            )
        note_model(candidates[0].served_id)
        return candidates[0]

    def describe(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self.models]
