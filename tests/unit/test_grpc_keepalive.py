"""HTTP/2 keepalive on the gRPC port is set as Triton's --grpc-keepalive-* and --grpc-http2-*
flags set it: each setting becomes gRPC core's channel argument of that meaning."""

from __future__ import annotations

from perito_server.app import grpc_keepalive_options
from perito_server.settings import ServerSettings


def test_the_keepalive_settings_are_grpcs_channel_arguments() -> None:
    options = dict(
        grpc_keepalive_options(
            ServerSettings(
                grpc_keepalive_time_ms=60_000,
                grpc_keepalive_permit_without_calls=True,
                grpc_http2_min_recv_ping_interval_without_data_ms=5_000,
            )
        )
    )
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 5_000
    assert options["grpc.http2.max_ping_strikes"] == 2
    defaults = dict(grpc_keepalive_options(ServerSettings()))
    assert "grpc.keepalive_time_ms" not in defaults  # no server pings unless asked
    assert defaults["grpc.keepalive_permit_without_calls"] == 0
    assert defaults["grpc.http2.min_recv_ping_interval_without_data_ms"] == 300_000
