"""Serving an app from inside a Python process: `running_server(app)` runs uvicorn in a background thread on a
free loopback port and yields its URL (a notebook, a test, a benchmark). `t5qa serve` runs uvicorn itself."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from t5qa.errors import T5QAError, require


@contextlib.contextmanager
def running_server(app: Any, *, host: str = "127.0.0.1", log_level: str = "warning",
                   start_timeout_s: float = 60.0, **uvicorn_options: Any) -> Iterator[str]:
    """uvicorn serving `app` on a free port of `host` (this machine only by default) in a daemon thread; yields
    the base URL, and stops the server when the block ends."""
    require("uvicorn", "serve", "running_server")
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    # log_config=None: uvicorn's loggers propagate to the root logger (pytest's caplog sees them).
    config = uvicorn.Config(app, log_config=None, log_level=log_level, lifespan="on", backlog=2048,
                            **uvicorn_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise T5QAError(f"the server did not start within {start_timeout_s:g} s; see the log above")
        time.sleep(0.02)
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
