"""Shadow traffic: a candidate version run on a sample of an alias's answered images.

When an alias's route names a shadow (`perito_core.models.rollout.Shadow`, set with
`perito models shadow`), each request the alias answers is, with probability `sample`, offered
here once the incumbent has answered it (`InferenceService.infer` calls `ShadowTraffic.offer`
last). The offer never delays, fails or changes the caller's answer: it only appends the
request's images to a queue bounded in images (`shadow_queue_images`) and in the bytes it holds
(`shadow_queue_bytes`: the pixels and encoded images kept, outside the batchers' byte budget),
or counts them shed (`queue_full`) when either has no room.

One background task empties the queue whenever no caller's image is admitted to any model of
the server (so under sustained load the queue fills and the shadow's work is the first shed):
it loads the candidate through the model pool (off the caller's path), runs its images through
the candidate's batcher in the low-priority lane (the one explanations use, taken only while no
normal request is queued, so a caller arriving meanwhile waits for one batch at most), and
compares both answers image by image (`Comparison`: same top-1
label, the incumbent-by-candidate confusion, the confidence shift). The counts go to

- Prometheus, on the server's registry: `perito_shadow_compared_total`,
  `perito_shadow_agreed_total`, `perito_shadow_confusion_total` (only the images the two
  answered differently, by both labels; at most `CONFUSION_PAIRS` label pairs per version pair
  on a server, the rest under `OTHER`, so a 1,000-class model cannot make a million series),
  `perito_shadow_confidence_shift` and `perito_shadow_shed_total` (reason: `queue_full`, no
  room in the shadow queue or the candidate's low-priority lane; `load_failed`, the candidate
  could not be loaded, tried again after `LOAD_RETRY_S`; `no_room`, loading it would evict a
  model already held; `input_differs`, pixels sent at the incumbent's size for a candidate
  whose input differs; `no_answer`, an output that is no answer on either side (NaN or
  infinity, or not probabilities: `summary.output_fault`), not compared; `failed`, any other
  failure);
- Redis (`ComparisonStore`, summed over every replica, the whole confusion matrix), added
  every `FLUSH_S` seconds in one round trip per version pair, off the event loop; a failed
  flush loses only its own counts.

A shadow stopped in the registry stops being offered images within one alias refresh, and the
images still queued for it are dropped, not run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Histogram

from perito_core.errors import PeritoError, QueueFull, ShuttingDown
from perito_core.imaging import ImageLimits, InputSpec, load_model_input_with_info
from perito_core.models.comparison import Comparison, ComparisonStore
from perito_core.models.rollout import AliasRoute
from perito_core.models.summary import output_fault
from perito_server.model_pool import ModelPool
from perito_server.settings import ServerSettings

if TYPE_CHECKING:
    from perito_server.inference import Inference

log = logging.getLogger(__name__)

# Seconds between two flushes of the comparisons to Redis.
FLUSH_S = 1.0
# Seconds between two looks, while callers keep the server busy, for a moment without them.
IDLE_POLL_S = 0.005
# Seconds before a candidate that failed to load is tried again.
LOAD_RETRY_S = 60.0
# Upper bounds of the confidence-shift histogram: -1.0, -0.9, ..., 1.0.
SHIFT_BUCKETS = tuple(round(-1.0 + i / 10, 1) for i in range(21))
# Distinct (incumbent label, candidate label) disagreements a server exports per version pair in
# perito_shadow_confusion_total; the others are counted under OTHER (Redis keeps them all).
CONFUSION_PAIRS = 100
# The label both sides of the confusion's overflow series carry (not a valid class name of a
# model that has one called "other").
OTHER = "(other)"

QUEUE_FULL = "queue_full"
LOAD_FAILED = "load_failed"
NO_ROOM = "no_room"
INPUT_DIFFERS = "input_differs"
NO_ANSWER = "no_answer"
FAILED = "failed"


@dataclass
class _Offer:
    """One request's images queued for a candidate, with the incumbent's answers.

    `pixels` (uint8 [H, W, 3] each, at the incumbent's input `spec`) are kept where the
    candidate takes the same input or is not known yet; `contents` (encoded images) where it
    may need them decoded again; one or both.
    """

    model: str
    alias: str
    incumbent: str
    candidate: str
    labels: Sequence[str]
    spec: InputSpec
    probabilities: list[np.ndarray]
    pixels: list[np.ndarray] | None
    contents: Sequence[bytes] | None

    @property
    def size(self) -> int:
        return len(self.probabilities)

    @property
    def nbytes(self) -> int:
        """The bytes the offer keeps alive: pixels, encoded images and probabilities."""
        held = sum(p.nbytes for p in self.probabilities)
        held += sum(p.nbytes for p in self.pixels or ())
        return held + sum(len(c) for c in self.contents or ())


class ConfusionPairs:
    """Which label pairs a server exports in `perito_shadow_confusion_total`: the first
    `limit` distinct disagreements of each version pair by their own labels, every later one
    as (`OTHER`, `OTHER`)."""

    def __init__(self, limit: int = CONFUSION_PAIRS) -> None:
        self.limit = limit
        self._seen: dict[tuple[str, str, str], set[tuple[str, str]]] = {}

    def labels(self, pair: tuple[str, str, str], incumbent: str, candidate: str) -> tuple[str, str]:
        """The (incumbent_label, candidate_label) to count a disagreement of `pair` (model,
        incumbent version, candidate version) under."""
        seen = self._seen.setdefault(pair, set())
        if (incumbent, candidate) in seen:
            return incumbent, candidate
        if len(seen) < self.limit:
            seen.add((incumbent, candidate))
            return incumbent, candidate
        return OTHER, OTHER


class ShadowMetrics:
    """The shadow's Prometheus families, registered on the server's registry (present in a
    scrape from the start)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        pair = ["model", "incumbent", "candidate"]
        self.compared = Counter(
            "perito_shadow_compared",
            "Images both the alias's version (incumbent) and its shadow (candidate) answered.",
            pair,
            registry=registry,
        )
        self.agreed = Counter(
            "perito_shadow_agreed",
            "Images the incumbent and its shadow answered with the same top-1 label.",
            pair,
            registry=registry,
        )
        self.confusion = Counter(
            "perito_shadow_confusion",
            "Images the incumbent and its shadow answered with different top-1 labels, by both "
            f"labels: at most {CONFUSION_PAIRS} label pairs per version pair, the rest under "
            f"{OTHER}.",
            [*pair, "incumbent_label", "candidate_label"],
            registry=registry,
        )
        self.shift = Histogram(
            "perito_shadow_confidence_shift",
            "The candidate's top-1 probability minus the incumbent's, per image compared.",
            pair,
            buckets=SHIFT_BUCKETS,
            registry=registry,
        )
        self.shed = Counter(
            "perito_shadow_shed",
            "Images offered to a shadow and not compared, by reason: queue_full, load_failed, "
            "no_room, input_differs, no_answer, failed.",
            ["model", "candidate", "reason"],
            registry=registry,
        )


class ShadowTraffic:
    """The server's shadow queue, its runner and its counts.

    Args:
        pool: the server's model pool (candidates load and run through it).
        settings: `shadow_queue_images`, `shadow_queue_bytes`, `max_batch_size`,
            `max_loaded_models`, image limits.
        client: the Redis the comparisons are added to (`ComparisonStore`).
        registry: the server's metrics registry, or None.
    """

    def __init__(
        self,
        pool: ModelPool,
        settings: ServerSettings,
        client: redis.Redis,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.limits: ImageLimits = settings.image_limits()
        self.store = ComparisonStore(client)
        self.metrics = ShadowMetrics(registry)
        self.capacity = settings.shadow_queue_images
        self.capacity_bytes = settings.shadow_queue_bytes
        self._queue: collections.deque[_Offer] = collections.deque()
        self.queued = 0  # images in the queue
        self.queued_bytes = 0  # what they hold (`_Offer.nbytes`)
        self._confusion = ConfusionPairs()
        self._wakeup = asyncio.Event()
        # (model, incumbent, candidate) -> counts not yet added to Redis.
        self._pending: dict[tuple[str, str, str], Comparison] = {}
        # (model, candidate) -> its input spec, once loaded; -> when to try loading again.
        self._specs: dict[tuple[str, str], InputSpec] = {}
        self._retry_at: dict[tuple[str, str], float] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the runner and the flusher (on the running event loop)."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name="shadow-runner"),
                asyncio.create_task(self._flush_every(), name="shadow-flush"),
            ]

    async def close(self) -> None:
        """Stop the runner (the queued images are dropped) and add the last counts."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._queue.clear()
        self.queued = self.queued_bytes = 0
        await self._flush()

    # The caller's side: never raises, never waits.

    def offer(self, ref: str, images: Sequence[bytes] | np.ndarray, inference: Inference) -> None:
        """Queue `inference`'s images for the shadow of `ref`'s route, if it has one and its
        sample draws them; count them shed when the queue has no room for their images or
        their bytes.

        Args:
            ref: the version reference the caller asked for (an alias; a version number or
                "" has no shadow).
            images: the request's images as sent: encoded bytes, or uint8 [N, H, W, 3].
            inference: the incumbent's answer (`InferenceService.infer`).
        """
        try:
            self._offer(ref, images, inference)
        except Exception:  # the caller's answer never depends on the shadow
            log.exception("shadow: offer of %s@%s failed", inference.model, ref)

    def _offer(self, ref: str, images: Sequence[bytes] | np.ndarray, inference: Inference) -> None:
        route = self.route(inference.model, ref)
        shadow = route.shadow if route is not None else None
        if shadow is None or shadow.version == inference.version or not shadow.takes():
            return
        size = len(inference.probabilities)
        if self.queued + size > self.capacity:
            self.metrics.shed.labels(inference.model, shadow.version, QUEUE_FULL).inc(size)
            return
        spec = inference.manifest.input.spec()
        known = self._specs.get((inference.model, shadow.version))
        encoded = None if isinstance(images, np.ndarray) else images
        offer = _Offer(
            inference.model,
            ref,
            inference.version,
            shadow.version,
            inference.manifest.labels,
            spec,
            inference.probabilities,
            inference.pixels if known is None or known == spec else None,
            encoded if known is None or known != spec else None,
        )
        held = offer.nbytes
        if self.queued_bytes + held > self.capacity_bytes:
            self.metrics.shed.labels(inference.model, shadow.version, QUEUE_FULL).inc(size)
            return
        self._queue.append(offer)
        self.queued += size
        self.queued_bytes += held
        self._wakeup.set()

    def route(self, model: str, ref: str) -> AliasRoute | None:
        """The route of `model@ref` as this replica serves it (`ModelPool.route`, re-read
        every `alias_ttl_s`; None for a version number, latest, or an alias not served)."""
        return self.pool.route(model, ref)

    # The runner.

    def _shed(self, offer: _Offer, reason: str, count: int | None = None) -> None:
        self.metrics.shed.labels(offer.model, offer.candidate, reason).inc(
            offer.size if count is None else count
        )

    def _take(self) -> list[_Offer]:
        """The next offers to run together: the queue's first and those after it for the
        same version pair, up to `max_batch_size` images in all."""
        first = self._queue.popleft()
        taken, size, held = [first], first.size, first.nbytes
        key = (first.model, first.alias, first.incumbent, first.candidate)
        while self._queue:
            after = self._queue[0]
            same = (after.model, after.alias, after.incumbent, after.candidate) == key
            if not same or size + after.size > self.settings.max_batch_size:
                break
            taken.append(self._queue.popleft())
            size += after.size
            held += after.nbytes
        self.queued -= size
        self.queued_bytes -= held
        return taken

    def _busy(self) -> bool:
        """Whether any caller's image is admitted to a model of this server and unanswered."""
        return any(served.batcher.admitted for served in self.pool.served())

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Only between callers' requests: while they keep the server busy the queue fills
            # and what does not fit is shed (queue_full) instead of taking their cores.
            while self._busy():  # noqa: ASYNC110 - no batcher signals an idle moment
                await asyncio.sleep(IDLE_POLL_S)
            offers = self._take()
            try:
                await self._compare(offers)
            except asyncio.CancelledError:
                raise
            except Exception:  # one failure sheds its own images only
                log.exception("shadow: %s@%s failed", offers[0].model, offers[0].candidate)
                for offer in offers:
                    self._shed(offer, FAILED)

    async def _compare(self, offers: list[_Offer]) -> None:
        """Run `offers` (one version pair) on the candidate and count the comparisons."""
        first = offers[0]
        route = self.route(first.model, first.alias)
        if route is None or route.shadow is None or route.shadow.version != first.candidate:
            return  # the shadow was stopped or moved: its queued images are dropped
        key = (first.model, first.candidate)
        if time.monotonic() < self._retry_at.get(key, 0.0):
            for offer in offers:
                self._shed(offer, LOAD_FAILED)
            return
        held = self.pool.served()
        if key not in self.pool.loaded and len(held) >= self.settings.max_loaded_models:
            log.warning(
                "shadow: not loading %s@%s: the server holds max_loaded_models already",
                *key,
            )
            self._retry_at[key] = time.monotonic() + LOAD_RETRY_S
            for offer in offers:
                self._shed(offer, NO_ROOM)
            return
        try:
            served = await self.pool.get(*key)
        except PeritoError as error:
            log.warning("shadow: cannot load %s@%s: %s", *key, error.message)
            self._retry_at[key] = time.monotonic() + LOAD_RETRY_S
            for offer in offers:
                self._shed(offer, LOAD_FAILED)
            return
        spec = self._specs[key] = served.model.manifest.input.spec()
        pixels: list[np.ndarray] = []
        runnable: list[_Offer] = []
        for offer in offers:
            images = await self._pixels(offer, spec)
            if images is not None:
                pixels.extend(images)
                runnable.append(offer)
        if not pixels:
            return
        try:
            with served.batcher.admit(len(pixels), low_priority=True) as admit:
                answers = await admit.run(pixels, None)
        except QueueFull:
            for offer in runnable:
                self._shed(offer, QUEUE_FULL)
            return
        except ShuttingDown:
            return
        labels = served.model.manifest.labels
        at = 0
        for offer in runnable:
            self._count(offer, answers[at : at + offer.size], labels)
            at += offer.size

    async def _pixels(self, offer: _Offer, spec: InputSpec) -> list[np.ndarray] | None:
        """`offer`'s images as the candidate takes them (None: shed, counted)."""
        if offer.pixels is not None and spec == offer.spec:
            return offer.pixels
        if offer.contents is None:
            self._shed(offer, INPUT_DIFFERS)
            return None
        limits = self.limits

        def decode() -> list[np.ndarray]:
            return [load_model_input_with_info(c, spec, limits)[0] for c in offer.contents or ()]

        return await asyncio.to_thread(decode)

    def _count(self, offer: _Offer, answers: Sequence[np.ndarray], labels: Sequence[str]) -> None:
        """Compare the answers of both sides; count the others shed (`no_answer`)."""
        answered = [
            index
            for index, (mine, theirs) in enumerate(zip(offer.probabilities, answers, strict=True))
            if output_fault(mine) is None and output_fault(theirs) is None
        ]
        if len(answered) < offer.size:
            self._shed(offer, NO_ANSWER, offer.size - len(answered))
        if not answered:
            return
        pair = (offer.model, offer.incumbent, offer.candidate)
        comparison = self._pending.get(pair)
        if comparison is None:
            comparison = self._pending[pair] = Comparison(*pair)
        rows = comparison.add(
            np.stack([offer.probabilities[i] for i in answered]),
            np.stack([answers[i] for i in answered]),
            offer.labels,
            labels,
        )
        metrics = self.metrics
        metrics.compared.labels(*pair).inc(len(rows))
        metrics.agreed.labels(*pair).inc(sum(a == b for a, b, _ in rows))
        shift = metrics.shift.labels(*pair)
        for incumbent_label, candidate_label, moved in rows:
            if incumbent_label != candidate_label:
                shown = self._confusion.labels(pair, incumbent_label, candidate_label)
                metrics.confusion.labels(*pair, *shown).inc()
            shift.observe(moved)

    # The flusher.

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self._flush()

    async def _flush(self) -> None:
        """Add the counts gathered since the last flush to Redis, off the event loop; counts
        that fail to reach it are lost (logged), never retried into the next flush."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for comparison in pending.values():
            try:
                await asyncio.to_thread(self.store.add, comparison)
            except redis.RedisError as error:
                log.warning(
                    "shadow: %d comparisons of %s %s->%s lost: Redis: %s",
                    comparison.compared,
                    comparison.model,
                    comparison.incumbent,
                    comparison.candidate,
                    error,
                )
