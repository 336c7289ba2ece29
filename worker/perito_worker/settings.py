"""Worker settings: flags or `PERITO_*` environment variables, built once in `main()`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from perito_core.imaging import ImageLimits
from perito_core.storage import S3Options


class WorkerSettings(BaseSettings):
    """Everything `perito worker` can be told. Environment: `PERITO_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="PERITO_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    registry: str = "./var/registry"
    cache_dir: Path = Path("./var/cache")
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    local_roots: list[Path] = Field(default_factory=list)

    device: str = "auto"
    concurrency: int = Field(1, ge=1, description="worker processes; 1 per GPU or per 2 cores")
    pool: str = Field("prefork", description="prefork (CPU), solo or threads (GPU)")
    torch_threads: int = Field(0, ge=0, description="0: one per core")
    decode_threads: int = Field(2, ge=1)
    batch_size: int = Field(4, ge=1)
    # Below the sync path's priority, so a bulk job sharing a machine with `perito serve`
    # leaves Classify's latency within 2x of idle. bench/bulk.py, 2 cores: nice 0 gives the
    # job 0.95x raw but sync p50 3.2x idle; nice 10: 0.89x and 1.2x; nice 5: 0.95x and 1.6x.
    nice: int = Field(5, ge=0, le=19)
    max_attempts: int = Field(3, ge=1, description="deliveries of a chunk before it is given up")
    visibility_timeout_s: int = Field(3600, ge=10)
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)

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
