"""A tenant's images-per-minute quota is spent by calls that reach a model, not by calls
naming a model, version or precision that is not there (over real gRPC)."""

from __future__ import annotations

from pathlib import Path

import pytest

import perito
from perito_core.access.tenancy import Quotas, add_tenant
from tests.conftest import tiny_registry
from tests.helpers import ServerThread, red_jpeg

pytestmark = pytest.mark.integration


def test_a_call_to_a_model_that_is_not_there_costs_no_quota(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    tenants = tmp_path / "tenants.yaml"
    token = add_tenant(
        tenants, "initech", roles=["classify"], models=["*"], quotas=Quotas(images_per_minute=4)
    )
    registry = tiny_registry(tmp_path / "registry", tiny_model_file)
    with (
        ServerThread.serving(
            registry, tmp_path / "cache", tenants_file=tenants, redis_url=redis_url
        ) as server,
        perito.Client(server.target, token=token, timeout=30, max_retries=0) as client,
    ):
        for _ in range(3):
            with pytest.raises(perito.NotFoundError):
                client.classify([red_jpeg()] * 3, model="car-x")
            with pytest.raises(perito.NotFoundError):
                client.classify([red_jpeg()] * 3, model="tiny", version="9")
        assert len(client.classify([red_jpeg()] * 4, model="tiny")) == 4  # the whole quota
        with pytest.raises(perito.ResourceExhaustedError):
            client.classify([red_jpeg()], model="tiny")
