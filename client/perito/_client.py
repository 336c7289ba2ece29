"""The synchronous client."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from perito._errors import PeritoError, ResourceExhaustedError, UnavailableError, from_rpc_error
from perito._images import ImageInput, encode_image, image_name
from perito._models import Classification, Model
from perito.v1 import classify_pb2, image_pb2, models_pb2, service_pb2_grpc

DEFAULT_TARGET = "localhost:8500"
# Batches of photos are far over gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Metadata = Sequence[tuple[str, str]]
ResponseT = TypeVar("ResponseT")


class Client:
    """A connection to a Perito server.

    Args:
        target: `host:port` of the server.
        timeout: default deadline in seconds for each call.
        max_retries: how often a call is retried on UNAVAILABLE, or on RESOURCE_EXHAUSTED when
            the server sent a retry hint; waits back off exponentially, or follow the hint.
        channel: a ready channel to use instead of opening one (tests, custom TLS setups).

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
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.max_retries = max_retries
        self._owns_channel = channel is None
        self._channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
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
        attempt = 0
        while True:
            try:
                return method(
                    request, timeout=max(deadline - time.monotonic(), 0.001), metadata=metadata
                )
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            wait = _retry_wait(error, attempt)
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
            images: file paths, encoded bytes, PIL images or numpy arrays (HxWx3 uint8).
            model: the model's name.
            version: a version number or alias; "" means latest.
            top_k: classes to return per image.
            confidence_threshold: top-1 probability under which a result is `uncertain`;
                0 uses the model's recommended threshold, if it has one.
            ids: your ids for the images; default: file names, or positions.

        Raises:
            InvalidArgumentError: a bad image (see `violations`) or argument.
            NotFoundError: unknown model or version.
            ResourceExhaustedError, UnavailableError: after retries ran out.
        """
        if isinstance(images, str | bytes):
            raise TypeError("images must be a sequence: classify([image], ...)")
        if ids is not None and len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        request = classify_pb2.ClassifyRequest(
            model=model, version=version, top_k=top_k, confidence_threshold=confidence_threshold
        )
        for index, image in enumerate(images):
            image_id = ids[index] if ids is not None else image_name(image, index)
            request.images.append(image_pb2.Image(id=image_id, content=encode_image(image)))
        response = self._call(self._stub.Classify, request, timeout, metadata)
        return [
            Classification._from_proto(result, response.model, response.model_version)
            for result in response.results
        ]

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

    def get_model(
        self, name: str, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Model:
        """One model with every version's model card."""
        request = models_pb2.GetModelRequest(model=name)
        return Model._from_proto(self._call(self._stub.GetModel, request, timeout, metadata))


def _retry_wait(error: PeritoError, attempt: int) -> float | None:
    """Seconds to wait before retrying `error`, or None when it must not be retried."""
    if isinstance(error, ResourceExhaustedError) and error.retry_after is not None:
        hint: float = error.retry_after
        return hint * (1 + random.random() * 0.2)
    if isinstance(error, UnavailableError):
        return min(2.0, 0.1 * 2.0**attempt) * (0.5 + random.random())
    return None
