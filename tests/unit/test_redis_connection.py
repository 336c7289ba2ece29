"""Redis URLs (perito_core.redis_connection): the forms accepted, the refusals, what Celery
gets. Pure logic: nothing here connects (redis-py connects on a client's first command)."""

from __future__ import annotations

import pytest
from redis.sentinel import SentinelConnectionPool

from perito_core.errors import InvalidArgument
from perito_core.jobs.queue import make_celery
from perito_core.redis_connection import (
    SentinelURL,
    celery_broker,
    check_redis_url,
    parse_sentinel_url,
    redacted,
    redis_client,
)
from perito_core.settings import CommonSettings


def test_a_sentinel_url_names_the_sentinels_the_service_the_db_and_the_credentials() -> None:
    parsed = parse_sentinel_url(
        "redis+sentinel://app:s%40cret@s1:26380,[::1],s3/my%20primary/2"
        "?sentinel_password=watch&sentinel_username=sentry"
    )
    assert parsed == SentinelURL(
        sentinels=(("s1", 26380), ("::1", 26379), ("s3", 26379)),
        service_name="my primary",
        db=2,
        username="app",
        password="s@cret",
        sentinel_username="sentry",
        sentinel_password="watch",
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+sentinel://s1/mymaster", SentinelURL((("s1", 26379),), "mymaster")),
        ("REDIS+SENTINEL://s1:1/mymaster/", SentinelURL((("s1", 1),), "mymaster")),
        (
            "redis+sentinel://:pw@s1,s2/m/0",
            SentinelURL((("s1", 26379), ("s2", 26379)), "m", password="pw"),
        ),
        ("redis+sentinel://u@s1/m/15", SentinelURL((("s1", 26379),), "m", 15, username="u")),
    ],
)
def test_sentinel_url_defaults(url: str, expected: SentinelURL) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://:hunter2@/m", "sentinel host '' is empty"),
        ("redis+sentinel://:hunter2@s1,,s2/m", "sentinel host '' is empty"),
        ("redis+sentinel://:hunter2@s1:x/m", "port 'x' is not a number in 1..65535"),
        ("redis+sentinel://:hunter2@s1:0/m", "port '0' is not a number in 1..65535"),
        ("redis+sentinel://:hunter2@s1:70000/m", "port '70000'"),
        ("redis+sentinel://:hunter2@::1/m", "an IPv6 address needs brackets"),
        ("redis+sentinel://:hunter2@[::1/m", "is not [IPv6]:port"),
        ("redis+sentinel://:hunter2@s1", "no service name"),
        ("redis+sentinel://:hunter2@s1/", "no service name"),
        ("redis+sentinel://:hunter2@s1/m/x", "database 'x' is not a number >= 0"),
        ("redis+sentinel://:hunter2@s1/m/-1", "database '-1' is not a number >= 0"),
        ("redis+sentinel://:hunter2@s1/m/0/x", "3 path segments"),
        ("redis+sentinel://:hunter2@s1/m?ssl=true", "unknown parameter 'ssl'"),
        ("redis+sentinel://:hunter2@s1/m?password=hunter2", "unknown parameter 'password'"),
        (
            "redis+sentinel://:hunter2@s1/m?sentinel_password=a&sentinel_password=b",
            "parameter 'sentinel_password' given 2 times",
        ),
        ("redis+sentinel://:hunter2@s1/m#top", "a URL fragment"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_naming_the_setting_never_the_password(
    url: str, says: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_redis_url(url, "PERITO_BROKER_URL")
    message = caught.value.message
    assert message.startswith("PERITO_BROKER_URL: ")
    assert says in message
    assert "redis+sentinel://[[username]:password@]host[:port]" in message  # the form
    assert caught.value.field == "PERITO_BROKER_URL"
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:pw@redis.perito.svc/3",
        "redis://user:pw@h",
        "rediss://h:6380/0?ssl_cert_reqs=none",
        "unix:///run/redis/redis.sock?db=2",
        "unix://:pw@/run/redis.sock",
    ],
)
def test_plain_urls_are_redis_pys_own(url: str) -> None:
    check_redis_url(url)
    assert celery_broker(url) == (url, {})


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("localhost:6379", "scheme '(none)' is not one of"),
        ("http://:hunter2@h/0", "scheme 'http' is not one of"),
        ("redis+cluster://:hunter2@h/0", "Redis Cluster is not supported"),
        ("rediss+sentinel://:hunter2@h/m", "scheme 'rediss+sentinel' is not one of"),
        ("redis://:hunter2@h/zero", "database 'zero' is not a number"),
        ("redis://:hunter2@h:port/0", "Port could not be cast to integer"),
        ("redis://:hunter2@h:99999/0", "Port out of range"),
        ("redis://:hunter2@h/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
def test_a_malformed_plain_url_is_refused_naming_the_setting(url: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        redis_client(url)
    assert caught.value.message.startswith("PERITO_REDIS_URL: ")
    assert says in caught.value.message
    assert "hunter2" not in caught.value.message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:pw@h/0", "redis://user:***@h/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://:p/w?#x@h/0", "redis://:***@h/0"),  # an unencoded "/", "?" and "#"
        ("unix://u:pw@/run/r.sock?db=1", "unix://u:***@/run/r.sock?db=1"),
        (
            "redis+sentinel://:pw@a:1,b/m?sentinel_password=s@x&sentinel_username=q",
            "redis+sentinel://:***@a:1,b/m?sentinel_password=***&sentinel_username=q",
        ),
        ("redis://h/0?password=pw", "redis://h/0?password=***"),
    ],
)
def test_redacted_never_shows_a_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_a_sentinel_url_gives_celery_the_sentinel_transport() -> None:
    broker, options = celery_broker(
        "redis+sentinel://:p%40ss;word@s1:26380,[::1]:26381/perito/3?sentinel_password=w"
    )
    # kombu splits the URL on ";", then reads each part's percent-encoded password.
    assert broker == (
        "sentinel://:p%40ss%3Bword@s1:26380/3;sentinel://:p%40ss%3Bword@[::1]:26381/3"
    )
    assert options == {
        "master_name": "perito",
        "sentinel_kwargs": {"socket_connect_timeout": 3.0, "socket_timeout": 10.0, "password": "w"},
    }


def test_make_celery_keeps_its_transport_options_beside_sentinels() -> None:
    from kombu.connection import Connection

    app = make_celery("redis+sentinel://:pw@s1,s2:26380/perito/1", visibility_timeout_s=100)
    options = app.conf.broker_transport_options
    assert options["master_name"] == "perito"
    assert options["visibility_timeout"] == 100
    assert options["unacked_restore_interval"] == 20
    connection = Connection(app.conf.broker_url)  # type: ignore[no-untyped-call]
    assert connection.transport_cls == "sentinel"
    assert connection.alt == ["sentinel://:pw@s1:26379/1", "sentinel://:pw@s2:26380/1"]
    assert connection.password == "pw"
    assert connection.virtual_host == "1"


def test_make_celery_names_the_setting_of_a_malformed_broker() -> None:
    with pytest.raises(InvalidArgument, match=r"^PERITO_REDIS_URL: .*no service name"):
        make_celery("redis+sentinel://s1", setting="PERITO_REDIS_URL")


def test_a_sentinel_client_asks_the_sentinels_for_the_primary() -> None:
    client = redis_client(
        "redis+sentinel://app:pw@s1:26380,s2/perito/4?sentinel_password=w",
        socket_connect_timeout=2,
        socket_timeout=7,
    )
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "perito"
    assert pool.is_master
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (4, "app", "pw")
    assert kwargs["socket_timeout"] == 7
    manager = pool.sentinel_manager
    sentinels = [s.connection_pool.connection_kwargs for s in manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("s1", 26380), ("s2", 26379)]
    assert all(s["password"] == "w" and s["socket_timeout"] == 7 for s in sentinels)


def test_a_plain_client_is_redis_pys_from_url() -> None:
    client = redis_client("redis://:pw@h:6390/5", socket_timeout=3)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "h",
        6390,
        5,
        "pw",
    )
    assert kwargs["socket_timeout"] == 3


def test_the_broker_setting_names_where_the_broker_url_came_from() -> None:
    assert CommonSettings(redis_url="redis://a/0").broker_setting == "PERITO_REDIS_URL"
    both = CommonSettings(redis_url="redis://a/0", broker_url="redis://b/0")
    assert (both.broker, both.broker_setting) == ("redis://b/0", "PERITO_BROKER_URL")
