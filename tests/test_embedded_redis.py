"""The embedded Redis (daemon/embedded_redis.py): a real TCP server in a child process that
speaks enough Redis for the demo and the benchmark's smoke test, and goes away on close."""

from __future__ import annotations

import pytest
import redis


def test_serves_streams_over_tcp_and_stops_on_close() -> None:
    from daemon.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis()
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0" and server.port > 0
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True
        entry = client.xadd("bars", {"symbol": "AAPL", "close": "1"})
        client.xgroup_create("bars", "g", id="0")
        reply = client.xreadgroup("g", "me", {"bars": ">"}, count=10)
        assert reply[0][1] == [(entry, {b"symbol": b"AAPL", b"close": b"1"})]
        client.close()
    finally:
        server.close()
    assert not server.process.is_alive()
    with pytest.raises(redis.ConnectionError):  # nothing listens there any more
        redis.Redis(host="127.0.0.1", port=server.port, socket_connect_timeout=1).ping()
