"""The synchronous client."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from perito._errors import UnavailableError, from_rpc_error
from perito._images import ImageInput
from perito._jobs import Job, JobHandle, JobItemResult
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
from perito.v1 import jobs_pb2, models_pb2, service_pb2_grpc

ResponseT = TypeVar("ResponseT")


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

    def _call(
        self,
        method: Callable[..., ResponseT],
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> ResponseT:
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        metadata = call_metadata(self._token, metadata)
        attempt = 0
        while True:
            try:
                return method(
                    request, timeout=max(deadline - time.monotonic(), 0.001), metadata=metadata
                )
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            wait = retry_wait(error, attempt)
            if wait is None or attempt >= self.max_retries or time.monotonic() + wait >= deadline:
                raise error
            time.sleep(wait)
            attempt += 1

    def classify(
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
            timeout: seconds for the whole call, all its parts and retries included.

        Raises:
            InvalidArgumentError: a bad image (see `violations`) or argument.
            NotFoundError: unknown model or version.
            ResourceExhaustedError, UnavailableError: after retries ran out.
        """
        requests = classify_requests(
            images,
            model=model,
            version=version,
            top_k=top_k,
            confidence_threshold=confidence_threshold,
            ids=ids,
            limits=self.limits,
        )
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        results: list[Classification] = []
        for request in requests:
            response = self._call(
                self._stub.Classify, request, max(deadline - time.monotonic(), 0.001), metadata
            )
            results += [
                Classification._from_proto(result, response.model, response.model_version)
                for result in response.results
            ]
        return results

    def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> list[Model]:
        """Every model in the server's registry, with its versions and aliases."""
        models: list[Model] = []
        token = ""
        while True:
            request = models_pb2.ListModelsRequest(page_token=token)
            response = self._call(self._stub.ListModels, request, timeout, metadata)
            models += [Model._from_proto(m) for m in response.models]
            token = response.next_page_token
            if not token:
                return models

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
        job = Job._from_proto(self._call(self._stub.SubmitJob, request, timeout, metadata))
        return JobHandle(self, job)

    def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job."""
        return JobHandle(self, self.get_job(job_id))

    def get_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Job:
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        return Job._from_proto(self._call(self._stub.GetJob, request, timeout, metadata))

    def cancel_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Job:
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        return Job._from_proto(self._call(self._stub.CancelJob, request, timeout, metadata))

    def delete_job(
        self, job_id: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> None:
        """Delete a job's record and item results now (cancelling it first if it is still
        running); its results files stay. Raises NotFoundError for an unknown job."""
        request = jobs_pb2.DeleteJobRequest(job_id=job_id)
        self._call(self._stub.DeleteJob, request, timeout, metadata)

    def _watch_job(self, job_id: str) -> Iterator[Job]:
        try:
            stream = self._stub.WatchJob(
                jobs_pb2.WatchJobRequest(job_id=job_id), metadata=call_metadata(self._token, None)
            )
            for message in stream:
                yield Job._from_proto(message)
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            if not isinstance(error, UnavailableError):
                raise error from None

    def _job_results(
        self, job_id: str, *, failed_only: bool, page_size: int
    ) -> Iterator[JobItemResult]:
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
            response = self._call(self._stub.ListJobResults, request, None, None)
            yield from (JobItemResult._from_proto(r) for r in response.results)
            token = response.next_page_token
            if not token:
                return

    def get_model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Model:
        """One model with every version's model card."""
        request = models_pb2.GetModelRequest(model=name)
        return Model._from_proto(self._call(self._stub.GetModel, request, timeout, metadata))
