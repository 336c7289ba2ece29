"""A loaded form's preferred batch size, chosen by measurement on the machine that serves it.

A bigger batch is not always faster: on a 2-core AVX2 CPU ONNX Runtime's FP32 ResNet-18 ran
more images per second one at a time than eight at a time, while TorchScript gained from
batching. So each form is timed at load, on its own model thread right after warm-up, at the
candidate batch sizes up to the server's `max_batch_size` (1, 2, 4, 8, ... and the cap itself),
and the smallest size whose images per second are within `TOLERANCE` of the best is kept: a
bigger batch than that adds only latency (each image waits for the batch to fill and for the
others' compute).

In Triton's terms `max_batch_size` stays the most a batch may hold and the chosen size is the
dynamic batcher's `preferred_batch_size`, picked as Triton's Model Analyzer would pick it from a
sweep over batch sizes, but in about a second and for the form actually loaded here.

The sizes are timed in short interleaved rounds (each size once per round, the order reversed
every other round), so a burst of other load on the machine falls on every size rather than on
one; each size's rate is its best round (other load only ever slows a round down).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from perito_core.models.engines.base import LoadedModel

log = logging.getLogger(__name__)

# A size within this fraction of the best images/s counts as as fast as the best.
TOLERANCE = 0.03
# Interleaved rounds, and each size's share of a round: at least this long and this many
# forward passes. ResNet-18 at 1, 2, 4 and 8 on 2 AVX2 cores (about 30 ms an image): ~1.8 s.
ROUNDS = 2
ROUND_SECONDS = 0.05
MIN_PASSES = 2


@dataclass(frozen=True)
class BatchProfile:
    """The batch size a loaded form is run at, and the measurement it was chosen by.

    Attributes:
        preferred_batch_size: the most images per forward pass (>= 1).
        images_per_second: forward-pass throughput by batch size, as measured (empty when the
            size was set, not measured).
        seconds: wall-clock seconds the measurement took (0 when set).
        tolerance: the fraction of the best images/s a smaller size may fall short by and
            still be chosen.
    """

    preferred_batch_size: int
    images_per_second: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    tolerance: float = TOLERANCE

    @property
    def measured(self) -> bool:
        return bool(self.images_per_second)

    def summary(self) -> str:
        """For logs: `batch 1: 120.0 images/s, 2: 131.0, 4: 133.0 -> 2 (the smallest within 3%
        of the best; measured in 0.6s)`, or `batch size 4 (set, not measured)`."""
        if not self.measured:
            return f"batch size {self.preferred_batch_size} (set, not measured)"
        rates = ", ".join(
            f"{size}: {rate:.1f}" + (" images/s" if i == 0 else "")
            for i, (size, rate) in enumerate(sorted(self.images_per_second.items()))
        )
        return (
            f"batch {rates} -> {self.preferred_batch_size} (the smallest within "
            f"{self.tolerance:.0%} of the best; measured in {self.seconds:.1f}s)"
        )


def candidate_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The sizes timed under a cap: the powers of two below it and the cap itself,
    `8 -> (1, 2, 4, 8)`, `6 -> (1, 2, 4, 6)`.

    Raises:
        ValueError: `max_batch_size` < 1.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


def measure_images_per_second(
    forward: Callable[[int], object],
    batch_sizes: Sequence[int],
    *,
    rounds: int = ROUNDS,
    round_seconds: float = ROUND_SECONDS,
    min_passes: int = MIN_PASSES,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """Images per second of `forward` at each batch size, in interleaved rounds.

    Args:
        forward: runs one forward pass of a batch of the given size (its result is ignored);
            the caller has warmed it at every size.
        batch_sizes: the sizes to time, each >= 1.
        rounds: how many times each size is timed; its best round counts.
        round_seconds: a size's share of a round lasts at least this long (seconds) ...
        min_passes: ... and at least this many passes.
        clock: monotonic seconds (`time.perf_counter`; a fake one in tests).

    Returns:
        batch size -> images per second (its best round), for each of `batch_sizes`.

    Raises:
        ValueError: no sizes, a size < 1, or rounds or min_passes < 1.
    """
    if not batch_sizes or min(batch_sizes) < 1 or rounds < 1 or min_passes < 1:
        raise ValueError("need batch sizes >= 1, rounds >= 1 and min_passes >= 1")
    best: dict[int, float] = dict.fromkeys(batch_sizes, 0.0)
    for round_number in range(rounds):
        order = batch_sizes if round_number % 2 == 0 else list(reversed(batch_sizes))
        for size in order:
            passes, start = 0, clock()
            while (elapsed := clock() - start) < round_seconds or passes < min_passes:
                forward(size)
                passes += 1
            rate = passes * size / elapsed if elapsed > 0 else float("inf")
            best[size] = max(best[size], rate)
    return best


def choose_batch_size(images_per_second: Mapping[int, float], tolerance: float = TOLERANCE) -> int:
    """The smallest batch size whose images/s are at least (1 - `tolerance`) of the best.

    Raises:
        ValueError: no rates.
    """
    if not images_per_second:
        raise ValueError("no batch sizes measured")
    floor = (1 - tolerance) * max(images_per_second.values())
    return min(size for size, rate in images_per_second.items() if rate >= floor)


def profile_batch_sizes(
    model: LoadedModel,
    max_batch_size: int,
    preferred_batch_size: int | None = None,
    tolerance: float = TOLERANCE,
) -> BatchProfile:
    """The batch size to run `model` at: `preferred_batch_size` when given (nothing is
    measured), else the fastest of `candidate_batch_sizes(max_batch_size)` by
    `measure_images_per_second` and `choose_batch_size(rates, tolerance)`, logged at INFO.
    A caller that answers people keeps the default; one that only counts throughput (bulk
    jobs) may pass 0 for the very fastest size.

    Call it on the thread that runs the model's forward passes (an engine's thread pool belongs
    to the thread that calls it), after `model.warm` at the candidate sizes. The measurement
    runs random uint8 images through the model's forward pass (no decoding); it takes
    `ROUNDS` x the sum over sizes of max(`ROUND_SECONDS`, `MIN_PASSES` passes).

    Raises:
        ValueError: `max_batch_size` < 1, or `preferred_batch_size` outside 1..max_batch_size.
    """
    if preferred_batch_size is not None:
        if not 1 <= preferred_batch_size <= max_batch_size:
            raise ValueError(
                f"preferred_batch_size {preferred_batch_size} is not within 1..{max_batch_size} "
                "(max_batch_size)"
            )
        return BatchProfile(preferred_batch_size)
    sizes = candidate_batch_sizes(max_batch_size)
    batches: dict[int, torch.Tensor] = {size: model._random_batch(size) for size in sizes}
    started = time.perf_counter()
    rates = measure_images_per_second(lambda size: model._forward(batches[size]), sizes)
    profile = BatchProfile(
        choose_batch_size(rates, tolerance), rates, time.perf_counter() - started, tolerance
    )
    manifest = model.manifest
    log.info("%s@%s, %s: %s", manifest.name, manifest.version, model.form, profile.summary())
    return profile
