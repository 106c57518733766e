"""The API server stops promptly even while a client holds a never-ending stream open (what
``meshagent monitor`` does): an agent's shutdown must not wait for its watchers to leave."""

import asyncio
import time

import aiohttp
from aiohttp import web

from meshagent.runtime.apiserver import STREAM_GRACE, APIServer


async def endless(request):
    response = web.StreamResponse()
    await response.prepare(request)
    while True:
        await asyncio.sleep(0.05)


async def test_stop_ends_open_streams_within_the_grace(short_tmp):
    app = web.Application()
    app.router.add_get("/stream", endless)
    server = APIServer(app, short_tmp / "api.sock")
    await server.start()
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(server.socket_path)))
    try:
        response = await session.get("http://meshagent/stream")
        assert response.status == 200
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < STREAM_GRACE + 3
    finally:
        await session.close()
