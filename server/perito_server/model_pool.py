"""The models this server holds in memory, each with its own batcher and model thread.

Requests name a model and a version or alias; the pool resolves the reference, fetches and
verifies the artifact, loads and warms it once, and evicts the least recently used model when
more than `max_loaded_models` are held (`perito_core.models.cache.ModelCache`, the cache the
workers use too).

Aliases (and `latest`) roll out without a restart and without a failed request: every
`alias_ttl_s` a background task re-reads the aliases in use; when one has moved, the new
version is loaded and warmed while the old one keeps serving, and only then does the alias
switch. A version that fails to load leaves the old one serving; the reason is logged and kept
(`rollout_errors`), and the load is retried after `ROLLOUT_RETRY_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from perito_core.errors import PeritoError
from perito_core.models.cache import ModelCache
from perito_core.models.engines.base import LoadedModel
from perito_core.models.registry import ModelRegistry
from perito_core.models.selection import check_precision, load_model, requested_precision
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


ROLLOUT_RETRY_S = 60.0


@dataclass
class RolloutError:
    """Why an alias still serves its old version."""

    alias: str
    version: str
    reason: str
    retry_at: float


class ModelPool:
    def __init__(self, registry: ModelRegistry, settings: ServerSettings) -> None:
        self.registry = registry
        self.settings = settings
        # Found by (name, version, precision): a version is loaded once per precision asked
        # for (`PERITO_PRECISION`, or a request's more exact one), and once per form.
        self._models: ModelCache[ServedModel] = ModelCache(settings.max_loaded_models)
        self._loading: dict[tuple[str, str, str], asyncio.Lock] = {}
        # (name, alias or "") -> the version that alias is served by here.
        self._serving: dict[tuple[str, str], str] = {}
        self._checked_versions: set[tuple[str, str]] = set()
        self.rollout_errors: dict[tuple[str, str], RolloutError] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.on_load: list[Callable[[ServedModel], None]] = []

    @property
    def loaded(self) -> list[tuple[str, str]]:
        """(name, version) of every version held in memory (once, whatever its precisions)."""
        return self._models.versions()

    def served(self) -> list[ServedModel]:
        """The loaded models held in memory now, each once (a copy: safe from any thread)."""
        return self._models.models()

    def start(self) -> None:
        """Start following alias moves (every `alias_ttl_s`)."""
        if self._watcher is None and self.settings.alias_ttl_s > 0:
            self._watcher = asyncio.create_task(self._follow_aliases(), name="alias-rollout")

    async def resolve(self, name: str, ref: str) -> str:
        """A concrete version for `ref` (a number, an alias, or "" for latest).

        An alias in use resolves to the version serving it here, so a job pinned at submission
        gets the same version `Classify` answers with.
        """
        key = (name, ref)
        if ref.isdigit():
            if key not in self._checked_versions:
                await asyncio.to_thread(self.registry.resolve, name, ref)  # NOT_FOUND if absent
                self._checked_versions.add(key)
            return ref
        serving = self._serving.get(key)
        if serving is not None:
            return serving
        return await asyncio.to_thread(self.registry.resolve, name, ref)

    async def get(self, name: str, ref: str = "", precision: str = "") -> ServedModel:
        """The served model for `name` at `ref`, loading it on first use.

        Args:
            precision: the request's (`selection.requested_precision`: at least as exact as
                the server's, and required: that precision's form or a refusal); "" for the
                server's `precision` setting (a preference).

        Raises:
            InvalidArgument: a `precision` less exact than the server's, or not one.
            PrecisionUnavailable: a `precision` this version has no form of that serves here.
            NotFound, ArtifactIntegrityError, ModelLoadError: as `load_model`.
        """
        asked = requested_precision(precision, self.settings.precision)
        version = await self.resolve(name, ref)
        if asked.required and self._models.get(name, version, asked.precision) is None:
            # Refused before loading where the manifest (or this CPU) has no such form.
            manifest = await asyncio.to_thread(self.registry.manifest, name, version)
            check_precision(manifest, asked, device=self.settings.device)
        served = await self._get_version(name, version, asked.precision)
        # What loaded: a form that failed here gave way to another, which a requirement refuses.
        check_precision(served.model.manifest, asked, served=served.model)
        if not ref.isdigit():
            self._serving.setdefault((name, ref), version)
        return served

    async def _get_version(
        self, name: str, version: str, precision: str | None = None
    ) -> ServedModel:
        key = (name, version, precision or self.settings.precision)
        served = self._models.get(*key)
        if served is None:
            lock = self._loading.setdefault(key, asyncio.Lock())
            async with lock:
                served = self._models.get(*key)
                if served is None:
                    served = await self._load(*key)
        return served

    async def _follow_aliases(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alias_ttl_s)
            try:
                await self.refresh_aliases()
            except Exception:
                log.exception("alias refresh failed; will try again")

    async def refresh_aliases(self) -> None:
        """Roll every alias in use forward to the version the registry now names."""
        for (name, alias), current in list(self._serving.items()):
            try:
                target = await asyncio.to_thread(self.registry.resolve, name, alias)
            except PeritoError as error:
                log.warning(
                    "cannot re-read %s@%s (%s); still serving v%s",
                    name,
                    alias or "latest",
                    error.message,
                    current,
                )
                continue
            if target == current:
                self.rollout_errors.pop((name, alias), None)
                continue
            failed = self.rollout_errors.get((name, alias))
            if failed and failed.version == target and time.monotonic() < failed.retry_at:
                continue
            await self._roll(name, alias, current, target)

    async def _roll(self, name: str, alias: str, current: str, target: str) -> None:
        label = f"{name}@{alias or 'latest'}"
        log.info("%s moved v%s -> v%s: loading and warming v%s", label, current, target, target)
        started = time.perf_counter()
        try:
            await self._get_version(name, target)
        except Exception as error:  # noqa: BLE001 - any failure keeps the old version serving
            reason = error.message if isinstance(error, PeritoError) else repr(error)
            self.rollout_errors[(name, alias)] = RolloutError(
                alias or "latest", target, reason, time.monotonic() + ROLLOUT_RETRY_S
            )
            log.error(
                "%s: v%s failed to load, v%s keeps serving: %s", label, target, current, reason
            )
            return
        self._serving[(name, alias)] = target
        self.rollout_errors.pop((name, alias), None)
        log.info("%s now serves v%s (ready in %.1fs)", label, target, time.perf_counter() - started)

    async def _load(self, name: str, version: str, precision: str) -> ServedModel:
        settings = self.settings
        sizes = tuple(range(1, settings.max_batch_size + 1))

        def load() -> LoadedModel:
            return load_model(
                self.registry,
                name,
                version,
                precision=precision,
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
        log.info(
            "loaded %s@%s (precision %s) in %.1fs on %s, form %s",
            name,
            version,
            precision,
            model.load_seconds,
            model.device,
            model.form,
        )
        served, evicted = self._models.add(
            name, version, precision, model.form, lambda: ServedModel(model, executor, settings)
        )
        if served.model is not model:
            # Another precision setting already loaded this form: one copy serves both.
            executor.shutdown(wait=False)
            return served
        served.batcher.start()
        for callback in self.on_load:
            callback(served)
        for old in evicted:
            log.info(
                "evicting %s@%s, form %s (least recently used)",
                old.name,
                old.version,
                old.model.form,
            )
            await old.close()
        return served

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for served in self._models.clear():
            await served.close()
