"""Refused job submissions, tried as another tenant would, over real sockets (gRPC SubmitJob
with the generated stub and with the SDK, and `POST /v1/jobs`): two tenants with a local
root each, a real redis-server. A refusal names the field at fault, quotes the caller's own
input only (never the server's roots, another tenant's folder behind a symbolic link, the
server's working directory or a Python exception), and leaves nothing behind: no results
folder, no Redis key, no quota slot, no audit record of success."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import perito
from perito.v1 import image_pb2, jobs_pb2, service_pb2_grpc
from perito_core.access.audit import AUDIT_KEY, AuditLog
from perito_core.access.tenancy import Quotas, add_tenant
from perito_server.settings import ServerSettings
from tests.conftest import tiny_registry
from tests.helpers import ServerThread, encoded

pytestmark = pytest.mark.integration

# Words of Python's exception texts for paths it cannot take (os.stat, Path.resolve).
PYTHON_WORDS = ("Traceback", "ValueError", "OSError", "Errno", "embedded null", "too long")


@dataclass
class Site:
    server: ServerThread
    work: Path
    tokens: dict[str, str]
    redis_url: str

    @property
    def results(self) -> Path:
        return self.work / "results"

    @property
    def acme_root(self) -> Path:
        return self.work / "acme-claims-root"

    @property
    def globex_root(self) -> Path:
        return self.work / "globex-root"


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_file: Path, redis_url: str
) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("refusals")
    tiny_registry(work / "registry", tiny_model_file)
    acme, globex = work / "acme-claims-root", work / "globex-root"
    for root in (acme, globex):
        root.mkdir()
        pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        (root / "0.jpg").write_bytes(encoded(pixels, "JPEG"))
    (acme / "manifest.csv").write_text(f"uri\n{acme / '0.jpg'}\n")
    (globex / "crossing.csv").write_text(f"uri\n{acme / '0.jpg'}\n")
    (globex / "header-only.csv").write_text("uri,id\n")
    (globex / "to-acme").symlink_to(acme)  # a link in globex's root into acme's
    (globex / "to-acme.jpg").symlink_to(acme / "0.jpg")
    (work / "results").mkdir()
    tenants_file = work / "tenants.yaml"
    tokens = {
        name: add_tenant(
            tenants_file,
            name,
            roles=["classify", "jobs"],
            models=["tiny"],
            read=[str(root)],
            write=[str(root / "out")],
            quotas=Quotas(concurrent_jobs=2),
        )
        for name, root in (("acme", acme), ("globex", globex))
    }
    # A database of its own: the keys counted here are this server's only.
    url = redis_url.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(url).flushdb()
    settings = ServerSettings(
        port=0,
        http_port=0,
        registry=str(work / "registry"),
        redis_url=url,
        cache_dir=work / "server-cache",
        results_uri=str(work / "results"),
        local_roots=[acme, globex],  # one root per tenant, as the docs advise
        tenants_file=tenants_file,
        max_watches_per_tenant=3,
    )
    with ServerThread(settings) as server:
        yield Site(server, work, tokens, url)


@dataclass
class Refusal:
    code: str  # the status code's name
    field: str
    message: str


def refused_over_grpc(site: Site, request: jobs_pb2.SubmitJobRequest) -> Refusal:
    """The refusal of `request` sent as globex with the generated stub (the text exactly as
    given: the SDK would resolve local paths on the caller's side first)."""
    with grpc.insecure_channel(site.server.target) as channel:
        stub = service_pb2_grpc.PeritoStub(channel)
        try:
            job = stub.SubmitJob(
                request,
                metadata=[("authorization", f"Bearer {site.tokens['globex']}")],
                timeout=30,
            )
        except grpc.RpcError as caught:
            error: Any = caught
        else:
            return Refusal("OK", "", f"job {job.id} accepted")
    fields = []
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [violation.field for violation in bad.field_violations]
    return Refusal(error.code().name, fields[0] if fields else "", error.details())


def refused_over_http(site: Site, body: dict[str, Any]) -> tuple[int, Refusal]:
    """The HTTP status and refusal of `POST /v1/jobs` with `body`, sent as globex."""
    answer = httpx.post(
        f"http://127.0.0.1:{site.server.running.http_port}/v1/jobs",  # type: ignore[attr-defined]
        content=json.dumps(body),  # ASCII, with \u escapes: a lone surrogate travels too
        headers={
            "Authorization": f"Bearer {site.tokens['globex']}",
            "Content-Type": "application/json",
        },
        timeout=30,
    )
    if answer.status_code == 200:
        return 200, Refusal("OK", "", f"job {answer.json()['id']} accepted")
    error = answer.json()["error"]
    fields = [
        violation["field"]
        for detail in error.get("details", [])
        for violation in detail.get("fieldViolations", [])
    ]
    return answer.status_code, Refusal(
        error["status"], fields[0] if fields else "", error["message"]
    )


def cases(site: Site) -> dict[str, tuple[dict[str, Any], str, str]]:
    """Each refused request (its JSON body), the status and the field it names."""
    acme, globex = site.acme_root, site.globex_root
    return {
        "a path in another tenant's root": (
            {"uris": {"uris": [str(acme / "0.jpg")]}},
            "PERMISSION_DENIED",
            "uris[0]",
        ),
        "a path under no root at all": (
            {"uris": {"uris": ["/etc/hostname"]}},
            "PERMISSION_DENIED",
            "uris[0]",
        ),
        "a folder in another tenant's root": ({"prefix": str(acme)}, "PERMISSION_DENIED", "prefix"),
        "another tenant's manifest": (
            {"manifestUri": str(acme / "manifest.csv")},
            "PERMISSION_DENIED",
            "manifest_uri",
        ),
        "a symlink to another tenant's image": (
            {"uris": {"uris": [str(globex / "to-acme.jpg")]}},
            "PERMISSION_DENIED",
            "uris[0]",
        ),
        "a symlink to another tenant's folder": (
            {"prefix": str(globex / "to-acme")},
            "PERMISSION_DENIED",
            "prefix",
        ),
        "a file:// URI through a symlink": (
            {"uris": {"uris": [f"file://{globex}/to-acme/0.jpg"]}},
            "PERMISSION_DENIED",
            "uris[0]",
        ),
        "a relative path": ({"uris": {"uris": ["0.jpg"]}}, "INVALID_ARGUMENT", "uris[0]"),
        "a relative folder": ({"prefix": "globex-root"}, "INVALID_ARGUMENT", "prefix"),
        "a NUL byte": (
            {"uris": {"uris": [f"{globex}/0.jpg\x00.png"]}},
            "INVALID_ARGUMENT",
            "uris[0]",
        ),
        "a NUL byte in an S3 key": (
            {"uris": {"uris": ["s3://inspections/globex/0\x00.jpg"]}},
            "INVALID_ARGUMENT",
            "uris[0]",
        ),
        "a 5,000-character path": (
            {"uris": {"uris": [f"{globex}/" + "a" * 5000]}},
            "INVALID_ARGUMENT",
            "uris[0]",
        ),
        "a 5,000-character S3 key": (
            {"prefix": "s3://inspections/" + "k" * 5000},
            "INVALID_ARGUMENT",
            "prefix",
        ),
        "an output under no root": (
            {"uris": {"uris": [str(globex / "0.jpg")]}, "outputUri": "/tmp/globex-out"},
            "PERMISSION_DENIED",
            "output_uri",
        ),
        "an output in another tenant's root": (
            {"uris": {"uris": [str(globex / "0.jpg")]}, "outputUri": str(acme / "out")},
            "PERMISSION_DENIED",
            "output_uri",
        ),
        "a relative output": (
            {"uris": {"uris": [str(globex / "0.jpg")]}, "outputUri": "out"},
            "INVALID_ARGUMENT",
            "output_uri",
        ),
        "a NUL byte in the output": (
            {"uris": {"uris": [str(globex / "0.jpg")]}, "outputUri": f"{globex}/out/\x00"},
            "INVALID_ARGUMENT",
            "output_uri",
        ),
        # Refused while the job is being recorded, after its output was claimed and tried.
        "the tenant's own manifest naming another tenant's image": (
            {"manifestUri": str(globex / "crossing.csv"), "outputUri": str(globex / "out/m")},
            "PERMISSION_DENIED",
            "manifest_uri (item 1)",
        ),
        "an empty manifest of the tenant's own": (
            {"manifestUri": str(globex / "header-only.csv"), "outputUri": str(globex / "out/e/f")},
            "INVALID_ARGUMENT",
            "manifest_uri",
        ),
        # Empty and blank locations name nothing: never the server's working directory.
        "an empty prefix": ({"prefix": ""}, "INVALID_ARGUMENT", "prefix"),
        "a blank manifest": ({"manifestUri": " \t"}, "INVALID_ARGUMENT", "manifest_uri"),
        "an empty URI after a good one": (
            {"uris": {"uris": [str(globex / "0.jpg"), ""]}},
            "INVALID_ARGUMENT",
            "uris[1]",
        ),
        "a blank output (an empty one is the default)": (
            {"uris": {"uris": [str(globex / "0.jpg")]}, "outputUri": " "},
            "INVALID_ARGUMENT",
            "output_uri",
        ),
        "a file:// URI with no path": ({"prefix": "file://"}, "INVALID_ARGUMENT", "prefix"),
        "an s3:// URI with no bucket": ({"prefix": "s3://"}, "INVALID_ARGUMENT", "prefix"),
        "an S3 key after two slashes": (
            {"uris": {"uris": ["s3:///globex/0.jpg"]}},
            "INVALID_ARGUMENT",
            "uris[0]",
        ),
        "a bucket where an image is wanted": (
            {"uris": {"uris": ["s3://inspections/"]}},
            "INVALID_ARGUMENT",
            "uris[0]",
        ),
        # '.' and '..' are refused as written, inside the tenant's root or not.
        "a '..' that comes back into the tenant's root": (
            {"uris": {"uris": [f"{globex}/../{globex.name}/0.jpg"]}},
            "INVALID_ARGUMENT",
            "uris[0]",
        ),
        "a '..' into another tenant's root": (
            {"prefix": f"{globex}/../{acme.name}"},
            "INVALID_ARGUMENT",
            "prefix",
        ),
        "a '.' in the output": (
            {"uris": {"uris": [str(globex / "0.jpg")]}, "outputUri": f"{globex}/out/./x"},
            "INVALID_ARGUMENT",
            "output_uri",
        ),
        "a '..' in an S3 key": (
            {"manifestUri": "s3://inspections/globex/../acme/m.csv"},
            "INVALID_ARGUMENT",
            "manifest_uri",
        ),
        # Labels live in the job's Redis record, read by every listing: bounded as Kubernetes
        # bounds labels, so one tenant cannot fill the Redis every tenant shares.
        "2,000 labels": (
            {
                "uris": {"uris": [str(globex / "0.jpg")]},
                "labels": {f"k{i}": "v" for i in range(2000)},
            },
            "INVALID_ARGUMENT",
            "labels",
        ),
        "a label key of control characters": (
            {"uris": {"uris": [str(globex / "0.jpg")]}, "labels": {"\x00\n": "x"}},
            "INVALID_ARGUMENT",
            "labels",
        ),
        "a label value with a newline": (
            {"uris": {"uris": [str(globex / "0.jpg")]}, "labels": {"site": "a\nb"}},
            "INVALID_ARGUMENT",
            "labels[site]",
        ),
        "a 20,000-character label value": (
            {"uris": {"uris": [str(globex / "0.jpg")]}, "labels": {"site": "v" * 20_000}},
            "INVALID_ARGUMENT",
            "labels[site]",
        ),
        # Refused before a quota slot is taken: the concurrent-jobs refusal came first.
        "no input at all": ({}, "INVALID_ARGUMENT", "input"),
        "an empty URI list": ({"uris": {"uris": []}}, "INVALID_ARGUMENT", "uris"),
        "a good image, then one in another tenant's root": (
            {"uris": {"uris": [str(globex / "0.jpg"), str(acme / "0.jpg")]}},
            "PERMISSION_DENIED",
            "uris[1]",
        ),
    }


def as_request(body: dict[str, Any]) -> jobs_pb2.SubmitJobRequest:
    request = jobs_pb2.SubmitJobRequest(model="tiny", request_id=os.urandom(8).hex())
    if "uris" in body:
        request.uris.uris.extend(body["uris"]["uris"])
    if "prefix" in body:
        request.prefix = body["prefix"]
    if "manifestUri" in body:
        request.manifest_uri = body["manifestUri"]
    request.output_uri = body.get("outputUri", "")
    request.labels.update(body.get("labels", {}))
    return request


def leaks(site: Site, given: list[str], message: str) -> list[str]:
    """What `message` tells beyond the caller's own inputs `given`: the other tenant's root,
    the roots' list, where a link leads, the working directory, Python's words."""
    told = message
    for text in sorted(given, key=len, reverse=True):
        told = told.replace(text, "")
    secrets = [str(site.acme_root), "acme-claims", os.getcwd(), *PYTHON_WORDS]
    return [secret for secret in secrets if secret in told]


def given_texts(site: Site, body: dict[str, Any]) -> list[str]:
    """The locations the caller sent, and the lines of its own manifest: anything quoted
    from them is its own."""
    texts = [*body.get("uris", {}).get("uris", []), body.get("prefix", "")]
    manifest = body.get("manifestUri", "")
    if manifest.startswith(str(site.globex_root)):
        texts += Path(manifest).read_text().splitlines()
    return [t for t in [*texts, manifest, body.get("outputUri", "")] if t]


def leftovers(site: Site) -> tuple[set[Path], set[bytes]]:
    """Everything in the results area and the tenants' roots, and every Redis key but the
    audit log's."""
    keys = set(redis.Redis.from_url(site.redis_url).keys("*")) - {AUDIT_KEY.encode()}
    folders = (site.results, site.acme_root, site.globex_root)
    return {path for folder in folders for path in folder.rglob("*")}, keys


def test_refusals_name_the_field_quote_only_the_callers_input_and_leave_nothing(
    site: Site,
) -> None:
    before = leftovers(site)
    globex = site.globex_root
    problems = []
    for case, (body, code, field) in cases(site).items():
        answers = {
            "gRPC": refused_over_grpc(site, as_request(body)),
            "HTTP": refused_over_http(site, {"model": "tiny", **body}),
        }
        http_status, answers["HTTP"] = answers["HTTP"]  # type: ignore[misc]
        expected_status = {"PERMISSION_DENIED": 403, "INVALID_ARGUMENT": 400}[code]
        if http_status != expected_status:
            problems.append(f"{case} (HTTP): status {http_status}")
        for door, refusal in answers.items():
            got = (refusal.code, refusal.field)
            if got != (code, field):
                problems.append(f"{case} ({door}): {got} {refusal.message!r}")
            if field not in refusal.message:
                problems.append(f"{case} ({door}): the message does not name {field}")
            leaked = leaks(site, given_texts(site, body), refusal.message)
            if leaked:
                problems.append(f"{case} ({door}): tells {leaked}: {refusal.message!r}")
    # JSON may carry what protobuf cannot (a lone surrogate): refused by the JSON door.
    status, refusal = refused_over_http(site, {"model": "tiny", "prefix": f"{globex}/\udc80"})
    if (status, refusal.code) != (400, "INVALID_ARGUMENT") or leaks(site, [], refusal.message):
        problems.append(f"a lone surrogate (HTTP): {status} {refusal}")
    assert not problems, "\n".join(problems)
    assert leftovers(site) == before
    records = AuditLog(redis.Redis.from_url(site.redis_url), 3600).list(limit=500)
    submitted = [r for r in records if r.method == "SubmitJob" and r.tenant == "globex"]
    assert len(submitted) == 2 * len(cases(site))  # the surrogate: refused before SubmitJob
    assert all(r.outcome in ("PERMISSION_DENIED", "INVALID_ARGUMENT") for r in submitted)


def test_an_unwritable_output_behind_a_link_is_refused_quoting_the_callers_text(
    site: Site,
) -> None:
    # The tenant's own output folder, reached through a link, whose results file is a link:
    # never written over, and the refusal quotes the location as sent, not where it leads.
    out = site.globex_root / "out"
    real = out / "behind-the-link"
    real.mkdir(parents=True)
    (real / "results.jsonl").symlink_to(site.globex_root / "0.jpg")
    (out / "via-link").symlink_to(real)
    given = str(out / "via-link")
    body = {"uris": {"uris": [str(site.globex_root / "0.jpg")]}, "outputUri": given}
    try:
        status, over_http = refused_over_http(site, {"model": "tiny", **body})
        over_grpc = refused_over_grpc(site, as_request(body))
    finally:
        (out / "via-link").unlink()
        (real / "results.jsonl").unlink()
        real.rmdir()
    assert status == 400
    for refusal in (over_grpc, over_http):
        assert (refusal.code, refusal.field) == ("FAILED_PRECONDITION", "output_uri"), refusal
        assert repr(given) in refusal.message and "symbolic link" in refusal.message
        assert "behind-the-link" not in refusal.message, refusal.message


def test_the_sdk_gets_the_same_refusals(site: Site) -> None:
    before = leftovers(site)
    with perito.Client(site.server.target, token=site.tokens["globex"], max_retries=0) as sdk:
        for source, output, error, field in (
            ([str(site.acme_root / "0.jpg")], "", perito.PermissionDeniedError, "uris[0]"),
            (site.acme_root, "", perito.PermissionDeniedError, "prefix"),
            ([str(site.globex_root / "0.jpg")], "/srv", perito.PermissionDeniedError, "output_uri"),
            ([str(site.globex_root / "0.jpg")], "out", perito.InvalidArgumentError, "output_uri"),
            (["s3://inspections/" + "k" * 5000], "", perito.InvalidArgumentError, "uris[0]"),
            ("s3://", "", perito.InvalidArgumentError, "prefix"),
            (["s3://inspections"], "", perito.InvalidArgumentError, "uris[0]"),
            ([str(site.globex_root / "0.jpg")], " ", perito.InvalidArgumentError, "output_uri"),
        ):
            with pytest.raises(error) as caught:
                sdk.submit_job(source, model="tiny", output_uri=output)  # type: ignore[arg-type]
            assert caught.value.violations[0].field == field, caught.value
            given = [*map(str, source if isinstance(source, list) else [source]), output]
            assert not leaks(site, given, str(caught.value)), caught.value
        # An empty source would be Path(""), the caller's working directory: refused at once.
        for empty in ("", " ", ["s3://inspections/globex/0.jpg", ""]):
            with pytest.raises(ValueError, match="empty"):
                sdk.submit_job(empty, model="tiny")  # type: ignore[arg-type]
    assert leftovers(site) == before


def test_another_tenants_job_is_a_missing_job_and_odd_ids_tell_nothing(site: Site) -> None:
    """globex tries acme's job id on every job method, through the SDK and the JSON API:
    the answer is the one for an id that never existed, in the same words. Ids that cannot
    be a job's (empty, a Redis key of a job's parts, a NUL byte, 100,000 characters) are
    INVALID_ARGUMENT naming job_id, quoted short, never an internal error."""
    http = f"http://127.0.0.1:{site.server.running.http_port}/v1/jobs"  # type: ignore[attr-defined]
    with (
        perito.Client(site.server.target, token=site.tokens["acme"]) as acme,
        perito.Client(site.server.target, token=site.tokens["globex"], max_retries=0) as globex,
    ):
        theirs = acme.submit_job([str(site.acme_root / "0.jpg")], model="tiny").last.id
        missing = "0" * len(theirs)
        methods = {
            "GetJob": globex.get_job,
            "CancelJob": globex.cancel_job,
            "DeleteJob": globex.delete_job,
            "WatchJob": lambda job_id: list(globex.watch_job(job_id)),
            "ListJobResults": lambda job_id: list(globex.list_job_results(job_id)),
        }
        for method, call in methods.items():
            answers = []
            for job_id in (theirs, missing):
                with pytest.raises(perito.NotFoundError) as caught:
                    call(job_id)
                error = caught.value
                told = f"{error.reason} {error.violations} {error.message}"
                answers.append(told.replace(job_id, "ID"))
            assert answers[0] == answers[1], method
            for odd in ("", f"{theirs}:open", f"{theirs}:results", "a\x00b", "x" * 100_000):
                with pytest.raises(perito.InvalidArgumentError) as invalid:
                    call(odd)
                assert invalid.value.violations[0].field == "job_id", (method, odd[:20])
                assert len(invalid.value.message) < 300 and "Error" not in invalid.value.message
        for verb, tail in (("GET", ""), ("GET", "/results"), ("POST", ":cancel")):
            answers = []
            for job_id in (theirs, missing):
                answer = httpx.request(
                    verb,
                    f"{http}/{job_id}{tail}",
                    headers={"Authorization": f"Bearer {site.tokens['globex']}"},
                    timeout=30,
                )
                assert answer.status_code == 404, answer.text
                answers.append(answer.text.replace(job_id, "ID"))
            assert answers[0] == answers[1], tail
            for odd in ("a%00b", "x" * 3000, "%C3%A9"):
                answer = httpx.request(
                    verb,
                    f"{http}/{odd}{tail}",
                    headers={"Authorization": f"Bearer {site.tokens['globex']}"},
                    timeout=30,
                )
                assert answer.status_code == 400, (tail, odd[:20], answer.text)
                assert answer.json()["error"]["status"] == "INVALID_ARGUMENT"
        assert acme.get_job(theirs).id == theirs  # untouched by globex's tries
        acme.cancel_job(theirs)


def test_a_job_in_the_tenants_own_root_is_accepted_through_both_doors(site: Site) -> None:
    """The refusals above are the paths', not the setup's: the same requests with the
    tenant's own paths make jobs (and free their quota slots when cancelled)."""
    own = str(site.globex_root / "0.jpg")
    with perito.Client(site.server.target, token=site.tokens["globex"]) as sdk:
        labels = {"claim": "C-2026/0042 front bumper", "site.id": "garage-7"}
        job = sdk.submit_job(
            [own], model="tiny", output_uri=str(site.globex_root / "out/a"), labels=labels
        ).last
        assert job.output_uri == str(site.globex_root / "out" / "a")
        assert job.labels == labels
        sdk.cancel_job(job.id)
        answer = httpx.post(
            f"http://127.0.0.1:{site.server.running.http_port}/v1/jobs",  # type: ignore[attr-defined]
            json={"model": "tiny", "uris": {"uris": [own]}},
            headers={"Authorization": f"Bearer {site.tokens['globex']}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        sdk.cancel_job(answer.json()["id"])


def test_a_deleted_jobs_output_folder_may_be_given_to_a_new_job_at_once(site: Site) -> None:
    """A job's output folder is claimed so that no other job overwrites its results; once the
    job is deleted the claim went with it: the folder (or one above it) was refused for 8
    days with OUTPUT_IN_USE."""
    own = str(site.globex_root / "0.jpg")
    output = str(site.globex_root / "out" / "reused")
    with perito.Client(site.server.target, token=site.tokens["globex"]) as sdk:
        first = sdk.submit_job([own], model="tiny", output_uri=output).last
        with pytest.raises(perito.PermissionDeniedError, match="another job writes"):
            sdk.submit_job([own], model="tiny", output_uri=output)
        sdk.delete_job(first.id)
        second = sdk.submit_job([own], model="tiny", output_uri=f"{output}/under").last
        assert second.output_uri == f"{output}/under"
        sdk.delete_job(second.id)
        third = sdk.submit_job([own], model="tiny", output_uri=output).last
        sdk.delete_job(third.id)


def test_page_tokens_and_filters_not_made_by_the_server_are_invalid_arguments(
    site: Site,
) -> None:
    """A token the server never made is the caller's mistake: `nan:x` was UNAVAILABLE ("the
    job store (Redis) is unreachable: min or max is not a float", so callers retried it), and
    "-1", "1_0" or another script's digits were read as positions; an unknown filter
    answered every result."""
    metadata = [("authorization", f"Bearer {site.tokens['globex']}")]
    own = str(site.globex_root / "0.jpg")
    with grpc.insecure_channel(site.server.target) as channel:
        stub = service_pb2_grpc.PeritoStub(channel)
        job = stub.SubmitJob(
            jobs_pb2.SubmitJobRequest(model="tiny", uris=jobs_pb2.UriList(uris=[own])),
            metadata=metadata,
            timeout=30,
        )
        calls: list[tuple[str, Any, str]] = [
            ("ListJobs", jobs_pb2.ListJobsRequest(page_token=token), "page_token")
            for token in ("nan:x", "inf:x", "1e400:zz", "12.5:", "x")
        ]
        calls += [
            (
                "ListJobResults",
                jobs_pb2.ListJobResultsRequest(job_id=job.id, page_token=t),
                "page_token",
            )
            for t in ("-1", "1_0", "\u0661", "+1", " 1")
        ]
        calls += [
            ("ListJobResults", jobs_pb2.ListJobResultsRequest(job_id=job.id, filter=f), "filter")  # type: ignore[arg-type]
            for f in (3, 99, -1)
        ]
        for method, request, field in calls:
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, method)(request, metadata=metadata, timeout=30)
            error: Any = refused.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, request, error)
            assert field in error.details(), (method, request, error)
        stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id), metadata=metadata, timeout=30)


def test_job_item_ids_are_bounded_as_classify_ids(site: Site) -> None:
    """An item id over 256 characters (Classify's limit) was stored, a JSONL manifest's
    `"id": {...}` became the text "{'a': 1}", and an inline image with neither content nor
    uri failed later as EMPTY: each refused, naming the field."""
    globex = site.globex_root
    metadata = [("authorization", f"Bearer {site.tokens['globex']}")]
    (globex / "long-id.csv").write_text(f"uri,id\n{globex / '0.jpg'},{'i' * 300}\n")
    record = {"uri": str(globex / "0.jpg"), "id": {"a": 1}}
    (globex / "object-id.jsonl").write_text(json.dumps(record) + "\n")
    refused = {
        "images[0].id": jobs_pb2.SubmitJobRequest(
            model="tiny",
            images=jobs_pb2.InlineImages(images=[image_pb2.Image(id="i" * 300, content=b"x")]),
        ),
        "images[1]": jobs_pb2.SubmitJobRequest(
            model="tiny",
            images=jobs_pb2.InlineImages(
                images=[image_pb2.Image(content=b"x"), image_pb2.Image(id="nothing")]
            ),
        ),
        "manifest_uri (item 1).id": jobs_pb2.SubmitJobRequest(
            model="tiny", manifest_uri=str(globex / "long-id.csv")
        ),
        "manifest_uri": jobs_pb2.SubmitJobRequest(
            model="tiny", manifest_uri=str(globex / "object-id.jsonl")
        ),
    }
    with grpc.insecure_channel(site.server.target) as channel:
        stub = service_pb2_grpc.PeritoStub(channel)
        for field, request in refused.items():
            with pytest.raises(grpc.RpcError) as caught:
                stub.SubmitJob(request, metadata=metadata, timeout=30)
            error: Any = caught.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error)
            status = rpc_status.from_call(error)
            assert status is not None
            named = []
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    named += [violation.field for violation in bad.field_violations]
            assert named[:1] == [field], (field, named, error.details())


def test_one_tenants_watch_streams_are_bounded_and_leave_the_others_room(site: Site) -> None:
    """WatchJob streams held open by one tenant took every one of the server's concurrent
    calls, and other tenants' Classify and CancelJob were refused by gRPC itself (no retry
    hint). A tenant's streams are bounded (`max_watches_per_tenant`, 3 here): the next one is
    RESOURCE_EXHAUSTED with a retry hint, while another tenant watches on."""
    tokens = site.tokens
    with grpc.insecure_channel(site.server.target) as channel:
        stub = service_pb2_grpc.PeritoStub(channel)

        def submitted(tenant: str, root: Path) -> str:
            request = jobs_pb2.SubmitJobRequest(
                model="tiny", uris=jobs_pb2.UriList(uris=[str(root / "0.jpg")])
            )
            auth = [("authorization", f"Bearer {tokens[tenant]}")]
            return str(stub.SubmitJob(request, metadata=auth, timeout=30).id)  # queued: no worker

        def watch(tenant: str, job_id: str) -> Any:
            auth = [("authorization", f"Bearer {tokens[tenant]}")]
            return stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=auth)

        theirs, ours = submitted("globex", site.globex_root), submitted("acme", site.acme_root)
        streams = [watch("globex", theirs) for _ in range(3)]
        for stream in streams:
            assert next(stream).id == theirs
        with pytest.raises(grpc.RpcError) as refused:
            next(watch("globex", theirs))
        error: Any = refused.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "QUOTA_CONCURRENT_WATCHES" in str(rpc_status.from_call(error)), error
        other = watch("acme", ours)
        assert next(other).id == ours
        other.cancel()
        streams.pop().cancel()
        time.sleep(0.5)  # the server sees the stream end
        again = watch("globex", theirs)
        assert next(again).id == theirs
        for stream in (*streams, again):
            stream.cancel()
        for tenant, job_id in (("globex", theirs), ("acme", ours)):
            auth = [("authorization", f"Bearer {tokens[tenant]}")]
            stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), metadata=auth, timeout=30)
