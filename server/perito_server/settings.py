"""Server settings: flags or `PERITO_*` environment variables, built once in `main()`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from perito_core.imaging import ImageLimits
from perito_core.storage import S3Options


class ServerSettings(BaseSettings):
    """Everything `perito serve` can be told. Environment: `PERITO_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="PERITO_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8500, ge=0, le=65535, description="0 picks a free port")
    registry: str = Field("./var/registry", description="a folder, file:// or s3://bucket/prefix")
    cache_dir: Path = Path("./var/cache")
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None

    device: str = "auto"
    torch_threads: int = Field(0, ge=0, description="0: one per core")
    decode_threads: int = Field(2, ge=1)
    optimize_models: bool = True
    preload: list[str] = Field(default_factory=list, description="NAME[@VERSION] to load at start")
    max_loaded_models: int = Field(4, ge=1)
    alias_ttl_s: float = Field(5.0, ge=0, description="how long an alias resolution is cached")

    # 4 is the fastest batch for EfficientNet-Lite0 on 2 CPU cores (bench/classify.py); GPUs
    # want more (16-64).
    max_batch_size: int = Field(4, ge=1)
    max_queue_delay_ms: float = Field(2.0, ge=0)
    max_queue_size: int = Field(256, ge=1, description="images admitted and not yet answered")
    max_images_per_request: int = Field(64, ge=1)
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)
    default_top_k: int = Field(5, ge=1)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="job store and Celery broker")
    local_roots: list[Path] = Field(
        default_factory=list, description="folders jobs may read images from and write results to"
    )
    results_uri: str = Field("./var/results", description="default output location of jobs")
    # Each chunk drains the decode pipeline and costs a broker round trip: 64 gave 0.89x raw,
    # 256 gives 0.95x (bench/bulk.py); 256 images take ~3 s on 2 CPU cores.
    job_chunk_size: int = Field(256, ge=1, le=10_000)
    max_job_items: int = Field(1_000_000, ge=1)
    visibility_timeout_s: int = Field(3600, ge=10)

    grace_s: float = Field(10.0, ge=0, description="how long in-flight calls get on shutdown")

    def s3_options(self) -> S3Options:
        secret = self.s3_secret_access_key
        return S3Options(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=self.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
