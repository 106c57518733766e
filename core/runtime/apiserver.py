"""Serving an aiohttp app on the agent's unix socket (the agent's API and KVStoreMesh's): one
server below both process roots."""

import asyncio
import logging
import os
from pathlib import Path

from aiohttp import web

from meshagent.errors import MeshagentError

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660  # root and the socket's group
STREAM_GRACE = 1.0  # seconds


class APIServer:
    """Serves the app on the unix socket, replacing a stale socket file, mode 0660."""

    def __init__(self, app: web.Application, socket_path: Path):
        self.app = app
        self.socket_path = socket_path
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        await remove_stale_socket(self.socket_path)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        # a stream (meshagent monitor, observe -f) ends only when its client goes: on stop,
        # streams get this long to finish before they are cancelled (aiohttp waits 60 s)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=STREAM_GRACE)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()
        os.chmod(self.socket_path, SOCKET_MODE)
        log.info("API listening on %s", self.socket_path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.socket_path.unlink(missing_ok=True)

    async def __aenter__(self) -> "APIServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


async def remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse to steal one an agent still serves."""
    if not (path.exists() or path.is_symlink()):
        return
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        log.info("removing stale API socket %s", path)
        path.unlink(missing_ok=True)
        return
    writer.close()
    raise MeshagentError(f"another agent is already serving the API socket {path}")
