"""Settings every deployable shares: storage, the job store, image limits.

`ServerSettings` and `WorkerSettings` extend this; each is built once in its `main()` from
flags and `PERITO_*` environment variables, never read at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from perito_core.imaging import ImageLimits
from perito_core.registry import ModelRegistry
from perito_core.storage import S3Options


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PERITO_", extra="ignore")

    registry: str = Field("./var/registry", description="a folder, file:// or s3://bucket/prefix")
    cache_dir: Path = Path("./var/cache")
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="the job store (and broker)")
    broker_url: str | None = Field(
        None, description="the Celery broker (a Redis URL); unset: the job store's Redis"
    )
    local_roots: list[Path] = Field(
        default_factory=list, description="folders jobs may read images from and write results to"
    )
    visibility_timeout_s: int = Field(3600, ge=10, description="redelivery of unacked chunks")
    # A worker renews its lease on a chunk every third of this; a chunk whose lease lapses
    # (its worker died) is sent again by the watchdog.
    lease_ttl_s: float = Field(30.0, ge=1)
    # A chunk's Celery time limits: 60 s + this per image (soft), one more minute (hard).
    item_time_limit_s: float = Field(5.0, gt=0)
    # A complete job whose results files cannot be written for this long ends FAILED.
    finalize_timeout_s: float = Field(600.0, ge=0)
    device: str = "auto"
    log_format: Literal["text", "json"] = "text"
    # OpenTelemetry spans to OTEL_EXPORTER_OTLP_ENDPOINT (needs perito[tracing]).
    tracing: bool = False
    # Prometheus `/metrics` on this port (0: any free port; unset: off). Images set it.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    torch_threads: int = Field(0, ge=0, description="0: one per core")
    decode_threads: int = Field(2, ge=1)
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)

    @property
    def broker(self) -> str:
        """The Celery broker's URL: `broker_url`, else the job store's Redis."""
        return self.broker_url or self.redis_url

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

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
