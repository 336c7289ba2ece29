"""Settings every deployable shares: storage, the job store, image limits.

`ServerSettings` and `WorkerSettings` extend this; each is built once in its `main()` from
flags and `PERITO_*` environment variables, never read at import.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from perito_core.access.audit import AuditLog
from perito_core.access.tenancy import Tenant, Tenants, acting_tenant
from perito_core.imaging import ImageLimits
from perito_core.models.manifest import PrecisionChoice
from perito_core.models.registry import ModelRegistry
from perito_core.scheduling import InteractiveActivity, default_activity_path
from perito_core.storage import S3Options

log = logging.getLogger(__name__)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PERITO_", extra="ignore")

    registry: str = Field("./var/registry", description="a folder, file:// or s3://bucket/prefix")
    cache_dir: Path = Path("./var/cache")
    # Model forms held in memory at once (a version per precision asked for); the least
    # recently used is dropped when one more is needed.
    max_loaded_models: int = Field(4, ge=1)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    # Redis URLs: redis://, rediss://, unix:// or redis+sentinel:// (Redis Sentinel), the
    # forms of perito_core.redis_connection; every Redis client is made there.
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="the job store (and broker)")
    broker_url: str | None = Field(
        None, description="the Celery broker (a Redis URL); unset: the job store's Redis"
    )
    # PERITO_LOCAL_ROOTS: a JSON list, or folders separated by os.pathsep as in PATH.
    local_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="folders jobs may read images from and write results to"
    )
    # Where bulk jobs keep their data: each chunk's inputs and each chunk's results as one part
    # (perito_core.jobs.parts), under {this}/{tenant}/{job id}/. A folder, or s3://bucket/prefix
    # where workers run on other hosts; servers and workers must all reach it. Unset: the
    # folder .job-data under the server's results_uri. Servers read it; workers find each
    # job's prefix in its record.
    job_data_uri: str | None = Field(None, description="bulk jobs' inputs and result parts")
    visibility_timeout_s: int = Field(3600, ge=10, description="redelivery of unacked chunks")
    # A worker renews its lease on a chunk every third of this; a chunk whose lease lapses
    # (its worker died) is sent again by the watchdog.
    lease_ttl_s: float = Field(30.0, ge=1)
    # A chunk's Celery time limits: 60 s + this per image (soft), one more minute (hard).
    item_time_limit_s: float = Field(5.0, gt=0)
    # A complete job whose results files cannot be written ends FAILED with the reason: at
    # once when no wait changes it (a symbolic link, permission denied, a missing bucket,
    # access denied), else once its writes have failed for this long (storage unreachable;
    # tried 5 s doubling to 60 s apart). Its slot in the tenant's concurrent jobs is freed.
    finalize_timeout_s: float = Field(300.0, ge=0)
    device: str = "auto"
    # The file through which the servers and bulk workers of one host share when a caller's
    # images are in hand (perito_core.scheduling.InteractiveActivity; claims first, bulk
    # second); unset: /dev/shm/perito-interactive-UID. Processes on other hosts never meet.
    activity_file: Path | None = None
    # Which form of a model version serves a call that names no precision
    # (perito_core.models.selection), a preference, never refused: `auto` times each verified
    # compiled form this CPU can run at load and keeps the fastest; `fp32`, `bf16`, `int8` that
    # precision's forms, else the fastest more exact compiled form, else TorchScript (the reason
    # logged); `torchscript` the reference. A precision a call or job names is honoured or
    # refused (FAILED_PRECONDITION, reason PRECISION_UNAVAILABLE), never substituted. The
    # table: docs/models.md#precision.
    precision: PrecisionChoice = "auto"
    log_format: Literal["text", "json"] = "text"
    # OpenTelemetry spans to OTEL_EXPORTER_OTLP_ENDPOINT (needs perito[tracing]).
    tracing: bool = False
    # Prometheus `/metrics` on this port (0: any free port; unset: off). Images set it. Its
    # interface, `metrics_host`, is each deployable's own (the server's follows its `host`).
    metrics_port: int | None = Field(None, ge=0, le=65535)
    torch_threads: int = Field(0, ge=0, description="0: one per core")
    decode_threads: int = Field(2, ge=1)
    # Drift detection (perito_core.drift): the newest images kept per model version in its
    # live window, a Redis list every server and worker feeds (docs/monitoring.md#drift).
    drift_window: int = Field(2000, ge=1, le=100_000, description="images per version's window")
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)

    # Who may call (perito_core.access.tenancy): a tenants file (YAML; re-read when it changes and
    # on SIGHUP), or else bearer tokens (env: a JSON list) that make one tenant with every
    # right. Operator commands that write the registry or read the audit log act as the
    # tenant holding `token` (PERITO_TOKEN).
    tenants_file: Path | None = None
    auth_tokens: list[SecretStr] = Field(default_factory=list)
    token: SecretStr | None = Field(None, description="the caller's own token (PERITO_TOKEN)")

    @field_validator("local_roots", mode="before")
    @classmethod
    def _folder_list(cls, value: object) -> object:
        """PERITO_LOCAL_ROOTS as a JSON list (`["/data/a", "/data/b"]`) or as PATH spells
        folders (`/data/a:/data/b`, one folder alone: `/data/a`); flags give a list."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)  # a JSONDecodeError is a ValueError: pydantic names it
        return [part for part in text.split(os.pathsep) if part.strip()]

    def open_tenants(self) -> Tenants:
        """The tenants these settings name (see `perito_core.access.tenancy.Tenants`).

        Raises:
            InvalidArgument: a malformed tenants file.
            OSError: it cannot be read.
        """
        tokens = [token.get_secret_value() for token in self.auth_tokens]
        return Tenants(self.tenants_file, tokens)

    def acting_tenant(self, role: str, what: str, model: str | None = None) -> Tenant:
        """The tenant an operator command acts as (`perito_core.access.tenancy.acting_tenant`).

        Raises:
            Unauthenticated: PERITO_TOKEN missing or unknown (when tenants are configured).
            PermissionDenied: its tenant lacks `role`, or may not use `model`.
        """
        token = self.token.get_secret_value() if self.token else None
        return acting_tenant(self.open_tenants(), token, role, what, model)

    def open_audit(self) -> AuditLog:
        """The audit log in the job store's Redis, kept for `audit_retention_s` (read by
        `perito audit`, written by one-shot commands through `audit.record_command`)."""
        from perito_core.redis_connection import redis_client

        client = redis_client(self.redis_url, socket_connect_timeout=2, socket_timeout=10)
        return AuditLog(client, self.audit_retention_s)

    # How long audit records are kept in Redis (the server uses its job retention).
    audit_retention_s: float = Field(7 * 86400, gt=0)

    @property
    def broker(self) -> str:
        """The Celery broker's URL: `broker_url`, else the job store's Redis."""
        return self.broker_url or self.redis_url

    @property
    def broker_setting(self) -> str:
        """The setting `broker` comes from, for messages: PERITO_BROKER_URL or
        PERITO_REDIS_URL."""
        return "PERITO_BROKER_URL" if self.broker_url else "PERITO_REDIS_URL"

    def s3_options(self) -> S3Options:
        secret = self.s3_secret_access_key
        return S3Options(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=self.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )

    def open_registry(self) -> ModelRegistry:
        """The model registry these settings name, with their S3 options and cache folder."""
        return ModelRegistry.open(self.registry, cache_dir=self.cache_dir, s3=self.s3_options())

    def open_activity(self) -> InteractiveActivity | None:
        """The shared `activity_file` (`InteractiveActivity`), or None where it cannot be
        opened (logged: claims-first across processes is then off on this host)."""
        path = self.activity_file or default_activity_path()
        try:
            return InteractiveActivity(path)
        except OSError as error:
            log.warning("claims first across processes is off: %s: %s", path, error)
            return None

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
