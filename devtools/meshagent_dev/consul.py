"""An in-process stand-in for the Consul HTTP API — the parts a kvstore uses.

No Consul server can be installed on these machines, so the consul plugin's tests run against
this: KV get (single, recurse) with blocking queries (``index``, ``wait``) and
``X-Consul-Index``; put with ``cas``, ``acquire``, ``release``; delete with ``recurse`` and
``cas``; sessions with ``TTL`` (at least 10 s, as Consul requires), ``Behavior`` delete or
release, renew, destroy and invalidation on expiry; ``/v1/status/leader``. It follows the
documented semantics; ``stalled`` makes it behave like a stopped server (requests, and the
answers of blocking queries, wait until it is cleared). Set ``MESHAGENT_TEST_CONSUL`` to run the same tests against a real Consul.
"""

import asyncio
import base64
import json
import re
import uuid

from aiohttp import web

from meshagent_dev.netlab import serve

MIN_TTL = 10.0
STALL_POLL = 0.05


def _duration(text: str | None, default: float) -> float:
    if not text:
        return default
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text)
    if not match:
        raise web.HTTPBadRequest(reason=f"bad duration {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


class ConsulStandIn:
    def __init__(self) -> None:
        self.index = 1
        self.kv: dict[str, dict] = {}
        self.sessions: dict[str, dict] = {}
        self.changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.url = ""
        self._tasks: set[asyncio.Task] = set()
        self.stalled = False

    async def _wait_while_stalled(self) -> None:
        while self.stalled:
            await asyncio.sleep(STALL_POLL)

    @web.middleware
    async def _stall(self, request, handler):
        await self._wait_while_stalled()
        response = await handler(request)
        await self._wait_while_stalled()  # a blocking query's answer is held back too
        return response

    async def start(self) -> "ConsulStandIn":
        app = web.Application(middlewares=[self._stall])
        app.router.add_get("/v1/status/leader", self._leader)
        app.router.add_route("GET", "/v1/kv/{key:.*}", self._get)
        app.router.add_route("PUT", "/v1/kv/{key:.*}", self._put)
        app.router.add_route("DELETE", "/v1/kv/{key:.*}", self._delete)
        app.router.add_put("/v1/session/create", self._session_create)
        app.router.add_put("/v1/session/renew/{id}", self._session_renew)
        app.router.add_put("/v1/session/destroy/{id}", self._session_destroy)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.url = await self.listen()
        return self

    async def listen(self, netns: str | None = None, host: str = "127.0.0.1",
                     port: int = 0) -> str:
        """Answer on one more address (e.g. inside an agent's network namespace too)."""
        return await serve(self.runner, netns, host, port)

    async def stop(self) -> None:
        for session in self.sessions.values():
            if session["timer"] is not None:
                session["timer"].cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _bump(self) -> int:
        self.index += 1
        await self._notify()
        return self.index

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _headers(self) -> dict:
        return {"X-Consul-Index": str(self.index), "X-Consul-KnownLeader": "true"}

    async def _leader(self, request):
        return web.json_response("127.0.0.1:8300")

    def _matching(self, key: str, recurse: bool) -> list[dict]:
        if recurse:
            return [self.kv[k] for k in sorted(self.kv) if k.startswith(key)]
        return [self.kv[key]] if key in self.kv else []

    async def _get(self, request):
        key, query = request.match_info["key"], request.query
        recurse = "recurse" in query
        if "index" in query:
            index = int(query["index"])
            wait = min(_duration(query.get("wait"), 300.0), 600.0)
            if index >= self.index:
                try:
                    async with self.changed:
                        await asyncio.wait_for(
                            self.changed.wait_for(lambda: self.index > index), wait)
                except asyncio.TimeoutError:
                    pass
        items = self._matching(key, recurse)
        if not items:
            return web.Response(status=404, headers=self._headers())
        body = [{"Key": i["Key"], "CreateIndex": i["CreateIndex"],
                 "ModifyIndex": i["ModifyIndex"], "LockIndex": i["LockIndex"],
                 "Flags": i["Flags"], "Session": i["Session"],
                 "Value": base64.b64encode(i["Value"]).decode() if i["Value"] else None}
                for i in items]
        return web.json_response(body, headers=self._headers())

    async def _put(self, request):
        key, query = request.match_info["key"], request.query
        value = await request.read()
        current = self.kv.get(key)
        if "cas" in query:
            cas = int(query["cas"])
            if (cas == 0 and current is not None) or (cas != 0 and (
                    current is None or current["ModifyIndex"] != cas)):
                return web.json_response(False)
        session = None
        if "acquire" in query:
            session = query["acquire"]
            if session not in self.sessions:
                raise web.HTTPInternalServerError(reason=f"invalid session {session!r}")
            if current is not None and current["Session"] not in (None, session):
                return web.json_response(False)
        elif "release" in query:
            if current is None or current["Session"] != query["release"]:
                return web.json_response(False)
        elif current is not None:
            session = current["Session"]
        # check and write with no await in between: requests are atomic, as in Consul
        self.index += 1
        index = self.index
        self.kv[key] = {"Key": key, "Value": value, "Flags": int(query.get("flags", 0)),
                        "CreateIndex": current["CreateIndex"] if current else index,
                        "ModifyIndex": index, "Session": session,
                        "LockIndex": (current["LockIndex"] if current else 0)
                        + (1 if "acquire" in query else 0)}
        await self._notify()
        return web.json_response(True)

    async def _delete(self, request):
        key, query = request.match_info["key"], request.query
        if "cas" in query:
            current = self.kv.get(key)
            if current is None or current["ModifyIndex"] != int(query["cas"]):
                return web.json_response(False)
        doomed = [k for k in self.kv if (k.startswith(key) if "recurse" in query else k == key)]
        for k in doomed:
            del self.kv[k]
        if doomed:
            await self._bump()
        return web.json_response(True)

    async def _session_create(self, request):
        raw = await request.read()
        # Consul decodes JSON field names case-insensitively (Go): "TTL" and "ttl" both work
        body = {k.lower(): v for k, v in (json.loads(raw) if raw.strip() else {}).items()}
        ttl = _duration(body.get("ttl"), 0.0)
        if ttl and not MIN_TTL <= ttl <= 86400:
            raise web.HTTPBadRequest(reason="Invalid Session TTL, must be between [10s=24h0m0s]")
        session_id = str(uuid.uuid4())
        self.sessions[session_id] = {"ID": session_id, "TTL": ttl,
                                     "Behavior": body.get("behavior", "release"), "timer": None}
        self._arm(session_id)
        await self._bump()
        return web.json_response({"ID": session_id})

    def _arm(self, session_id: str) -> None:
        session = self.sessions[session_id]
        if session["timer"] is not None:
            session["timer"].cancel()
        if session["TTL"]:
            session["timer"] = asyncio.get_running_loop().call_later(
                session["TTL"], self._expire, session_id)

    def _expire(self, session_id: str) -> None:
        task = asyncio.ensure_future(self._invalidate(session_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _invalidate(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        if session["timer"] is not None:
            session["timer"].cancel()
        for key in [k for k, v in self.kv.items() if v["Session"] == session_id]:
            if session["Behavior"] == "delete":
                del self.kv[key]
            else:
                self.kv[key]["Session"] = None
        await self._bump()

    async def _session_renew(self, request):
        session_id = request.match_info["id"]
        if session_id not in self.sessions:
            return web.Response(status=404, text=f"Session id '{session_id}' not found")
        self._arm(session_id)
        session = {k: v for k, v in self.sessions[session_id].items() if k != "timer"}
        session["TTL"] = f"{session['TTL']:g}s"
        return web.json_response([session])

    async def _session_destroy(self, request):
        await self._invalidate(request.match_info["id"])
        return web.json_response(True)


