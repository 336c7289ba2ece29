"""How two versions of a model answered the same images: top-1 agreement, the
incumbent-by-candidate confusion and the shift in top-1 confidence.

A shadow (`perito_core.models.rollout.Shadow`) fills one live on the servers; an offline
comparison fills one from two bulk jobs over the same images. Servers add their counts to
Redis (`ComparisonStore`), where `perito models compare` reads the sum of every replica.

Classes are compared by label (the candidate may order or name its labels differently), so
the confusion is keyed by (incumbent's top-1 label, candidate's top-1 label).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import redis

from perito_core.stats import wilson_interval

# The confidence shift, candidate's top-1 probability minus incumbent's, in 20 bins over
# [-1, 1]: bin i holds shifts in [-1 + i/10, -1 + (i+1)/10), the last one 1 too.
SHIFT_BINS = 20
# Comparisons are kept this long after their last update.
RETENTION_S = 30 * 24 * 3600
_SEP = "\x1f"


def shift_bin(shift: float) -> int:
    """The bin (0 .. SHIFT_BINS - 1) of a confidence shift in [-1, 1]."""
    return min(SHIFT_BINS - 1, max(0, int((shift + 1.0) * SHIFT_BINS / 2.0)))


@dataclass
class Comparison:
    """Counts of how `candidate` answered the images `incumbent` answered, for one model.

    Attributes:
        compared: images both versions answered.
        agreed: those whose top-1 labels are the same.
        confusion: (incumbent's top-1 label, candidate's top-1 label) -> images.
        shift: images per confidence-shift bin (`shift_bin`), SHIFT_BINS long.
        shift_sum: the sum of the shifts (their mean is `mean_shift`).
    """

    model: str
    incumbent: str
    candidate: str
    compared: int = 0
    agreed: int = 0
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)
    shift: list[int] = field(default_factory=lambda: [0] * SHIFT_BINS)
    shift_sum: float = 0.0

    def add(
        self,
        incumbent: np.ndarray,
        candidate: np.ndarray,
        incumbent_labels: Sequence[str],
        candidate_labels: Sequence[str],
    ) -> list[tuple[str, str, float]]:
        """Count N images both versions answered.

        Args:
            incumbent: float probabilities [N, C1] of the incumbent, finite.
            candidate: float probabilities [N, C2] of the candidate, finite.
            incumbent_labels, candidate_labels: each version's labels (C1 and C2 long).

        Returns:
            Each image's (incumbent's top-1 label, candidate's top-1 label, shift).
        """
        rows = []
        for inc, cand in zip(incumbent, candidate, strict=True):
            i, c = int(np.argmax(inc)), int(np.argmax(cand))
            pair = (incumbent_labels[i], candidate_labels[c])
            shift = float(cand[c]) - float(inc[i])
            self.compared += 1
            self.agreed += pair[0] == pair[1]
            self.confusion[pair] += 1
            self.shift[shift_bin(shift)] += 1
            self.shift_sum += shift
            rows.append((pair[0], pair[1], shift))
        return rows

    def merge(self, other: Comparison) -> None:
        """Add `other`'s counts (the same model and versions) to these."""
        self.compared += other.compared
        self.agreed += other.agreed
        self.confusion.update(other.confusion)
        self.shift = [a + b for a, b in zip(self.shift, other.shift, strict=True)]
        self.shift_sum += other.shift_sum

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement in [0, 1]; None before any image."""
        return self.agreed / self.compared if self.compared else None

    @property
    def agreement_interval(self) -> tuple[float, float]:
        """The agreement's Wilson 95% interval (`wilson_interval`)."""
        return wilson_interval(self.agreed, self.compared)

    @property
    def mean_shift(self) -> float | None:
        """Mean confidence shift (candidate minus incumbent) in [-1, 1]; None before any."""
        return self.shift_sum / self.compared if self.compared else None

    def labels(self) -> tuple[list[str], list[str]]:
        """The incumbent's and the candidate's top-1 labels seen, each sorted."""
        return (
            sorted({a for a, _ in self.confusion}),
            sorted({b for _, b in self.confusion}),
        )

    def fields(self) -> dict[str, float]:
        """These counts as the fields of a Redis hash (`ComparisonStore`)."""
        out: dict[str, float] = {"compared": self.compared, "agreed": self.agreed}
        out["shift_sum"] = self.shift_sum
        for (a, b), count in self.confusion.items():
            out[f"c{_SEP}{a}{_SEP}{b}"] = count
        for index, count in enumerate(self.shift):
            if count:
                out[f"s{_SEP}{index}"] = count
        return out

    @classmethod
    def from_fields(
        cls, model: str, incumbent: str, candidate: str, fields: dict[str, str]
    ) -> Comparison:
        """The comparison a Redis hash of `fields` holds (unknown fields are ignored)."""
        comparison = cls(model, incumbent, candidate)
        for name, value in fields.items():
            kind, _, rest = name.partition(_SEP)
            if name == "compared":
                comparison.compared = int(float(value))
            elif name == "agreed":
                comparison.agreed = int(float(value))
            elif name == "shift_sum":
                comparison.shift_sum = float(value)
            elif kind == "c" and _SEP in rest:
                a, _, b = rest.partition(_SEP)
                comparison.confusion[(a, b)] = int(float(value))
            elif kind == "s" and rest.isdigit() and int(rest) < SHIFT_BINS:
                comparison.shift[int(rest)] = int(float(value))
        return comparison


class ComparisonStore:
    """Comparisons in Redis, summed over every server that adds to them.

    Key `perito:comparison:{model}:{incumbent}:{candidate}`, a hash of `Comparison.fields`,
    kept `RETENTION_S` after its last update; its size is bounded by the labels squared.
    """

    def __init__(self, client: redis.Redis, retention_s: int = RETENTION_S) -> None:
        self.redis = client
        self.retention_s = retention_s

    @staticmethod
    def key(model: str, incumbent: str, candidate: str) -> str:
        return f"perito:comparison:{model}:{incumbent}:{candidate}"

    def add(self, comparison: Comparison) -> None:
        """Add `comparison`'s counts in one round trip.

        Raises:
            redis.RedisError: Redis could not be reached.
        """
        if not comparison.compared:
            return
        key = self.key(comparison.model, comparison.incumbent, comparison.candidate)
        pipe = self.redis.pipeline(transaction=True)
        for name, value in comparison.fields().items():
            if isinstance(value, float):  # shift_sum: a float field from its first add
                pipe.hincrbyfloat(key, name, value)
            else:
                pipe.hincrby(key, name, int(value))
        pipe.expire(key, self.retention_s)
        pipe.execute()

    def read(self, model: str, incumbent: str, candidate: str) -> Comparison:
        """The comparison summed so far (empty when none was recorded).

        Raises:
            redis.RedisError: Redis could not be reached.
        """
        raw: dict[bytes | str, bytes | str] = self.redis.hgetall(
            self.key(model, incumbent, candidate)
        )
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return Comparison.from_fields(model, incumbent, candidate, fields)

    def pairs(self, model: str) -> list[tuple[str, str]]:
        """(incumbent, candidate) version pairs with a comparison kept for `model`."""
        found = set()
        for key in self.redis.scan_iter(match=f"perito:comparison:{model}:*", count=1000):
            parts = _text(key).split(":")
            if len(parts) == 5 and parts[3].isdigit() and parts[4].isdigit():
                found.add((parts[3], parts[4]))
        return sorted(found, key=lambda pair: (int(pair[0]), int(pair[1])))


def _text(value: bytes | str) -> str:
    """A Redis reply as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value
