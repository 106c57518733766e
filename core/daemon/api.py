"""The agent API: HTTP/JSON on a unix socket, versioned under ``/v1/``.

The CLI talks to the agent only through it; plugins add paths with ``meshagent_api_routes``.
"""

import functools
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from aiohttp import web

from meshagent.client import API_PREFIX
from meshagent.errors import MeshagentError, PluginError
from meshagent.hooks.additions import Route, json_response
from meshagent.kvstore import KVStoreError, KVStoreUnavailable
from meshagent.model.jsonfields import to_jsonable
from meshagent.model.net import family_order

if TYPE_CHECKING:  # types only: the API serves the components, it does not build them
    from meshagent.clustermesh.mesh import ClusterMesh
    from meshagent.endpoint.manager import EndpointManager
    from meshagent.model.endpoint import Endpoint
    from meshagent.model.table import Tables
    from meshagent.datapath.drops import DropFeed
    from meshagent.datapath.progress import PolicyProgress
    from meshagent.fqdn.manager import FQDN
    from meshagent.policy import PolicyRepository, PolicyResolver
    from meshagent.runtime.config import Config
    from meshagent.runtime.status import StatusReport
    from meshagent.service.manager import ServiceManager

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 20 * 1024 * 1024


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)
    except KVStoreError as exc:  # the request was fine; the store behind it was not
        what = "unavailable" if isinstance(exc, KVStoreUnavailable) else "error"
        return web.json_response({"error": f"kvstore {what}: {exc}"}, status=503)
    except MeshagentError as exc:
        return web.json_response({"error": str(exc)}, status=getattr(exc, "http_status", 400))
    except json.JSONDecodeError as exc:
        return web.json_response({"error": f"the request body is not JSON: {exc}"}, status=400)
    except RecursionError:
        return web.json_response({"error": "the request is nested too deeply"}, status=400)
    except Exception as exc:  # a bug: say so in JSON, and keep serving
        log.exception("API %s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc}"},
                                 status=500)


@attrs.frozen
class APIState:
    """What the core routes serve, handed over by the agent (the API never sees the agent)."""

    is_ready: Callable[[], bool]
    status: "Callable[[bool], StatusReport]"
    plugin_infos: Callable[[], Any]
    config: "Config"
    tables: "Tables"
    services: "ServiceManager"
    endpoints: "EndpointManager"
    clustermesh: "ClusterMesh | None"
    resolver: "PolicyResolver | None"
    repository: "PolicyRepository | None"
    policy_progress: "PolicyProgress"
    drops: "DropFeed"
    fqdn: "FQDN | None" = None  # the DNS proxy and its names (None: no proxy runs)


def build_app(api: APIState, extra_routes: list[tuple[str, Route]]) -> web.Application:
    # room for the largest policy import (8 MiB of YAML, JSON-escaped), no more
    app = web.Application(middlewares=[_errors_as_json], client_max_size=MAX_REQUEST_BYTES)
    core = [
        Route("GET", "/healthz", functools.partial(_healthz, api)),
        Route("GET", "/monitor", api.drops.stream),
        Route("GET", "/status", functools.partial(_status, api)),
        Route("GET", "/plugins", functools.partial(_plugins, api)),
        Route("GET", "/config", functools.partial(_config, api)),
        Route("GET", "/nodes", functools.partial(_nodes, api)),
        Route("GET", "/identities", functools.partial(_identities, api)),
        Route("GET", "/ipcache", functools.partial(_ipcache, api)),
        Route("GET", "/clustermesh", functools.partial(_clustermesh, api)),
        Route("GET", "/services", functools.partial(_services, api)),
        Route("POST", "/services", functools.partial(_service_apply, api)),
        Route("DELETE", "/services/{namespace}/{name}", functools.partial(_service_delete, api)),
        Route("GET", "/endpoints", functools.partial(_endpoints, api)),
        Route("POST", "/endpoints", functools.partial(_endpoint_create, api)),
        Route("GET", "/endpoints/{id}", functools.partial(_endpoint_get, api)),
        Route("DELETE", "/endpoints/{id}", functools.partial(_endpoint_delete, api)),
        Route("GET", "/endpoints/{id}/config", functools.partial(_endpoint_config_get, api)),
        Route("PATCH", "/endpoints/{id}/config", functools.partial(_endpoint_config_patch, api)),
        # policy, for whichever resolver fills the slot: only its contract is used
        Route("GET", "/policy", functools.partial(_policy_get, api)),
        Route("POST", "/policy", functools.partial(_policy_import, api)),
        Route("DELETE", "/policy/{kind}/{namespace}/{name}",
              functools.partial(_policy_delete, api)),
        Route("POST", "/policy/trace", functools.partial(_policy_trace, api)),
        Route("GET", "/policy/wait", functools.partial(_policy_wait, api)),
        Route("GET", "/fqdn/cache", functools.partial(_fqdn_cache, api)),
        Route("DELETE", "/fqdn/cache", functools.partial(_fqdn_cache_clean, api)),
    ]
    owners: dict[tuple[str, str], str] = {}
    for owner, route in [("core", r) for r in core] + extra_routes:
        key = (route.method.upper(), route.path)
        if key in owners:
            raise PluginError(f"API {key[0]} {API_PREFIX}{key[1]} is served by both"
                              f" {owners[key]!r} and {owner!r}")
        owners[key] = owner
        app.router.add_route(route.method, API_PREFIX + route.path, route.handler)
    return app


def _resolver(api: APIState) -> "PolicyResolver":
    if api.resolver is None:
        raise web.HTTPNotFound(reason="no policy resolver is loaded (slot policy-resolver)")
    return api.resolver


def _repository(api: APIState) -> "PolicyRepository":
    _resolver(api)
    return api.repository


async def _policy_get(api: APIState, request: web.Request) -> web.Response:
    repository = _repository(api)
    policies = repository.policies()
    return json_response({"revision": repository.revision,
                          "policies": [p.document for p in policies],
                          "rules": [rule for p in policies for rule in p.rules_json()]})


async def _policy_import(api: APIState, request: web.Request) -> web.Response:
    repository = _repository(api)
    body = await request.json()
    policies = await repository.import_policies(body.get("text", ""),
                                                body.get("source", "request"))
    revision = await repository.store(policies)
    return json_response({"imported": [p.display for p in policies], "revision": revision,
                          "warnings": [w for p in policies for w in p.warnings]}, status=201)


async def _policy_delete(api: APIState, request: web.Request) -> web.Response:
    info = request.match_info
    namespace = None if info["namespace"] == "-" else info["namespace"]
    revision = await _repository(api).delete(info["kind"], namespace, info["name"])
    if revision is None:
        raise web.HTTPNotFound(reason=f"no policy {info['kind']} {info['namespace']}/"
                                      f"{info['name']}")
    return json_response({"deleted": info["name"], "revision": revision})


MAX_WAIT = 600.0


async def _policy_wait(api: APIState, request: web.Request) -> web.Response:
    """Until every local endpoint's datapath state reflects the revision (``cilium policy
    wait``); 408 naming the endpoints behind after the timeout."""
    from meshagent.datapath.progress import PolicyWaitTimeout
    _resolver(api)
    try:
        revision = int(request.query["revision"])
        timeout = min(float(request.query.get("timeout", "60")), MAX_WAIT)
    except (KeyError, ValueError):
        raise web.HTTPBadRequest(reason="expected ?revision=N[&timeout=SECONDS]") from None
    try:
        await api.policy_progress.wait(revision, timeout)
    except PolicyWaitTimeout as exc:
        return json_response({"error": str(exc)}, status=408)
    return json_response({"revision": revision,
                          "endpoints": len(api.policy_progress.revisions)})


TRACE_FIELDS = {"dst_endpoint", "port", "protocol", "src_identity", "src_labels", "src_ip"}
#: an egress trace: a local source endpoint and the destination peer
EGRESS_TRACE_FIELDS = {"src_endpoint", "port", "protocol", "dst_identity", "dst_labels",
                       "dst_ip"}


async def _policy_trace(api: APIState, request: web.Request) -> web.Response:
    resolver = _resolver(api)
    body = await request.json()
    egress = isinstance(body, dict) and "src_endpoint" in body
    fields = EGRESS_TRACE_FIELDS if egress else TRACE_FIELDS
    local = "src_endpoint" if egress else "dst_endpoint"
    if not isinstance(body, dict) or not {local, "port"} <= body.keys() <= fields:
        raise web.HTTPBadRequest(reason="expected a trace request: dst_endpoint, port and"
                                        " optionally protocol, src_identity, src_labels, src_ip;"
                                        " or src_endpoint, port and optionally protocol,"
                                        " dst_identity, dst_labels, dst_ip")
    try:
        result = resolver.trace(**body)
    except TypeError:
        if not egress:
            raise
        raise web.HTTPBadRequest(reason="the loaded policy resolver cannot trace egress")
    endpoint = api.endpoints.endpoints.get(body[local])
    audit = endpoint is not None and endpoint.policy_audit
    # what the datapath does with it, in Hubble's verdict words (meshagent observe)
    flow_verdict = {"allow": "FORWARDED", "redirect": "REDIRECTED"}.get(
        result.get("verdict"), "AUDIT" if audit else "DROPPED")
    return json_response({**result, "policy_audit": audit, "flow_verdict": flow_verdict})


async def _healthz(api: APIState, request: web.Request) -> web.Response:
    return json_response({"ready": api.is_ready()}, status=200 if api.is_ready() else 503)


async def _status(api: APIState, request: web.Request) -> web.Response:
    verbose = request.query.get("verbose", "false").lower() in ("1", "true", "yes")
    return json_response(api.status(verbose))


async def _plugins(api: APIState, request: web.Request) -> web.Response:
    return json_response(api.plugin_infos())


async def _config(api: APIState, request: web.Request) -> web.Response:
    config = api.config
    return json_response({name: {"value": config.values[name], "source": config.sources[name]}
                          for name in sorted(config.values)})


async def _nodes(api: APIState, request: web.Request) -> web.Response:
    return json_response(sorted(api.tables.nodes.values(), key=lambda n: n.full_name))


async def _identities(api: APIState, request: web.Request) -> web.Response:
    return json_response(sorted(api.tables.identities.values(), key=lambda i: i.id))


async def _ipcache(api: APIState, request: web.Request) -> web.Response:
    return json_response(sorted(api.tables.ipcache.values(),
                                key=lambda e: family_order(e.prefix)))


async def _clustermesh(api: APIState, request: web.Request) -> web.Response:
    mesh = api.clustermesh
    if mesh is None:
        return json_response({"configured": False, "remotes": []})
    now = time.time()
    return json_response({"configured": True, "directory": mesh.directory,
                          "remotes": [r.to_json(now) for _, r in sorted(mesh.remotes.items())]})


async def _services(api: APIState, request: web.Request) -> web.Response:
    return json_response([api.services.merged[key] for key in sorted(api.services.merged)])


async def _service_apply(api: APIState, request: web.Request) -> web.Response:
    body = await request.json()
    services = await api.services.apply(body.get("text", ""), body.get("source", "request"))
    return json_response({"applied": [f"{s.namespace}/{s.name}" for s in services]}, status=201)


async def _service_delete(api: APIState, request: web.Request) -> web.Response:
    info = request.match_info
    if not await api.services.delete(info["namespace"], info["name"]):
        raise web.HTTPNotFound(reason=f"no service {info['namespace']}/{info['name']}")
    return json_response({"deleted": f"{info['namespace']}/{info['name']}"})


async def _endpoints(api: APIState, request: web.Request) -> web.Response:
    container = request.query.get("container_id")
    found = sorted(api.endpoints.endpoints.values(), key=lambda e: e.id)
    if container is not None:
        found = [e for e in found if e.container_id == container]
    return json_response([_endpoint_status(api, e) for e in found])


def _endpoint_status(api: APIState, endpoint: "Endpoint") -> dict:
    """An endpoint with what the agent knows of its policy: the revision its datapath state
    reflects, and ``policy_enabled`` in the words of Cilium's endpoint model (null when the
    resolver does not say which directions it enforces)."""
    from meshagent.endpoint.options import policy_enabled
    from meshagent.policy import ReportsEnforcement
    resolver = api.resolver
    enforced = resolver.enforced(endpoint.id) if isinstance(resolver, ReportsEnforcement) \
        else None
    return {**to_jsonable(endpoint),
            "policy_revision": api.policy_progress.revisions.get(endpoint.id, 0),
            "policy_enabled": None if enforced is None
            else policy_enabled(*enforced, endpoint.policy_audit)}


async def _endpoint_create(api: APIState, request: web.Request) -> web.Response:
    from meshagent.endpoint.manager import EndpointRequest
    try:
        body = await request.json()
        endpoint_request = EndpointRequest(**body)
    except (ValueError, TypeError) as exc:
        raise web.HTTPBadRequest(reason=f"expected an endpoint request: {exc}") from None
    return json_response(await api.endpoints.create(endpoint_request), status=201)


def _endpoint_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise web.HTTPBadRequest(reason="endpoint id must be a number") from None


async def _endpoint_get(api: APIState, request: web.Request) -> web.Response:
    return json_response(_endpoint_status(api, api.endpoints.get(_endpoint_id(request))))


async def _endpoint_config_get(api: APIState, request: web.Request) -> web.Response:
    return json_response(api.endpoints.options(_endpoint_id(request)))


async def _endpoint_config_patch(api: APIState, request: web.Request) -> web.Response:
    """``{"options": {"PolicyAuditMode": "Enabled"}}``, as Cilium's PATCH /endpoint/{id}/config
    takes it; answers with the endpoint's options then."""
    endpoint_id = _endpoint_id(request)
    body = await request.json()
    options = body.get("options") if isinstance(body, dict) else None
    if not isinstance(options, dict) or not options:
        raise web.HTTPBadRequest(reason='expected {"options": {"NAME": "VALUE", ...}}')
    await api.endpoints.configure(endpoint_id, options)
    return json_response(api.endpoints.options(endpoint_id))


async def _endpoint_delete(api: APIState, request: web.Request) -> web.Response:
    return json_response(await api.endpoints.delete(_endpoint_id(request)))


def _fqdn_query(api: APIState, request: web.Request) -> tuple[int | None, str]:
    """The ``endpoint`` and ``matchpattern`` filters of the fqdn routes."""
    if api.fqdn is None:
        raise web.HTTPNotFound(reason="no DNS proxy runs on this agent (meshagent status says"
                                      " why)")
    raw = request.query.get("endpoint", "")
    if raw and not raw.isdigit():
        raise web.HTTPBadRequest(reason=f"invalid endpoint {raw!r}: an endpoint ID")
    pattern = request.query.get("matchpattern", "")
    return (int(raw) if raw else None), pattern


async def _fqdn_cache(api: APIState, request: web.Request) -> web.Response:
    """``meshagent fqdn cache list``: Cilium's DNSLookup rows."""
    endpoint, pattern = _fqdn_query(api, request)
    source = request.query.get("source", "")
    if source not in ("", "lookup", "connection"):
        raise web.HTTPBadRequest(reason=f"invalid source {source!r}: lookup or connection")
    try:
        return json_response(api.fqdn.lookups(endpoint, pattern, source))
    except ValueError as exc:
        raise web.HTTPBadRequest(reason=str(exc)) from None


async def _fqdn_cache_clean(api: APIState, request: web.Request) -> web.Response:
    """``meshagent fqdn cache clean``: the names go, and what they allowed."""
    endpoint, pattern = _fqdn_query(api, request)
    try:
        api.fqdn.clean(endpoint, pattern)
    except ValueError as exc:
        raise web.HTTPBadRequest(reason=str(exc)) from None
    return json_response({"cleared": True})
