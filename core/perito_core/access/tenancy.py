"""Tenants: who a token belongs to, and what that tenant may read, write, use and spend.

A tenants file (`PERITO_TENANTS_FILE`, YAML) lists the tenants:

    tenants:
      - name: acme-claims                      # [a-z0-9][a-z0-9_-]*, at most 63
        tokens: ["sha256:9f86d0..."]           # digests only; `perito tenants add` makes them
        roles: [classify, jobs, models:read]   # classify, jobs, models:read, models:publish, admin
        models: ["car-damage", "car-*"]        # names or globs; default: none
        storage:
          read: ["s3://acme-inbox/", "/data/acme/"]
          write: ["s3://results/acme/"]        # also readable
        quotas:                                # each optional; absent: no limit
          concurrent_jobs: 10
          images_per_minute: 600               # Classify images, a token bucket of one minute
          items_per_job: 100000
        prediction_log:                        # optional; absent: no log (docs/trust.md)
          uri: s3://results/acme/prediction-log/  # inside the tenant's own `write` prefixes
          retention: 400d                      # optional; default the server's

Tokens are stored as `sha256:<hex>` digests, never in clear: the file can be read by whoever
runs the server without giving anyone a token. A presented token is hashed and looked up;
a digest does not reveal its token, and a 256-bit random token cannot be guessed from it.

Without a tenants file, `PERITO_AUTH_TOKENS` is one tenant (`default`) with every role, every
model and every storage location; with neither, the server serves one anonymous tenant
(`anonymous`, the same rights) and binds to loopback only.

Storage prefixes are checked by `check_uri`: S3 buckets must be plain bucket names (no
access-point ARNs, no other bucket), local paths are resolved (symlinks followed) before they
are compared, and nothing under
the model registry is ever a job's input or output. A refusal quotes what the caller sent and
the tenant's own prefixes, never a resolved path nor anyone else's prefixes. What is malformed
whoever asks (empty, a relative path, a `.` or `..` segment in a path or key, no bucket) is
refused first, as INVALID_ARGUMENT, by `perito_core.storage.check_uri_text`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from perito_core.digests import sha256_hex
from perito_core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from perito_core.prediction_log import PredictionLogSetting, parse_duration
from perito_core.storage import (
    check_uri_text,
    echo_uri,
    has_dot_segments,
    local_path_of,
    split_s3_uri,
)

log = logging.getLogger(__name__)

ROLES = ("classify", "jobs", "models:read", "models:publish", "admin")
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# S3 bucket names (the AWS rules, loosely): no ':' (ARNs), no '/', no upper case.
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
ANY = "*"
DEFAULT_TENANT = "default"
ANONYMOUS_TENANT = "anonymous"
TOKEN_PREFIX = "prt_"

Access = Literal["read", "write"]


def hash_token(token: str) -> str:
    """The digest a tenants file stores for `token`: `sha256:<hex>`."""
    return "sha256:" + sha256_hex(token.encode())


def new_token() -> str:
    """A new random token: `prt_` and 43 URL-safe characters (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Quotas:
    """A tenant's limits; None means no limit of that kind."""

    concurrent_jobs: int | None = None
    images_per_minute: int | None = None
    items_per_job: int | None = None


@dataclass(frozen=True)
class Location:
    """One allowed storage prefix: an S3 bucket and key prefix, or a local folder."""

    bucket: str = ""  # S3; "" for a local folder
    key_prefix: str = ""  # ends in "/" unless it is the whole bucket ("")
    folder: Path | None = None  # local, resolved

    @classmethod
    def parse(cls, text: str) -> Location:
        """`s3://bucket/prefix/`, `s3://bucket` or an absolute local folder.

        Raises:
            InvalidArgument: anything else.
        """
        if text[:5].lower() == "s3://":
            bucket, key = split_s3_uri(text)
            if not BUCKET_NAME.match(bucket):
                raise InvalidArgument(f"storage prefix {text!r}: not a plain S3 bucket name")
            if has_dot_segments(key):
                raise InvalidArgument(f"storage prefix {text!r}: '.' or '..' in the key")
            if key and not key.endswith("/"):
                key += "/"
            return cls(bucket=bucket, key_prefix=key)
        path = local_path_of(text)
        if not path.is_absolute():
            raise InvalidArgument(f"storage prefix {text!r}: a local folder must be absolute")
        return cls(folder=path.resolve())

    def covers(self, bucket: str, key: str, path: Path | None) -> bool:
        if self.folder is not None:
            return path is not None and path.is_relative_to(self.folder)
        return path is None and bucket == self.bucket and key.startswith(self.key_prefix)

    def __str__(self) -> str:
        return str(self.folder) if self.folder else f"s3://{self.bucket}/{self.key_prefix}"


@dataclass(frozen=True)
class Tenant:
    """One tenant: its name, token digests, roles, models, storage prefixes and quotas.

    `read` / `write` of None mean any location (the single-tenant modes); the registry's
    prefix is refused either way.
    """

    name: str
    token_digests: tuple[str, ...] = ()
    roles: frozenset[str] = frozenset()
    models: tuple[str, ...] = ()
    read: tuple[Location, ...] | None = ()
    write: tuple[Location, ...] | None = ()
    quotas: Quotas = field(default_factory=Quotas)
    prediction_log: PredictionLogSetting | None = None

    @classmethod
    def unrestricted(cls, name: str, digests: Iterable[str] = ()) -> Tenant:
        """Every role, every model, every location: `PERITO_AUTH_TOKENS` and anonymous mode."""
        return cls(name, tuple(digests), frozenset(ROLES), (ANY,), None, None)

    def has_role(self, role: str) -> bool:
        """`admin` holds every role."""
        return role in self.roles or "admin" in self.roles

    def may_use_model(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.models)

    def require_role(self, role: str, what: str) -> None:
        """Raises PermissionDenied unless the tenant holds `role`."""
        if not self.has_role(role):
            raise PermissionDenied(
                f"tenant {self.name!r} may not {what}: it lacks the role {role!r}",
                reason="ROLE_REQUIRED",
            )

    def require_model(self, name: str, field: str = "model") -> None:
        """Raises PermissionDenied unless the tenant may use model `name` (checked on the
        name alone, before the registry is asked: it says nothing about what exists)."""
        if not self.may_use_model(name):
            raise PermissionDenied(
                f"tenant {self.name!r} may not use model {name[:64]!r}",
                field=field,
                reason="MODEL_NOT_ALLOWED",
            )


def check_uri(
    tenant: Tenant,
    uri: str,
    access: Access,
    field: str,
    *,
    forbidden: Iterable[str] = (),
    given: str | None = None,
    text_checked: bool = False,
) -> None:
    """Refuse `uri` unless it falls under one of `tenant`'s prefixes for `access` and under
    none of `forbidden` (the registry, the server's own results area).

    Local paths are resolved (symlinks followed) before they are compared; a caller checks
    the path as given and again once made canonical (`SourceReader.normalize`), so a link
    swapped in between cannot lead out. Writable prefixes are readable too. A refusal quotes
    `given` (default `uri`: what the caller sent), never a resolved path, and lists the
    tenant's own prefixes only, never another tenant's or the server's local roots.
    `text_checked`: the caller ran `check_uri_text` on `uri` already (with its own options),
    and it is not run again.

    Raises:
        InvalidArgument: naming `field`: a malformed location (`check_uri_text`: empty, a
            NUL byte, too long, not UTF-8, a relative local path, a `.` or `..` segment, an
            S3 URI without a bucket).
        PermissionDenied: naming `field`: an ARN or other non-bucket, a location outside
            the tenant's prefixes or under a forbidden one.
    """
    if not text_checked:
        check_uri_text(uri, field)
    shown = echo_uri(uri if given is None else given)
    bucket, key, path = _parts(uri, field, shown)
    for other in forbidden:
        if _under(bucket, key, path, other):
            raise PermissionDenied(
                f"{field}: {shown} is in a location reserved to the service",
                field=field,
                reason="RESERVED_LOCATION",
            )
    allowed = tenant.write if access == "write" else _readable(tenant)
    if allowed is None:
        return
    if not any(location.covers(bucket, key, path) for location in allowed):
        own = ", ".join(map(str, allowed[:4])) + (" …" if len(allowed) > 4 else "")
        raise PermissionDenied(
            f"{field}: {shown} is outside the storage tenant {tenant.name!r} may {access} "
            f"({own or 'none'}; symbolic links are followed before this check)",
            field=field,
            reason="STORAGE_NOT_ALLOWED",
        )


def _readable(tenant: Tenant) -> tuple[Location, ...] | None:
    if tenant.read is None or tenant.write is None:
        return None
    return (*tenant.read, *tenant.write)


def _parts(uri: str, field: str, shown: str) -> tuple[str, str, Path | None]:
    """(bucket, key, None) of an S3 URI, or ("", "", resolved path) of a local one; `uri`
    has passed `check_uri_text` (a bucket, no `.` or `..` segment, an absolute path)."""
    if uri[:5].lower() == "s3://":
        bucket, key = split_s3_uri(uri)
        if not BUCKET_NAME.match(bucket):
            raise PermissionDenied(
                f"{field}: {bucket[:80]!r} is not a plain bucket name (access points and ARNs "
                "are not accepted)",
                field=field,
                reason="STORAGE_NOT_ALLOWED",
            )
        return bucket, key, None
    try:
        path = local_path_of(uri).resolve()
    except (OSError, RuntimeError, ValueError, InvalidArgument):
        raise PermissionDenied(
            f"{field}: {shown} cannot be resolved", field=field, reason="STORAGE_NOT_ALLOWED"
        ) from None
    return "", "", path


def _under(bucket: str, key: str, path: Path | None, location: str) -> bool:
    """Whether (bucket, key) or `path` is at or under `location` (a URI or folder)."""
    if location[:5].lower() == "s3://":
        other_bucket, prefix = split_s3_uri(location)
        prefix = prefix.rstrip("/")
        return (
            path is None
            and bucket == other_bucket
            and (not prefix or key == prefix or key.startswith(prefix + "/"))
        )
    if path is None:
        return False
    try:
        return path.is_relative_to(local_path_of(location).resolve())
    except (OSError, RuntimeError, InvalidArgument):
        return False


# Parsing the tenants file.


def _positive(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{what} must be a positive whole number")
    return value


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{what} must be a list of strings")
    return list(value)


def parse_tenant(entry: Any, index: int) -> Tenant:
    """One entry of the tenants file's `tenants` list.

    Raises:
        InvalidArgument: a missing or malformed field, naming the entry.
    """
    where = f"tenants[{index}]"
    if not isinstance(entry, Mapping):
        raise InvalidArgument(f"{where} must be a mapping")
    unknown = set(entry) - {
        "name",
        "tokens",
        "roles",
        "models",
        "storage",
        "quotas",
        "prediction_log",
    }
    if unknown:
        raise InvalidArgument(f"{where}: unknown keys {sorted(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise InvalidArgument(f"{where}: name must match {TENANT_NAME.pattern}")
    where = f"tenant {name!r}"
    digests = _strings(entry.get("tokens"), f"{where}: tokens")
    for digest in digests:
        if not DIGEST.match(digest):
            raise InvalidArgument(
                f"{where}: tokens are stored as 'sha256:<64 hex digits>', never in clear "
                "(perito tenants add writes them)"
            )
    roles = _strings(entry.get("roles"), f"{where}: roles")
    for role in roles:
        if role not in ROLES:
            raise InvalidArgument(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
    storage = entry.get("storage") or {}
    if not isinstance(storage, Mapping) or set(storage) - {"read", "write"}:
        raise InvalidArgument(f"{where}: storage takes 'read' and 'write' lists")
    quotas = entry.get("quotas") or {}
    if not isinstance(quotas, Mapping) or set(quotas) - {
        "concurrent_jobs",
        "images_per_minute",
        "items_per_job",
    }:
        raise InvalidArgument(
            f"{where}: quotas take concurrent_jobs, images_per_minute and items_per_job"
        )
    try:
        read = tuple(Location.parse(p) for p in _strings(storage.get("read"), "storage.read"))
        write = tuple(Location.parse(p) for p in _strings(storage.get("write"), "storage.write"))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None
    tenant = Tenant(
        name=name,
        token_digests=tuple(digests),
        roles=frozenset(roles),
        models=tuple(_strings(entry.get("models"), f"{where}: models")),
        read=read,
        write=write,
        quotas=Quotas(
            concurrent_jobs=_positive(quotas.get("concurrent_jobs"), f"{where}: concurrent_jobs"),
            images_per_minute=_positive(
                quotas.get("images_per_minute"), f"{where}: images_per_minute"
            ),
            items_per_job=_positive(quotas.get("items_per_job"), f"{where}: items_per_job"),
        ),
    )
    if entry.get("prediction_log") is None:
        return tenant
    return replace(tenant, prediction_log=_prediction_log(tenant, entry["prediction_log"], where))


def _prediction_log(tenant: Tenant, value: Any, where: str) -> PredictionLogSetting:
    """A tenant's `prediction_log` entry: `{uri, retention}`, the uri within the tenant's own
    writable prefixes (checked as a job's output is), so that no tenant can name another's.

    Raises:
        InvalidArgument: a malformed entry, or a uri outside the tenant's `write` prefixes.
    """
    if isinstance(value, str):
        value = {"uri": value}
    if not isinstance(value, Mapping) or set(value) - {"uri", "retention"}:
        raise InvalidArgument(f"{where}: prediction_log takes 'uri' and 'retention'")
    uri = value.get("uri")
    if not isinstance(uri, str):
        raise InvalidArgument(f"{where}: prediction_log.uri must be a location")
    try:
        check_uri(tenant, uri, "write", "prediction_log.uri")
    except (InvalidArgument, PermissionDenied) as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None
    retention = value.get("retention")
    return PredictionLogSetting(
        uri,
        None if retention is None else parse_duration(retention, f"{where}: retention"),
    )


def parse_tenants(text: str) -> list[Tenant]:
    """Every tenant of a tenants file's text.

    Raises:
        InvalidArgument: not YAML, no `tenants` list, a malformed entry, a repeated name or
            a token digest given to two tenants.
    """
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"the tenants file is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("tenants", []), list):
        raise InvalidArgument("the tenants file must be a mapping with a 'tenants' list")
    tenants = [parse_tenant(entry, i) for i, entry in enumerate(data.get("tenants") or [])]
    names: set[str] = set()
    digests: set[str] = set()
    for tenant in tenants:
        if tenant.name in names:
            raise InvalidArgument(f"tenant {tenant.name!r} appears twice")
        names.add(tenant.name)
        if digests & set(tenant.token_digests):
            raise InvalidArgument(f"tenant {tenant.name!r} shares a token with another tenant")
        digests.update(tenant.token_digests)
    _check_prediction_logs(tenants)
    return tenants


def _check_prediction_logs(tenants: list[Tenant]) -> None:
    """Refuse a tenant's prediction log that another tenant could read or write: its prefix
    within, or holding, another tenant's storage prefix or log (its own `write` prefixes were
    checked as the entry was read).

    Raises:
        InvalidArgument: naming both tenants and the log's prefix.
    """
    for owner in tenants:
        if owner.prediction_log is None:
            continue
        uri = owner.prediction_log.uri
        bucket, key, path = _parts(uri, "prediction_log.uri", echo_uri(uri))
        for other in tenants:
            if other is owner:
                continue
            places = [*(other.read or ()), *(other.write or ())]
            if other.prediction_log is not None:
                places.append(Location.parse(other.prediction_log.uri))
            for place in places:
                if _under(bucket, key, path, str(place)) or _holds(uri, place):
                    raise InvalidArgument(
                        f"tenant {other.name!r} may reach {owner.name}'s prediction log "
                        f"{echo_uri(uri)} through its storage or log {place}: a log's prefix "
                        "must lie in no other tenant's storage"
                    )


def _holds(uri: str, place: Location) -> bool:
    """Whether `place` lies at or under the location `uri`."""
    key = place.key_prefix.rstrip("/")
    return _under(place.bucket, key, place.folder, uri)


def tenant_to_yaml(tenant: Tenant) -> dict[str, Any]:
    """The tenants-file entry for `tenant` (restricted tenants only)."""
    entry: dict[str, Any] = {
        "name": tenant.name,
        "tokens": list(tenant.token_digests),
        "roles": sorted(tenant.roles, key=ROLES.index),
        "models": list(tenant.models),
        "storage": {
            "read": [str(location) for location in tenant.read or ()],
            "write": [str(location) for location in tenant.write or ()],
        },
    }
    quotas = {k: v for k, v in vars(tenant.quotas).items() if v is not None}
    if quotas:
        entry["quotas"] = quotas
    if tenant.prediction_log is not None:
        log_entry: dict[str, Any] = {"uri": tenant.prediction_log.uri}
        if tenant.prediction_log.retention_s is not None:
            log_entry["retention"] = f"{tenant.prediction_log.retention_s}s"
        entry["prediction_log"] = log_entry
    return entry


class Tenants:
    """The tenants a server knows, looked up by token; re-read when the file changes.

    Args:
        path: the tenants file, or None.
        tokens: `PERITO_AUTH_TOKENS`, used when there is no file: one tenant, every right.
        check_interval_s: how often the file's modification time is looked at on lookup.

    `on_reload`, if set, is called after each re-read with whether it was read (the server
    writes the change to the audit log).
    """

    def __init__(
        self,
        path: Path | None = None,
        tokens: Iterable[str] = (),
        *,
        check_interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self._tokens = [t for t in tokens if t]
        self._interval = check_interval_s
        self._lock = threading.Lock()
        self._by_digest: dict[str, Tenant] = {}
        self._by_name: dict[str, Tenant] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.on_reload: Callable[[bool], None] | None = None
        self.anonymous: Tenant | None = None
        if path is not None:
            self._load()
        elif self._tokens:
            tenant = Tenant.unrestricted(DEFAULT_TENANT, (hash_token(t) for t in self._tokens))
            self._index([tenant])
        else:
            self.anonymous = Tenant.unrestricted(ANONYMOUS_TENANT)
            self._by_name = {ANONYMOUS_TENANT: self.anonymous}

    @property
    def requires_auth(self) -> bool:
        """False only in anonymous mode (no file, no tokens)."""
        return self.anonymous is None

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> Tenant | None:
        self._maybe_reload()
        return self._by_name.get(name)

    def _index(self, tenants: list[Tenant]) -> None:
        self._by_digest = {d: t for t in tenants for d in t.token_digests}
        self._by_name = {t.name: t for t in tenants}

    def _file_stamp(self) -> tuple[int, int]:
        assert self.path is not None
        info = os.stat(self.path)
        return info.st_mtime_ns, info.st_size

    def _load(self) -> None:
        """Read the file now.

        Raises:
            InvalidArgument: the file is malformed (the tenants known so far stay).
            OSError: it cannot be read.
        """
        assert self.path is not None
        stamp = self._file_stamp()
        tenants = parse_tenants(self.path.read_text())
        with self._lock:
            self._index(tenants)
            self._stamp = stamp

    def reload(self) -> bool:
        """Re-read the file (SIGHUP). A file that is now malformed or unreadable is logged
        and the tenants known so far stay in force. Returns whether it was read."""
        if self.path is None:
            return False
        try:
            self._load()
        except (InvalidArgument, OSError) as exc:
            message = exc.message if isinstance(exc, InvalidArgument) else str(exc)
            log.error("tenants file %s not reloaded (the previous stays): %s", self.path, message)
            loaded = False
        else:
            log.info("tenants file %s loaded: %d tenants", self.path, len(self._by_name))
            loaded = True
        if self.on_reload is not None:
            self.on_reload(loaded)
        return loaded

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked < self._interval:
            return
        self._checked = now
        try:
            changed = self._file_stamp() != self._stamp
        except OSError:
            return
        if changed:
            self.reload()

    def authenticate(self, token: str | None) -> Tenant:
        """The tenant holding `token` (the anonymous tenant when no auth is configured).

        Raises:
            Unauthenticated: no token, or one no tenant holds.
        """
        if self.anonymous is not None:
            return self.anonymous
        self._maybe_reload()
        if not token:
            raise Unauthenticated(
                "missing bearer token: send the header 'authorization: Bearer <token>' "
                "(Perito's SDK: token=; the perito CLI: PERITO_TOKEN)"
            )
        tenant = self._by_digest.get(hash_token(token))
        if tenant is None:
            raise Unauthenticated("unknown bearer token")
        return tenant


def acting_tenant(
    tenants: Tenants, token: str | None, role: str, what: str, model: str | None = None
) -> Tenant:
    """The tenant an operator command (`perito models import`, `perito publish`,
    `perito audit`) acts as: the holder of `token` (PERITO_TOKEN), which must have `role` and,
    if `model` is given, may use that model. With no tenants configured, the anonymous tenant.

    Raises:
        Unauthenticated: no token, or one no tenant holds.
        PermissionDenied: the tenant lacks `role` or may not use `model`.
    """
    tenant = tenants.authenticate(token)
    tenant.require_role(role, what)
    if model is not None:
        tenant.require_model(model)
    return tenant


def add_tenant(
    path: Path,
    name: str,
    *,
    roles: Iterable[str],
    models: Iterable[str] = (),
    read: Iterable[str] = (),
    write: Iterable[str] = (),
    quotas: Quotas | None = None,
) -> str:
    """Add a token to tenant `name` in the tenants file at `path` (creating the tenant, or
    the file, if need be; an existing tenant keeps its other tokens, and takes the roles,
    models, prefixes and quotas given when any are). Returns the new token, which is stored
    nowhere in clear. The file is replaced atomically with mode 0600.

    Raises:
        InvalidArgument: a bad name, role or prefix, or the existing file is malformed.
    """
    if not TENANT_NAME.match(name):
        raise InvalidArgument(f"tenant name must match {TENANT_NAME.pattern}")
    text = path.read_text() if path.exists() else ""
    tenants = parse_tenants(text)
    token = new_token()
    given = {
        "roles": list(roles),
        "models": list(models),
        "storage": {"read": list(read), "write": list(write)},
    }
    entry = parse_tenant({"name": name, **given}, 0)  # validates what was given
    existing = next((t for t in tenants if t.name == name), None)
    if existing is None:
        updated = Tenant(
            name,
            (hash_token(token),),
            entry.roles,
            entry.models,
            entry.read,
            entry.write,
            quotas or Quotas(),
        )
        tenants.append(updated)
    else:
        updated = Tenant(
            name,
            (*existing.token_digests, hash_token(token)),
            entry.roles or existing.roles,
            entry.models or existing.models,
            entry.read or existing.read,
            entry.write or existing.write,
            quotas or existing.quotas,
            existing.prediction_log,
        )
        tenants = [updated if t.name == name else t for t in tenants]
    document = {"tenants": [tenant_to_yaml(t) for t in tenants]}
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        yaml.safe_dump(document, out, sort_keys=False)
    os.replace(temporary, path)
    return token
