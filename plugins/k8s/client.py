"""The few API-server calls the plugin makes, on kubernetes_asyncio's configured client.

kubernetes_asyncio brings what must not be hand-written: kubeconfig and in-cluster loading,
TLS, bearer tokens and their refresh, exec credential plugins. The calls go through its
``call_api`` unparsed, because the plugin wants the wire format: JSON objects as the API
server sends them (custom resources have no generated models) and a watch's newline-delimited
event stream, read in chunks so an object of any size fits.
"""

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import attrs
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

from meshagent.plugin import UsageError

# What can go wrong talking to the API server that a retry may cure.
TRANSIENT = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class KubeError(Exception):
    """The API server answered with an error ``Status``."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message


def error_from(code: int, doc: object) -> KubeError:
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        return KubeError(int(doc.get("code") or code), str(doc.get("reason", "")),
                         str(doc.get("message", "")))
    return KubeError(code, "", str(doc)[:200])


@attrs.frozen
class Resource:
    """A kind the plugin reads, and where the API server serves it."""

    plural: str
    kind: str
    api_version: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name is not None else base


NAMESPACES = Resource("namespaces", "Namespace", "v1", False)
NODES = Resource("nodes", "Node", "v1", False)
PODS = Resource("pods", "Pod", "v1", True)
SERVICES = Resource("services", "Service", "v1", True)
ENDPOINT_SLICES = Resource("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True)
CNPS = Resource("ciliumnetworkpolicies", "CiliumNetworkPolicy", "cilium.io/v2", True)
CCNPS = Resource("ciliumclusterwidenetworkpolicies", "CiliumClusterwideNetworkPolicy",
                 "cilium.io/v2", False)


class KubeAPI:
    def __init__(self, api_client: ApiClient, where: str):
        self.api_client = api_client
        self.where = where  # "kubeconfig /path" or "in-cluster", for messages

    @classmethod
    async def connect(cls, kubeconfig: str = "") -> "KubeAPI":
        """From ``kubeconfig`` if given; else in-cluster (service account) when running in a
        pod; else ``$KUBECONFIG`` or ``~/.kube/config``, as kubectl does."""
        configuration = Configuration()
        try:
            if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
                load_incluster_config(client_configuration=configuration)
                where = "in-cluster service account"
            else:
                path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] \
                    or str(Path("~/.kube/config").expanduser())
                await load_kube_config(config_file=path, client_configuration=configuration,
                                       persist_config=False)
                where = f"kubeconfig {path}"
        except (ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"cannot load the Kubernetes client configuration"
                             f" ({kubeconfig or 'default'}): {exc}") from None
        return cls(ApiClient(configuration), where)

    @property
    def server(self) -> str:
        return self.api_client.configuration.host

    async def close(self) -> None:
        await self.api_client.close()

    async def _call(self, method: str, path: str, query: dict | None, body: object,
                    timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        return await self.api_client.call_api(
            path, method, query_params=list((query or {}).items()),
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            body=body, auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=timeout)

    async def request(self, method: str, path: str, *, query: dict | None = None,
                      body: object = None, timeout: float = 30.0) -> dict:
        """One call; the decoded JSON answer, or KubeError with the server's Status."""
        response = await self._call(method, path, query, body,
                                    aiohttp.ClientTimeout(total=timeout))
        async with response:
            data = await response.read()
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            raise KubeError(response.status, "", f"not JSON: {data[:200]!r}") from None
        if response.status >= 300:
            raise error_from(response.status, doc)
        return doc

    async def watch(self, path: str, query: dict, read_timeout: float) -> AsyncIterator[bytes]:
        """The lines of a watch stream, as they come."""
        response = await self._call("GET", path, {**query, "watch": "1"}, None,
                                    aiohttp.ClientTimeout(sock_connect=10,
                                                          sock_read=read_timeout))
        async with response:
            if response.status >= 300:
                data = await response.read()
                try:
                    raise error_from(response.status, json.loads(data))
                except ValueError:
                    raise KubeError(response.status, "", data[:200].decode(errors="replace")) \
                        from None
            pending = b""
            async for chunk in response.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield line
