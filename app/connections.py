"""The HTTP server's own limits: how long a client may take to send a request, how many connections
are served at once, and how long shutdown waits for connections that will not close.

uvicorn bounds none of these by default: a connection that never sends its headers is held forever
(its keep-alive timer starts only after a first response), and after a drain it waits without limit
for every connection to close, so one stuck client kept the process alive past SIGTERM.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.config import Settings

SHUTDOWN_GRACE_S = 3  # after the drain, how long uvicorn waits for connections before cancelling them


class DeadlineH11Protocol(H11Protocol):
    """h11 with a deadline for a new connection's first request headers (slowloris, idle sockets).

    The body has its own deadline (app/middleware.BodyLimitMiddleware answers 408); after a response,
    uvicorn's keep-alive timer takes over.
    """

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.header_timeout: float = getattr(config, "header_timeout", 30.0)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        if self.cycle is None and not self.transport.is_closing():  # no request has started on it
            self.transport.close()


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration every way of serving uses (the CLI, the tests' real servers)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "lifespan": "on",
        "http": DeadlineH11Protocol,
        "limit_concurrency": settings.max_connections,  # beyond: 503 at once
        "timeout_graceful_shutdown": SHUTDOWN_GRACE_S,
    }
    config = uvicorn.Config(app, **{**options, **overrides})
    config.header_timeout = settings.read_timeout  # type: ignore[attr-defined]  # read by DeadlineH11Protocol
    return config
