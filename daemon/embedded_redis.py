"""An embedded Redis for a machine without one: fakeredis' TCP server in a child process
(`livepred demo`, `livepred bench --quick --embedded`). For demos and smoke tests only."""

from __future__ import annotations

import threading
from typing import Any


def _serve_embedded(port_out: Any, stop: Any) -> None:
    """Child process: fakeredis' TCP server on a free loopback port until `stop` is set."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0))
    port_out.put(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()


class EmbeddedRedis:
    """fakeredis' TCP server on a free loopback port, in a child process of its own, so the
    demo's feeder, strategy, live view and daemon don't starve it of the interpreter lock."""

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        port_out = ctx.Queue()
        self._stop = ctx.Event()
        self.process = ctx.Process(
            target=_serve_embedded, args=(port_out, self._stop), name="livepred-embedded-redis", daemon=True
        )
        self.process.start()
        self.host = "127.0.0.1"
        self.port = int(port_out.get(timeout=60))

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def close(self) -> None:
        self._stop.set()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
