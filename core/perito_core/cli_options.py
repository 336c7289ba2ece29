"""Command-line options that several `perito` commands take, each written once.

`perito serve`, `perito worker`, `perito models ...` and `perito train`/`publish` read the same
settings (`perito_core.settings`); a flag given here overrides its `PERITO_*` variable.
"""

from __future__ import annotations

from pathlib import Path

import click

PRECISIONS = ["auto", "fp32", "bf16", "int8", "torchscript"]

registry_option = click.option(
    "--registry",
    envvar="PERITO_REGISTRY",
    help="Model registry: a folder, file:// or s3://bucket/prefix (env PERITO_REGISTRY; S3 "
    "endpoint and keys from PERITO_S3_* or the AWS defaults).",
)
device_option = click.option("--device", help="auto, cpu, cuda, cuda:1 ... (env PERITO_DEVICE).")
precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    help="Which form serves: auto (the fastest verified compiled form, else TorchScript), "
    "fp32, bf16, int8 or torchscript (env PERITO_PRECISION).",
)
local_roots_option = click.option(
    "--local-root",
    "local_roots",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A folder jobs may read images from and write results to (repeatable; env "
    "PERITO_LOCAL_ROOTS, a JSON list). Server and workers need the same.",
)
