"""What the job handles (`perito._async.AsyncJobHandle` and the generated
`perito._client.JobHandle`) share: the error their `wait` raises."""

from __future__ import annotations

__all__ = ["JobTimeoutError"]


class JobTimeoutError(TimeoutError):
    """`wait()` ran out of time; the job goes on."""
