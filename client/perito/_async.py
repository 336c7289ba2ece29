"""The asyncio client, `AsyncClient` over `grpc.aio`, and its `AsyncJobHandle`.

This file is also the source of the synchronous `Client` and `JobHandle`:
`scripts/gen_sync_client.py` writes `perito/_client.py` from it with `unasync` (no `async`,
no `await`, `grpc` for `grpc.aio`, `perito._concurrency`'s blocking twins), and a unit test
fails when that file is stale. What each call does (requests, the deadline of a split call,
retries, pages) is in `perito._core`; the clients perform its steps (`_run`).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, Unpack, overload

import grpc
import grpc.aio

from perito import _core
from perito._concurrency import (
    async_loop_key,
    async_map_all,
    async_run_blocking,
    async_sleep,
    async_time_limit,
)
from perito._core import OnInvalid, Pager, Policy, Program, Send
from perito._errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    PeritoError,
    UnavailableError,
    from_rpc_error,
)
from perito._images import ImageInput
from perito._jobs import JobTimeoutError
from perito._models import Classification, Job, JobItemResult, JobState, Model, RejectedImage
from perito._progress import ProgressBar
from perito._requests import (
    DEFAULT_TARGET,
    ClassifyOptions,
    Limits,
    Metadata,
    call_metadata,
    channel_credentials,
    channel_options,
    submit_request,
)
from perito._upload import upload_folder
from perito.v1 import jobs_pb2, service_pb2_grpc

R = TypeVar("R")
T = TypeVar("T")


class AsyncClient:
    """A connection to a Perito server.

    Args:
        target: `host:port` of the server.
        timeout: default deadline in seconds for each call.
        max_retries: how often a call is retried on UNAVAILABLE, or on RESOURCE_EXHAUSTED when
            the server sent a retry hint; waits back off exponentially (0.1 s doubling to
            2 s), or follow the hint. Once the server has answered this client, UNAVAILABLE
            is retried beyond it for up to 30 s within the call's timeout (a restart); a
            server never reached gets only `max_retries`. 0: no retry at all.
        tls: connect with TLS, verified against the system's CA roots.
        root_certificates: a CA bundle (PEM bytes or a file path) to verify the server with;
            implies TLS.
        token: sent as `authorization: Bearer <token>` on every call.
        limits: how a large `classify` is split into several calls (sent concurrently by the
            asyncio client, `limits.max_concurrent_requests` at once).
        channel: a ready channel to use instead of opening one (tests, custom setups).

    Use as a context manager (`async with`), or call `close()`.

    Example:
        >>> async with AsyncClient("localhost:8500") as client:
        ...     [result] = await client.classify(["claim-123.jpg"], model="car-damage")
        ...     print(result.label, result.probability, result.uncertain)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        max_retries: int = 3,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        token: str | None = None,
        limits: Limits | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = _core.seconds(timeout)
        self.max_retries = max_retries
        self.limits = limits or Limits()
        self._token = token
        self._owns_channel = channel is None
        self._credentials = channel_credentials(tls, root_certificates)
        self._channel = channel
        self._stub: Any = None if channel is None else service_pb2_grpc.PeritoStub(channel)  # type: ignore[no-untyped-call]
        self._loop = 0  # the event loop the channel belongs to (0: none yet, or sync)
        self._closed = False
        self._answered = False  # whether the server has answered a call of this client

    def _connected(self) -> Any:
        """The stub over this client's channel, opened on first use: an `AsyncClient` made
        outside any event loop (at import, as a web app's global) opens it in the loop that
        first uses it.

        Raises:
            FailedPreconditionError: the client is closed, or (`AsyncClient`) used from
                another event loop than the one it first ran in.
        """
        if self._closed:
            raise FailedPreconditionError("this client is closed: make a new one")
        loop = async_loop_key()
        if self._stub is None:
            self._channel = (
                grpc.aio.secure_channel(self.target, self._credentials, options=channel_options())
                if self._credentials is not None
                else grpc.aio.insecure_channel(self.target, options=channel_options())
            )
            self._stub = service_pb2_grpc.PeritoStub(self._channel)  # type: ignore[no-untyped-call]
            self._loop = loop
        elif self._owns_channel and self._loop and loop != self._loop:
            raise FailedPreconditionError(
                "this AsyncClient belongs to the event loop it first ran in; make one "
                "AsyncClient per event loop (asyncio.run makes a new loop each time)"
            )
        return self._stub

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (if this client opened it); calls after this raise
        FailedPreconditionError. Closing twice is harmless."""
        self._closed = True
        if self._owns_channel and self._channel is not None:
            self._stub = None
            await self._channel.close(None)
            self._channel = None

    def _policy(self, timeout: float | None) -> Policy:
        return Policy(
            self.timeout if timeout is None else _core.seconds(timeout),
            self.max_retries,
            # A server that has answered and stops is likely restarting: wait for it.
            patience_s=_core.RESTART_PATIENCE_S if self._answered else 0.0,
        )

    async def _run(self, program: Program[R], metadata: Metadata | None) -> R:
        """Perform a program's steps (see `perito._core`) until it returns or raises."""
        metadata = call_metadata(self._token, metadata)
        reply: Any = None
        error: PeritoError | None = None
        while True:
            try:
                step = program.send(reply) if error is None else program.throw(error)
            except StopIteration as stop:
                result: R = stop.value
                return result
            reply, error = None, None
            if isinstance(step, Send):
                try:
                    method = getattr(self._connected(), step.method)
                    reply = await method(step.request, timeout=step.timeout, metadata=metadata)
                    self._answered = True
                except grpc.RpcError as rpc_error:
                    error = from_rpc_error(rpc_error)
            else:
                await async_sleep(step.seconds)

    async def _pages(self, pager: Pager[T], metadata: Metadata | None) -> AsyncIterator[T]:
        while (page := pager.next_page()) is not None:
            for item in await self._run(page, metadata):
                yield item

    @overload
    async def classify(
        self,
        images: Sequence[ImageInput],
        *,
        on_invalid: Literal["fail"] = "fail",
        **options: Unpack[ClassifyOptions],
    ) -> list[Classification]: ...

    @overload
    async def classify(
        self,
        images: Sequence[ImageInput],
        *,
        on_invalid: Literal["skip"],
        **options: Unpack[ClassifyOptions],
    ) -> list[Classification | RejectedImage]: ...

    async def classify(
        self,
        images: Sequence[ImageInput],
        *,
        model: str,
        version: str = "",
        top_k: int = 5,
        confidence_threshold: float = 0.0,
        precision: str = "",
        quality_policy: str = "flag",
        quality_thresholds: Mapping[str, float] | None = None,
        ids: Sequence[str] | None = None,
        on_invalid: OnInvalid = "fail",
        explain: bool = False,
        routing_key: str = "",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[Classification] | list[Classification | RejectedImage]:
        """Classify images now; results come back in the order given.

        Args:
            images: file paths, encoded bytes, PIL images or numpy arrays (HxWx3 uint8). Many
                images are sent as several calls within `limits`, results still in order (the
                asyncio client sends `limits.max_concurrent_requests` of them at once, and
                cancels the others when one fails).
            model: the model's name, or `name@version` / `name@alias`.
            version: a version number or alias; "" means latest.
            top_k: classes to return per image.
            confidence_threshold: top-1 probability under which a result is `uncertain`;
                0 uses the model's recommended threshold, if it has one.
            precision: which form of the version answers. "" (the default): the server's
                setting, a preference, never refused. "auto": the fastest verified form.
                "fp32", "bf16", "int8", "torchscript" (the reference model.pt): a requirement,
                that precision answers or the call is refused, never answered by another
                form. Each result's `form` says which answered. The rule, as a table:
                docs/models.md#precision.
            quality_policy: what a photo the quality gate finds poor (blurry, under- or
                overexposed, too small, blank) does: "flag" (the default): it is answered,
                its `quality.issues` name the problems; "refuse": it is a bad image (reason
                `POOR_QUALITY`, its issues in the message), never sent to the model, as
                `on_invalid` says. docs/trust.md#quality.
            quality_thresholds: thresholds that replace the model card's for this call, by
                name: `min_sharpness`, `max_dark_fraction`, `max_bright_fraction`,
                `min_brightness`, `max_brightness`, `min_resolution`, `min_contrast`.
            ids: your ids for the images; default: file names, or positions.
            on_invalid: what a bad image (undecodable, truncated, too large) does. "fail"
                (the default): the call raises `InvalidArgumentError` naming the bad images
                by their index in `images` (`images[66]`), however the call was split: those
                of the first part refused (a call over `limits` goes in parts; the parts not
                yet answered are cancelled, so a later part's bad images may be unnamed).
                "skip": the call returns one entry per image, a `RejectedImage` (with its
                `error`) in place of each bad image's `Classification`, every bad image
                named; the others are classified.
            explain: also return each image's `explanation`: a heat map of where the model
                looked for its top-1 class, with `explanation.save("x.png")` to write its
                overlay (50 forward passes per image, run after plain requests; sent
                `limits.max_explanations_per_request` images per call).
            routing_key: keeps calls on one version while the alias has a canary: every call
                with the same key (a claim id, say) is answered by the same version, so one
                claim is never graded by two. "" (the default): each call is drawn at random.
                At most 256 characters. Each result's `model_version` names the version that
                answered. docs/models.md#canary.
            timeout: seconds for the whole call, all its parts and retries included.

        Raises:
            InvalidArgumentError: a bad image (see `violations`) or argument (a `precision`
                not in the list above, or less exact than the server's setting; a
                `routing_key` over 256 characters).
            FailedPreconditionError: the version has no form of the `precision` asked that
                runs there (reason `PRECISION_UNAVAILABLE`; the message lists its forms).
            NotFoundError: unknown model or version.
            DeadlineExceededError: `timeout` ran out.
            ResourceExhaustedError, UnavailableError: after retries ran out.
            ValueError: a `quality_policy` other than "flag" or "refuse", or an unknown name
                in `quality_thresholds`.

        Example:
            >>> results = await client.classify(photos, model="car-damage", on_invalid="skip")
            >>> bad = [r for r in results if r.error]  # RejectedImage: r.index, r.error
        """
        split = _core.SplitClassify.plan(
            images,
            self.limits,
            self._policy(timeout),
            on_invalid,
            model=model,
            version=version,
            top_k=top_k,
            confidence_threshold=confidence_threshold,
            precision=precision,
            quality_policy=quality_policy,
            quality_thresholds=quality_thresholds,
            explain=explain,
            routing_key=routing_key,
            ids=ids,
        )
        answers = await async_map_all(
            lambda program: self._run(program, metadata),
            split.programs(),
            self.limits.max_concurrent_requests,
        )
        return split.merge(answers)

    async def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> list[Model]:
        """Every model in the server's registry, with its versions and aliases."""
        return [m async for m in self._pages(_core.list_models(self._policy(timeout)), metadata)]

    async def get_model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Model:
        """One model with every version's model card."""
        return await self._run(_core.get_model(name, self._policy(timeout)), metadata)

    async def submit_job(
        self,
        source: str | os.PathLike[str] | Sequence[Any],
        *,
        model: str,
        version: str = "",
        output_uri: str = "",
        top_k: int = 5,
        confidence_threshold: float = 0.0,
        precision: str = "",
        chunk_size: int = 0,
        labels: dict[str, str] | None = None,
        inline: bool = False,
        ids: Sequence[str] | None = None,
        upload_to: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncJobHandle:
        """Submit a bulk job; returns a handle to follow it.

        Args:
            source: an `s3://bucket/prefix/`, an `s3://` or local CSV / JSONL manifest, a local
                folder (read by the workers, which must have it under a local root), or a list
                of URIs. With `inline=True`, a local folder's files or a list of images (paths,
                bytes, PIL images, arrays) are sent in the request instead.
            model, version: the model; the version is resolved now and pinned for the job.
            output_uri: where the results files go (default: the server's results location).
            precision: which form answers every image, as in `classify` ("": the workers'
                setting): a precision named is honoured or the submission refused
                (`FailedPreconditionError`, reason `PRECISION_UNAVAILABLE`, from the version's
                forms), never run by another form.
            ids: your ids for a list of images sent inline (default: file names or positions).
            upload_to: an `s3://bucket/prefix/` to upload a local folder's images to first (with
                boto3, `pip install 'perito[s3]'`); the job then reads them from there.
            request_id: makes the call idempotent (Google AIP-155): the same id within 24 h
                returns the job the first call made. Default: a new UUID for this call, reused
                by its own retries, so a retry after a lost answer never makes a second job.

        Example:
            >>> job = await client.submit_job("s3://inspections/garage-7/", model="cracks")
            >>> await job.wait()
            >>> failures = [r async for r in job.results(failed_only=True)]
        """
        if upload_to is not None:
            if not isinstance(source, str | os.PathLike):
                raise TypeError("upload_to needs a local folder as the source")
            source = await async_run_blocking(upload_folder, source, upload_to)
        request = submit_request(
            source,
            model=model,
            version=version,
            output_uri=output_uri,
            top_k=top_k,
            confidence_threshold=confidence_threshold,
            chunk_size=chunk_size,
            labels=labels,
            inline=inline,
            ids=ids,
            request_id=request_id,
            precision=precision,
        )
        job = await self._run(_core.submit_job(request, self._policy(timeout)), metadata)
        return AsyncJobHandle(self, job)

    def list_jobs(
        self,
        *,
        states: Iterable[JobState | str] = (),
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[Job]:
        """Your jobs (your tenant's; nobody else's are ever listed), newest first, fetched a
        page at a time as you iterate (`async for`).

        Args:
            states: only jobs in one of these states (`JobState` or its name).
            labels: only jobs carrying every one of these labels.
            page_size: jobs per request (0: the server's default, 100).

        Raises:
            ValueError: an unknown state name.
            UnauthenticatedError, PermissionDeniedError: no token, or no `jobs` role.

        Example:
            >>> running = [j async for j in client.list_jobs(states=["running"])]
        """
        pager = _core.list_jobs(
            states=states, labels=labels, page_size=page_size, policy=self._policy(timeout)
        )
        return self._pages(pager, metadata)

    async def job(self, job_id: str) -> AsyncJobHandle:
        """A handle on an existing job."""
        return AsyncJobHandle(self, await self.get_job(job_id))

    async def get_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Job:
        return await self._run(_core.get_job(job_id, self._policy(timeout)), metadata)

    async def cancel_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Job:
        return await self._run(_core.cancel_job(job_id, self._policy(timeout)), metadata)

    async def delete_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> None:
        """Delete a job's record and item results now (cancelling it first if it is still
        running); its results files stay. Raises NotFoundError for an unknown job."""
        await self._run(_core.delete_job(job_id, self._policy(timeout)), metadata)

    async def watch_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> AsyncIterator[Job]:
        """Snapshots of a job as it progresses (at least one a second while it runs), until
        the terminal one. The stream ends early, without an error, if the connection breaks
        (`AsyncJobHandle.watch` then reconnects). `timeout`: none by default, jobs run for
        hours."""
        try:
            stream = self._connected().WatchJob(
                jobs_pb2.WatchJobRequest(job_id=job_id),
                timeout=timeout,
                metadata=call_metadata(self._token, metadata),
            )
            async for message in stream:
                yield Job._from_proto(message)
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            if not _core.watch_ended_by(error):
                raise error from None

    def list_job_results(
        self,
        job_id: str,
        *,
        failed_only: bool = False,
        page_size: int = 1000,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[JobItemResult]:
        """Every item's result in input order (or only the failures), fetched page by page
        as you iterate; `timeout` is for each page."""
        pager = _core.list_job_results(
            job_id, failed_only=failed_only, page_size=page_size, policy=self._policy(timeout)
        )
        return self._pages(pager, metadata)


class AsyncJobHandle:
    """Follow and control one job: `status()`, `wait()`, `watch()`, `results()`, `cancel()`."""

    def __init__(self, client: AsyncClient, job: Job) -> None:
        self._client = client
        self.id = job.id
        self.last = job

    def __repr__(self) -> str:
        job = self.last
        return f"AsyncJobHandle({self.id!r}, state={job.state.value}, {job.done}/{job.total})"

    async def status(self) -> Job:
        self.last = await self._client.get_job(self.id)
        return self.last

    async def watch(self, *, timeout: float | None = None) -> AsyncIterator[Job]:
        """Snapshots as the job progresses (at least one a second while it runs), ending with
        the terminal one, or quietly once `timeout` seconds have passed (None: no end).

        Each `WatchJob` stream runs at most a minute (`_core.WATCH_STREAM_S`) before another
        is opened, so a server that stops answering without closing the connection is
        noticed; a stream that breaks, or a server that cannot be reached (a restart), is
        tried again, 0.5 s then up to 5 s apart, for two minutes (`_core.WATCH_PATIENCE_S`).

        Raises:
            UnavailableError, DeadlineExceededError: the server did not answer for two
                minutes.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        reconnect = _core.Reconnect()
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            stream_s = _core.WATCH_STREAM_S if left is None else min(_core.WATCH_STREAM_S, left)
            try:
                async for job in self._client.watch_job(self.id, timeout=stream_s):
                    reconnect.answered()
                    self.last = job
                    yield job
                    if job.terminal:
                        return
                left = None if deadline is None else deadline - time.monotonic()
                latest = await self._client.get_job(
                    self.id, timeout=None if left is None else max(left, _core.MIN_TIMEOUT)
                )
            except (UnavailableError, DeadlineExceededError) as error:
                await async_sleep(reconnect.pause(error, left))
                continue
            reconnect.answered()
            self.last = latest
            if latest.terminal:
                yield latest
                return

    async def wait(self, timeout: float | None = None, *, progress: bool = False) -> Job:
        """Wait until the job is done; returns its final snapshot.

        Args:
            timeout: seconds to wait at most (the job is not cancelled when they run out).
            progress: draw a progress bar on stderr.

        Raises:
            JobTimeoutError: `timeout` seconds passed first.
        """
        bar = ProgressBar() if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout

        async def follow() -> Job:
            async for job in self.watch(timeout=timeout):
                if bar is not None:
                    bar.update(job)
                if job.terminal:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError
            raise TimeoutError  # the watch ended at `timeout`

        try:
            return await async_time_limit(follow(), timeout)
        except TimeoutError:
            job = self.last
            raise JobTimeoutError(
                f"job {self.id} not done after {timeout}s: {job.done}/{job.total}"
            ) from None

    def results(
        self, *, failed_only: bool = False, page_size: int = 1000
    ) -> AsyncIterator[JobItemResult]:
        """Every item's result in input order (or only the failures), fetched page by page."""
        return self._client.list_job_results(self.id, failed_only=failed_only, page_size=page_size)

    async def cancel(self) -> Job:
        """Cancel: items not yet classified are marked cancelled; returns the job as it stands."""
        self.last = await self._client.cancel_job(self.id)
        return self.last
