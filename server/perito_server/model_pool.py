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

An alias may be split (`perito_core.models.rollout`): its canary answers a share of its
requests, picked by the request's routing key (`AliasRoute.pick`). A canary is loaded and
warmed in the background (one load at a time per alias, started when the alias is first served
here or by the refresh that finds the canary) before any request is sent to it; until then,
and while it fails to load (kept in `rollout_errors` and retried likewise), every request gets
the alias's own version, so no request waits for a canary. A request sent as pixels was shaped
for the alias's own version (its OIP model metadata: input size and label count): where the
canary's differ, it gets the alias's version whatever its key picks. Promoting or rolling back a
canary reaches this server at the next refresh. A bulk job pins the alias's own version at
submission (`resolve` without a routing key), never its canary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from perito.v1 import models_pb2
from perito_core.errors import InvalidArgument, PeritoError
from perito_core.models.batching import BatchProfile, profile_batch_sizes
from perito_core.models.cache import ModelCache
from perito_core.models.engines.base import LoadedModel
from perito_core.models.registry import LATEST, ModelRegistry
from perito_core.models.rollout import AliasRoute, Canary
from perito_core.models.selection import check_precision, load_model, requested_precision
from perito_server.batcher import DynamicBatcher
from perito_server.oip_protocol import pixel_contract
from perito_server.settings import ServerSettings

log = logging.getLogger(__name__)


class ServedModel:
    """One loaded version: its model, a single model thread and its dynamic batcher."""

    def __init__(
        self,
        model: LoadedModel,
        executor: ThreadPoolExecutor,
        settings: ServerSettings,
        batching: BatchProfile,
    ) -> None:
        self.model = model
        self.name = model.manifest.name
        self.version = model.manifest.version
        self._executor = executor
        # The batch size this form runs at (measured at load, or set): the batcher's cap.
        self.batching = batching
        self.batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
            self._run_batch,
            max_batch_size=batching.preferred_batch_size,
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
# A request's routing key (a claim id, say) is at most this many characters.
MAX_ROUTING_KEY_CHARS = 256


def check_routing_key(key: object, field: str = "routing_key") -> str:
    """A request's routing key, checked: a string of at most `MAX_ROUTING_KEY_CHARS`
    characters; "" (or None, a parameter not sent) for none.

    Raises:
        InvalidArgument: not a string, or too long, naming `field`.
    """
    if key is None:
        return ""
    if not isinstance(key, str):
        raise InvalidArgument(f"{field} must be a string", field=field)
    if len(key) > MAX_ROUTING_KEY_CHARS:
        raise InvalidArgument(
            f"{field}: {len(key)} characters; the limit is {MAX_ROUTING_KEY_CHARS}", field=field
        )
    return key


def alias_rollouts(
    registry: ModelRegistry, name: str, aliases: Iterable[str]
) -> dict[str, models_pb2.AliasRollout]:
    """`GetModel`'s `rollouts`: each of `aliases` of `name` that has a canary or a shadow, as
    the registry holds it now (one read per alias; one gone or damaged meanwhile is left out).
    """
    rollouts = {}
    for alias in aliases:
        try:
            route = registry.route(name, alias)
        except PeritoError:
            continue
        if route.canary is None and route.shadow is None:
            continue
        rollout = models_pb2.AliasRollout()
        if route.canary is not None:
            rollout.canary_version = route.canary.version
            rollout.canary_percent = route.canary.percent
        if route.shadow is not None:
            rollout.shadow_version = route.shadow.version
            rollout.shadow_sample = route.shadow.sample
        rollouts[alias] = rollout
    return rollouts


@dataclass
class RolloutError:
    """Why an alias still serves its old version, or does not send its canary any requests
    yet (`version` is then the canary's)."""

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
        # (name, alias or "" / "latest") -> the route that alias is served by here: its
        # version loaded, its canary only once loaded too, its shadow as the registry names it.
        self._routes: dict[tuple[str, str], AliasRoute] = {}
        self._checked_versions: set[tuple[str, str]] = set()
        # (name, alias) for an alias's move, (name, "alias:canary") for its canary.
        self.rollout_errors: dict[tuple[str, str], RolloutError] = {}
        # (name, alias) -> the canary the registry names for it, loaded here or not yet, and
        # the background load of that alias's canary (one at a time).
        self._wanted_canaries: dict[tuple[str, str], Canary] = {}
        self._canary_loads: dict[tuple[str, str], asyncio.Task[None]] = {}
        # (name, version) -> `pixel_contract` of its manifest (a version never changes).
        self._pixel_contracts: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.on_load: list[Callable[[ServedModel], None]] = []
        self._routed: Counter | None = None

    @property
    def loaded(self) -> list[tuple[str, str]]:
        """(name, version) of every version held in memory (once, whatever its precisions)."""
        return self._models.versions()

    def served(self) -> list[ServedModel]:
        """The loaded models held in memory now, each once (a copy: safe from any thread)."""
        return self._models.models()

    def count_routes(self, registry: CollectorRegistry) -> None:
        """Count in `registry` the images each alias sends to each version:
        `perito_alias_routed_images_total{model,alias,version,route}`, route `primary` (the
        alias's own version) or `canary`. Listed from now on, before any sample."""
        self._routed = Counter(
            "perito_alias_routed_images",
            "Images sent to a version through an alias, by model, alias, version and route: "
            "primary (the alias's own version) or canary.",
            ["model", "alias", "version", "route"],
            registry=registry,
        )

    def route(self, name: str, ref: str) -> AliasRoute | None:
        """The route alias `ref` of `name` is served by here now: its version, and its canary
        once loaded (its shadow as the registry names it). None for a version number,
        `latest` or "", or an alias this server has not served yet.
        """
        if ref.isdigit() or ref in ("", LATEST):
            return None
        return self._routes.get((name, ref))

    def start(self) -> None:
        """Start following alias moves (every `alias_ttl_s`)."""
        if self._watcher is None and self.settings.alias_ttl_s > 0:
            self._watcher = asyncio.create_task(self._follow_aliases(), name="alias-rollout")

    async def resolve(self, name: str, ref: str, routing_key: str | None = None) -> str:
        """A concrete version for `ref` (a number, an alias, or "" for latest).

        An alias in use resolves to the version serving it here, so a job pinned at submission
        gets the same version `Classify` answers with.

        Args:
            routing_key: a request's routing key ("": none, a random draw) to pick between an
                alias's version and its canary (`AliasRoute.pick`); None (a bulk job, a
                model's metadata): the alias's own version, never its canary.

        Raises:
            NotFound: no such model, version or alias.
        """
        key = (name, ref)
        if ref.isdigit():
            if key not in self._checked_versions:
                await asyncio.to_thread(self.registry.resolve, name, ref)  # NOT_FOUND if absent
                self._checked_versions.add(key)
            return ref
        route = self._routes.get(key)
        if route is None:
            return await asyncio.to_thread(self.registry.resolve, name, ref)
        if routing_key is None:
            return route.version
        return route.pick(routing_key, salt=f"{name}/{ref}")

    async def get(
        self,
        name: str,
        ref: str = "",
        precision: str = "",
        *,
        routing_key: str = "",
        images: int = 0,
        pixels: bool = False,
    ) -> ServedModel:
        """The served model for `name` at `ref`, loading it on first use (an alias's canary
        is loaded in the background: until it is warmed, the alias's own version answers).

        Args:
            precision: the request's (`selection.requested_precision`: at least as exact as
                the server's, and required: that precision's form or a refusal); "" for the
                server's `precision` setting (a preference).
            routing_key: the request's routing key (`check_routing_key`), "" for none: an
                alias with a canary sends it by `AliasRoute.pick`.
            images: how many images the request sends, counted in
                `perito_alias_routed_images_total` for an alias.
            pixels: the request sends uint8 [N, H, W, 3] pixels shaped for the alias's own
                version: a canary whose `pixel_contract` differs does not take it.

        Raises:
            InvalidArgument: a `precision` less exact than the server's, or not one.
            PrecisionUnavailable: a `precision` this version has no form of that serves here.
            NotFound, ArtifactIntegrityError, ModelLoadError: as `load_model`.
        """
        asked = requested_precision(precision, self.settings.precision)
        route: AliasRoute | None = None
        read: AliasRoute | None = None  # the registry's route, on the alias's first use here
        if ref.isdigit():
            version = await self.resolve(name, ref)
        else:
            route = self._routes.get((name, ref))
            if route is None:
                read = await asyncio.to_thread(self._read_route, name, ref)
                route = AliasRoute(read.version, None, read.shadow)
            version = route.pick(routing_key, salt=f"{name}/{ref}")
            if (
                pixels
                and version != route.version
                and not await self._same_pixels(name, route.version, version)
            ):
                version = route.version  # pixels shaped for the alias's version fit only it
        if asked.required and self._models.get(name, version, asked.precision) is None:
            # Refused before loading where the manifest (or this CPU) has no such form.
            manifest = await asyncio.to_thread(self.registry.manifest, name, version)
            check_precision(manifest, asked, device=self.settings.device)
        served = await self._get_version(name, version, asked.precision)
        # What loaded: a form that failed here gave way to another, which a requirement refuses.
        check_precision(served.model.manifest, asked, served=served.model)
        if route is not None:
            if self._routes.setdefault((name, ref), route) is route and read is not None:
                self._follow_canary(name, ref, route.version, read.canary, None)
            if self._routed is not None and images and ref not in ("", LATEST):
                canary = route.canary is not None and version == route.canary.version
                part = "canary" if canary else "primary"
                self._routed.labels(name, ref, version, part).inc(images)
        return served

    def _read_route(self, name: str, ref: str) -> AliasRoute:
        """The registry's route for alias `ref` ("" or `latest`: the latest version alone).

        Raises:
            NotFound: no such model or alias (as `ModelRegistry.resolve` words it).
            ModelLoadError: a damaged alias record.
        """
        if ref in ("", LATEST):
            return AliasRoute(self.registry.resolve(name, ref))
        try:
            return self.registry.route(name, ref)
        except PeritoError:
            self.registry.resolve(name, ref)  # the standard refusal for a missing alias
            raise

    async def preload(self, name: str, ref: str = "") -> None:
        """Load `name` at `ref` before serving, and an alias's canary too (waited for; one
        that fails to load is left out as on any first use, its reason in `rollout_errors`).

        Raises:
            As `get`.
        """
        await self.get(name, ref)
        task = self._canary_loads.get((name, ref))
        if task is not None:
            await task

    async def _same_pixels(self, name: str, version: str, other: str) -> bool:
        """Whether `other` takes and answers pixels as `version` does (`pixel_contract`);
        False while either's manifest cannot be read."""
        contracts = []
        for v in (version, other):
            contract = self._pixel_contracts.get((name, v))
            if contract is None:
                try:
                    manifest = await asyncio.to_thread(self.registry.manifest, name, v)
                except PeritoError:
                    return False
                contract = self._pixel_contracts[(name, v)] = pixel_contract(manifest)
            contracts.append(contract)
        return contracts[0] == contracts[1]

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
        """Roll every alias in use forward to the route the registry now names: a moved
        alias's version is loaded and warmed before it takes requests, a new canary in the
        background (`_follow_canary`); a promoted or rolled back canary takes effect here and
        now."""
        for (name, alias), current in list(self._routes.items()):
            try:
                target = await asyncio.to_thread(self._read_route, name, alias)
            except PeritoError as error:
                log.warning(
                    "cannot re-read %s@%s (%s); still serving v%s",
                    name,
                    alias or "latest",
                    error.message,
                    current.version,
                )
                continue
            version = current.version
            if target.version == current.version:
                self.rollout_errors.pop((name, alias), None)
            else:
                failed = self.rollout_errors.get((name, alias))
                waiting = (
                    failed is not None
                    and failed.version == target.version
                    and time.monotonic() < failed.retry_at
                )
                if not waiting and await self._roll(name, alias, current.version, target.version):
                    version = target.version
            current = self._routes.get((name, alias), current)  # a canary readied meanwhile
            canary = self._follow_canary(name, alias, version, target.canary, current.canary)
            shadow = target.shadow if target.shadow and target.shadow.version != version else None
            self._routes[(name, alias)] = AliasRoute(version, canary, shadow)

    async def _roll(self, name: str, alias: str, current: str, target: str) -> bool:
        """Load and warm `target`, alias's new version: whether it loaded (if not, the reason
        is kept in `rollout_errors` and `current` keeps serving)."""
        label = f"{name}@{alias or 'latest'}"
        log.info("%s moved v%s -> v%s: loading and warming v%s", label, current, target, target)
        started = time.perf_counter()
        if not await self._warm(name, (name, alias), alias or "latest", target):
            failure = self.rollout_errors[(name, alias)]
            log.error(
                "%s: v%s failed to load, v%s keeps serving: %s",
                label,
                target,
                current,
                failure.reason,
            )
            return False
        log.info("%s now serves v%s (ready in %.1fs)", label, target, time.perf_counter() - started)
        return True

    def _follow_canary(
        self, name: str, alias: str, version: str, wanted: Canary | None, current: Canary | None
    ) -> Canary | None:
        """The canary alias `alias` (serving `version`) sends requests to from now on:
        `wanted` at once when `current` already sends to its version (a new percent); else
        None, with `wanted`'s version loading and warming in the background
        (`_load_canary`, which puts it in the route once ready), unless a load of this alias's
        canary is under way or failed less than `ROLLOUT_RETRY_S` ago; None when there is
        none."""
        key = (name, alias)
        if wanted is None or wanted.version == version:
            self._wanted_canaries.pop(key, None)
            self.rollout_errors.pop((name, f"{alias}:canary"), None)
            return None
        self._wanted_canaries[key] = wanted
        if current is not None and current.version == wanted.version:
            return wanted
        loading = self._canary_loads.get(key)
        if loading is not None and not loading.done():
            return None
        failed = self.rollout_errors.get((name, f"{alias}:canary"))
        if failed and failed.version == wanted.version and time.monotonic() < failed.retry_at:
            return None
        self._canary_loads[key] = asyncio.create_task(
            self._load_canary(name, alias, wanted), name=f"canary-{name}@{alias}"
        )
        return None

    async def _load_canary(self, name: str, alias: str, wanted: Canary) -> None:
        """Load and warm alias `alias`'s canary `wanted`, then send it its share: put it in
        the alias's route if the registry still names it (a failure is kept in
        `rollout_errors`, the load retried after `ROLLOUT_RETRY_S`)."""
        key = (name, alias)
        label = f"{name}@{alias}"
        log.info(
            "%s: canary v%s (%g%%): loading and warming it", label, wanted.version, wanted.percent
        )
        started = time.perf_counter()
        if not await self._warm(name, (name, f"{alias}:canary"), alias, wanted.version):
            log.error(
                "%s: canary v%s failed to load, the alias's version answers every request: %s",
                label,
                wanted.version,
                self.rollout_errors[(name, f"{alias}:canary")].reason,
            )
            return
        route = self._routes.get(key)
        now = self._wanted_canaries.get(key)
        if route is None or now is None or now.version != wanted.version:
            return  # ended or changed while it loaded: the next refresh follows the registry
        if route.version != now.version:
            self._routes[key] = AliasRoute(route.version, now, route.shadow)
        log.info(
            "%s: canary v%s answers %g%% of requests (ready in %.1fs)",
            label,
            now.version,
            now.percent,
            time.perf_counter() - started,
        )

    async def _warm(self, name: str, key: tuple[str, str], alias: str, version: str) -> bool:
        """Load and warm `version` for a rollout: whether it loaded; why not is kept in
        `rollout_errors[key]` (cleared on success)."""
        try:
            await self._get_version(name, version)
        except Exception as error:  # noqa: BLE001 - any failure keeps the old version serving
            reason = error.message if isinstance(error, PeritoError) else repr(error)
            self.rollout_errors[key] = RolloutError(
                alias, version, reason, time.monotonic() + ROLLOUT_RETRY_S
            )
            return False
        self.rollout_errors.pop(key, None)
        return True

    async def _load(self, name: str, version: str, precision: str) -> ServedModel:
        settings = self.settings
        fixed = settings.fixed_batch_size
        sizes = tuple(range(1, (fixed or settings.max_batch_size) + 1))

        def load() -> tuple[LoadedModel, BatchProfile]:
            model = load_model(
                self.registry,
                name,
                version,
                precision=precision,
                device=settings.device,
                optimize=settings.optimize_models,
                warmup_batch_sizes=sizes,
            )
            batching = profile_batch_sizes(model, settings.max_batch_size, fixed)
            model.load_seconds += batching.seconds
            return model, batching

        # One thread per model loads, warms and runs it: a forward pass already uses every
        # core, serialising batches is what lets the batcher coalesce, and torch's OpenMP
        # team belongs to the calling thread (a second team on the same cores costs ~10%).
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{name}@{version}")
        try:
            model, batching = await asyncio.get_running_loop().run_in_executor(executor, load)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        log.info(
            "loaded %s@%s (precision %s) in %.1fs on %s, form %s, batch size %d",
            name,
            version,
            precision,
            model.load_seconds,
            model.device,
            model.form,
            batching.preferred_batch_size,
        )
        served, evicted = self._models.add(
            name,
            version,
            precision,
            model.form,
            lambda: ServedModel(model, executor, settings, batching),
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
        for task in self._canary_loads.values():
            task.cancel()
        await asyncio.gather(*self._canary_loads.values(), return_exceptions=True)
        self._canary_loads.clear()
        for served in self._models.clear():
            await served.close()
