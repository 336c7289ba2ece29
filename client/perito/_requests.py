"""Request building shared by `Client` and `AsyncClient`: no I/O on the network here."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, Required, TypedDict

import grpc

from perito._images import ImageInput, ImageInputError, encode_image, image_name
from perito.v1 import classify_pb2, image_pb2, jobs_pb2

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
# Obvious non-photos a folder may hold; the same rule as the server's listings
# (`perito_core.jobs.sources.is_ignored_key`), which the SDK cannot import.
_IGNORED_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
DEFAULT_TARGET = "localhost:8500"
# Batches of photos are far over gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Limits:
    """How `classify` splits many images into calls the server accepts.

    The defaults sit within the server's own defaults (64 images and 64 MiB per request).
    """

    max_images_per_request: int = 64
    max_request_bytes: int = 48 * 1024 * 1024
    # Calls in flight at once when one `classify` needs several.
    max_concurrent_requests: int = 4
    # Images per call when `classify(..., explain=True)`: the server's own default.
    max_explanations_per_request: int = 4


def model_ref(model: str, version: str) -> tuple[str, str]:
    """Accept `model="car-damage@production"` as well as `model=..., version=...`."""
    name, at, ref = model.partition("@")
    if at and version and version != ref:
        raise ValueError(f"model {model!r} names a version and version={version!r} another")
    return name, version or ref


class ImageOptions(TypedDict):
    """What `classify_parts` makes its requests of, besides the images and `limits`."""

    model: str
    version: str
    top_k: int
    confidence_threshold: float
    precision: NotRequired[str]
    quality_policy: NotRequired[str]
    quality_thresholds: NotRequired[Mapping[str, float] | None]
    explain: NotRequired[bool]
    routing_key: NotRequired[str]
    ids: Sequence[str] | None


class ClassifyOptions(TypedDict, total=False):
    """`classify`'s keyword arguments but `on_invalid` (its overloads differ in that alone);
    see `Client.classify`."""

    model: Required[str]
    version: str
    top_k: int
    confidence_threshold: float
    precision: str
    quality_policy: str
    quality_thresholds: Mapping[str, float] | None
    ids: Sequence[str] | None
    explain: bool
    routing_key: str
    timeout: float | None
    metadata: Metadata | None


@dataclass(frozen=True)
class Part:
    """Some of a `classify` call's images, sent as one request: `images[i]` is the caller's
    image number `indexes[i]`."""

    indexes: tuple[int, ...]
    images: tuple[image_pb2.Image, ...]


def classify_parts(
    images: Sequence[ImageInput],
    *,
    model: str,
    version: str,
    top_k: int,
    confidence_threshold: float,
    ids: Sequence[str] | None,
    limits: Limits,
    precision: str = "",
    quality_policy: str = "flag",
    quality_thresholds: Mapping[str, float] | None = None,
    explain: bool = False,
    routing_key: str = "",
) -> tuple[classify_pb2.ClassifyRequest, list[Part], dict[int, tuple[str, str]]]:
    """The request every part shares (no images yet), the images split into parts in
    order, each within `limits` (with `explain`, `limits.max_explanations_per_request`
    images at most), and the images that cannot be sent (index -> (id, why): a file that
    cannot be read, an array or a picture that cannot be encoded, one larger than a request
    carries).

    Raises:
        ValueError: a `quality_policy` other than "flag" or "refuse", or a key of
            `quality_thresholds` that is not a threshold (`QUALITY_THRESHOLDS`).
    """
    if type(images).__module__.startswith("numpy"):
        if getattr(images, "ndim", 0) != 4:  # one image's array would be cut into rows
            raise TypeError(
                "images must be a sequence: classify([array], ...) for one image, or a "
                "batch array [N, H, W, C]"
            )
        images = list(images)  # a batch [N, H, W, C]: its N images
    if isinstance(images, str | bytes | os.PathLike):
        raise TypeError("images must be a sequence: classify([image], ...)")
    if ids is not None and len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids for {len(images)} images")
    if len(images) == 0:
        raise ValueError("no images to classify")
    name, ref = model_ref(model, version)
    template = classify_pb2.ClassifyRequest(
        model=name,
        version=ref,
        top_k=top_k,
        confidence_threshold=confidence_threshold,
        precision=precision,
        quality_policy=_quality_policy(quality_policy),
        quality_thresholds=_quality_thresholds(quality_thresholds or {}),
        explain=explain,
        routing_key=routing_key,
    )
    most = limits.max_images_per_request
    if explain:
        most = min(most, limits.max_explanations_per_request)
    parts: list[tuple[list[int], list[image_pb2.Image]]] = []
    unsent: dict[int, tuple[str, str]] = {}
    size = 0
    for index, image in enumerate(images):
        image_id = ids[index] if ids is not None else image_name(image, index)
        try:
            content = encode_image(image)
        except ImageInputError as error:
            unsent[index] = (image_id, str(error))
            continue
        if len(content) > limits.max_request_bytes:
            unsent[index] = (
                image_id,
                f"{len(content):,} bytes, more than one request carries "
                f"({limits.max_request_bytes:,}, perito.Limits.max_request_bytes)",
            )
            continue
        full = parts and (
            len(parts[-1][0]) >= most or size + len(content) > limits.max_request_bytes
        )
        if not parts or full:
            parts.append(([], []))
            size = 0
        parts[-1][0].append(index)
        parts[-1][1].append(image_pb2.Image(id=image_id, content=content))
        size += len(content)
    return template, [Part(tuple(indexes), tuple(protos)) for indexes, protos in parts], unsent


QUALITY_POLICIES = {
    "flag": classify_pb2.QUALITY_POLICY_FLAG,
    "refuse": classify_pb2.QUALITY_POLICY_REFUSE,
}
QUALITY_THRESHOLDS = tuple(classify_pb2.QualityThresholds.DESCRIPTOR.fields_by_name)
"""The photo-quality thresholds a call may replace (docs/trust.md#quality)."""


def _quality_policy(policy: str) -> classify_pb2.QualityPolicy:
    try:
        return QUALITY_POLICIES[policy]
    except KeyError:
        raise ValueError(f"quality_policy must be 'flag' or 'refuse', not {policy!r}") from None


def _quality_thresholds(thresholds: Mapping[str, float]) -> classify_pb2.QualityThresholds:
    unknown = sorted(set(thresholds) - set(QUALITY_THRESHOLDS))
    if unknown:
        raise ValueError(
            f"quality_thresholds: {', '.join(unknown)} not among {', '.join(QUALITY_THRESHOLDS)}"
        )
    return classify_pb2.QualityThresholds(**thresholds)


def submit_request(
    source: str | os.PathLike[str] | Sequence[Any],
    *,
    model: str,
    version: str,
    output_uri: str,
    top_k: int,
    confidence_threshold: float,
    chunk_size: int,
    labels: dict[str, str] | None,
    inline: bool,
    ids: Sequence[str] | None = None,
    request_id: str | None = None,
    precision: str = "",
) -> jobs_pb2.SubmitJobRequest:
    """The SubmitJobRequest for `Client.submit_job`. It carries `request_id` (a new UUID if
    none is given), so the client's retries of this one request never make a second job."""
    name, ref = model_ref(model, version)
    request = jobs_pb2.SubmitJobRequest(
        request_id=request_id or str(uuid.uuid4()),
        model=name,
        version=ref,
        output_uri=output_uri,
        top_k=top_k,
        confidence_threshold=confidence_threshold,
        precision=precision,
        chunk_size=chunk_size,
        labels=labels or {},
    )
    _job_input(request, source, inline, ids)
    return request


def _job_input(
    request: jobs_pb2.SubmitJobRequest,
    source: str | os.PathLike[str] | Sequence[Any],
    inline: bool,
    ids: Sequence[str] | None,
) -> None:
    """Fill the request's input from what the caller gave (see `Client.submit_job`)."""
    if isinstance(source, str | os.PathLike):
        text = os.fspath(source)
        if not text.strip():  # Path("") is the working directory: never a job by accident
            raise ValueError("source is empty: name an s3:// prefix, a manifest or a folder")
        if text.startswith("s3://"):
            if text.lower().endswith(MANIFEST_SUFFIXES):
                request.manifest_uri = text
            else:
                request.prefix = text
            return
        path = Path(text)
        if path.is_dir() and inline:
            files = image_files(path)
            if not files:
                raise ValueError(f"no images under {path}")
            request.images.images.extend(
                image_pb2.Image(id=str(p.relative_to(path)), content=p.read_bytes()) for p in files
            )
        elif path.is_dir():
            request.prefix = os.path.abspath(path)  # a link kept as written
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            request.manifest_uri = os.path.abspath(path)
        else:
            raise ValueError(f"{text}: not a folder, a manifest (.csv/.jsonl) or an s3:// URI")
        return
    items = list(source)
    blank = next(
        (i for i, item in enumerate(items) if isinstance(item, str) and not item.strip()), None
    )
    if blank is not None:
        raise ValueError(f"source[{blank}] is empty: name an s3:// URI or a file")
    if ids is not None and len(ids) != len(items):
        raise ValueError(f"{len(ids)} ids for {len(items)} images")
    if all(isinstance(item, str) and (item.startswith("s3://") or not inline) for item in items):
        request.uris.uris.extend(
            item if item.startswith("s3://") else os.path.abspath(item) for item in items
        )
    else:
        request.images.images.extend(
            image_pb2.Image(
                id=ids[index] if ids is not None else image_name(item, index),
                content=encode_image(item),
            )
            for index, item in enumerate(items)
        )


def image_files(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted, except hidden ones (a part starting with `.`) and
    `Thumbs.db`, `ehthumbs.db`, `desktop.ini`. The server decides by content what is an image
    (HEIC, AVIF, MPO, `.jfif` ... included), and a file that is not one fails with its reason:
    nothing is skipped by its name."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name.lower() not in _IGNORED_NAMES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def call_metadata(token: str | None, metadata: Metadata | None) -> Metadata | None:
    """The caller's metadata plus the bearer token, if the client has one."""
    if token is None:
        return metadata
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


def channel_options() -> list[tuple[str, Any]]:
    """The client's channel options: messages as large as the server takes; a server that
    went away tried again from 0.2 s, at most 5 s apart (gRPC's default: 1 s, growing to 2
    minutes, so a restarted server stayed unreachable for seconds, past the client's
    retries); and connections of its own (gRPC shares them between channels to one address
    by default, so a new client inherited another's wait before its next connection try)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]


def channel_credentials(
    tls: bool, root_certificates: bytes | str | os.PathLike[str] | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials (the system's roots, or the given CA bundle), or None for plaintext."""
    if root_certificates is None and not tls:
        return None
    roots: bytes | None
    if isinstance(root_certificates, str | os.PathLike):
        roots = Path(root_certificates).read_bytes()
    else:
        roots = root_certificates
    return grpc.ssl_channel_credentials(root_certificates=roots)
