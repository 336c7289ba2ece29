"""Command-line options that several `perito` commands take, each written once.

`perito serve`, `perito worker`, `perito models ...` and `perito train`/`publish` read the same
settings (`perito_core.settings`); a flag given here overrides its `PERITO_*` variable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from pydantic_settings.exceptions import SettingsError

from perito_core.models.manifest import (
    FORM_PRECISIONS,
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    PRECISIONS,
)

F = TypeVar("F", bound=Callable[..., Any])
SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(cls: type[SettingsT], **flags: Any) -> SettingsT:
    """`cls` (a `PERITO_*` settings class) from the flags given (not None, not empty), which
    win over the environment.

    Raises:
        click.ClickException: a value that is not valid, one line per setting naming its
            environment variable and what is wrong (pydantic's message), never the value
            itself (it may be a secret): `PERITO_PORT: Input should be a valid integer, ...`.
    """
    given = {name: value for name, value in flags.items() if value not in (None, ())}
    try:
        return cls(**given)
    except ValidationError as error:
        problems = []
        for detail in error.errors(include_url=False, include_input=False):
            location = detail["loc"]
            setting = _variable(cls, str(location[0])) if location else cls.__name__
            problems.append(f"{setting}: {detail['msg']}")
        raise click.ClickException("; ".join(problems)) from None
    except SettingsError as error:  # a list or mapping variable that is not JSON
        found = re.search(r'field "(\w+)"', str(error))
        setting = _variable(cls, found.group(1)) if found else "a PERITO_* variable"
        raise click.ClickException(
            f'{setting}: not valid JSON (a list is written ["first", "second"])'
        ) from None


def _variable(cls: type[BaseSettings], field: str) -> str:
    """The environment variable of `cls`'s `field`: PERITO_LOCAL_ROOTS."""
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


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
    help="Which form serves a call that names no precision, a preference: auto (the fastest "
    "verified compiled form, else TorchScript), fp32, bf16 or int8 (that precision's forms, "
    "else the fastest more exact one, else TorchScript) or torchscript (env "
    "PERITO_PRECISION). A precision a call or job names is honoured or refused, never "
    "substituted: docs/models.md#precision.",
)
alias_option = click.option(
    "--alias", "aliases", multiple=True, help="Point this alias at the new version (repeatable)."
)


def _parse_forms(
    _context: click.Context, _parameter: click.Parameter, value: str
) -> tuple[str, ...]:
    """`fp32, int8` -> ("fp32", "int8"); click.BadParameter naming an unknown precision."""
    chosen = tuple(p.strip() for p in value.split(",") if p.strip())
    unknown = [p for p in chosen if p not in FORM_PRECISIONS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: forms are {', '.join(FORM_PRECISIONS)}")
    return chosen


def forms_option(calibrated_on: str) -> Callable[[F], F]:
    """`--forms`: the compiled forms to build beside the reference (`compile.build_forms`),
    INT8 calibrated on `calibrated_on`; the command receives them as a tuple of precisions."""
    return click.option(
        "--forms",
        default="",
        callback=_parse_forms,
        help="Compiled forms to build beside the reference, e.g. fp32,int8,bf16, each for "
        f"OpenVINO and ONNX Runtime (INT8 calibrated on {calibrated_on}); each is gated "
        "against the reference on held-out images.",
    )


min_agreement_option = click.option(
    "--min-agreement",
    default=MIN_AGREEMENT,
    type=click.FloatRange(0.0, 1.0),
    show_default=True,
    help="Refuse a form whose top-1 agreement with the reference on held-out images is lower "
    "(a share: 0.99 for 99%).",
)
max_accuracy_drop_option = click.option(
    "--max-accuracy-drop",
    default=MAX_ACCURACY_DROP,
    type=click.FloatRange(0.0, 1.0),
    show_default=True,
    help="Refuse a form whose test accuracy is lower than the reference's by more (0.003: "
    "0.3 points).",
)
local_roots_option = click.option(
    "--local-root",
    "local_roots",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A folder jobs may read images from and write results to (repeatable; env "
    "PERITO_LOCAL_ROOTS: folders separated by ':', or a JSON list). Server and workers need "
    "the same.",
)
redis_url_option = click.option(
    "--redis-url",
    help="The job store's Redis and the Celery broker: redis://, rediss://, unix:// or "
    "redis+sentinel:// (env PERITO_REDIS_URL, default redis://127.0.0.1:6379/0; "
    "PERITO_BROKER_URL for another broker).",
)
metrics_port_option = click.option(
    "--metrics-port",
    type=int,
    help="Prometheus /metrics port, 0 for any free one (env PERITO_METRICS_PORT; off).",
)
