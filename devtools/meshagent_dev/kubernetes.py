"""An in-process stand-in for the Kubernetes API server — the parts a list/watch client uses.

No API server can be installed on these machines, so the ``k8s`` plugin's tests run against
this. It speaks the real wire format for the kinds meshagent reads (Namespaces, Pods, Services,
EndpointSlices, CiliumNetworkPolicies, CiliumClusterwideNetworkPolicies, Nodes):

- list: ``{"kind": "PodList", "metadata": {"resourceVersion": ...}, "items": [...]}``, with
  ``limit``/``continue`` pages from one consistent snapshot (a continue token dies with a
  compaction: 410 Expired); items of built-in kinds carry no kind/apiVersion, as on a real server;
- watch (``watch=1``): newline-delimited ``{"type": ..., "object": ...}`` events after the
  given ``resourceVersion``; none or ``0`` starts with synthetic ADDED events for what exists;
  a version older than the last compaction gets an ERROR event with a 410 ``Expired`` Status;
  ``allowWatchBookmarks`` brings BOOKMARK events; ``timeoutSeconds`` ends the stream;
- ``fieldSelector`` on ``metadata.name``, ``metadata.namespace`` and, for Pods,
  ``spec.nodeName`` (``=``, ``==``, ``!=``); other fields are refused with 400, as is a
  ``labelSelector`` (which the stand-in does not implement);
- get, create (POST; 409 AlreadyExists; 404 if the namespace does not exist), replace (PUT;
  409 Conflict on a stale ``resourceVersion``), delete; errors are ``Status`` objects;
- one resourceVersion counter for everything, as etcd's revision is on a real server;
- an optional bearer token (401 without it).

It does not validate objects against schemas (a real server would refuse some of the
malformed custom resources the tests write). For tests: :meth:`compact`,
:meth:`drop_watches` (connections cut mid-stream) and :meth:`inject` (garbage on a watch).
``MESHAGENT_TEST_KUBECONFIG`` runs the same tests against a real cluster instead.
"""

import asyncio
import base64
import datetime
import json
import uuid
from pathlib import Path

import attrs
from aiohttp import web

from meshagent_dev.netlab import serve


@attrs.frozen
class Kind:
    plural: str
    kind: str
    api_version: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"

    @property
    def builtin(self) -> bool:
        return not self.api_version.startswith("cilium.io/")


KINDS = (
    Kind("namespaces", "Namespace", "v1", False),
    Kind("nodes", "Node", "v1", False),
    Kind("pods", "Pod", "v1", True),
    Kind("services", "Service", "v1", True),
    Kind("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True),
    Kind("ciliumnetworkpolicies", "CiliumNetworkPolicy", "cilium.io/v2", True),
    Kind("ciliumclusterwidenetworkpolicies", "CiliumClusterwideNetworkPolicy", "cilium.io/v2",
         False),
)
FIELDS = {"metadata.name", "metadata.namespace"}
POD_FIELDS = FIELDS | {"spec.nodeName"}


class StatusError(web.HTTPException):
    """An API error answered as a ``Status`` object, the way the API server does."""

    def __init__(self, code: int, reason: str, message: str):
        self.status_code = code
        body = status_object(code, reason, message)
        super().__init__(text=json.dumps(body), content_type="application/json")


def status_object(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@attrs.define(eq=False)
class _Watcher:
    kind: Kind
    namespace: str | None
    selector: list[tuple[str, str, str]]
    queue: asyncio.Queue
    transport: object = None


class KubeStandIn:
    def __init__(self, token: str = "", bookmark_interval: float = 60.0) -> None:
        self.token = token
        self.bookmark_interval = bookmark_interval
        # answer a watch from a compacted version with HTTP 410 instead of an ERROR event
        # (both happen: servers without the watch cache, proxies)
        self.expired_as_http = False
        self.revision = 1
        self.compacted = 1  # watches from before this get 410
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, ns, name) -> object
        self.history: list[tuple[int, str, Kind, dict, dict | None]] = []  # since compaction
        self.watchers: set[_Watcher] = set()
        self.continues: dict[str, tuple[int, list[dict]]] = {}
        self.requests: list[str] = []  # "GET /api/v1/pods?watch=1", for tests to look at
        self.runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, netns: str | None = None, host: str = "127.0.0.1",
                    port: int = 0) -> "KubeStandIn":
        """Listen on ``host:port`` (a free port by default), inside ``netns`` if given."""
        app = web.Application(middlewares=[self._auth])
        for kind in KINDS:
            base = kind.prefix
            if kind.namespaced:
                app.router.add_get(f"{base}/{kind.plural}", self._handler(self._list, kind))
                coll = f"{base}/namespaces/{{namespace}}/{kind.plural}"
            else:
                coll = f"{base}/{kind.plural}"
            app.router.add_get(coll, self._handler(self._list, kind))
            app.router.add_post(coll, self._handler(self._create, kind))
            app.router.add_get(coll + "/{name}", self._handler(self._get, kind))
            app.router.add_put(coll + "/{name}", self._handler(self._replace, kind))
            app.router.add_delete(coll + "/{name}", self._handler(self._delete, kind))
        app.router.add_get("/version", self._version)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        self.url = await self.listen(netns, host, port)
        return self

    async def listen(self, netns: str | None = None, host: str = "127.0.0.1",
                     port: int = 0) -> str:
        """Answer on one more address (e.g. inside an agent's network namespace too)."""
        return await serve(self.runner, netns, host, port)

    async def stop(self) -> None:
        self.drop_watches()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def kubeconfig(self, path: Path, url: str = "") -> Path:
        """A kubeconfig for this server (at ``url`` if given), as ``kubectl`` would use it."""
        user = {"token": self.token} if self.token else {}
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "standin",
               "clusters": [{"name": "standin", "cluster": {"server": url or self.url}}],
               "users": [{"name": "standin", "user": user}],
               "contexts": [{"name": "standin",
                             "context": {"cluster": "standin", "user": "standin"}}]}
        path.write_text(json.dumps(doc))
        return path

    # -- test controls -------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget the history: a watch or continue from an older version now gets 410."""
        self.compacted = self.revision
        self.history.clear()
        self.continues.clear()

    def drop_watches(self) -> None:
        """Cut every watch connection mid-stream, as a restarting API server or a broken
        network would."""
        for watcher in list(self.watchers):
            if watcher.transport is not None:
                watcher.transport.abort()
            watcher.queue.put_nowait(None)
        self.watchers.clear()

    def inject(self, plural: str, line: str) -> None:
        """Send ``line`` as is to every watch of ``plural``."""
        for watcher in self.watchers:
            if watcher.kind.plural == plural:
                watcher.queue.put_nowait(line)

    def put_object(self, plural: str, obj: dict) -> dict:
        """Create or replace ``obj`` directly, as another client would while this one's
        connection is down."""
        kind = next(k for k in KINDS if k.plural == plural)
        meta = obj["metadata"]
        old = self.objects.get((plural, meta.get("namespace", ""), meta["name"]))
        obj = {**obj, "kind": kind.kind, "apiVersion": kind.api_version}
        obj["metadata"] = {"uid": str(uuid.uuid4()), "creationTimestamp": _now(), **meta}
        return self._commit("MODIFIED" if old else "ADDED", kind, obj, old)

    def delete_object(self, plural: str, namespace: str, name: str) -> None:
        kind = next(k for k in KINDS if k.plural == plural)
        old = self._find(kind, namespace, name)
        self._commit("DELETED", kind, old, old)

    def watch_count(self, plural: str) -> int:
        return sum(1 for w in self.watchers if w.kind.plural == plural)

    # -- plumbing ------------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        self.requests.append(f"{request.method} {request.path_qs}")
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise StatusError(401, "Unauthorized", "Unauthorized")
        return await handler(request)

    @staticmethod
    def _handler(method, kind: Kind):
        async def handle(request: web.Request):
            return await method(request, kind)
        return handle

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-standin"})

    def _find(self, kind: Kind, namespace: str, name: str) -> dict:
        obj = self.objects.get((kind.plural, namespace, name))
        if obj is None:
            raise StatusError(404, "NotFound", f'{kind.plural} "{name}" not found')
        return obj

    async def _body(self, request: web.Request, kind: Kind) -> dict:
        try:
            body = await request.json()
        except ValueError as exc:
            raise StatusError(400, "BadRequest", f"invalid JSON: {exc}") from None
        meta = body.get("metadata") if isinstance(body, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) \
                or not meta["name"]:
            raise StatusError(422, "Invalid", f"{kind.kind} is invalid: metadata.name: Required"
                                              " value: name is required")
        namespace = request.match_info.get("namespace", "")
        if kind.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise StatusError(400, "BadRequest", "the namespace of the provided object does"
                                  " not match the namespace sent on the request")
            meta["namespace"] = namespace
        body["kind"], body["apiVersion"] = kind.kind, kind.api_version
        return body

    def _commit(self, event: str, kind: Kind, obj: dict, old: dict | None) -> dict:
        self.revision += 1
        obj = json.loads(json.dumps(obj))  # a copy nobody else holds
        obj["metadata"]["resourceVersion"] = str(self.revision)
        key = (kind.plural, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if event == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.history.append((self.revision, event, kind, obj, old))
        for watcher in self.watchers:
            if watcher.kind == kind:
                line = _event_for(watcher, event, obj, old)
                if line is not None:
                    watcher.queue.put_nowait(line)
        return obj

    # -- verbs ---------------------------------------------------------------------------------

    async def _get(self, request: web.Request, kind: Kind) -> web.Response:
        obj = self._find(kind, request.match_info.get("namespace", ""), request.match_info["name"])
        return web.json_response(obj)

    async def _create(self, request: web.Request, kind: Kind) -> web.Response:
        body = await self._body(request, kind)
        meta = body["metadata"]
        if kind.namespaced:
            self._find(KINDS[0], "", meta["namespace"])  # 404 names the missing namespace
        key = (kind.plural, meta.get("namespace", ""), meta["name"])
        if key in self.objects:
            raise StatusError(409, "AlreadyExists",
                              f'{kind.plural} "{meta["name"]}" already exists')
        meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now())
        return web.json_response(self._commit("ADDED", kind, body, None), status=201)

    async def _replace(self, request: web.Request, kind: Kind) -> web.Response:
        body = await self._body(request, kind)
        meta = body["metadata"]
        if meta["name"] != request.match_info["name"]:
            raise StatusError(400, "BadRequest", "the name of the object does not match the"
                              " name on the URL")
        old = self._find(kind, meta.get("namespace", ""), meta["name"])
        wanted = meta.get("resourceVersion")
        if not wanted and not kind.builtin:
            raise StatusError(422, "Invalid", f'{kind.kind}.{kind.api_version.split("/")[0]}'
                              f' "{meta["name"]}" is invalid: metadata.resourceVersion: Invalid'
                              " value: 0x0: must be specified for an update")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise StatusError(409, "Conflict", f'Operation cannot be fulfilled on {kind.plural}'
                              f' "{meta["name"]}": the object has been modified; please apply'
                              " your changes to the latest version and try again")
        meta.update(uid=old["metadata"]["uid"], creationTimestamp=old["metadata"][
            "creationTimestamp"], generation=old["metadata"].get("generation", 1) + 1)
        return web.json_response(self._commit("MODIFIED", kind, body, old))

    async def _delete(self, request: web.Request, kind: Kind) -> web.Response:
        old = self._find(kind, request.match_info.get("namespace", ""), request.match_info["name"])
        return web.json_response(self._commit("DELETED", kind, old, old))

    async def _list(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        query = request.query
        if query.get("labelSelector"):
            raise StatusError(400, "BadRequest", "labelSelector is not implemented by the"
                              " stand-in")
        namespace = request.match_info.get("namespace")
        selector = _field_selector(query.get("fieldSelector", ""),
                                   POD_FIELDS if kind.plural == "pods" else FIELDS)
        if query.get("watch") in ("1", "true"):
            return await self._watch(request, kind, namespace, selector)
        token = query.get("continue")
        if token:
            if token not in self.continues:
                raise StatusError(410, "Expired", "The provided continue parameter is too old"
                                  " to display a consistent list result. You can start a new"
                                  " list without the continue parameter.")
            revision, items = self.continues.pop(token)
        else:
            revision = self.revision
            items = [obj for (plural, ns, _), obj in sorted(self.objects.items())
                     if plural == kind.plural and namespace in (None, ns)
                     and _matches(obj, selector)]
        limit = int(query.get("limit") or 0)
        meta: dict = {"resourceVersion": str(revision)}
        if limit and len(items) > limit:
            token = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()
            self.continues[token] = (revision, items[limit:])
            meta["continue"] = token
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        if kind.builtin:
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                     for o in items]
        return web.json_response({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                                  "metadata": meta, "items": items})

    async def _watch(self, request: web.Request, kind: Kind, namespace: str | None,
                     selector: list) -> web.StreamResponse:
        query = request.query
        watcher = _Watcher(kind, namespace, selector, asyncio.Queue(), request.transport)
        version = query.get("resourceVersion", "")
        expired = version not in ("", "0") and int(version) < self.compacted
        if expired and self.expired_as_http:
            raise StatusError(410, "Expired", f"too old resource version: {version}"
                              f" ({self.compacted})")
        if expired:
            watcher.queue.put_nowait(json.dumps({"type": "ERROR", "object": status_object(
                410, "Expired", f"too old resource version: {version} ({self.compacted})")}))
            watcher.queue.put_nowait(None)
        elif version in ("", "0"):
            for (plural, ns, _), obj in sorted(self.objects.items()):
                if plural == kind.plural and namespace in (None, ns) and _matches(obj, selector):
                    watcher.queue.put_nowait(json.dumps({"type": "ADDED", "object": obj}))
        else:
            for revision, event, event_kind, obj, old in self.history:
                if event_kind == kind and revision > int(version):
                    line = _event_for(watcher, event, obj, old)
                    if line is not None:
                        watcher.queue.put_nowait(line)
        self.watchers.add(watcher)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                wait = min(left, self.bookmark_interval) if bookmarks else left
                try:
                    line = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if not bookmarks or deadline <= asyncio.get_running_loop().time():
                        break
                    line = json.dumps({"type": "BOOKMARK", "object": {
                        "kind": kind.kind, "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(self.revision)}}})
                if line is None:
                    break
                await response.write(line.encode() + b"\n")
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            self.watchers.discard(watcher)
        if request.transport is not None and not request.transport.is_closing():
            await response.write_eof()
        return response


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _field_selector(text: str, allowed: set[str]) -> list[tuple[str, str, str]]:
    terms = []
    for term in filter(None, text.split(",")):
        for op in ("!=", "==", "="):
            field, sep, value = term.partition(op)
            if sep:
                break
        else:
            raise StatusError(400, "BadRequest", f"invalid field selector: {term!r}")
        if field not in allowed:
            raise StatusError(400, "BadRequest", f'"{field}" is not a known field selector:'
                              f' only {", ".join(sorted(allowed))}')
        terms.append((field, "!=" if op == "!=" else "=", value))
    return terms


def _field(obj: dict, path: str) -> str:
    value: object = obj
    for part in path.split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
    return value if isinstance(value, str) else ""


def _matches(obj: dict, selector: list[tuple[str, str, str]]) -> bool:
    return all((_field(obj, f) == v) == (op == "=") for f, op, v in selector)


def _event_for(watcher: _Watcher, event: str, obj: dict, old: dict | None) -> str | None:
    """The event a watcher sees, given its namespace and field selector: an object moving out
    of the selection is DELETED for it, one moving in is ADDED."""
    def visible(o: dict | None) -> bool:
        return o is not None and watcher.namespace in (None, o["metadata"].get("namespace", "")) \
            and _matches(o, watcher.selector)
    now, before = visible(obj) and event != "DELETED", visible(old)
    if now:
        return json.dumps({"type": "MODIFIED" if before else "ADDED", "object": obj})
    if not before:
        return None
    # gone from this watcher's view: the object as it saw it last, at the event's version
    last = {**old, "metadata": {**old["metadata"],
                                "resourceVersion": obj["metadata"]["resourceVersion"]}}
    return json.dumps({"type": "DELETED", "object": last})


async def _serve(port: int, kubeconfig: Path) -> None:
    standin = await KubeStandIn().start(port=port)
    standin.kubeconfig(kubeconfig)
    print(f"Kubernetes API stand-in at {standin.url}; kubeconfig {kubeconfig}", flush=True)
    try:
        await asyncio.Future()
    finally:
        await standin.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m meshagent_dev.kubernetes --kubeconfig PATH``: serve until interrupted
    (to try the k8s plugin without a cluster)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m meshagent_dev.kubernetes")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default:"
                        " a free one)")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="where to write the"
                        " kubeconfig for it")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.port, args.kubeconfig))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
