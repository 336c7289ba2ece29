"""The SDK's core (`perito._core`) run by hand: no network, a fake clock. Splitting, the
deadline budget across attempts and parts, the retry decision, pagination, and the
renumbering and merging of split calls with bad images."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import pytest

import perito
from perito import _core
from perito._core import Deadline, Policy, Program, Send, Sleep
from perito._errors import FieldViolation, UnavailableError
from perito._requests import Part, classify_parts
from perito.v1 import classify_pb2, jobs_pb2, models_pb2
from tests.helpers import FakeClock

R = TypeVar("R")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drive(
    program: Program[R], answer: Callable[[Send], Any], clock: Clock
) -> tuple[R, list[Send], list[float]]:
    """Run a program as a client would: `answer` plays the server (returns a response or
    raises a PeritoError), a `Sleep` moves the fake clock. Returns the program's result,
    the attempts it sent and the waits it asked for."""
    sends: list[Send] = []
    sleeps: list[float] = []
    reply: Any = None
    error: perito.PeritoError | None = None
    while True:
        try:
            step = program.send(reply) if error is None else program.throw(error)
        except StopIteration as stop:
            return stop.value, sends, sleeps
        reply, error = None, None
        if isinstance(step, Sleep):
            sleeps.append(step.seconds)
            clock.now += step.seconds
        else:
            sends.append(step)
            try:
                reply = answer(step)
            except perito.PeritoError as raised:
                error = raised


def failing(*errors: perito.PeritoError, then: Any = "ok") -> Callable[[Send], Any]:
    """A server that fails with `errors` in turn, then answers `then`."""
    queue = list(errors)

    def answer(step: Send) -> Any:
        if queue:
            raise queue.pop(0)
        return then

    return answer


def call(
    answer: Callable[[Send], Any],
    clock: Clock,
    deadline: Deadline,
    max_retries: int = 3,
    patience_s: float = 0.0,
) -> tuple[Any, list[Send], list[float]]:
    """One `_core.call` within `deadline`, driven against `answer` (which RPC it is does not
    matter to the retry loop)."""
    retries = _core.Retries(max_retries, patience_s, clock)
    return drive(_core.call("GetJob", models_pb2.Model(), deadline, retries), answer, clock)


# Splitting.

# What the split calls below ask for, beside their images.
REQUEST: dict[str, Any] = {"model": "m", "version": "", "top_k": 5, "confidence_threshold": 0.0}


def _split(images: list[bytes], ids: list[str] | None = None, **limits: int) -> list[Part]:
    _, parts, _ = classify_parts(
        images,
        **REQUEST,
        ids=ids,
        limits=perito.Limits(**limits),
    )
    return parts


def _split_call(
    images: list[bytes],
    on_invalid: _core.OnInvalid,
    per_request: int = 4,
    clock: Callable[[], float] = time.monotonic,
) -> _core.SplitClassify:
    """A split call of `per_request` images a part, with 10 s in all and no retries."""
    return _core.SplitClassify.plan(
        images,
        **REQUEST,
        ids=None,
        limits=perito.Limits(max_images_per_request=per_request),
        policy=Policy(timeout=10.0, max_retries=0, clock=clock),
        on_invalid=on_invalid,
    )


def test_images_are_split_by_count_in_order() -> None:
    parts = _split([b"x"] * 70, max_images_per_request=64)
    assert [len(p.images) for p in parts] == [64, 6]
    assert parts[1].indexes == tuple(range(64, 70))
    assert [image.id for image in parts[1].images] == [str(i) for i in range(64, 70)]


def test_images_are_split_by_bytes() -> None:
    parts = _split([b"a" * 40, b"b" * 40, b"c" * 40, b"d" * 90], max_request_bytes=100)
    assert [p.indexes for p in parts] == [(0, 1), (2,), (3,)]


def test_the_request_every_part_shares() -> None:
    template, [part], _ = classify_parts(
        [b"x"],
        model="car-damage@production",
        version="",
        top_k=3,
        confidence_threshold=0.7,
        ids=["claim-1"],
        limits=perito.Limits(),
    )
    assert (template.model, template.version, template.top_k) == ("car-damage", "production", 3)
    assert not template.images and part.images[0].id == "claim-1"


@pytest.mark.parametrize(
    ("images", "ids", "error"),
    [("photo.jpg", None, TypeError), ([b"x"], ["a", "b"], ValueError), ([], None, ValueError)],
)
def test_bad_arguments_are_refused_before_anything_is_sent(
    images: Any, ids: list[str] | None, error: type[Exception]
) -> None:
    with pytest.raises(error):
        _split(images, ids)


# The retry decision.


def test_unavailable_backs_off_exponentially_up_to_two_seconds() -> None:
    error = perito.UnavailableError("down")
    waits = [_core.retry_wait(error, attempt, rand=lambda: 0.5) for attempt in range(7)]
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert _core.retry_wait(error, 0, rand=lambda: 0.0) == pytest.approx(0.05)


def test_resource_exhausted_is_retried_only_with_the_servers_hint() -> None:
    hinted = perito.ResourceExhaustedError("queue full", retry_after=0.5)
    assert _core.retry_wait(hinted, 0, rand=lambda: 1.0) == pytest.approx(0.6)
    assert _core.retry_wait(perito.ResourceExhaustedError("message too large"), 0) is None


@pytest.mark.parametrize(
    "error",
    [
        perito.InvalidArgumentError("bad"),
        perito.NotFoundError("no model"),
        perito.DeadlineExceededError("late"),
        perito.InternalError("bug"),
        perito.UnauthenticatedError("token"),
    ],
)
def test_other_errors_are_not_retried(error: perito.PeritoError) -> None:
    assert _core.retry_wait(error, 0) is None
    clock = Clock()
    with pytest.raises(type(error)):
        call(failing(error), clock, Deadline.after(10, clock))


def test_a_call_is_retried_at_most_max_retries_times() -> None:
    clock = Clock()
    down = perito.UnavailableError("down")
    result, sends, sleeps = call(failing(down, down, down), clock, Deadline.after(30, clock))
    assert result == "ok" and len(sends) == 4 and len(sleeps) == 3
    with pytest.raises(perito.UnavailableError):
        call(failing(down, down, down), clock, Deadline.after(30, clock), max_retries=2)


def test_a_server_that_answered_before_is_waited_for_within_the_patience_and_deadline() -> None:
    """Once the server has answered, UNAVAILABLE is tried again past `max_retries` for the
    patience (a restart), never past the call's deadline, and not at all with 0 retries."""
    down = perito.UnavailableError("down")
    clock = Clock()
    result, sends, sleeps = call(
        failing(*[down] * 9), clock, Deadline.after(60, clock), patience_s=30.0
    )
    assert result == "ok" and len(sends) == 10 and 5 < sum(sleeps) < 30
    clock = Clock()
    with pytest.raises(perito.UnavailableError):
        call(failing(*[down] * 100), clock, Deadline.after(60, clock), patience_s=30.0)
    assert 27 <= clock.now - 100 < 30  # the fake clock starts at 100
    clock = Clock()
    with pytest.raises(perito.UnavailableError):
        call(failing(*[down] * 100), clock, Deadline.after(10, clock), patience_s=30.0)
    assert clock.now - 100 <= 10
    clock = Clock()
    with pytest.raises(perito.UnavailableError):
        call(failing(down), clock, Deadline.after(60, clock), max_retries=0, patience_s=30.0)
    # Only UNAVAILABLE: a hinted RESOURCE_EXHAUSTED still stops at max_retries.
    full = perito.ResourceExhaustedError("queue full", retry_after=0.5)
    clock = Clock()
    with pytest.raises(perito.ResourceExhaustedError):
        call(failing(*[full] * 5), clock, Deadline.after(60, clock), patience_s=30.0)


# The deadline budget.


def test_each_attempt_gets_what_is_left_of_the_calls_deadline() -> None:
    clock = Clock()

    def slow_then_ok(step: Send) -> Any:
        clock.now += 1.0  # each attempt takes a second
        if len(attempts) < 2:
            attempts.append(step.timeout)
            raise perito.ResourceExhaustedError("full", retry_after=0.5)
        attempts.append(step.timeout)
        return "ok"

    attempts: list[float] = []
    result, _, sleeps = call(slow_then_ok, clock, Deadline.after(5.0, clock))
    assert result == "ok"
    # 5 s in all: the second attempt starts after 1 s + its wait, the third after two each.
    assert attempts[0] == pytest.approx(5.0)
    assert attempts[1] == pytest.approx(5.0 - 1.0 - sleeps[0])
    assert attempts[2] == pytest.approx(5.0 - 2.0 - sleeps[0] - sleeps[1])


def test_no_retry_waits_past_the_deadline() -> None:
    clock = Clock()
    error = perito.ResourceExhaustedError("full", retry_after=3.0)
    with pytest.raises(perito.ResourceExhaustedError):
        call(failing(error), clock, Deadline.after(2.0, clock))


def test_an_expired_deadline_raises_without_sending() -> None:
    clock = Clock()
    deadline = Deadline.after(1.0, clock)
    clock.now += 1.5
    with pytest.raises(perito.DeadlineExceededError):
        call(failing(), clock, deadline)


def _response(request: classify_pb2.ClassifyRequest) -> classify_pb2.ClassifyResponse:
    return classify_pb2.ClassifyResponse(
        model="m",
        model_version="1",
        results=[
            classify_pb2.Classification(
                image_id=image.id,
                predictions=[classify_pb2.Prediction(label="ok", probability=0.9)],
            )
            for image in request.images
        ],
    )


def test_the_parts_of_a_split_call_share_one_deadline() -> None:
    """Sent one after the other (as `Client` does, or `AsyncClient` when parts wait for a
    slot), each part gets what the earlier ones left."""
    clock = Clock()
    split = _split_call([b"a", b"b", b"c"], "fail", per_request=1, clock=clock)
    timeouts = []

    def two_seconds(step: Send) -> Any:
        timeouts.append(step.timeout)
        clock.now += 2.0
        return _response(step.request)  # type: ignore[arg-type]

    answers = [drive(program, two_seconds, clock)[0] for program in split.programs()]
    assert timeouts == [10.0, 8.0, 6.0]
    assert [r.image_id for r in split.merge(answers)] == ["0", "1", "2"]
    clock.now += 5.0  # a fourth part would start past the deadline
    with pytest.raises(perito.DeadlineExceededError):
        drive(split._part(split.parts[0]), two_seconds, clock)


# Pagination.


def test_pages_are_fetched_until_the_server_says_the_last() -> None:
    clock = Clock()
    pages = {"": (["a", "b"], "t2"), "t2": (["c"], "t3"), "t3": ([], "")}
    tokens: list[str] = []

    def answer(step: Send) -> Any:
        token = step.request.page_token  # type: ignore[attr-defined]
        tokens.append(token)
        names, following = pages[token]
        clock.now += 1.0
        return models_pb2.ListModelsResponse(
            models=[models_pb2.Model(name=n) for n in names], next_page_token=following
        )

    pager = _core.list_models(Policy(timeout=10.0, max_retries=0, clock=clock))
    names, timeouts = [], []
    while (page := pager.next_page()) is not None:
        models, sends, _ = drive(page, answer, clock)
        names += [m.name for m in models]
        timeouts += [s.timeout for s in sends]
    assert names == ["a", "b", "c"] and tokens == ["", "t2", "t3"]
    assert timeouts == [10.0, 9.0, 8.0]  # one deadline for the whole listing


def test_job_results_pages_each_get_the_whole_timeout() -> None:
    clock = Clock()
    pager = _core.list_job_results(
        "job", failed_only=True, page_size=2, policy=Policy(5.0, 0, clock=clock)
    )
    requests: list[jobs_pb2.ListJobResultsRequest] = []

    def answer(step: Send) -> Any:
        requests.append(step.request)  # type: ignore[arg-type]
        clock.now += 3.0
        return jobs_pb2.ListJobResultsResponse(next_page_token="" if len(requests) > 1 else "2")

    timeouts = []
    while (page := pager.next_page()) is not None:
        timeouts += [s.timeout for s in drive(page, answer, clock)[1]]
    assert timeouts == [5.0, 5.0]  # the caller reads pages at their own pace
    assert [r.page_token for r in requests] == ["", "2"]
    assert requests[0].filter == jobs_pb2.RESULT_FILTER_FAILED and requests[0].page_size == 2


# Split calls with bad images: the caller's indexes, and "skip".


def test_violations_are_renumbered_to_the_callers_indexes() -> None:
    error = perito.InvalidArgumentError(
        "images[3] (id 'p67.jpg'): truncated (and 1 more)",
        reason="INVALID_IMAGE",
        violations=(
            FieldViolation("images[3]", "images[3] (id 'p67.jpg'): truncated"),
            FieldViolation("images[5].id", "images[5].id: too long"),
            FieldViolation("images", "... and 2 more (images[6] to images[7])"),
        ),
    )
    fixed = _core.renumber(error, [64, 65, 66, 67, 68, 69, 70, 71])
    assert isinstance(fixed, perito.InvalidArgumentError) and fixed.reason == "INVALID_IMAGE"
    assert fixed.message == "images[67] (id 'p67.jpg'): truncated (and 1 more)"
    assert [v.field for v in fixed.violations] == ["images[67]", "images[69].id", "images"]
    assert fixed.violations[2].description == "... and 2 more (images[70] to images[71])"
    assert fixed.code == grpc.StatusCode.INVALID_ARGUMENT
    # An id that looks like a field is the caller's own text, left alone.
    quoted = perito.InvalidArgumentError("images[1] (id 'images[1].jpg'): truncated")
    assert _core.renumber(quoted, [5, 6]).message == "images[6] (id 'images[1].jpg'): truncated"
    # Nothing to renumber: the same error.
    assert _core.renumber(error, range(8)) is error


def test_rejected_images_are_those_named_one_by_one() -> None:
    error = perito.InvalidArgumentError(
        "images[66]: truncated",
        reason="INVALID_IMAGE",
        violations=(
            FieldViolation("images[66]", "images[66] (id 'a'): truncated"),
            FieldViolation("images[66].id", "images[66].id: too long"),
            FieldViolation("images", "... and 3 more (images[67] to images[69])"),
            FieldViolation("top_k", "must be positive"),
        ),
    )
    rejected = _core.rejected_images(error, {66: "a", 67: "b"})
    assert list(rejected) == [66]
    assert rejected[66].image_id == "a" and rejected[66].index == 66
    assert [v.field for v in rejected[66].error.violations] == ["images[66]", "images[66].id"]
    assert "truncated" in rejected[66].error.message


class BadImages:
    """A server that refuses images whose content is b"bad", naming at most `cap` of them
    (then one summary violation), as the real one does."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.requests: list[list[str]] = []

    def __call__(self, step: Send) -> Any:
        request: classify_pb2.ClassifyRequest = step.request  # type: ignore[assignment]
        self.requests.append([image.id for image in request.images])
        bad = [i for i, image in enumerate(request.images) if image.content == b"bad"]
        if not bad:
            return _response(request)
        violations = [FieldViolation(f"images[{i}]", f"images[{i}]: truncated") for i in bad]
        if len(bad) > self.cap:
            rest = bad[self.cap :]
            violations = [
                *violations[: self.cap],
                FieldViolation("images", f"... and {len(rest)} more"),
            ]
        raise perito.InvalidArgumentError(violations[0].description, violations=tuple(violations))


def test_fail_raises_with_the_callers_indexes() -> None:
    images = [b"ok"] * 10
    images[6] = images[7] = b"bad"
    split = _split_call(images, "fail")
    server = BadImages(cap=16)
    clock = Clock()
    drive(split.programs()[0], server, clock)
    with pytest.raises(perito.InvalidArgumentError) as caught:
        drive(split.programs()[1], server, clock)
    assert [v.field for v in caught.value.violations] == ["images[6]", "images[7]"]
    assert caught.value.message.startswith("images[6]")


def test_skip_resends_without_the_bad_images_until_the_part_passes() -> None:
    images = [b"ok"] * 12
    bad = [4, 5, 6, 9, 11]
    for i in bad:
        images[i] = b"bad"
    split = _split_call(images, "skip")
    server = BadImages(cap=2)  # names two at a time: the part [4..7] needs three tries
    clock = Clock()
    results = split.merge(drive(p, server, clock)[0] for p in split.programs())
    assert len(results) == 12
    assert [i for i, r in enumerate(results) if r.error] == bad
    assert [r.index for r in results if isinstance(r, perito.RejectedImage)] == bad
    assert all(isinstance(r, perito.Classification) for i, r in enumerate(results) if i not in bad)
    assert [r.image_id for r in results] == [str(i) for i in range(12)]
    assert server.requests == [
        ["0", "1", "2", "3"],
        ["4", "5", "6", "7"],
        ["6", "7"],
        ["7"],
        ["8", "9", "10", "11"],
        ["8", "10"],
    ]


def test_skip_still_fails_on_errors_that_name_no_image() -> None:
    split = _split_call([b"ok"], "skip")

    def refuse(step: Send) -> Any:
        raise perito.InvalidArgumentError(
            "top_k: must be positive", violations=(FieldViolation("top_k", "must be positive"),)
        )

    with pytest.raises(perito.InvalidArgumentError, match="top_k"):
        drive(split.programs()[0], refuse, Clock())


def test_a_part_of_only_bad_images_is_all_rejected() -> None:
    split = _split_call([b"bad", b"bad"], "skip")
    [results] = [drive(p, BadImages(cap=16), Clock())[0] for p in split.programs()]
    assert [type(r) for r in results] == [perito.RejectedImage] * 2


def test_on_invalid_is_checked() -> None:
    with pytest.raises(ValueError, match="on_invalid"):
        _split_call([b"ok"], "ignore")  # type: ignore[arg-type]


def test_no_deadline_is_none_or_infinity_and_nan_is_refused() -> None:
    """`Client(timeout=None)` raised TypeError at call time, and an infinite timeout reached
    gRPC, which answered DEADLINE_EXCEEDED at once."""
    assert _core.seconds(None) == _core.seconds(float("inf")) == float("inf")
    assert _core.seconds(2) == 2.0
    assert _core.grpc_timeout(float("inf")) is None and _core.grpc_timeout(2.5) == 2.5
    with pytest.raises(ValueError, match="NaN"):
        _core.seconds(float("nan"))
    program = _core.call("GetJob", jobs_pb2.GetJobRequest(job_id="j"), Deadline(float("inf")), 0)
    step = next(program)
    assert isinstance(step, Send) and step.timeout is None


def test_a_watch_tries_an_unanswering_server_again_for_its_patience_then_raises() -> None:
    clock = FakeClock()
    reconnect = _core.Reconnect(patience_s=12.6, clock=clock)
    error = UnavailableError("gone")
    pauses = []
    for _ in range(5):
        pauses.append(reconnect.pause(error, None))
        clock.now += pauses[-1]
    assert pauses == [0.5, 1.0, 2.0, 4.0, 5.0]
    assert reconnect.pause(error, 0.2) == 0.2  # never past the caller's own time
    clock.now += 0.2
    with pytest.raises(UnavailableError):
        reconnect.pause(error, None)  # 12.7 s without an answer
    reconnect.answered()
    assert reconnect.pause(error, None) == 0.5  # an answer starts it over
