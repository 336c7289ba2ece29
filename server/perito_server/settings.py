"""Server settings: flags or `PERITO_*` environment variables, built once in `main()`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from perito_core.settings import CommonSettings


class ServerSettings(CommonSettings):
    """Everything `perito serve` can be told. Environment: `PERITO_<FIELD>`."""

    host: str = "127.0.0.1"
    port: int = Field(8500, ge=0, le=65535, description="0 picks a free port")
    optimize_models: bool = True
    preload: list[str] = Field(default_factory=list, description="NAME[@VERSION] to load at start")
    max_loaded_models: int = Field(4, ge=1)
    alias_ttl_s: float = Field(
        5.0,
        ge=0,
        description="how often aliases in use are re-read (0: never, pinned at first use)",
    )

    # 4 is the fastest batch for EfficientNet-Lite0 on 2 CPU cores (bench/classify.py); GPUs
    # want more (16-64).
    max_batch_size: int = Field(4, ge=1)
    max_queue_delay_ms: float = Field(2.0, ge=0)
    max_queue_size: int = Field(256, ge=1, description="images admitted and not yet answered")
    max_images_per_request: int = Field(64, ge=1)
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    default_top_k: int = Field(5, ge=1)

    results_uri: str = Field("./var/results", description="default output location of jobs")
    # Each chunk drains the decode pipeline and costs a broker round trip: 64 gave 0.89x raw,
    # 256 gives 0.95x (bench/bulk.py); 256 images take ~3 s on 2 CPU cores.
    job_chunk_size: int = Field(256, ge=1, le=10_000)
    max_job_items: int = Field(1_000_000, ge=1)

    grace_s: float = Field(10.0, ge=0, description="how long in-flight calls get on shutdown")

    # TLS: both files PEM. Without them the port is plaintext (fine behind a mesh or on localhost).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Bearer tokens accepted in `authorization` metadata (env: a JSON list). Empty: no auth.
    # Health checks and reflection stay open so probes and grpcurl work.
    auth_tokens: list[SecretStr] = Field(default_factory=list)
