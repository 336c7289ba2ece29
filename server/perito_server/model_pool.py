"""The models this server holds in memory, each with its own batcher and model thread.

Requests name a model and a version or alias; the pool resolves the reference (caching alias
lookups for `alias_ttl_s`, concrete versions for good since they are immutable), fetches and
verifies the artifact, loads and warms it once, and evicts the least recently used model when
more than `max_loaded_models` are held.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from perito_core.registry import ModelRegistry
from perito_core.runtime import LoadedModel
from perito_server.batcher import DynamicBatcher
from perito_server.settings import ServerSettings

log = logging.getLogger(__name__)


class ServedModel:
    """One loaded version: its model, a single model thread and its dynamic batcher."""

    def __init__(
        self, model: LoadedModel, executor: ThreadPoolExecutor, settings: ServerSettings
    ) -> None:
        self.model = model
        self.name = model.manifest.name
        self.version = model.manifest.version
        self._executor = executor
        self.batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_queue_delay=settings.max_queue_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            name=f"{self.name}@{self.version}",
        )

    async def _run_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        probabilities = await loop.run_in_executor(self._executor, self._predict, images)
        return list(probabilities)

    def _predict(self, images: list[np.ndarray]) -> np.ndarray:
        return self.model.predict(np.stack(images))

    async def close(self) -> None:
        await self.batcher.close()
        self._executor.shutdown(wait=True)


@dataclass
class _Resolution:
    version: str
    expires: float


class ModelPool:
    def __init__(self, registry: ModelRegistry, settings: ServerSettings) -> None:
        self.registry = registry
        self.settings = settings
        self._models: collections.OrderedDict[tuple[str, str], ServedModel] = (
            collections.OrderedDict()
        )
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}
        self._resolved: dict[tuple[str, str], _Resolution] = {}

    @property
    def loaded(self) -> list[tuple[str, str]]:
        return list(self._models)

    async def resolve(self, name: str, ref: str) -> str:
        """A concrete version for `ref` (a number, an alias, or "" for latest)."""
        key = (name, ref)
        now = time.monotonic()
        cached = self._resolved.get(key)
        if cached is not None and cached.expires > now:
            return cached.version
        version = await asyncio.to_thread(self.registry.resolve, name, ref)
        ttl = float("inf") if ref.isdigit() else self.settings.alias_ttl_s
        self._resolved[key] = _Resolution(version, now + ttl)
        return version

    async def get(self, name: str, ref: str = "") -> ServedModel:
        """The served model for `name` at `ref`, loading it on first use."""
        version = await self.resolve(name, ref)
        key = (name, version)
        served = self._models.get(key)
        if served is None:
            lock = self._loading.setdefault(key, asyncio.Lock())
            async with lock:
                served = self._models.get(key)
                if served is None:
                    served = await self._load(name, version)
        self._models.move_to_end(key)
        return served

    async def _load(self, name: str, version: str) -> ServedModel:
        settings = self.settings
        sizes = tuple(range(1, settings.max_batch_size + 1))

        def load() -> LoadedModel:
            artifact = self.registry.fetch(name, version)
            return LoadedModel.load(
                artifact.path,
                artifact.manifest,
                device=settings.device,
                optimize=settings.optimize_models,
                warmup_batch_sizes=sizes,
            )

        # One thread per model loads, warms and runs it: a forward pass already uses every
        # core, serialising batches is what lets the batcher coalesce, and torch's OpenMP
        # team belongs to the calling thread (a second team on the same cores costs ~10%).
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{name}@{version}")
        try:
            model = await asyncio.get_running_loop().run_in_executor(executor, load)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        log.info("loaded %s@%s in %.1fs on %s", name, version, model.load_seconds, model.device)
        served = ServedModel(model, executor, settings)
        served.batcher.start()
        self._models[(name, version)] = served
        while len(self._models) > settings.max_loaded_models:
            (old_name, old_version), old = self._models.popitem(last=False)
            log.info("evicting %s@%s (least recently used)", old_name, old_version)
            await old.close()
        return served

    async def close(self) -> None:
        for served in list(self._models.values()):
            await served.close()
        self._models.clear()
