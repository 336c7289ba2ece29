"""Operator commands with tenants: `perito tenants add` issues a token once, registry
writes need `models:publish` and record the publisher, `perito audit` lists the records
for admins, and `perito serve` refuses to listen beyond loopback without authentication."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from perito_core.models.registry import ModelRegistry
from tests.helpers import TINY_INPUT, perito_command, run_perito, subprocess_env

pytestmark = pytest.mark.e2e


def test_tokens_roles_publishing_and_the_audit_log(
    tmp_path: Path, tiny_model_file: Path, redis_url: str
) -> None:
    tenants = tmp_path / "tenants.yaml"
    env = subprocess_env(
        PERITO_TENANTS_FILE=str(tenants),
        PERITO_REGISTRY=str(tmp_path / "registry"),
        PERITO_CACHE_DIR=str(tmp_path / "cache"),
        PERITO_REDIS_URL=redis_url,
    )
    added = run_perito("tenants", "add", "ops", "--role", "admin", env=env)
    admin = added.stdout.strip()
    assert admin.startswith("prt_") and len(admin) > 40 and "shown once" in added.stderr
    assert admin not in tenants.read_text() and (tenants.stat().st_mode & 0o777) == 0o600
    viewer = run_perito(
        "tenants", "add", "viewer", "--role", "models:read", "--model", "*", env=env
    ).stdout.strip()
    team = run_perito(
        "tenants",
        "add",
        "ds-team",
        "--role",
        "models:publish",
        "--model",
        "tiny*",
        env=env,
    ).stdout.strip()
    listed = run_perito("tenants", "list", env=env).stdout
    assert "ds-team: roles models:publish; models tiny*" in listed and "prt_" not in listed

    labels = tmp_path / "labels.txt"
    labels.write_text("minor\nmoderate\nsevere\n")
    size = str(TINY_INPUT.height)
    command = [
        "models", "import", str(tiny_model_file), "--name", "tiny", "--labels", str(labels),
        "--input-size", size, "--resize-size", size, "--resize-mode", "squash",
    ]  # fmt: skip
    refusals = {
        None: "missing bearer token",
        "prt_wrong": "unknown bearer token",
        viewer: "lacks the role 'models:publish'",
    }
    for token, words in refusals.items():
        refused = run_perito(*command, env={**env, "PERITO_TOKEN": token or ""}, check=False)
        assert refused.returncode != 0 and words in refused.stderr, refused.stderr
    other_name = [*command[:4], "other", *command[5:]]
    refused = run_perito(*other_name, env={**env, "PERITO_TOKEN": team}, check=False)
    assert refused.returncode != 0 and "may not use model 'other'" in refused.stderr

    run_perito(*command, env={**env, "PERITO_TOKEN": team})
    run_perito("models", "alias", "tiny", "production", "1", env={**env, "PERITO_TOKEN": team})
    registry = ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "c2")
    assert registry.manifest("tiny", "1").source.published_by == "ds-team"

    denied = run_perito("audit", env={**env, "PERITO_TOKEN": team}, check=False)
    assert denied.returncode != 0 and "lacks the role 'admin'" in denied.stderr
    records = [
        json.loads(line)
        for line in run_perito(
            "audit", "--json", env={**env, "PERITO_TOKEN": admin}
        ).stdout.splitlines()
    ]
    seen = [(r["tenant"], r["method"], r["resource"], r["outcome"]) for r in records]
    assert seen[:2] == [
        ("ds-team", "models.alias", "models/tiny/aliases/production", "OK"),
        ("ds-team", "models.import", "models/tiny/versions/1", "OK"),
    ]
    assert ("", "tenants.add", "tenants/ds-team", "OK") in seen
    assert all(r["time"] > 0 for r in records)
    only = run_perito(
        "audit", "--method", "tenants.add", env={**env, "PERITO_TOKEN": admin}
    ).stdout.splitlines()
    assert len(only) == 3 and all("tenants.add" in line for line in only)


def test_serving_beyond_loopback_needs_auth_or_insecure(tmp_path: Path) -> None:
    env = subprocess_env(
        PERITO_REGISTRY=str(tmp_path / "registry"), PERITO_CACHE_DIR=str(tmp_path / "cache")
    )
    result = subprocess.run(
        [*perito_command(), "serve", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "refusing to serve gRPC on 0.0.0.0 without authentication" in result.stderr
