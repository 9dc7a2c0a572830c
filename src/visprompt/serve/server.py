"""Running the app under uvicorn: in the foreground (`visprompt serve`) or in a thread (tests, benches).

SIGTERM and Ctrl-C go to uvicorn's graceful shutdown: it stops accepting connections, lets the
requests in flight finish (streams included) for up to `request_timeout` seconds, then the app's
lifespan stops the scheduler thread.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from ..engine.backend import Backend
from ..errors import VispromptError
from .app import create_app
from .config import ServeConfig
from .media import MediaFetcher


def log_to_stderr(level: int = logging.INFO) -> None:
    """The server's one line per request (ids, sizes, timings) on stderr."""
    logger = logging.getLogger("visprompt.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def uvicorn_config(app, config: ServeConfig, **overrides) -> uvicorn.Config:
    """uvicorn's settings for the app: no access log (the app logs its own lines, without client
    addresses or paths), graceful shutdown bounded by the request timeout."""
    settings = dict(
        host=config.host,
        port=config.port,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=int(config.request_timeout),
        server_header=False,
        lifespan="on",
    )
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (so a busy port is a one-line error before the model loads).

    Args:
        host: an address or name; port: the port (0: any free one).

    Returns:
        The socket. Raises `VispromptError` when it cannot be bound.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        raise VispromptError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    backend: Backend,
    config: ServeConfig,
    sock: socket.socket | None = None,
    explainer: Callable[..., dict] | None = None,
) -> None:
    """Serve `backend` until SIGINT or SIGTERM (in the foreground; blocks).

    Args:
        backend: the loaded model.
        config: address, access and limits.
        sock: a socket from `listen` (default: one bound to config.host and config.port).
        explainer: what answers /v1/tasks/explain (see `create_app`).
    """
    sock = sock or listen(config.host, config.port)
    log_to_stderr()
    app = create_app(backend, config, explainer=explainer)
    server = uvicorn.Server(uvicorn_config(app, config))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("visprompt.serve").info("serving %s on http://%s:%d", app.state.model.name, shown, port)
    server.run(sockets=[sock])


@dataclass
class RunningServer:
    """A server started by `serve_in_thread`."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown, as SIGTERM does it."""
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_in_thread(
    backend: Backend,
    config: ServeConfig | None = None,
    fetcher: MediaFetcher | None = None,
    timeout: float = 60.0,
    explainer: Callable[..., dict] | None = None,
) -> RunningServer:
    """Start the server on a free loopback port in a background thread; returns once it answers.

    Args:
        backend: the model.
        config: limits and access (its host and port are replaced: 127.0.0.1, a free port).
        fetcher: the media fetcher (tests pass one with a resolver stub).
        timeout: seconds to wait for start-up.
        explainer: what answers /v1/tasks/explain (see `create_app`).

    Returns:
        The running server: `.url` (http://127.0.0.1:PORT) and `.stop()`.
    """
    config = config or ServeConfig()
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = create_app(backend, config, fetcher, explainer)
    server = uvicorn.Server(uvicorn_config(app, config, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="visprompt-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", server, thread)
