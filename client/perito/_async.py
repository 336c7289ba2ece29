"""The asyncio client: `Client`'s methods, awaited, over `grpc.aio`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from perito._errors import UnavailableError, from_rpc_error
from perito._images import ImageInput
from perito._jobs import AsyncJobHandle, Job, JobItemResult
from perito._models import Classification, Model
from perito._requests import (
    DEFAULT_TARGET,
    Limits,
    Metadata,
    call_metadata,
    channel_credentials,
    channel_options,
    classify_requests,
    retry_wait,
    submit_request,
)
from perito._upload import upload_folder
from perito.v1 import classify_pb2, jobs_pb2, models_pb2, service_pb2_grpc

ResponseT = TypeVar("ResponseT")


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

    async def _call(
        self,
        method: Callable[..., Awaitable[ResponseT]],
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> ResponseT:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        metadata = call_metadata(self._token, metadata)
        attempt = 0
        while True:
            try:
                return await method(
                    request, timeout=max(deadline - time.monotonic(), 0.001), metadata=metadata
                )
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            wait = retry_wait(error, attempt)
            if wait is None or attempt >= self.max_retries or time.monotonic() + wait >= deadline:
                raise error
            await asyncio.sleep(wait)
            attempt += 1

    async def classify(
        self,
        images: Sequence[ImageInput],
        *,
        model: str,
        version: str = "",
        top_k: int = 5,
        confidence_threshold: float = 0.0,
        ids: Sequence[str] | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[Classification]:
        """Classify images now; results in the order given. See `Client.classify`."""
        requests = classify_requests(
            images,
            model=model,
            version=version,
            top_k=top_k,
            confidence_threshold=confidence_threshold,
            ids=ids,
            limits=self.limits,
        )
        budget = self.timeout if timeout is None else timeout
        gate = asyncio.Semaphore(self.limits.max_concurrent_requests)

        async def send(request: classify_pb2.ClassifyRequest) -> list[Classification]:
            async with gate:
                response = await self._call(self._stub.Classify, request, budget, metadata)
            return [
                Classification._from_proto(result, response.model, response.model_version)
                for result in response.results
            ]

        parts = await asyncio.gather(*(send(request) for request in requests))
        return [result for part in parts for result in part]

    async def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> list[Model]:
        """Every model in the server's registry, with its versions and aliases."""
        models: list[Model] = []
        token = ""
        while True:
            request = models_pb2.ListModelsRequest(page_token=token)
            response = await self._call(self._stub.ListModels, request, timeout, metadata)
            models += [Model._from_proto(m) for m in response.models]
            token = response.next_page_token
            if not token:
                return models

    async def get_model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Model:
        """One model with every version's model card."""
        request = models_pb2.GetModelRequest(model=name)
        return Model._from_proto(await self._call(self._stub.GetModel, request, timeout, metadata))

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
        job = Job._from_proto(await self._call(self._stub.SubmitJob, request, timeout, metadata))
        return AsyncJobHandle(self, job)

    async def job(self, job_id: str) -> AsyncJobHandle:
        """A handle on an existing job."""
        return AsyncJobHandle(self, await self.get_job(job_id))

    async def get_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Job:
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        return Job._from_proto(await self._call(self._stub.GetJob, request, timeout, metadata))

    async def cancel_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Job:
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        return Job._from_proto(await self._call(self._stub.CancelJob, request, timeout, metadata))

    async def delete_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> None:
        """Delete a job's record and item results now (cancelling it first if it is still
        running); its results files stay. Raises NotFoundError for an unknown job."""
        request = jobs_pb2.DeleteJobRequest(job_id=job_id)
        await self._call(self._stub.DeleteJob, request, timeout, metadata)

    async def _watch_job(self, job_id: str) -> AsyncIterator[Job]:
        stream = self._stub.WatchJob(
            jobs_pb2.WatchJobRequest(job_id=job_id), metadata=call_metadata(self._token, None)
        )
        try:
            async for message in stream:
                yield Job._from_proto(message)
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            if not isinstance(error, UnavailableError):
                raise error from None

    async def _job_results(
        self, job_id: str, *, failed_only: bool, page_size: int
    ) -> AsyncIterator[JobItemResult]:
        token = ""
        while True:
            request = jobs_pb2.ListJobResultsRequest(
                job_id=job_id,
                page_size=page_size,
                page_token=token,
                filter=jobs_pb2.RESULT_FILTER_FAILED
                if failed_only
                else jobs_pb2.RESULT_FILTER_UNSPECIFIED,
            )
            response = await self._call(self._stub.ListJobResults, request, None, None)
            for result in response.results:
                yield JobItemResult._from_proto(result)
            token = response.next_page_token
            if not token:
                return
