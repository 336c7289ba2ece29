"""Page sizes of the list calls, one rule for all of them and every door (Google AIP-158).

`page_size` 0 (or absent) is the call's default page, a size above its largest page is served
as the largest (not refused), and a negative size is INVALID_ARGUMENT naming `page_size`. The
numbers live here only: the calls apply them, and the JSON API's OpenAPI document and its
parameter descriptions are written from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from perito_core.errors import InvalidArgument


@dataclass(frozen=True)
class PageSize:
    """The page sizes of one list call, in items (models, jobs, results)."""

    default: int
    largest: int

    def of(self, requested: int) -> int:
        """The number of items to serve for a request's `page_size`.

        Raises:
            InvalidArgument: naming `page_size`, when `requested` is negative.
        """
        if requested < 0:
            raise InvalidArgument(
                f"page_size must be 0 (the default, {self.default}) or more, not {requested}",
                field="page_size",
            )
        return min(requested or self.default, self.largest)


LIST_MODELS = PageSize(default=100, largest=1000)
LIST_JOBS = PageSize(default=100, largest=1000)
LIST_JOB_RESULTS = PageSize(default=1000, largest=10_000)
