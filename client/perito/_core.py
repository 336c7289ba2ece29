"""The SDK's one core: what every call does, written once for `Client` and `AsyncClient`.

Design (sans-IO). A call is a *program*: a generator that yields the I/O it needs, `Send`
(one RPC attempt, with its timeout) or `Sleep` (before a retry), and is sent each response
back, or has the attempt's `PeritoError` thrown into it. The program decides everything
else: the request, the deadline each attempt gets out of the call's budget (one `Deadline`
shared by every part and retry of a split `classify`), whether and when to retry, which page
comes next, and how the parts of a split call are renumbered and merged. Each client only
performs the steps, in a loop of a dozen lines (`_run`): `AsyncClient` with `grpc.aio` and
`asyncio.sleep`, plus the concurrency of split calls (`limits.max_concurrent_requests` parts
at once), and `Client` with blocking grpc calls and `time.sleep`. A unit test runs a program
by hand with a fake clock, no network at all.

Why not an async core with a sync facade: `Client` would need an event loop, either in the
caller's thread (which breaks under Jupyter or any caller already running a loop) or in a
background thread (every call crossing threads, `grpc.aio` channels tied to that loop, fork
and signal handling harder). So `Client` stays plain blocking grpc, with no loop anywhere;
and as the two clients differ only in `async` / `await` once the logic is here, `Client` is
generated from `AsyncClient` (`scripts/gen_sync_client.py`, with `unasync`; a unit test fails
when the generated file is stale), so the client code is written once too.

Why a hand-written retry loop rather than gRPC's `retryPolicy` service config: that retries
on status codes alone, while the SDK retries RESOURCE_EXHAUSTED only when the server sent a
`google.rpc.RetryInfo` hint (a message over the size limit is RESOURCE_EXHAUSTED too, and
retrying it is pointless), waits what the hint says, and never starts a wait that would end
past the call's deadline. gRPC's transparent retries (of requests never sent) still apply.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeAlias, TypeVar, Unpack

from google.protobuf.message import Message

from perito._errors import (
    DeadlineExceededError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    PeritoError,
    ResourceExhaustedError,
    UnavailableError,
)
from perito._images import ImageInput
from perito._models import Classification, Job, JobItemResult, JobState, Model, RejectedImage
from perito._requests import ImageOptions, Limits, Part, classify_parts
from perito.v1 import classify_pb2, jobs_pb2, models_pb2

R = TypeVar("R")
T = TypeVar("T")
E = TypeVar("E", bound=PeritoError)

# The shortest timeout an attempt is sent with; under it the call has run out of time.
MIN_TIMEOUT = 0.001


# Steps: the I/O a program asks its client to perform.


@dataclass(frozen=True)
class Send:
    """Make one attempt of an RPC, `stub.<method>(request, timeout=timeout)`; send the
    program its response, or throw in the call's error as a `PeritoError`."""

    method: str
    request: Message
    timeout: float | None  # None: no deadline


@dataclass(frozen=True)
class Sleep:
    """Wait `seconds` before the next attempt; send the program None."""

    seconds: float


Step: TypeAlias = Send | Sleep
Program: TypeAlias = Generator[Step, Any, R]


# Deadlines.


class Deadline:
    """The time one call has left, shared by every attempt and every part of it."""

    def __init__(self, at: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.at = at
        self._clock = clock

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        """Seconds left; zero or less once it has passed."""
        return self.at - self._clock()


def seconds(timeout: float | None, name: str = "timeout") -> float:
    """A timeout as a client keeps it: seconds, `math.inf` for none (None or infinity, as
    gRPC takes None).

    Raises:
        ValueError: NaN, which no clock reaches and gRPC would take as already passed.
    """
    if timeout is None:
        return math.inf
    if math.isnan(timeout):
        raise ValueError(f"{name} is NaN; give seconds, or None for no deadline")
    return float(timeout)


def grpc_timeout(remaining: float) -> float | None:
    """Seconds as gRPC's `timeout=` takes them: None for no deadline."""
    return None if math.isinf(remaining) else remaining


@dataclass(frozen=True)
class Policy:
    """A client's settings as one call uses them: its timeout (seconds, `math.inf`: none)
    and how often to retry (`Retries`)."""

    timeout: float
    max_retries: int
    clock: Callable[[], float] = time.monotonic
    # Seconds UNAVAILABLE is retried past `max_retries` (`Retries.patience_s`).
    patience_s: float = 0.0

    def deadline(self) -> Deadline:
        """A deadline `timeout` seconds from now."""
        return Deadline.after(self.timeout, self.clock)

    @property
    def retries(self) -> Retries:
        return Retries(self.max_retries, self.patience_s, self.clock)


# How long a client goes on retrying UNAVAILABLE past its `max_retries`, once its server has
# answered it: the server was there and is likely restarting (a `perito serve` start with a
# small model takes a few seconds; a pod replaced takes longer), always within the call's
# deadline. A server never reached is given only `max_retries`, so that a wrong address or a
# server not started fails in about a second.
RESTART_PATIENCE_S = 30.0


@dataclass(frozen=True)
class Retries:
    """How often one call may be tried again (`call`).

    Args:
        max_retries: retries whatever the error `retry_wait` allows (0: none at all).
        patience_s: for UNAVAILABLE, further retries while the first failure is under this
            many seconds old (0: none past `max_retries`).
    """

    max_retries: int
    patience_s: float = 0.0
    clock: Callable[[], float] = time.monotonic

    def allow(self, error: PeritoError, attempt: int, failing_since: float, wait: float) -> bool:
        """Whether attempt number `attempt` (from 0), failed with `error`, is tried again
        after `wait` seconds, the call failing since `failing_since` (this clock's time)."""
        if attempt < self.max_retries:
            return True
        return (
            self.max_retries > 0
            and isinstance(error, UnavailableError)
            and self.clock() + wait - failing_since < self.patience_s
        )


# Retries.


def retry_wait(
    error: PeritoError, attempt: int, rand: Callable[[], float] = random.random
) -> float | None:
    """Seconds to wait before retrying `error` after attempt number `attempt` (from 0), or
    None when it must not be retried.

    RESOURCE_EXHAUSTED is retried only with the server's hint (`retry_after`), waited with up
    to 20% jitter; UNAVAILABLE with exponential backoff from 0.1 s, capped at 2 s, jittered
    by 0.5x to 1.5x; nothing else.
    """
    if isinstance(error, ResourceExhaustedError) and error.retry_after is not None:
        hint: float = error.retry_after
        return hint * (1 + rand() * 0.2)
    if isinstance(error, UnavailableError):
        return min(2.0, 0.1 * 2.0**attempt) * (0.5 + rand())
    return None


def call(method: str, request: Message, deadline: Deadline, retries: Retries) -> Program[Any]:
    """One RPC within `deadline`: each attempt gets what is left of it, and a failed one is
    retried when `retry_wait` says so, `retries` allows it and the wait ends before the
    deadline. Returns the response; raises the last attempt's error."""
    attempt, failing_since = 0, None
    while True:
        remaining = deadline.remaining()
        if remaining < MIN_TIMEOUT:
            raise DeadlineExceededError("Deadline Exceeded: the call's timeout ran out")
        try:
            return (yield Send(method, request, grpc_timeout(remaining)))
        except PeritoError as error:
            if failing_since is None:
                failing_since = retries.clock()
            wait = retry_wait(error, attempt)
            if (
                wait is None
                or wait >= deadline.remaining()
                or not retries.allow(error, attempt, failing_since, wait)
            ):
                raise
        yield Sleep(wait)
        attempt += 1


# Pagination.


@dataclass
class Pager(Generic[T]):
    """A paged listing: the program for each page in turn, until the server says it was the
    last. A client runs `next_page()`'s program before asking for the next one."""

    method: str
    request_for: Callable[[str], Message]
    items_of: Callable[[Any], Iterable[T]]
    deadline_for: Callable[[], Deadline]
    retries: Retries
    # The next page's token: "" for the first page, None after the last.
    _token: str | None = dataclasses.field(default="", init=False)

    def next_page(self) -> Program[list[T]] | None:
        """The program fetching the next page's items, or None after the last page."""
        return None if self._token is None else self._page(self._token)

    def _page(self, token: str) -> Program[list[T]]:
        request = self.request_for(token)
        response = yield from call(self.method, request, self.deadline_for(), self.retries)
        self._token = response.next_page_token or None
        return list(self.items_of(response))


def list_models(policy: Policy) -> Pager[Model]:
    """Every model, page by page, within one deadline for the whole listing."""
    deadline = policy.deadline()
    return Pager(
        "ListModels",
        lambda token: models_pb2.ListModelsRequest(page_token=token),
        lambda response: (Model._from_proto(m) for m in response.models),
        lambda: deadline,
        policy.retries,
    )


def list_jobs(
    *,
    states: Iterable[JobState | str] = (),
    labels: Mapping[str, str] | None = None,
    page_size: int = 0,
    policy: Policy,
) -> Pager[Job]:
    """The caller's jobs (its tenant's), newest first, page by page; each page has the
    whole timeout. `states` and `labels` filter on the server.

    Raises:
        ValueError: an unknown state name.
    """
    wanted = [
        jobs_pb2.JobState.Name(jobs_pb2.JobState.Value("JOB_STATE_" + JobState(state).name))
        for state in states
    ]
    return Pager(
        "ListJobs",
        lambda token: jobs_pb2.ListJobsRequest(
            page_size=page_size, page_token=token, states=wanted, labels=dict(labels or {})
        ),
        lambda response: (Job._from_proto(j) for j in response.jobs),
        policy.deadline,
        policy.retries,
    )


def list_job_results(
    job_id: str, *, failed_only: bool, page_size: int, policy: Policy
) -> Pager[JobItemResult]:
    """A job's item results, page by page; each page has the whole timeout, as the caller
    reads them at their own pace."""
    result_filter = (
        jobs_pb2.RESULT_FILTER_FAILED if failed_only else jobs_pb2.RESULT_FILTER_UNSPECIFIED
    )
    return Pager(
        "ListJobResults",
        lambda token: jobs_pb2.ListJobResultsRequest(
            job_id=job_id, page_size=page_size, page_token=token, filter=result_filter
        ),
        lambda response: (
            JobItemResult._from_proto(r, response.model, response.model_version)
            for r in response.results
        ),
        policy.deadline,
        policy.retries,
    )


# Single calls. Each deadline starts when the client starts running the program.


def get_model(name: str, policy: Policy) -> Program[Model]:
    request = models_pb2.GetModelRequest(model=name)
    return Model._from_proto(
        (yield from call("GetModel", request, policy.deadline(), policy.retries))
    )


def submit_job(request: jobs_pb2.SubmitJobRequest, policy: Policy) -> Program[Job]:
    """`request` carries its `request_id`, so every retry of it is the same submission."""
    return Job._from_proto(
        (yield from call("SubmitJob", request, policy.deadline(), policy.retries))
    )


def get_job(job_id: str, policy: Policy) -> Program[Job]:
    request = jobs_pb2.GetJobRequest(job_id=job_id)
    return Job._from_proto((yield from call("GetJob", request, policy.deadline(), policy.retries)))


def cancel_job(job_id: str, policy: Policy) -> Program[Job]:
    request = jobs_pb2.CancelJobRequest(job_id=job_id)
    return Job._from_proto(
        (yield from call("CancelJob", request, policy.deadline(), policy.retries))
    )


def delete_job(job_id: str, policy: Policy) -> Program[None]:
    request = jobs_pb2.DeleteJobRequest(job_id=job_id)
    yield from call("DeleteJob", request, policy.deadline(), policy.retries)


def watch_ended_by(error: PeritoError) -> bool:
    """Whether a `WatchJob` stream that ends in `error` ends quietly (the handle then asks
    `GetJob` and watches again) rather than raising: the connection was lost, or the
    stream's own time ran out (`WATCH_STREAM_S`)."""
    return isinstance(error, UnavailableError | DeadlineExceededError)


# How long one WatchJob stream runs before a job handle opens another: a server that stops
# answering without closing the connection (a frozen process, a host cut off) is noticed
# within it, not never.
WATCH_STREAM_S = 60.0
# How long a job handle's watch goes on trying a server that does not answer (a restart
# takes seconds) before it raises.
WATCH_PATIENCE_S = 120.0


@dataclass
class Reconnect:
    """When a job handle's watch tries the server again after it did not answer: 0.5 s,
    doubling to 5 s, for `patience_s` seconds since the last answer."""

    patience_s: float = WATCH_PATIENCE_S
    clock: Callable[[], float] = time.monotonic
    _since: float | None = dataclasses.field(default=None, init=False)
    _pause: float = dataclasses.field(default=0.5, init=False)

    def answered(self) -> None:
        """The server answered: patience and pauses start over."""
        self._since, self._pause = None, 0.5

    def pause(self, error: PeritoError, left: float | None) -> float:
        """Seconds to wait before trying again (at most `left`, the caller's time; None:
        unbounded).

        Raises:
            error: the server has not answered for `patience_s`.
        """
        now = self.clock()
        if self._since is None:
            self._since = now
        if now - self._since >= self.patience_s:
            raise error
        pause, self._pause = self._pause, min(self._pause * 2, 5.0)
        return pause if left is None else max(0.0, min(pause, left))


# Classify, split into parts.

OnInvalid: TypeAlias = Literal["fail", "skip"]
Outcome: TypeAlias = Classification | RejectedImage

# `images[3]` where the server writes one: at the start, or after a space or "(" (not
# inside a quoted id such as 'images[3].jpg').
_IMAGE_REF = re.compile(r"(?<![^\s(])images\[(\d+)\]")
_IMAGE_FIELD = re.compile(r"images\[(\d+)\](?:$|\.)")


def renumber(error: E, indexes: Sequence[int]) -> E:
    """`error` as if the caller's whole list had been sent in one call: `images[i]` in a
    part that held the caller's images `indexes` becomes `images[indexes[i]]`, in the message
    and in every violation's field and description."""

    def fix(text: str) -> str:
        def caller_index(match: re.Match[str]) -> str:
            i = int(match[1])
            return f"images[{indexes[i]}]" if i < len(indexes) else match[0]

        return _IMAGE_REF.sub(caller_index, text)

    message = fix(error.message)
    violations = tuple(
        FieldViolation(fix(v.field), fix(v.description), v.reason) for v in error.violations
    )
    if message == error.message and violations == error.violations:
        return error
    copy = type(error)(
        message, reason=error.reason, violations=violations, retry_after=error.retry_after
    )
    copy.code = error.code
    return copy


def rejected_images(
    error: InvalidArgumentError, image_ids: Mapping[int, str]
) -> dict[int, RejectedImage]:
    """The images of `image_ids` (caller index -> id) that `error`'s violations name one by
    one (`images[66]`, `images[66].id`), each with an error of its own. Violations about the
    request as a whole, or summarising images beyond the server's cap, name none."""
    named: dict[int, list[FieldViolation]] = {}
    for violation in error.violations:
        match = _IMAGE_FIELD.match(violation.field)
        if match and int(match[1]) in image_ids:
            named.setdefault(int(match[1]), []).append(violation)
    return {
        index: RejectedImage(
            image_id=image_ids[index],
            index=index,
            error=InvalidArgumentError(
                "; ".join(v.description for v in found) or error.message,
                reason=next((v.reason for v in found if v.reason), error.reason),
                violations=tuple(found),
            ),
        )
        for index, found in named.items()
    }


def _unsent(index: int, image_id: str, why: str) -> RejectedImage:
    """The outcome of an image the client could not send, named as the server names one."""
    field = f"images[{index}]"
    error = InvalidArgumentError(
        f"{field}: {why}",
        reason="IMAGE_NOT_SENT",
        violations=(FieldViolation(field, why),),
    )
    return RejectedImage(image_id=image_id, index=index, error=error)


def _check(on_invalid: str) -> None:
    if on_invalid not in ("fail", "skip"):
        raise ValueError(f"on_invalid must be 'fail' or 'skip', not {on_invalid!r}")


class SplitClassify:
    """One `classify` call: its images split into parts within `Limits`, a program per part,
    and how the parts' answers make one answer, in the caller's order and numbering.

    Every part, every retry and every resend shares one deadline, started when the call is
    planned: a part that waited for a free slot gets only what is left.

    `on_invalid="fail"`: a part refused with INVALID_ARGUMENT raises it, its `images[i]`
    renumbered to the caller's indexes. `"skip"`: a part refused because of some of its
    images is sent again without them (again if need be: the server names at most 16 bad
    images per answer), and each of them gets a `RejectedImage` in its place.
    """

    def __init__(
        self,
        template: classify_pb2.ClassifyRequest,
        parts: list[Part],
        policy: Policy,
        on_invalid: OnInvalid,
        unsent: Mapping[int, tuple[str, str]] | None = None,
    ) -> None:
        """`unsent`: the images the client could not send (index -> (id, why)): with
        "fail" the first is raised at once, with "skip" each is a `RejectedImage`.

        Raises:
            InvalidArgumentError: `on_invalid="fail"` and an image could not be sent, named
                `images[i]` (every such image a violation).
        """
        _check(on_invalid)
        self.template = template
        self.parts = parts
        self.on_invalid = on_invalid
        self.retries = policy.retries
        self.unsent = {
            index: _unsent(index, image_id, why)
            for index, (image_id, why) in (unsent or {}).items()
        }
        if self.unsent and on_invalid == "fail":
            first = self.unsent[min(self.unsent)].error
            violations = tuple(r.error.violations[0] for _, r in sorted(self.unsent.items()))
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise InvalidArgumentError(
                first.message + more, reason=first.reason, violations=violations
            )
        self.deadline = policy.deadline()

    @classmethod
    def plan(
        cls,
        images: Sequence[ImageInput],
        limits: Limits,
        policy: Policy,
        on_invalid: OnInvalid,
        **options: Unpack[ImageOptions],
    ) -> SplitClassify:
        """Encode and split the images; the call's deadline starts once they are ready."""
        _check(on_invalid)
        template, parts, unsent = classify_parts(images, limits=limits, **options)
        return cls(template, parts, policy, on_invalid, unsent)

    def programs(self) -> list[Program[list[Outcome]]]:
        """One program per part; each returns that part's outcomes in order."""
        return [self._part(part) for part in self.parts]

    def merge(self, answers: Iterable[list[Outcome]]) -> list[Outcome]:
        """The parts' outcomes (in part order) and the images not sent, as one list in the
        caller's order."""
        placed: dict[int, Outcome] = dict(self.unsent)
        for part, answer in zip(self.parts, answers, strict=True):
            placed.update(zip(part.indexes, answer, strict=True))
        return [placed[index] for index in sorted(placed)]

    def _request(self, images: Iterable[Any]) -> classify_pb2.ClassifyRequest:
        request = classify_pb2.ClassifyRequest()
        request.CopyFrom(self.template)
        request.images.extend(images)
        return request

    def _part(self, part: Part) -> Program[list[Outcome]]:
        ids = dict(zip(part.indexes, (image.id for image in part.images), strict=True))
        pending = list(range(len(part.images)))  # positions in the part still to classify
        rejected: dict[int, RejectedImage] = {}
        classified: dict[int, Classification] = {}
        while pending:
            indexes = [part.indexes[p] for p in pending]
            request = self._request(part.images[p] for p in pending)
            try:
                response = yield from call("Classify", request, self.deadline, self.retries)
            except InvalidArgumentError as error:
                renumbered = renumber(error, indexes)
                named = rejected_images(renumbered, {i: ids[i] for i in indexes})
                if self.on_invalid == "fail" or not named:
                    raise renumbered from None
                rejected.update(named)
                pending = [p for p in pending if part.indexes[p] not in named]
                continue
            if len(response.results) != len(indexes):
                raise InternalError(
                    f"the server answered {len(response.results)} results for {len(indexes)} images"
                )
            for index, result in zip(indexes, response.results, strict=True):
                found = Classification._from_proto(result, response.model, response.model_version)
                if not ids[index]:  # the server numbers unnamed images within the request
                    found = dataclasses.replace(found, image_id=str(index))
                classified[index] = found
            break
        return [classified[i] if i in classified else rejected[i] for i in part.indexes]
