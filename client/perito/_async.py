"""The asyncio client: `Client`'s methods, awaited, over `grpc.aio`. What each call does is in
`perito._core`; this class performs its steps (`_run`), and sends the parts of a split
`classify` concurrently."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import grpc
import grpc.aio

from perito import _core
from perito._core import OnInvalid, Pager, Policy, Program, Send
from perito._errors import PeritoError, from_rpc_error
from perito._images import ImageInput
from perito._jobs import AsyncJobHandle
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


class AsyncClient:
    """A connection to a Perito server for asyncio code; arguments as for `Client`.

    A large `classify` is split into several calls sent concurrently
    (`limits.max_concurrent_requests` at once).

    Example:
        >>> async with AsyncClient("localhost:8500") as client:
        ...     [result] = await client.classify(["claim-123.jpg"], model="car-damage")
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
        channel: grpc.aio.Channel | None = None,
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
                grpc.aio.secure_channel(target, credentials, options=channel_options())
                if credentials is not None
                else grpc.aio.insecure_channel(target, options=channel_options())
            )
        self._channel = channel
        self._stub = service_pb2_grpc.PeritoStub(channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)

    def _policy(self, timeout: float | None) -> Policy:
        return Policy(self.timeout if timeout is None else timeout, self.max_retries)

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
                    method = getattr(self._stub, step.method)
                    reply = await method(step.request, timeout=step.timeout, metadata=metadata)
                except grpc.RpcError as rpc_error:
                    error = from_rpc_error(rpc_error)
            else:
                await asyncio.sleep(step.seconds)

    async def _pages(self, pager: Pager[T], metadata: Metadata | None) -> AsyncIterator[T]:
        while (page := pager.next_page()) is not None:
            for item in await self._run(page, metadata):
                yield item

    @overload
    async def classify(
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
    async def classify(
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

    async def classify(
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
        """Classify images now; results in the order given. See `Client.classify`.

        The parts of a split call are sent `limits.max_concurrent_requests` at a time, all
        within the one `timeout`; when one fails (with `on_invalid="fail"`, or any other
        error) the others are cancelled and its error is raised.
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
        gate = asyncio.Semaphore(self.limits.max_concurrent_requests)

        async def send(program: Program[list[_core.Outcome]]) -> list[_core.Outcome]:
            async with gate:
                return await self._run(program, metadata)

        return split.merge(await _all_or_none([send(p) for p in split.programs()]))

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
        chunk_size: int = 0,
        labels: dict[str, str] | None = None,
        inline: bool = False,
        ids: Sequence[str] | None = None,
        upload_to: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncJobHandle:
        """Submit a bulk job; returns a handle to follow it. See `Client.submit_job`."""
        if upload_to is not None:
            if not isinstance(source, str | os.PathLike):
                raise TypeError("upload_to needs a local folder as the source")
            source = await asyncio.to_thread(upload_folder, source, upload_to)
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
        """Your jobs (your tenant's), newest first, a page at a time: `async for`.

        Raises:
            ValueError: an unknown state name.
            UnauthenticatedError, PermissionDeniedError: no token, or no `jobs` role.
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
        """Snapshots of a job as it progresses; see `Client.watch_job`."""
        stream = self._stub.WatchJob(
            jobs_pb2.WatchJobRequest(job_id=job_id),
            timeout=timeout,
            metadata=call_metadata(self._token, metadata),
        )
        try:
            async for message in stream:
                yield Job._from_proto(message)
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            if not _core.watch_ended_by(error):
                raise error from None

    async def list_job_results(
        self,
        job_id: str,
        *,
        failed_only: bool = False,
        page_size: int = 1000,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[JobItemResult]:
        """Every item's result in input order (or only the failures), page by page; see
        `Client.list_job_results`."""
        pager = _core.list_job_results(
            job_id, failed_only=failed_only, page_size=page_size, policy=self._policy(timeout)
        )
        async for result in self._pages(pager, metadata):
            yield result


async def _all_or_none(calls: Sequence[Awaitable[R]]) -> list[R]:
    """Every call's result in order; when one fails, the others are cancelled (and awaited,
    so none is left running or with an unread error) and its error is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
