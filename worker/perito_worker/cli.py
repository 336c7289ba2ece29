"""`perito worker`, plugged into the CLI through the `perito.commands` entry point."""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from typing import Any

import click

from perito_core.cli_options import (
    device_option,
    load_settings,
    local_roots_option,
    metrics_port_option,
    precision_option,
    redis_url_option,
    registry_option,
)


@click.command()
@redis_url_option
@registry_option
@local_roots_option
@device_option
@precision_option
@click.option("--concurrency", type=int, help="Worker processes (default 1).")
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo", "threads"]),
    help="prefork on CPUs; solo or threads on a GPU (CUDA stays in one process).",
)
@click.option(
    "--batch-size",
    type=int,
    help="Images per forward pass (env PERITO_BATCH_SIZE; default auto: each form measured at "
    "load up to PERITO_MAX_BATCH_SIZE).",
)
@click.option("--name", default=None, help="Worker name (default perito@HOST).")
@metrics_port_option
@click.option(
    "--metrics-host",
    help="Interface of /metrics: an IPv4 or IPv6 address or a name (env PERITO_METRICS_HOST, "
    "default 0.0.0.0).",
)
@click.option("--log-level", default="INFO", show_default=True)
def worker(name: str | None, log_level: str, **flags: Any) -> None:
    """Run a bulk-job worker: take chunks from the queue, classify, record results.

    \b
    Example:
      perito worker --redis-url redis://localhost:6379/0 --registry s3://models/perito
    """
    from perito_core.errors import InvalidArgument
    from perito_core.jobs.queue import BULK_QUEUE
    from perito_core.listening import ListenError
    from perito_core.logs import configure_logging
    from perito_core.redis_connection import check_redis_url
    from perito_worker.settings import WorkerSettings

    settings = load_settings(WorkerSettings, **flags)
    configure_logging(log_level, settings.log_format)
    try:  # a malformed Redis URL is refused now, naming its setting, not at the first chunk
        check_redis_url(settings.redis_url, "PERITO_REDIS_URL")
        check_redis_url(settings.broker, settings.broker_setting)
    except InvalidArgument as error:
        raise click.ClickException(error.message) from None
    if settings.tracing:
        from perito_core.tracing import setup_tracing

        setup_tracing("perito-worker")
    if settings.metrics_port is not None:
        # Before prometheus_client is imported: every pool process writes its samples here.
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = _samples_folder()
        from perito_worker.metrics import serve_metrics

        try:
            bound = serve_metrics(settings.metrics_host, settings.metrics_port)
        except ListenError as error:
            raise click.ClickException(str(error)) from None
        logging.getLogger(__name__).info(
            "metrics on %s", ", ".join(f"http://{address}/metrics" for address in bound)
        )
    from perito_worker.tasks import app, configure

    configure(settings)
    if settings.pool != "prefork":  # no child processes: tune this one
        from perito_worker.tasks import _tune_process

        _tune_process(settings)
    app.worker_main(
        [
            "worker",
            f"--loglevel={log_level.upper()}",
            f"--queues={BULK_QUEUE}",
            f"--concurrency={settings.concurrency}",
            f"--pool={settings.pool}",
            f"--hostname={name or 'perito@' + socket.gethostname()}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


def register(cli: click.Group) -> None:
    """Entry point for `perito.commands`: only where `perito[serve]` is installed."""
    if all(importlib.util.find_spec(name) for name in ("celery", "torch", "redis")):
        cli.add_command(worker)


def _samples_folder() -> str:
    """A new temporary folder for the pool's metric samples (prometheus_client's multiprocess
    files), removed when this worker exits (not by its forked pool processes). A worker killed
    with SIGKILL leaves it: it lives under the temporary folder (TMPDIR)."""
    folder = tempfile.mkdtemp(prefix="perito-metrics-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)
    return folder
