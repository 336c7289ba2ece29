"""Two tenants on one server, over real sockets: real redis-server, S3 over HTTP (moto), a
tenants file. Nobody reads, writes or spends what is not theirs; every refusal is checked by
its status code and, where one is named, its field."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

import perito
from perito.v1 import classify_pb2, image_pb2, service_pb2_grpc
from perito_core.access.tenancy import add_tenant, hash_token
from tests.conftest import publish_tiny, tiny_registry
from tests.helpers import (
    MakeStores,
    ServerThread,
    encoded,
    free_port,
    perito_proc,
    subprocess_env,
    wait_for_port,
)

pytestmark = pytest.mark.integration

REGISTRY = "s3://models/tenant-tests"


def jpeg(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return encoded(pixels, "JPEG")


@dataclass
class Tenancy:
    server: ServerThread
    tokens: dict[str, str]
    work: Path
    s3: object

    def client(self, tenant: str | None, **kwargs: object) -> perito.Client:
        token = self.tokens.get(tenant or "", tenant)  # an unknown name is used as a token
        return perito.Client(self.server.target, token=token, **kwargs)  # type: ignore[arg-type]


def write_tenants(path: Path, work: Path) -> dict[str, str]:
    """acme and globex (each its own S3 prefixes and a local folder), a read-only viewer,
    and tenants with quotas; returns each tenant's token."""
    tokens = {}
    common = {"roles": ["classify", "jobs", "models:read"]}
    for name in ("acme", "globex"):
        tokens[name] = add_tenant(
            path,
            name,
            models=["tiny", f"{name}-*"],
            read=[f"s3://inspections/{name}/", str(work / name)],
            write=[f"s3://results/{name}/"],
            **common,  # type: ignore[arg-type]
        )
    tokens["viewer"] = add_tenant(path, "viewer", roles=["models:read"], models=["*"])
    from perito_core.access.tenancy import Quotas

    tokens["busy"] = add_tenant(
        path,
        "busy",
        models=["tiny"],
        read=["s3://inspections/busy/"],
        write=["s3://results/busy/"],
        quotas=Quotas(concurrent_jobs=10, items_per_job=5),
        **common,  # type: ignore[arg-type]
    )
    tokens["hammer"] = add_tenant(
        path, "hammer", models=["tiny"], quotas=Quotas(images_per_minute=120), **common
    )  # type: ignore[arg-type]
    return tokens


@pytest.fixture(scope="module")
def tenancy(s3_stores: MakeStores, tiny_model_file: Path) -> Iterator[Tenancy]:
    stores = s3_stores("tenancy", REGISTRY, results_uri="s3://results/jobs")
    work = stores.work
    registry = stores.open_registry()
    publish_tiny(registry, tiny_model_file)
    publish_tiny(registry, tiny_model_file, name="globex-secret")
    s3 = stores.s3_client()
    for tenant in ("acme", "globex", "busy"):
        for n in range(3):
            s3.put_object(Bucket="inspections", Key=f"{tenant}/{n}.jpg", Body=jpeg(n))
        (work / tenant).mkdir()
        (work / tenant / "0.jpg").write_bytes(jpeg(0))
    s3.put_object(
        Bucket="inspections",
        Key="globex/manifest.csv",
        Body=b"uri\nTOP-SECRET-LINE,classified\n",
    )
    s3.put_object(
        Bucket="inspections",
        Key="acme/cross.csv",
        Body=b"uri\ns3://inspections/acme/0.jpg\ns3://inspections/globex/0.jpg\n",
    )
    (work / "acme" / "link").symlink_to(work / "globex")
    tenants_file = work / "tenants.yaml"
    tokens = write_tenants(tenants_file, work)
    settings = stores.server_settings(tenants_file=tenants_file, watchdog_interval_s=1)
    with ServerThread(settings) as server:
        yield Tenancy(server, tokens, work, s3)


def test_a_token_is_required_and_must_be_known(tenancy: Tenancy) -> None:
    for token in (None, "prt_wrong", tenancy.tokens["acme"] + "x"):
        with (
            perito.Client(tenancy.server.target, token=token) as client,
            pytest.raises(perito.UnauthenticatedError),
        ):
            client.list_models()
    # Refused before any handler ran, the calls are still counted, by method and code.
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = tenancy.server.running.metrics.registry  # type: ignore[attr-defined]

    def refused() -> float:
        return sum(
            sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples
            if sample.name == "perito_requests_total"
            and sample.labels == {"method": "ListModels", "code": "UNAUTHENTICATED"}
        )

    deadline = time.monotonic() + 5  # a call is counted as it ends, just after its answer
    while refused() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused() >= 3
    assert tenancy.tokens["acme"] not in tenancy.work.joinpath("tenants.yaml").read_text()
    assert hash_token(tenancy.tokens["acme"]) in tenancy.work.joinpath("tenants.yaml").read_text()


def test_roles_and_models_are_enforced(tenancy: Tenancy) -> None:
    with tenancy.client("viewer") as viewer:
        assert {m.name for m in viewer.list_models()} == {"tiny", "globex-secret"}
        with pytest.raises(perito.PermissionDeniedError, match="classify"):
            viewer.classify([jpeg(1)], model="tiny")
        with pytest.raises(perito.PermissionDeniedError, match="jobs"):
            viewer.submit_job(["s3://inspections/acme/0.jpg"], model="tiny")
        with pytest.raises(perito.PermissionDeniedError):
            list(viewer.list_jobs())
    with tenancy.client("acme") as acme:
        assert [m.name for m in acme.list_models()] == ["tiny"]  # not globex's model
        assert acme.classify([jpeg(1)], model="tiny")[0].label
        for call in (
            lambda: acme.classify([jpeg(1)], model="globex-secret"),
            lambda: acme.get_model("globex-secret"),
            lambda: acme.submit_job(["s3://inspections/acme/0.jpg"], model="globex-secret"),
        ):
            with pytest.raises(perito.PermissionDeniedError) as caught:
                call()
            assert caught.value.violations[0].field == "model"
    with tenancy.client("globex") as globex:
        assert {m.name for m in globex.list_models()} == {"tiny", "globex-secret"}


def test_refused_state_changes_are_audited(tenancy: Tenancy) -> None:
    """A state-changing call refused before its handler (no role, no token) is in the
    audit log with who asked, the outcome and the request id."""
    from perito_core.access.audit import AuditLog

    with tenancy.client("viewer") as viewer, pytest.raises(perito.PermissionDeniedError):
        viewer.submit_job(["s3://inspections/acme/0.jpg"], model="tiny", request_id="audit-1")
    with (
        perito.Client(tenancy.server.target, token="prt_wrong") as stranger,
        pytest.raises(perito.UnauthenticatedError),
    ):
        stranger.cancel_job("0123456789abcdef", metadata=[("x-request-id", "audit-2")])
    store = tenancy.server.running.service.jobs.store  # type: ignore[attr-defined]
    records = AuditLog(store.redis, 3600).list(limit=50)
    denied = next(r for r in records if r.method == "SubmitJob" and r.tenant == "viewer")
    assert denied.outcome == "PERMISSION_DENIED" and "jobs" in denied.detail
    unknown = next(r for r in records if r.request_id == "audit-2")
    assert (unknown.method, unknown.tenant, unknown.outcome) == (
        "CancelJob",
        "",
        "UNAUTHENTICATED",
    )


def test_another_tenants_job_is_not_found(tenancy: Tenancy) -> None:
    with tenancy.client("acme") as acme, tenancy.client("globex") as globex:
        job = acme.submit_job(
            ["s3://inspections/acme/0.jpg", "s3://inspections/acme/1.jpg"],
            model="tiny",
            labels={"site": "garage-7"},
            request_id="shared-request-id",
        ).last
        assert job.tenant == "acme"
        calls = {
            "get": lambda: globex.get_job(job.id),
            "watch": lambda: list(globex.watch_job(job.id)),
            "results": lambda: list(globex.list_job_results(job.id)),
            "cancel": lambda: globex.cancel_job(job.id),
            "delete": lambda: globex.delete_job(job.id),
        }
        for name, call in calls.items():
            with pytest.raises(perito.NotFoundError) as caught:
                call()
            assert str(caught.value) == f"job {job.id!r} not found", name
        # The same words as for a job that never existed: nothing leaks.
        with pytest.raises(perito.NotFoundError) as missing:
            globex.get_job("0" * 20)
        assert str(missing.value) == f"job {'0' * 20!r} not found"
        # The same request id from another tenant is another submission, not acme's job.
        own = globex.submit_job(
            ["s3://inspections/globex/0.jpg"], model="tiny", request_id="shared-request-id"
        ).last
        assert own.id != job.id and own.tenant == "globex"
        globex_jobs = list(globex.list_jobs())  # its own, from this test and earlier ones
        assert own.id in [j.id for j in globex_jobs] and job.id not in [j.id for j in globex_jobs]
        assert {j.tenant for j in globex_jobs} == {"globex"}
        listed = list(acme.list_jobs(labels={"site": "garage-7"}))
        assert [j.id for j in listed] == [job.id]
        assert list(acme.list_jobs(labels={"site": "elsewhere"})) == []
        assert acme.get_job(job.id).id == job.id
        assert acme.cancel_job(job.id).state is perito.JobState.CANCELLED
        assert [j.id for j in acme.list_jobs(states=["cancelled"])] == [job.id]
        assert list(acme.list_jobs(states=["running"])) == []
        acme.delete_job(job.id)
        assert job.id not in [j.id for j in acme.list_jobs()]  # (other tests' acme jobs stay)


def test_a_tenant_is_not_told_where_the_server_keeps_results(tenancy: Tenancy) -> None:
    """A job without output_uri reported the operator's results location (on a local
    install, the server's working directory): only an admin is told it."""
    with tenancy.client("acme") as acme:
        job = acme.submit_job(["s3://inspections/acme/0.jpg"], model="tiny").last
        assert (job.output_uri, job.result_uris) == ("", [])
        assert acme.get_job(job.id).output_uri == ""
        assert [j.output_uri for j in acme.list_jobs() if j.id == job.id] == [""]
        own = "s3://results/acme/claims-run"
        given = acme.submit_job(["s3://inspections/acme/0.jpg"], model="tiny", output_uri=own)
        assert given.last.output_uri == own


def test_list_jobs_pages_through_every_job_once(tenancy: Tenancy) -> None:
    with tenancy.client("globex") as globex:
        before = {j.id for j in globex.list_jobs()}
        made = [
            globex.submit_job(
                ["s3://inspections/globex/1.jpg"], model="tiny", labels={"batch": "paging"}
            ).last.id
            for _ in range(7)
        ]
        listed = [j.id for j in globex.list_jobs(page_size=3, labels={"batch": "paging"})]
        assert listed == made[::-1]  # newest first, each once, across three pages
        assert {j.id for j in globex.list_jobs(page_size=2)} == before | set(made)
        for job_id in made:
            globex.cancel_job(job_id)


REFUSED_READS = {
    "another tenant's prefix": ("uris", ["s3://inspections/globex/0.jpg"], "uris[0]"),
    "another bucket": ("uris", ["s3://secrets/acme/0.jpg"], "uris[0]"),
    "an access-point ARN": (
        "uris",
        ["s3://arn:aws:s3:us-east-1:123456789012:accesspoint/ap/acme/0.jpg"],
        "uris[0]",
    ),
    "the registry's prefix": ("prefix", "s3://models/tenant-tests/models/tiny/", "prefix"),
    "the server's results area": ("prefix", "s3://results/jobs/", "prefix"),
    "another tenant's manifest": ("manifest", "s3://inspections/globex/manifest.csv", None),
    "a manifest naming another tenant's image": (
        "manifest",
        "s3://inspections/acme/cross.csv",
        "manifest_uri (item 2)",
    ),
    "a symlink into another tenant's folder": ("folder", "acme/link", "prefix"),
}


@pytest.mark.parametrize("case", REFUSED_READS)
def test_reads_outside_the_tenants_prefixes_are_refused(tenancy: Tenancy, case: str) -> None:
    kind, source, field = REFUSED_READS[case]
    if kind == "uris":
        submitted: object = source
    elif kind == "folder":
        submitted = str(tenancy.work / str(source))
    else:
        submitted = str(source)
    with tenancy.client("acme", max_retries=0) as acme:
        with pytest.raises(perito.PermissionDeniedError) as caught:
            acme.submit_job(submitted, model="tiny")  # type: ignore[arg-type]
        error = caught.value
        assert "TOP-SECRET" not in str(error) and "classified" not in str(error)
        if field is not None:
            assert error.violations[0].field == field, error
        assert error.reason in ("STORAGE_NOT_ALLOWED", "RESERVED_LOCATION"), error


def test_writes_outside_the_tenants_prefixes_are_refused(tenancy: Tenancy) -> None:
    uris = ["s3://inspections/acme/0.jpg"]
    with tenancy.client("acme", max_retries=0) as acme, tenancy.client("globex") as globex:
        first = globex.submit_job(["s3://inspections/globex/0.jpg"], model="tiny").last
        refused = {
            "s3://results/globex/out/": "STORAGE_NOT_ALLOWED",  # another tenant's prefix
            # another job's results (the server's area, which globex is not told)
            f"s3://results/jobs/{first.id}": "RESERVED_LOCATION",
            "s3://results/jobs/mine": "RESERVED_LOCATION",
            "s3://models/tenant-tests/models/tiny/9": "RESERVED_LOCATION",  # the registry
        }
        for output, reason in refused.items():
            with pytest.raises(perito.PermissionDeniedError) as caught:
                acme.submit_job(uris, model="tiny", output_uri=output)
            assert caught.value.reason == reason, output
            assert caught.value.violations[0].field == "output_uri"
        # A '..' segment is refused as written, never taken as a step up (nor compared).
        for source, output, field in (
            (uris, "s3://results/acme/../globex/x", "output_uri"),
            (["s3://inspections/acme/../globex/0.jpg"], "", "uris[0]"),
        ):
            with pytest.raises(perito.InvalidArgumentError) as invalid:
                acme.submit_job(source, model="tiny", output_uri=output)
            assert invalid.value.violations[0].field == field
        job = acme.submit_job(uris, model="tiny", output_uri="s3://results/acme/run-1").last
        for inside in ("s3://results/acme/run-1", "s3://results/acme/run-1/part"):
            with pytest.raises(perito.PermissionDeniedError) as caught:
                acme.submit_job(uris, model="tiny", output_uri=inside)
            assert caught.value.reason == "OUTPUT_IN_USE"
        acme.cancel_job(job.id)
        globex.cancel_job(first.id)


def test_the_11th_concurrent_job_and_an_oversized_job_are_refused(tenancy: Tenancy) -> None:
    uris = ["s3://inspections/busy/0.jpg", "s3://inspections/busy/1.jpg"]
    with tenancy.client("busy", max_retries=0) as busy, tenancy.client("acme") as acme:
        jobs = [busy.submit_job(uris, model="tiny").last for _ in range(10)]  # no worker: queued
        with pytest.raises(perito.ResourceExhaustedError) as caught:
            busy.submit_job(uris, model="tiny")
        assert caught.value.reason == "QUOTA_CONCURRENT_JOBS"
        assert caught.value.retry_after is not None and caught.value.retry_after > 0
        # Another tenant is not held back by busy's quota.
        other = acme.submit_job(["s3://inspections/acme/2.jpg"], model="tiny").last
        acme.cancel_job(other.id)
        busy.cancel_job(jobs[0].id)  # a slot frees as soon as a job ends
        jobs[0] = busy.submit_job(uris, model="tiny").last
        with pytest.raises(perito.ResourceExhaustedError) as too_many:
            busy.submit_job([f"s3://inspections/busy/{n % 3}.jpg" for n in range(6)], model="tiny")
        assert too_many.value.reason == "QUOTA_CONCURRENT_JOBS"
        busy.cancel_job(jobs[1].id)
        with pytest.raises(perito.ResourceExhaustedError) as too_many:
            busy.submit_job([f"s3://inspections/busy/{n % 3}.jpg" for n in range(6)], model="tiny")
        assert too_many.value.reason == "QUOTA_ITEMS_PER_JOB"
        assert too_many.value.retry_after is None  # waiting cannot help
        for job in jobs:
            busy.cancel_job(job.id)


def _p50_classify(client: perito.Client, image: bytes, calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        client.classify([image], model="tiny")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


HAMMER = """
import sys, time, perito
target, token, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
image = open(sys.argv[4], "rb").read()
refused = hinted = ok = 0
end = time.monotonic() + seconds
with perito.Client(target, token=token, max_retries=0) as client:
    while time.monotonic() < end:
        try:
            client.classify([image] * 4, model="tiny")
            ok += 1
        except perito.ResourceExhaustedError as error:
            refused += 1
            hinted += error.retry_after is not None
            time.sleep(0.002)  # ignores the hint; the pause only keeps this client's own CPU
            # (on the server's 2 cores) from being what slows the other tenant
print(ok, refused, hinted)
"""


def test_an_over_rate_tenant_is_refused_and_does_not_slow_another(tenancy: Tenancy) -> None:
    image = jpeg(3)
    (tenancy.work / "hammer.jpg").write_bytes(image)
    with tenancy.client("globex") as globex:
        _p50_classify(globex, image, 20)  # warm up
        idle = _p50_classify(globex, image, 60)
        hammers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    HAMMER,
                    tenancy.server.target,
                    tenancy.tokens["hammer"],
                    "12",
                    str(tenancy.work / "hammer.jpg"),
                ],
                stdout=subprocess.PIPE,
                text=True,
                env=subprocess_env(),
                # In service the hammering caller runs on its own machine; here it shares the
                # server's 2 cores, and at the lowest priority its own CPU stays out of the
                # figure, which then measures what its refused calls cost the server.
                preexec_fn=lambda: os.nice(19),
            )
            for _ in range(2)
        ]
        time.sleep(3)  # they are connected and past their first minute's allowance
        loaded = _p50_classify(globex, image, 60)
        counts = [tuple(map(int, h.communicate(timeout=60)[0].split())) for h in hammers]
    ok = sum(c[0] for c in counts)
    refused = sum(c[1] for c in counts)
    hinted = sum(c[2] for c in counts)
    print(
        f"\nClassify p50 for globex: idle {idle * 1000:.1f} ms, under hammer's load "
        f"{loaded * 1000:.1f} ms ({loaded / idle:.2f}x); hammer: {ok} calls admitted "
        f"({ok * 4} images), {refused} refused"
    )
    assert refused > 0 and hinted == refused
    assert ok * 4 <= 120 + 2 * 12 + 4  # a minute's allowance, and 2 a second for 12 s
    # Twice the idle p50, or 10 ms more where that is larger: the hammers share the server's
    # 2 cores here, and at a 5 ms p50 a few ms of scheduling is noise (a clean clone once saw
    # 4.9 -> 11.4 ms); a queue behind the refused calls would cost far more.
    assert loaded <= max(2 * idle, idle + 0.010), (idle, loaded)


def test_the_tenants_file_is_reread_when_it_changes(tenancy: Tenancy) -> None:
    path = tenancy.work / "tenants.yaml"
    token = add_tenant(path, "newcomer", roles=["models:read"], models=["tiny"])
    time.sleep(1.2)  # the file is looked at once a second
    with perito.Client(tenancy.server.target, token=token) as client:
        assert [m.name for m in client.list_models()] == ["tiny"]
    from perito_core.access.audit import AuditLog

    store = tenancy.server.running.service.jobs.store  # type: ignore[attr-defined]
    [reload] = AuditLog(store.redis, 3600).list(method="tenants.reload", limit=1)
    assert reload.outcome == "OK" and reload.resource == str(path)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_unauthenticated_64_mib_body_is_refused_before_it_is_read(
    tmp_path: Path, redis_url: str, tiny_model_file: Path
) -> None:
    tiny_registry(tmp_path / "registry", tiny_model_file)
    tenants_file = tmp_path / "tenants.yaml"
    token = add_tenant(tenants_file, "acme", roles=["classify"], models=["tiny"])
    port = free_port()
    env = subprocess_env(
        PERITO_REGISTRY=str(tmp_path / "registry"),
        PERITO_CACHE_DIR=str(tmp_path / "cache"),
        PERITO_REDIS_URL=redis_url,
        PERITO_TENANTS_FILE=str(tenants_file),
        PERITO_MAX_MESSAGE_BYTES=str(128 * 1024 * 1024),
        PERITO_MAX_QUEUE_BYTES=str(256 * 1024 * 1024),
    )
    args = ["serve", "--port", str(port), "--preload", "tiny"]
    server = perito_proc("perito serve", args, env, tmp_path / "serve.log", "").launch()
    body = classify_pb2.ClassifyRequest(
        model="tiny", images=[image_pb2.Image(content=os.urandom(64 * 1024 * 1024))]
    )
    try:
        wait_for_port(port, timeout=120, process=server)
        options = [("grpc.max_send_message_length", 128 * 1024 * 1024)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = service_pb2_grpc.PeritoStub(channel)
            small = classify_pb2.ClassifyRequest(
                model="tiny", images=[image_pb2.Image(content=jpeg(1))]
            )
            stub.Classify(small, metadata=[("authorization", f"Bearer {token}")], timeout=60)
            before = _peak_rss_kib(server.pid)
            for metadata in ([], [("authorization", "Bearer prt_wrong")]):
                started = time.perf_counter()
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Classify(body, metadata=metadata, timeout=60)
                assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
                print(f"\nrefused in {time.perf_counter() - started:.2f} s")
            refused_peak = _peak_rss_kib(server.pid)
            # The control: the same body with a token is read, and the peak shows it.
            with pytest.raises(grpc.RpcError) as caught:
                stub.Classify(body, metadata=[("authorization", f"Bearer {token}")], timeout=60)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # not an image
            read_peak = _peak_rss_kib(server.pid)
        print(
            f"server peak RSS: {before / 1024:.0f} MiB before, {refused_peak / 1024:.0f} MiB "
            f"after two unauthenticated 64 MiB bodies (+{(refused_peak - before) / 1024:.1f}), "
            f"{read_peak / 1024:.0f} MiB after one authenticated "
            f"(+{(read_peak - before) / 1024:.1f})"
        )
        assert refused_peak - before < 16 * 1024
        assert read_peak - before > 60 * 1024
    finally:
        server.stop(30)
