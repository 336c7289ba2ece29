"""Worker settings: flags or `PERITO_*` environment variables, built once in `main()`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from perito_core.settings import CommonSettings


class WorkerSettings(CommonSettings):
    """Everything `perito worker` can be told. Environment: `PERITO_<FIELD>`."""

    # The worker's only listener, Prometheus `/metrics` (with `metrics_port`): every IPv4
    # interface, for a Prometheus on another host or container; `::` for IPv6 too.
    metrics_host: str = Field("0.0.0.0", description="interface of /metrics (0.0.0.0: all IPv4)")
    concurrency: int = Field(1, ge=1, description="worker processes; 1 per GPU or per 2 cores")
    pool: str = Field("prefork", description="prefork (CPU), solo or threads (GPU)")
    # Images per forward pass for each loaded form (perito_core.models.batching): `auto` times
    # the form at 1, 2, 4, ... and `max_batch_size` once it is loaded (a second or two, on the
    # model's thread) and keeps the fastest; a number fixes it (a GPU wants 16-64).
    max_batch_size: int = Field(8, ge=1)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # Below the sync path's priority, so a bulk job sharing a machine with `perito serve`
    # leaves Classify's latency within 2x of idle. bench/bulk.py, 2 cores: nice 0 gives the
    # job 0.95x raw but sync p50 3.2x idle; nice 10: 0.89x and 1.2x; nice 5: 0.95x and 1.6x.
    nice: int = Field(5, ge=0, le=19)
    # The model's and the decoders' threads in Linux's SCHED_IDLE class (perito_core.scheduling):
    # they run only on CPU time nothing else wants, so `Classify` on the same machine keeps its
    # latency; on a machine of its own the worker loses nothing. False: the nice value only.
    idle_compute: bool = True
    # Claims first across processes (perito_core.scheduling.InteractiveActivity): no forward
    # pass starts while a `perito serve` on this host has a call in hand, nor until this long
    # after its last one ended, each batch waiting at most `yield_max_wait_s` (0: never waits).
    yield_quiet_s: float = Field(0.01, ge=0)
    yield_max_wait_s: float = Field(0.2, ge=0)
    # A model on a CUDA device: the JPEGs of a batch decoded together on it by nvJPEG and
    # resized there (perito_core.imaging_device; other images: Pillow on the decode threads).
    # False: Pillow decodes every image on the CPU. Ignored on the CPU.
    gpu_decode: bool = True
    max_attempts: int = Field(3, ge=1, description="starts of a chunk before it is given up")
    # How long a chunk waits out a Redis that is down or restarting before its attempt ends.
    store_outage_retry_s: float = Field(120.0, ge=0)
