"""``meshagent-cni``: the CNI 1.0.0 plugin, so a container runtime can use meshagent.

The runtime runs it with the network config JSON on stdin and ``CNI_*`` in the environment; it
asks the agent (over its API socket) to create, check or delete the container's endpoint and
prints the result, or a CNI error object, on stdout.

Network config (e.g. ``/etc/cni/net.d/10-meshagent.conflist``)::

    {"cniVersion": "1.0.0", "name": "meshagent",
     "plugins": [{"type": "meshagent-cni",
                  "socketPath": "/var/run/meshagent/meshagent.sock"}]}

Labels come from ``runtimeConfig.labels`` (``{"app": "employee"}``) or the conventional
``args.cni.labels`` (``[{"key": "app", "value": "employee"}]``); the namespace and pod name
from ``CNI_ARGS`` (``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``).
"""

import asyncio
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshagent.client import AgentClient
from meshagent.endpoint.podnet import GATEWAY, GATEWAY6
from meshagent.errors import AgentNotRunning, MeshagentError
from meshagent.runtime.config import DEFAULT_SOCKET

CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]

# Error codes of the CNI spec; 100 and up are ours.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
AGENT_REFUSED = 100


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self) -> dict:
        return {"cniVersion": CNI_VERSION, "code": self.code, "msg": self.msg,
                "details": self.details}


def parse_cni_args(text: str) -> dict[str, str]:
    """``K8S_POD_NAMESPACE=default;K8S_POD_NAME=x`` as a dict."""
    args = {}
    for pair in filter(None, text.split(";")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise CNIError(INVALID_ENVIRONMENT, f"CNI_ARGS entry {pair!r} is not KEY=VALUE")
        args[key] = value
    return args


def load_config(stdin: str) -> dict[str, Any]:
    try:
        config = json.loads(stdin)
    except ValueError as exc:
        raise CNIError(DECODE_FAILURE, "network config is not valid JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "network config must be a JSON object")
    version = config.get("cniVersion")
    if not isinstance(version, str):
        raise CNIError(INVALID_CONFIG, "network config has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if not isinstance(config.get("name"), str):
        raise CNIError(INVALID_CONFIG, "network config has no name")
    return config


def labels_from(config: Mapping[str, Any]) -> list[str]:
    labels = []
    runtime = config.get("runtimeConfig", {}).get("labels", {})
    if not isinstance(runtime, dict):
        raise CNIError(INVALID_CONFIG, "runtimeConfig.labels must be an object")
    labels += [f"{k}={v}" for k, v in runtime.items()]
    conventional = config.get("args", {}).get("cni", {}).get("labels", [])
    if not isinstance(conventional, list) or not all(
            isinstance(item, dict) and "key" in item for item in conventional):
        raise CNIError(INVALID_CONFIG, "args.cni.labels must be a list of {key, value}")
    labels += [f"{item['key']}={item.get('value', '')}" for item in conventional]
    return labels


def result_for(endpoint: dict, version: str) -> dict:
    """The CNI result: the pod's interface and its address of each family, with routes."""
    ips = [{"address": f"{endpoint['ipv4']}/32", "gateway": GATEWAY, "interface": 1}]
    routes = [{"dst": "0.0.0.0/0", "gw": GATEWAY}]
    if endpoint.get("ipv6"):
        ips.append({"address": f"{endpoint['ipv6']}/128", "gateway": GATEWAY6, "interface": 1})
        routes.append({"dst": "::/0", "gw": GATEWAY6})
    return {
        "cniVersion": version,
        "interfaces": [
            {"name": endpoint["ifname"], "mac": endpoint["host_mac"]},
            {"name": endpoint["pod_ifname"], "mac": endpoint["pod_mac"],
             "sandbox": endpoint["netns"]},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    }


def require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CNIError(INVALID_ENVIRONMENT, f"{name} is not set")
    return value


def handle(env: Mapping[str, str], stdin: str) -> dict | None:
    """Run one CNI command; the result to print (None: print nothing)."""
    command = require(env, "CNI_COMMAND")
    if command == "VERSION":
        return {"cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS}
    config = load_config(stdin)
    container = require(env, "CNI_CONTAINERID")
    socket = Path(config.get("socketPath") or env.get("MESHAGENT_SOCKET_PATH") or DEFAULT_SOCKET)
    client = AgentClient(socket)
    found = _call(client, "GET", "/endpoints", params={"container_id": container})
    existing = found[0] if found else None
    if command == "ADD":
        netns = require(env, "CNI_NETNS")
        ifname = require(env, "CNI_IFNAME")
        if not Path(netns).exists():
            raise CNIError(UNKNOWN_CONTAINER, f"network namespace {netns} does not exist")
        if existing is None:
            args = parse_cni_args(env.get("CNI_ARGS", ""))
            body = {"netns": netns, "pod_ifname": ifname, "container_id": container,
                    "namespace": args.get("K8S_POD_NAMESPACE", "default"),
                    "pod_name": args.get("K8S_POD_NAME", ""), "labels": labels_from(config)}
            existing = _call(client, "POST", "/endpoints", json=body, ok=(201,))
        return result_for(existing, config["cniVersion"])
    if command == "DEL":
        if existing is not None:
            _call(client, "DELETE", f"/endpoints/{existing['id']}")
        return None
    if command == "CHECK":
        if existing is None:
            raise CNIError(UNKNOWN_CONTAINER, f"no endpoint for container {container}")
        expected = {ip.get("address") for ip in config.get("prevResult", {}).get("ips", [])}
        have = {f"{existing['ipv4']}/32"} | ({f"{existing['ipv6']}/128"}
                                             if existing.get("ipv6") else set())
        if expected and expected != have:
            raise CNIError(AGENT_REFUSED, "endpoint address differs from prevResult",
                           f"agent: {sorted(have)}, prevResult: {sorted(expected)}")
        return None
    raise CNIError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is not supported")


def _call(client: AgentClient, method: str, path: str, **kwargs: Any) -> Any:
    try:
        return asyncio.run(client.request(method, path, **kwargs))
    except AgentNotRunning as exc:
        raise CNIError(TRY_AGAIN_LATER, "the meshagent agent is not reachable", str(exc)) from None
    except MeshagentError as exc:
        raise CNIError(AGENT_REFUSED, "the agent refused the request", str(exc)) from None


def main() -> int:
    try:
        result = handle(os.environ, sys.stdin.read() if not sys.stdin.isatty() else "")
    except CNIError as exc:
        print(json.dumps(exc.to_json()))
        return 1
    except OSError as exc:
        print(json.dumps(CNIError(IO_FAILURE, "I/O failure", str(exc)).to_json()))
        return 1
    if result is not None:
        print(json.dumps(result))
    return 0
