"""Tenants as data: parsing the tenants file, token lookup, and the storage rule (pure logic,
no server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from perito_core.access.tenancy import (
    Location,
    Tenant,
    Tenants,
    add_tenant,
    check_uri,
    parse_tenants,
)
from perito_core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from perito_core.storage import check_uri_text

REGISTRY = "s3://models/registry"


def tenant(**storage: list[str]) -> Tenant:
    return Tenant(
        "acme",
        read=tuple(Location.parse(p) for p in storage.get("read", [])),
        write=tuple(Location.parse(p) for p in storage.get("write", [])),
    )


ACME = tenant(read=["s3://inbox/acme/"], write=["s3://results/acme"])


@pytest.mark.parametrize(
    "uri",
    [
        "s3://inbox/acme/a.jpg",
        "s3://inbox/acme/2024/claim #1?.jpg",
        "s3://results/acme/out/results.jsonl",  # writable, so readable
    ],
)
def test_reads_inside_the_prefixes_pass(uri: str) -> None:
    check_uri(ACME, uri, "read", "uris[0]", forbidden=[REGISTRY])


@pytest.mark.parametrize(
    "uri",
    [
        "s3://inbox/acme-other/a.jpg",  # a sibling that shares the prefix's letters
        "s3://inbox/globex/a.jpg",
        "s3://other/acme/a.jpg",
        "s3://arn:aws:s3:us-east-1:1:accesspoint/ap/acme/a.jpg",
        "s3://INBOX/acme/a.jpg",
        "/etc/passwd",
        "file:///",
    ],
)
def test_reads_outside_are_refused_naming_the_field(uri: str) -> None:
    with pytest.raises(PermissionDenied) as caught:
        check_uri(ACME, uri, "read", "uris[3]", forbidden=[REGISTRY])
    assert caught.value.field == "uris[3]"


@pytest.mark.parametrize(
    ("uri", "names_object"),
    [
        ("", False),
        (" ", False),
        ("\t\n", True),
        ("s3://", False),
        ("s3:// /acme/a.jpg", False),
        ("s3:///acme/a.jpg", False),  # key '/acme/a.jpg'
        ("s3://inbox//acme/a.jpg", False),
        ("s3://inbox/acme/../globex/a.jpg", False),  # literal on S3, a step up locally
        ("s3://inbox/acme/./a.jpg", False),
        ("s3://inbox/acme/..", False),
        ("s3://inbox", True),  # a folder where an object is wanted
        ("s3://inbox/acme/", True),
        ("file://", False),
        ("file://localhost", False),
        ("/srv/acme/../globex/a.jpg", False),
        ("/srv/acme/./a.jpg", False),
        ("file:///srv/acme/../globex", False),
        ("/srv/acme/..", False),
        ("acme/a.jpg", False),
    ],
)
def test_malformed_locations_are_invalid_whoever_asks(uri: str, names_object: bool) -> None:
    """Refused on the text alone, for a tenant with prefixes and for one with every right
    alike: INVALID_ARGUMENT naming the field, before any prefix is compared."""
    with pytest.raises(InvalidArgument) as caught:
        check_uri_text(uri, "uris[3]", names_object=names_object)
    assert caught.value.field == "uris[3]"
    if names_object:
        return  # a folder is a fine prefix
    for who in (ACME, Tenant.unrestricted("default")):
        with pytest.raises(InvalidArgument) as caught:
            check_uri(who, uri, "read", "uris[3]", forbidden=[REGISTRY])
        assert caught.value.field == "uris[3]"


@pytest.mark.parametrize(
    "uri", ["s3://inbox/acme/a..b.jpg", "s3://inbox/acme/.hidden", "/srv/acme/...", "/srv/a b"]
)
def test_dots_and_spaces_inside_a_name_are_just_characters(uri: str) -> None:
    check_uri_text(uri, "uris[0]", names_object=True)


def test_writes_need_a_write_prefix_and_never_the_registry() -> None:
    with pytest.raises(PermissionDenied):
        check_uri(ACME, "s3://inbox/acme/out", "write", "output_uri")
    anyone = Tenant.unrestricted("default")
    check_uri(anyone, "s3://anything/at/all", "write", "output_uri", forbidden=[REGISTRY])
    for reserved in ("s3://models/registry", "s3://models/registry/models/x/1/model.pt"):
        with pytest.raises(PermissionDenied) as caught:
            check_uri(anyone, reserved, "write", "output_uri", forbidden=[REGISTRY])
        assert caught.value.reason == "RESERVED_LOCATION"
    check_uri(anyone, "s3://models/registry-other/x", "write", "output_uri", forbidden=[REGISTRY])


def test_local_prefixes_resolve_symlinks(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    (tmp_path / "globex").mkdir()
    (tmp_path / "globex" / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "globex" / "secret.jpg", tmp_path / "acme" / "link.jpg")
    local = tenant(read=[str(tmp_path / "acme")])
    check_uri(local, str(tmp_path / "acme" / "own.jpg"), "read", "uris[0]")
    with pytest.raises(PermissionDenied):
        check_uri(local, str(tmp_path / "acme" / "link.jpg"), "read", "uris[0]")
    with pytest.raises(InvalidArgument):  # refused as written, never resolved
        check_uri(local, f"{tmp_path}/acme/../globex", "read", "uris[0]")


def test_the_tenants_file_holds_digests_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="never in clear"):
        parse_tenants("tenants:\n- name: acme\n  tokens: [prt_plaintext]\n")
    with pytest.raises(InvalidArgument, match="unknown role"):
        parse_tenants("tenants:\n- name: acme\n  roles: [root]\n")
    with pytest.raises(InvalidArgument, match="twice"):
        parse_tenants("tenants:\n- name: acme\n- name: acme\n")
    path = tmp_path / "tenants.yaml"
    token = add_tenant(path, "acme", roles=["jobs"], models=["car-*"])
    second = add_tenant(path, "acme", roles=[])  # rotation: a second token, same rights
    tenants = Tenants(path)
    found = tenants.authenticate(token)
    assert found is tenants.authenticate(second)
    assert found.has_role("jobs") and not found.has_role("classify")
    assert found.may_use_model("car-damage") and not found.may_use_model("other")
    for wrong in (None, "", token + "x"):
        with pytest.raises(Unauthenticated):
            tenants.authenticate(wrong)


def test_a_broken_file_keeps_the_tenants_known(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    token = add_tenant(path, "acme", roles=["jobs"])
    tenants = Tenants(path)
    path.write_text("tenants: [{name: BAD NAME}]")
    assert not tenants.reload()
    assert tenants.authenticate(token).name == "acme"


def test_without_a_file_or_tokens_everyone_is_anonymous() -> None:
    tenants = Tenants()
    assert not tenants.requires_auth
    assert tenants.authenticate(None).name == "anonymous"
    single = Tenants(None, ["s3cret"])
    assert single.authenticate("s3cret").has_role("admin")
    with pytest.raises(Unauthenticated):
        single.authenticate("other")
