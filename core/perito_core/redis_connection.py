"""One way to reach Redis: every Redis client of Perito, and Celery's broker, from one URL.

A Redis setting (`PERITO_REDIS_URL`, `PERITO_BROKER_URL`) takes one of these forms:

    redis://[[username]:password@]host[:port][/db]        TCP (redis-py's own URL form)
    rediss://[[username]:password@]host[:port][/db]       TCP with TLS
    unix://[[username]:password@]/path/to/socket[?db=N]   a Unix socket
    redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service_name[/db]
        [?sentinel_password=...[&sentinel_username=...]]

The last is Redis Sentinel (https://redis.io/docs/latest/operate/oss_and_stack/management/
sentinel/): the hosts are the sentinels (port 26379 unless given; an IPv6 address in
brackets), `service_name` the name they monitor the primary under (`sentinel monitor
<service_name> ...` in their configuration), `db` the database number (0 unless given). The
user and password are the primary's (and its replicas'); `sentinel_password` (and
`sentinel_username`) authenticate to the sentinels themselves, for sentinels configured with
`requirepass`. Passwords are percent-encoded like any URL's userinfo (`%40` for `@`).

A Sentinel URL gives a client through redis-py's `redis.sentinel.Sentinel(...).master_for(
service_name)`: every new connection asks the sentinels where the primary is now, so after a
failover (the primary down, a replica promoted) the next connection reaches the new primary;
a connection still open to a demoted primary fails with `ConnectionError` (redis-py turns its
READONLY answer into one). Callers that must ride out a failover retry on `ConnectionError`
(`perito_core.jobs.store.JobStore.connect`). Celery's broker uses kombu's `sentinel://`
transport (`celery_broker`): `sentinel://host:port;sentinel://host:port` and the
`broker_transport_options` `master_name` and `sentinel_kwargs`.

Redis Cluster is not supported: a `redis+cluster://` or any other scheme is refused.

A malformed URL is refused with `InvalidArgument` naming the setting; messages and logs show a
URL only through `redacted`, which never shows a password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelManagedConnection

from perito_core.errors import InvalidArgument

REDIS_URL_SETTING = "PERITO_REDIS_URL"
BROKER_URL_SETTING = "PERITO_BROKER_URL"
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_FORM = (
    "redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service_name[/db]"
    "[?sentinel_password=...]"
)
_SENTINEL_QUERY = ("sentinel_password", "sentinel_username")
# Sentinels answer one small command; the broker's own connection timeout is 3 s.
SENTINEL_SOCKET_OPTIONS = {"socket_connect_timeout": 3.0, "socket_timeout": 10.0}


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `redis+sentinel://` URL (see the module docstring for its form).

    Attributes:
        sentinels: (host, port) of each sentinel, in the URL's order; IPv6 without brackets.
        service_name: the name the sentinels monitor the primary under.
        db: the database number.
        username, password: the primary's credentials (None: none given).
        sentinel_username, sentinel_password: the sentinels' own (None: none given).
    """

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def is_sentinel(url: str) -> bool:
    """Whether `url` is a `redis+sentinel://` URL (the scheme compared case-insensitively)."""
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def redacted(url: str) -> str:
    """`url` with every password replaced by `***`: the userinfo's, and any query parameter
    whose name holds `password`. Safe for messages and logs; never raises."""
    url = re.sub(r"([?&][^=&#]*password[^=&#]*=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
    # The userinfo ends at the last "@" (a password may hold "/", "?" or "#" unencoded).
    found = re.match(r"([A-Za-z][A-Za-z0-9+.-]*://)(.*)@", url, flags=re.DOTALL)
    if found is None or ":" not in found.group(2):
        return url
    username = found.group(2).partition(":")[0]
    return f"{found.group(1)}{username}:***@{url[found.end() :]}"


def _refuse(setting: str, url: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{setting}: {problem} (in {redacted(url)!r})", field=setting)


def parse_sentinel_url(url: str, setting: str = REDIS_URL_SETTING) -> SentinelURL:
    """Parse a `redis+sentinel://` URL (the module docstring gives its form).

    Args:
        url: the setting's value.
        setting: the setting's name, for messages (`PERITO_REDIS_URL`, `PERITO_BROKER_URL`).

    Raises:
        InvalidArgument: not that form: another scheme, no sentinel host, a port that is not a
            number in 1..65535, no service name, a database that is not a number >= 0, a path
            past the database, an unknown or repeated query parameter, a fragment. The message
            names `setting` and quotes the URL `redacted`.
    """

    def refuse(problem: str) -> InvalidArgument:
        return _refuse(setting, url, f"{problem}; expected {SENTINEL_FORM}")

    if not is_sentinel(url):
        raise refuse("not a redis+sentinel:// URL")
    rest = url.strip()[len(SENTINEL_SCHEME) + 3 :]
    rest, hash_mark, _ = rest.partition("#")
    if hash_mark:
        raise refuse("a URL fragment (#...) means nothing here")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts = netloc
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_host_port(part, refuse) for part in hosts.split(","))
    segments = path.split("/") if slash else []
    if segments and segments[-1] == "" and len(segments) > 1:
        segments.pop()  # a trailing slash
    if not segments or not segments[0]:
        raise refuse("no service name (the name the sentinels monitor the primary under)")
    if len(segments) > 2:
        raise refuse(f"{len(segments)} path segments; only service_name and db may follow")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise refuse(f"database {segments[1]!r} is not a number >= 0")
        db = int(segments[1])
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise refuse("a malformed query string") from None
    for name, values in params.items():
        if name not in _SENTINEL_QUERY:
            raise refuse(f"unknown parameter {name!r} (known: {', '.join(_SENTINEL_QUERY)})")
        if len(values) > 1:
            raise refuse(f"parameter {name!r} given {len(values)} times")
    return SentinelURL(
        sentinels=sentinels,
        service_name=unquote(segments[0]),
        db=db,
        username=username,
        password=password,
        sentinel_username=params.get("sentinel_username", [None])[0] or None,
        sentinel_password=params.get("sentinel_password", [None])[0],
    )


def _host_port(text: str, refuse: Any) -> tuple[str, int]:
    """(host, port) of one sentinel `host[:port]` or `[v6]:port`."""
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or not host or (tail and not tail.startswith(":")):
            raise refuse(f"sentinel {text!r} is not [IPv6]:port")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text:
            raise refuse(f"sentinel {text!r}: an IPv6 address needs brackets, [::1]:26379")
    if not host or any(c.isspace() for c in host):
        raise refuse(f"sentinel host {text!r} is empty or holds a space")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise refuse(f"sentinel {text!r}: port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def check_redis_url(url: str, setting: str = REDIS_URL_SETTING) -> None:
    """Refuse `url` unless it is one of the forms in the module docstring; connect nowhere.

    Raises:
        InvalidArgument: as `parse_sentinel_url` for a Sentinel URL; for the others an
            empty URL, another scheme (Redis Cluster's among them), a database path that is
            not a number, or what redis-py's own URL parser refuses (a port that is not a
            number, an unknown value of a query parameter). Names `setting`.
    """
    if is_sentinel(url):
        parse_sentinel_url(url, setting)
    else:
        _plain_pool(url, setting).disconnect()


def _plain_pool(url: str, setting: str, **options: Any) -> redis.ConnectionPool:
    """redis-py's connection pool (not connected yet) for a redis://, rediss:// or unix://
    `url`, refused as `check_redis_url` says."""
    if not url.strip():
        raise _refuse(
            setting, url, "empty; expected a redis://, rediss://, unix:// or redis+sentinel:// URL"
        )
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in PLAIN_SCHEMES:
        cluster = " (Redis Cluster is not supported)" if "cluster" in scheme else ""
        raise _refuse(
            setting,
            url,
            f"scheme {scheme or '(none)'!r} is not one of redis://, rediss://, unix://, "
            f"redis+sentinel://{cluster}",
        )
    if scheme != "unix":  # redis-py ignores a database path that is not a number
        path = urlsplit(url).path.strip("/")
        if path and not path.isdigit():
            raise _refuse(setting, url, f"database {path!r} is not a number >= 0")
    try:
        return redis.ConnectionPool.from_url(url, **options)
    except ValueError as exc:  # redis-py's messages name the part, never the password
        raise _refuse(setting, url, str(exc)) from None


def redis_client(url: str, *, setting: str = REDIS_URL_SETTING, **options: Any) -> redis.Redis:
    """A `redis.Redis` client on the Redis `url` names; connects on first use.

    Args:
        url: a URL of the module docstring's forms.
        setting: the setting `url` came from, named in refusals.
        **options: redis-py connection options (`socket_connect_timeout`, `socket_timeout`,
            `retry`, `retry_on_error`, ...), for the primary's connections. For a Sentinel
            URL the `socket_*` ones are used for the sentinels' connections too.

    Raises:
        InvalidArgument: a malformed `url` (`check_redis_url`).
    """
    if not is_sentinel(url):
        return redis.Redis.from_pool(_plain_pool(url, setting, **options))
    parsed = parse_sentinel_url(url, setting)
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel_kwargs.update(_sentinel_credentials(parsed))
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    credentials = {"username": parsed.username, "password": parsed.password}
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        parsed.service_name,
        connection_class=SentinelPrimaryConnection,
        db=parsed.db,
        **{k: v for k, v in credentials.items() if v is not None},
        **options,
    )
    return client


class SentinelPrimaryConnection(SentinelManagedConnection):
    """redis-py's `SentinelManagedConnection`, asking the sentinels for the primary's address
    on every attempt to open its socket.

    redis-py (8.1 at least) asks them only in `SentinelManagedConnection.connect`; a connection
    that fails mid-command is reopened by the command's retry through
    `Connection.send_packed_command` -> `connect_check_health` -> `_connect`, to the address it
    had: a command in flight when the primary dies retries the dead address until its retries
    run out, even once a replica is promoted. Resolving in
    `_connect` puts every retry, and every connection, on the primary the sentinels name now
    (one `SENTINEL MASTERS` round trip per socket opened). `MasterNotFoundError` while no
    primary is named is a `ConnectionError`, retried like one.
    """

    def _connect(self) -> Any:
        pool = self.connection_pool
        if pool.is_master:
            self.host, self.port = pool.get_master_address()
        return super()._connect()  # type: ignore[no-untyped-call]


def _sentinel_credentials(parsed: SentinelURL) -> dict[str, str]:
    credentials = {"username": parsed.sentinel_username, "password": parsed.sentinel_password}
    return {k: v for k, v in credentials.items() if v is not None}


def celery_broker(url: str, *, setting: str = BROKER_URL_SETTING) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the `broker_transport_options` it needs, for a Redis `url`.

    A redis://, rediss:// or unix:// URL is kombu's own: it comes back as given, with no
    options. A Sentinel URL becomes kombu's Sentinel transport (kombu.transport.redis.
    SentinelChannel): `sentinel://[user:password@]host:port/db` per sentinel, joined by `;`,
    and the options `master_name` (the service name) and `sentinel_kwargs` (the sentinels'
    socket timeouts, and their credentials when the URL has them).

    Raises:
        InvalidArgument: a malformed `url` (`check_redis_url`), naming `setting`.
    """
    if not is_sentinel(url):
        check_redis_url(url, setting)
        return url, {}
    parsed = parse_sentinel_url(url, setting)
    userinfo = ""
    if parsed.username is not None or parsed.password is not None:
        user = quote(parsed.username or "", safe="")
        secret = f":{quote(parsed.password, safe='')}" if parsed.password is not None else ""
        userinfo = f"{user}{secret}@"
    hosts = [f"[{h}]" if ":" in h else h for h, _ in parsed.sentinels]
    broker = ";".join(
        f"sentinel://{userinfo}{host}:{port}/{parsed.db}"
        for host, (_, port) in zip(hosts, parsed.sentinels, strict=True)
    )
    # A sentinel password sits here in clear: a Celery worker's reported connection
    # (`celery inspect stats`) leaves out only the broker's password, not its transport
    # options (docs/operations.md says so).
    options = {
        "master_name": parsed.service_name,
        "sentinel_kwargs": {**SENTINEL_SOCKET_OPTIONS, **_sentinel_credentials(parsed)},
    }
    return broker, options
