"""The synchronous client: blocking grpc calls, no event loop. What each call does is in
`perito._core`; this class performs its steps (`_run`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import grpc

from perito import _core
from perito._core import OnInvalid, Pager, Policy, Program, Send
from perito._errors import PeritoError, from_rpc_error
from perito._images import ImageInput
from perito._jobs import JobHandle
from perito._models import Classification, Job, JobItemResult, JobState, Model, RejectedImage
from perito._requests import (
    DEFAULT_TARGET,
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


class Client:
    """A connection to a Perito server.

    Args:
        target: `host:port` of the server.
        timeout: default deadline in seconds for each call.
        max_retries: how often a call is retried on UNAVAILABLE, or on RESOURCE_EXHAUSTED when
            the server sent a retry hint; waits back off exponentially, or follow the hint.
        tls: connect with TLS, verified against the system's CA roots.
        root_certificates: a CA bundle (PEM bytes or a file path) to verify the server with;
            implies TLS.
        token: sent as `authorization: Bearer <token>` on every call.
        limits: how a large `classify` is split into several calls.
        channel: a ready channel to use instead of opening one (tests, custom setups).

    Use as a context manager, or call `close()`.

    Example:
        >>> with Client("localhost:8500") as client:
        ...     [result] = client.classify(["claim-123.jpg"], model="car-damage")
        ...     print(result.label, result.probability, result.uncertain)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        token: str | None = None,
        limits: Limits | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.max_retries = max_retries
        self.limits = limits or Limits()
        self._token = token
        self._owns_channel = channel is None
        if channel is None:
            credentials = channel_credentials(tls, root_certificates)
            channel = (
                grpc.secure_channel(target, credentials, options=channel_options())
                if credentials is not None
                else grpc.insecure_channel(target, options=channel_options())
            )
        self._channel = channel
        self._stub = service_pb2_grpc.PeritoStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def _policy(self, timeout: float | None) -> Policy:
        return Policy(self.timeout if timeout is None else timeout, self.max_retries)

    def _run(self, program: Program[R], metadata: Metadata | None) -> R:
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
                    method = getattr(self._stub, step.method)
                    reply = method(step.request, timeout=step.timeout, metadata=metadata)
                except grpc.RpcError as rpc_error:
                    error = from_rpc_error(rpc_error)
            else:
                time.sleep(step.seconds)

    def _pages(self, pager: Pager[T], metadata: Metadata | None) -> Iterator[T]:
        while (page := pager.next_page()) is not None:
            yield from self._run(page, metadata)

    @overload
    def classify(
        self,
        images: Sequence[ImageInput],
        *,
        model: str,
        version: str = "",
        top_k: int = 5,
        confidence_threshold: float = 0.0,
        ids: Sequence[str] | None = None,
        on_invalid: Literal["fail"] = "fail",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[Classification]: ...

    @overload
    def classify(
        self,
        images: Sequence[ImageInput],
        *,
        model: str,
        version: str = "",
        top_k: int = 5,
        confidence_threshold: float = 0.0,
        ids: Sequence[str] | None = None,
        on_invalid: Literal["skip"],
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[Classification | RejectedImage]: ...

    def classify(
        self,
        images: Sequence[ImageInput],
        *,
        model: str,
        version: str = "",
        top_k: int = 5,
        confidence_threshold: float = 0.0,
        ids: Sequence[str] | None = None,
        on_invalid: OnInvalid = "fail",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[Classification] | list[Classification | RejectedImage]:
        """Classify images now; results come back in the order given.

        Args:
            images: file paths, encoded bytes, PIL images or numpy arrays (HxWx3 uint8). Many
                images are sent as several calls within `limits`, results still in order.
            model: the model's name, or `name@version` / `name@alias`.
            version: a version number or alias; "" means latest.
            top_k: classes to return per image.
            confidence_threshold: top-1 probability under which a result is `uncertain`;
                0 uses the model's recommended threshold, if it has one.
            ids: your ids for the images; default: file names, or positions.
            on_invalid: what a bad image (undecodable, truncated, too large) does. "fail"
                (the default): the call raises `InvalidArgumentError` naming each bad image
                by its index in `images` (`images[66]`), however the call was split. "skip":
                the call returns one entry per image, a `RejectedImage` (with its `error`)
                in place of each bad image's `Classification`; the others are classified.
            timeout: seconds for the whole call, all its parts and retries included.

        Raises:
            InvalidArgumentError: a bad image (see `violations`) or argument.
            NotFoundError: unknown model or version.
            DeadlineExceededError: `timeout` ran out.
            ResourceExhaustedError, UnavailableError: after retries ran out.

        Example:
            >>> results = client.classify(photos, model="car-damage", on_invalid="skip")
            >>> bad = [r for r in results if r.error]  # RejectedImage: r.index, r.error
        """
        split = _core.SplitClassify.plan(
            images,
            model=model,
            version=version,
            top_k=top_k,
            confidence_threshold=confidence_threshold,
            ids=ids,
            limits=self.limits,
            policy=self._policy(timeout),
            on_invalid=on_invalid,
        )
        return split.merge([self._run(program, metadata) for program in split.programs()])

    def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> list[Model]:
        """Every model in the server's registry, with its versions and aliases."""
        return list(self._pages(_core.list_models(self._policy(timeout)), metadata))

    def get_model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Model:
        """One model with every version's model card."""
        return self._run(_core.get_model(name, self._policy(timeout)), metadata)

    def submit_job(
        self,
        source: str | os.PathLike[str] | Sequence[Any],
        *,
        model: str,
        version: str = "",
        output_uri: str = "",
        top_k: int = 5,
        confidence_threshold: float = 0.0,
        chunk_size: int = 0,
        labels: dict[str, str] | None = None,
        inline: bool = False,
        ids: Sequence[str] | None = None,
        upload_to: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> JobHandle:
        """Submit a bulk job; returns a handle to follow it.

        Args:
            source: an `s3://bucket/prefix/`, an `s3://` or local CSV / JSONL manifest, a local
                folder (read by the workers, which must have it under a local root), or a list
                of URIs. With `inline=True`, a local folder's files or a list of images (paths,
                bytes, PIL images, arrays) are sent in the request instead.
            model, version: the model; the version is resolved now and pinned for the job.
            output_uri: where the results files go (default: the server's results location).
            ids: your ids for a list of images sent inline (default: file names or positions).
            upload_to: an `s3://bucket/prefix/` to upload a local folder's images to first (with
                boto3, `pip install 'perito[s3]'`); the job then reads them from there.
            request_id: makes the call idempotent (Google AIP-155): the same id within 24 h
                returns the job the first call made. Default: a new UUID for this call, reused
                by its own retries, so a retry after a lost answer never makes a second job.

        Example:
            >>> job = client.submit_job("s3://inspections/garage-7/", model="cracks")
            >>> job.wait()
            >>> failures = list(job.results(failed_only=True))
        """
        if upload_to is not None:
            if not isinstance(source, str | os.PathLike):
                raise TypeError("upload_to needs a local folder as the source")
            source = upload_folder(source, upload_to)
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
        )
        job = self._run(_core.submit_job(request, self._policy(timeout)), metadata)
        return JobHandle(self, job)

    def list_jobs(
        self,
        *,
        states: Iterable[JobState | str] = (),
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Iterator[Job]:
        """Your jobs (your tenant's; nobody else's are ever listed), newest first, fetched a
        page at a time as you iterate.

        Args:
            states: only jobs in one of these states (`JobState` or its name).
            labels: only jobs carrying every one of these labels.
            page_size: jobs per request (0: the server's default, 100).

        Raises:
            ValueError: an unknown state name.
            UnauthenticatedError, PermissionDeniedError: no token, or no `jobs` role.

        Example:
            >>> running = list(client.list_jobs(states=["running"], labels={"site": "7"}))
        """
        pager = _core.list_jobs(
            states=states, labels=labels, page_size=page_size, policy=self._policy(timeout)
        )
        return self._pages(pager, metadata)

    def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job."""
        return JobHandle(self, self.get_job(job_id))

    def get_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Job:
        return self._run(_core.get_job(job_id, self._policy(timeout)), metadata)

    def cancel_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Job:
        return self._run(_core.cancel_job(job_id, self._policy(timeout)), metadata)

    def delete_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> None:
        """Delete a job's record and item results now (cancelling it first if it is still
        running); its results files stay. Raises NotFoundError for an unknown job."""
        self._run(_core.delete_job(job_id, self._policy(timeout)), metadata)

    def watch_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Iterator[Job]:
        """Snapshots of a job as it progresses (at least one a second while it runs), until
        the terminal one. The stream ends early, without an error, if the connection breaks
        (`JobHandle.watch` then reconnects). `timeout`: none by default, jobs run for hours."""
        try:
            stream = self._stub.WatchJob(
                jobs_pb2.WatchJobRequest(job_id=job_id),
                timeout=timeout,
                metadata=call_metadata(self._token, metadata),
            )
            for message in stream:
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
    ) -> Iterator[JobItemResult]:
        """Every item's result in input order (or only the failures), fetched page by page
        as you iterate; `timeout` is for each page."""
        pager = _core.list_job_results(
            job_id, failed_only=failed_only, page_size=page_size, policy=self._policy(timeout)
        )
        return self._pages(pager, metadata)
