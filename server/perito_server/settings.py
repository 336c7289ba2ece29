"""Server settings: flags or `PERITO_*` environment variables, built once in `main()`."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from perito_core.prediction_log import duration_seconds
from perito_core.settings import CommonSettings


class ServerSettings(CommonSettings):
    """Everything `perito serve` can be told. Environment: `PERITO_<FIELD>`."""

    # Where the server listens: gRPC on `host`:`port`; the health port and HTTP on the same
    # host; `/metrics` on `metrics_host` (unset: `host`). A host is an IPv4 or IPv6 literal
    # (`::1` or `[::1]`) or a name (`localhost`: 127.0.0.1 and ::1); `0.0.0.0` and `::` are
    # every interface (gRPC's wildcard socket takes IPv4 and IPv6 both). Without tenants every
    # one of them must be loopback unless `insecure` is set.
    host: str = "127.0.0.1"
    port: int = Field(8500, ge=0, le=65535, description="0 picks a free port")
    metrics_host: str | None = Field(None, description="interface of /metrics; unset: host")
    optimize_models: bool = True
    preload: list[str] = Field(default_factory=list, description="NAME[@VERSION] to load at start")
    alias_ttl_s: float = Field(
        5.0,
        ge=0,
        description="how often aliases in use are re-read (0: never, pinned at first use)",
    )

    # The most images a batch may hold, for every model: each loaded form runs at the size it
    # measures up to this (`preferred_batch_size`; on 2 CPU cores EfficientNet-Lite0's
    # TorchScript keeps 4, ONNX Runtime INT8 forms gain up to 8); GPUs want more (16-64).
    max_batch_size: int = Field(8, ge=1)
    # Each loaded form's own batch size (Triton's `preferred_batch_size`), at most
    # `max_batch_size`: `auto` times the form's forward pass at load, on its model thread, at
    # 1, 2, 4, ... and `max_batch_size` (a second or two), and keeps the smallest size within
    # 3% of the best images/s (a bigger batch only adds latency; perito_core.models.batching);
    # an integer sets it for every form without measuring. Logged at load and exported as
    # `perito_preferred_batch_size` beside the measured `perito_forward_images_per_second`.
    preferred_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    max_queue_delay_ms: float = Field(2.0, ge=0)
    max_queue_size: int = Field(256, ge=1, description="images admitted and not yet answered")
    max_images_per_request: int = Field(64, ge=1)
    # Each explained image costs `perito_core.explain.Occlusion().passes` (50) forward passes,
    # run at low priority (docs/trust.md#explanations); 0 refuses `explain`.
    max_explanations_per_request: int = Field(
        4, ge=0, description="images a Classify call may ask `explain` for"
    )
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # HTTP/2 keepalive on the gRPC port, as Triton's --grpc-keepalive-* and --grpc-http2-*
    # flags (gRPC core's defaults; docs/operations.md): the server's own pings to idle
    # clients (off unless set), and how often clients may ping it. A client pinging more
    # often than `grpc_http2_min_recv_ping_interval_without_data_ms` while no call is open, or
    # at all without `grpc_keepalive_permit_without_calls`, is sent GOAWAY "too_many_pings"
    # after `grpc_http2_max_ping_strikes` such pings.
    grpc_keepalive_time_ms: int | None = Field(None, ge=1000)
    grpc_keepalive_timeout_ms: int = Field(20_000, ge=1)
    grpc_keepalive_permit_without_calls: bool = False
    grpc_http2_max_pings_without_data: int = Field(2, ge=0)
    grpc_http2_min_recv_ping_interval_without_data_ms: int = Field(300_000, ge=0)
    grpc_http2_max_ping_strikes: int = Field(2, ge=0)
    # Encoded bytes, not decoded pixels: the serialized size of every admitted `Classify`
    # request, server-wide, until it is answered. It is known before any work is done (decoded
    # sizes are not, until each header is read), it is what grows with callers (gRPC holds each
    # request message until its call ends), and decoded memory is already bounded by images
    # (`max_queue_size` model inputs of fixed size, `decode_threads` full-size decodes at a
    # time). Keep it at least `max_message_bytes`, or the largest requests never fit.
    max_queue_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="encoded request bytes admitted and not yet answered, server-wide",
    )
    # gRPC's own bound on calls in progress at once (every method, health checks included);
    # beyond it gRPC answers RESOURCE_EXHAUSTED itself, without a retry hint. Keep it well
    # above the callers the queues admit, so overload is shed by `max_queue_size` /
    # `max_queue_bytes` (with a hint) and probes still get through.
    max_concurrent_rpcs: int = Field(1000, ge=1, description="calls in progress at once")
    # WatchJob streams one tenant may hold open on this server at once (each reads the job
    # from Redis four times a second and holds one of `max_concurrent_rpcs`): past it,
    # RESOURCE_EXHAUSTED (QUOTA_CONCURRENT_WATCHES) with a retry hint, so no tenant can take
    # the whole call budget from the others.
    max_watches_per_tenant: int = Field(16, ge=1, description="WatchJob streams per tenant")
    # Calls in progress at once per tenant, gRPC calls and HTTP requests together, counted
    # from a call's arrival, before its message or body is read (`auth.CallSlots`): past it,
    # RESOURCE_EXHAUSTED / 429 (QUOTA_CONCURRENT_CALLS) with a retry hint, so that no tenant
    # holds the whole of `max_concurrent_rpcs`. Without tenants (one anonymous caller) the
    # share is the whole.
    max_calls_per_tenant: int = Field(256, ge=1, description="calls in progress per tenant")
    # Calls that need no token (health checks, reflection, OIP liveness and readiness) at
    # once; probes belong on `health_port`, which has its own calls.
    max_open_calls: int = Field(64, ge=1, description="calls without a token at once")
    # Seconds a unary call's request message may take to arrive once the call is open (a
    # 64 MiB request at 20 Mbit/s takes about 27 s); past it, DEADLINE_EXCEEDED. An HTTP
    # request's headers, and then its body, have as long each (408).
    request_arrival_s: float = Field(60.0, gt=0, description="for a request message to arrive")
    default_top_k: int = Field(5, ge=1)

    results_uri: str = Field("./var/results", description="default output location of jobs")
    # Each chunk drains the decode pipeline and costs a broker round trip: 64 gave 0.89x raw,
    # 256 gives 0.95x (bench/bulk.py); 256 images take ~3 s on 2 CPU cores.
    job_chunk_size: int = Field(256, ge=1, le=10_000)
    # A request's chunk_size is clamped to this: a chunk must finish well inside its time
    # limit and renew its lease, and one delivery should not hold a worker for long.
    max_job_chunk_size: int = Field(1024, ge=1, le=10_000)
    max_job_items: int = Field(1_000_000, ge=1)
    max_manifest_bytes: int = Field(256 * 1024 * 1024, ge=1)

    grace_s: float = Field(10.0, ge=0, description="how long in-flight calls get on shutdown")

    # A second, plaintext port serving only grpc.health.v1 (unset: none). Kubernetes gRPC
    # probes and `perito health` cannot speak TLS; this port carries no API and no data.
    health_port: int | None = Field(None, ge=0, le=65535)
    # HTTP (unset: none): the Open Inference Protocol's REST endpoints (/v2/...) and the JSON
    # API (/v1/...), in the same process and event loop as gRPC, sharing its batchers; 0 picks
    # a free port. Same host, TLS files and tokens as the gRPC port. Bodies are read up to
    # `max_message_bytes`.
    http_port: int | None = Field(None, ge=0, le=65535)
    # TLS: both files PEM. Without them the port is plaintext (fine behind a mesh or on localhost).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Tenants: `tenants_file` / `auth_tokens` (CommonSettings). Neither: one anonymous
    # tenant, and the server binds loopback only unless `insecure` is set. Health checks and
    # reflection stay open so probes and grpcurl work.
    insecure: bool = Field(
        False, description="serve without authentication on an interface other than loopback"
    )

    # Jobs: how long a finished job's record and item results are kept (env
    # PERITO_JOB_RETENTION: seconds, a number with s / m / h / d, or ISO 8601 such as P7D),
    # and how often the watchdog sweeps.
    job_retention: timedelta = Field(timedelta(days=7), ge=timedelta(seconds=1))
    watchdog_interval_s: float = Field(5.0, gt=0, description="0 < s; the job watchdog's period")
    submit_threads: int = Field(4, ge=1, description="threads that list and record new jobs")
    # A Redis that evicts keys under memory pressure silently loses jobs and queued chunks:
    # the server refuses to start against one unless this is set.
    allow_evicting_redis: bool = False

    # The prediction log (docs/trust.md#prediction-log): tenants switch it on in the tenants
    # file (`prediction_log`); a server without one logs its single tenant to this prefix
    # (s3://bucket/prefix/ or an absolute folder; unset: off). Records are kept
    # `prediction_log_retention` (unset: `job_retention`) unless the tenant says otherwise.
    prediction_log_uri: str | None = None
    prediction_log_retention: timedelta | None = Field(None, ge=timedelta(seconds=1))
    prediction_log_queue_records: int = Field(10_000, ge=1, description="records queued at most")
    prediction_log_queue_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="bytes (images, requests) queued at most"
    )
    prediction_log_batch_records: int = Field(1000, ge=1)
    prediction_log_flush_s: float = Field(1.0, gt=0, description="a batch's longest wait")
    prediction_log_sweep_interval_s: float = Field(3600.0, gt=0)
    prediction_log_close_s: float = Field(5.0, ge=0, description="flush time at shutdown")
    # Images queued for shadow versions and not yet run, and the bytes they hold
    # (perito_server.shadow); what does not fit either is shed.
    shadow_queue_images: int = Field(256, ge=1, description="images queued for shadows at most")
    shadow_queue_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="bytes (pixels, encoded images) queued for shadows"
    )
    # How often the drift gauges are recomputed from the shared windows (docs/monitoring.md).
    drift_interval_s: float = Field(15.0, gt=0, description="0 < s; the drift monitor's period")

    @model_validator(mode="after")
    def _preferred_within_max(self) -> ServerSettings:
        size = self.preferred_batch_size
        if size != "auto" and size > self.max_batch_size:
            raise ValueError(
                f"preferred_batch_size {size} is more than max_batch_size {self.max_batch_size}"
            )
        return self

    @property
    def fixed_batch_size(self) -> int | None:
        """`preferred_batch_size` when set to a number; None for `auto` (measured)."""
        return None if self.preferred_batch_size == "auto" else self.preferred_batch_size

    @field_validator("results_uri")
    @classmethod
    def _absolute_results_folder(cls, value: str) -> str:
        """A local results folder, as the server's working directory resolves it: a job given
        no output is written under it, and a job's output must be an absolute path."""
        return value if "://" in value else str(Path(value).resolve())

    @field_validator("job_retention", "prediction_log_retention", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        """'90', '90s', '15m', '24h', '7d' -> seconds (`duration_seconds`); anything else is
        left to pydantic."""
        if isinstance(value, str):
            seconds = duration_seconds(value)
            try:
                return value if seconds is None else timedelta(seconds=seconds)
            except ValueError:  # NaN
                return value
        return value
