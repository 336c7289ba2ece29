"""What an alias serves: its version and, during a rollout, a canary share and a shadow.

An alias record (`models/{name}/aliases/{alias}.json`, `perito_core.models.registry`) names
one version, and may name two more:

- a **canary**: a version that answers `percent` of the alias's requests (KServe's
  `canaryTrafficPercent`, SageMaker's production variant weights). A request that carries a
  routing key (a claim id, say) is sent by a hash of the key, so every request with that key
  gets the same version for as long as the canary lasts; a request without one is drawn at
  random.
- a **shadow**: a version run on a `sample` of the alias's traffic after the caller has been
  answered (SageMaker's shadow variants, Seldon's mirror); its answers are never returned,
  only compared with the alias's own.

Both are set, promoted and rolled back through the registry, so every replica reads the same
record within one alias refresh.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from perito_core.digests import sha256_hex

# Shares are counted in 1/10,000ths: a canary percent has at most two decimals.
_BUCKETS = 10_000


@dataclass(frozen=True)
class Canary:
    """A version that answers `percent` (0 < percent < 100) of an alias's requests."""

    version: str
    percent: float

    def takes(self, key: str, salt: str) -> bool:
        """Whether a request with routing key `key` goes to the canary.

        With a key: sha256 of `salt`, the canary's version and the key, read as a number
        below 10,000, is under `percent` x 100 (the same key always lands on the same side
        for one canary; a new canary version redraws). Without one (""): a random draw.
        """
        if not key:
            return random.random() * 100.0 < self.percent
        bucket = int(sha256_hex(f"{salt}\x00{self.version}\x00{key}".encode())[:8], 16)
        return bucket % _BUCKETS < round(self.percent * _BUCKETS / 100)


@dataclass(frozen=True)
class Shadow:
    """A version run on a `sample` (0 < sample <= 1) of an alias's answered traffic."""

    version: str
    sample: float

    def takes(self) -> bool:
        """Whether this request's images are also sent to the shadow (a random draw)."""
        return self.sample >= 1.0 or random.random() < self.sample


@dataclass(frozen=True)
class AliasRoute:
    """Where an alias's requests go: `version`, and during a rollout a canary and a shadow."""

    version: str
    canary: Canary | None = None
    shadow: Shadow | None = None

    def pick(self, key: str, salt: str) -> str:
        """The version that answers a request with routing key `key` ("": none);
        `salt` is the model and alias, so one key is drawn afresh for each."""
        if self.canary is not None and self.canary.takes(key, salt):
            return self.canary.version
        return self.version

    def moved_to(self, version: str) -> AliasRoute:
        """The route once the alias serves `version`: any canary ended, the shadow kept unless
        it is `version` (a move and a promotion alike)."""
        shadow = self.shadow if self.shadow and self.shadow.version != version else None
        return AliasRoute(version, None, shadow)

    @property
    def versions(self) -> list[str]:
        """Every version this route sends requests to or shadows, the alias's first."""
        extra = [part.version for part in (self.canary, self.shadow) if part is not None]
        return list(dict.fromkeys([self.version, *extra]))

    def record(self) -> dict[str, Any]:
        """The alias record's JSON fields (without `updated_at`)."""
        record: dict[str, Any] = {"version": self.version}
        if self.canary is not None:
            record["canary"] = {"version": self.canary.version, "percent": self.canary.percent}
        if self.shadow is not None:
            record["shadow"] = {"version": self.shadow.version, "sample": self.shadow.sample}
        return record


def check_percent(percent: float) -> float:
    """A canary share, checked: 0 < percent < 100 once rounded to the two decimals kept.

    Raises:
        ValueError: out of range or not a number.
    """
    kept = round(percent, 2) if math.isfinite(percent) else percent
    # Checked as kept: 99.999 would be stored as 100, a record no server could read.
    if not 0.0 < kept < 100.0:
        raise ValueError(
            f"a canary percent must be from 0.01 to 99.99 (two decimals are kept), not {percent:g}"
        )
    return kept


def check_sample(sample: float) -> float:
    """A shadow's share of traffic, checked: 0 < sample <= 1.

    Raises:
        ValueError: out of range or not a number.
    """
    if not 0.0 < sample <= 1.0:
        raise ValueError(f"a shadow sample must be above 0 and at most 1, not {sample}")
    return sample
