"""Prometheus metrics: one registry per agent, served only when ``--prometheus-serve-addr`` is set.

Served from the agent's own event loop (aiohttp) rather than prometheus_client's thread server.
"""

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meshagent.errors import UsageError

log = logging.getLogger(__name__)


def parse_serve_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (all addresses), as Cilium's flag takes it."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"invalid --prometheus-serve-addr={addr!r}: expected HOST:PORT or :PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, addr: str):
        self.registry = registry
        self.host, self.port = parse_serve_addr(addr)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        log.info("serving Prometheus metrics on http://%s:%d/metrics", self.host, self.port)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "MetricsServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()
