"""meshagent-audit: record every change the agent publishes as one JSON line.

A third-party plugin: it uses only meshagent's public hooks and helpers.
"""

import argparse
import collections
import json
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import Counter

import meshagent
from meshagent.plugin import (
    Health,
    Route,
    StatusSection,
    UsageError,
    json_response,
    to_jsonable,
)

KINDS = ("node", "identity", "ipcache", "endpoint", "policy", "service")
RECENT = 1000


class AuditLog:
    """One agent's audit log: registered per agent at configure, so agents never share one."""

    def __init__(self, path: Path, kinds: frozenset[str]):
        self.path = path
        self.kinds = kinds
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT)
        self.written = 0
        self.metric: Counter | None = None
        self._file = None

    def record(self, kind: str, change, obj) -> None:
        if kind not in self.kinds:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # line-buffered: each record whole
        entry = {"time": time.time(), "kind": kind, "change": change.value,
                 "object": to_jsonable(obj)}
        self._file.write(json.dumps(entry) + "\n")
        self.recent.append(entry)
        self.written += 1
        if self.metric is not None:
            self.metric.labels(kind=kind).inc()

    @meshagent.hookimpl
    def meshagent_unconfigure(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    @meshagent.hookimpl
    def meshagent_register_metrics(self, registry):
        self.metric = Counter("meshagent_audit_events", "changes written to the audit log",
                              ["kind"], registry=registry)

    @meshagent.hookimpl
    def meshagent_node_changed(self, kind, node):
        self.record("node", kind, node)

    @meshagent.hookimpl
    def meshagent_identity_changed(self, kind, identity):
        self.record("identity", kind, identity)

    @meshagent.hookimpl
    def meshagent_ipcache_changed(self, kind, entry):
        self.record("ipcache", kind, entry)

    @meshagent.hookimpl
    def meshagent_endpoint_changed(self, kind, endpoint):
        self.record("endpoint", kind, endpoint)

    @meshagent.hookimpl
    def meshagent_policy_changed(self, kind, policy):
        self.record("policy", kind, policy)

    @meshagent.hookimpl
    def meshagent_service_changed(self, kind, service):
        self.record("service", kind, service)

    @meshagent.hookimpl
    def meshagent_status(self):
        return StatusSection("Audit", Health.OK, f"{self.written} changes written to {self.path}",
                             details=[f"recording: {', '.join(sorted(self.kinds))}"])

    @meshagent.hookimpl
    def meshagent_api_routes(self):
        async def recent(request: web.Request) -> web.Response:
            try:
                limit = int(request.query.get("limit", "20"))
            except ValueError:
                raise web.HTTPBadRequest(reason="limit must be an integer") from None
            return json_response(list(self.recent)[-limit:] if limit > 0 else [])
        return [Route("GET", "/audit", recent)]


@meshagent.hookimpl
def meshagent_addoption(parser):
    group = parser.getgroup("audit", "audit plugin (meshagent-audit)")
    group.addoption("audit-file", type=str, default="",
                    help="JSON-lines file to append changes to (default: <state-dir>/audit.jsonl)")
    group.addoption("audit-events", type=str, default=",".join(KINDS),
                    help=f"comma list of kinds to record ({', '.join(KINDS)})")


@meshagent.hookimpl
def meshagent_configure(config, pluginmanager):
    kinds = frozenset(k.strip() for k in config.get("audit-events").split(",") if k.strip())
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise UsageError(f"invalid --audit-events: unknown kind {', '.join(unknown)};"
                         f" known: {', '.join(KINDS)}")
    path = Path(config.get("audit-file") or config.state_dir / "audit.jsonl")
    pluginmanager.register(AuditLog(path, kinds), name="audit.log")


@meshagent.hookimpl
def meshagent_commands():
    from meshagent.plugin import Command

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--limit", type=int, default=20, help="how many recent changes")

    def run(args: argparse.Namespace) -> int:
        from meshagent.client import AgentClient
        for entry in AgentClient(args.socket_path).get("/audit", params={"limit": args.limit}):
            print(json.dumps(entry))
        return 0

    return [Command("audit", "print the agent's most recent recorded changes", add_arguments, run)]
