"""What the k8s tests write to: the in-process API stand-in, or the real cluster named by
``MESHAGENT_TEST_KUBECONFIG`` (with Cilium's CRDs installed). Objects go into namespaces with a
per-run prefix and are deleted afterwards."""

import os
import uuid
from pathlib import Path

from meshagent.plugins.k8s.client import CCNPS, NAMESPACES, KubeAPI, KubeError, Resource
from meshagent_dev.kubernetes import KubeStandIn

REAL = os.environ.get("MESHAGENT_TEST_KUBECONFIG", "")


class KubeCluster:
    def __init__(self, api: KubeAPI, kubeconfig: Path, standin: KubeStandIn | None):
        self.api, self.kubeconfig, self.standin = api, kubeconfig, standin
        self.prefix = f"ma{uuid.uuid4().hex[:6]}-"
        self.created: list[tuple[Resource, str | None, str]] = []

    @classmethod
    async def start(cls, directory: Path, **standin_args) -> "KubeCluster":
        if REAL:
            return cls(await KubeAPI.connect(REAL), Path(REAL), None)
        standin = await KubeStandIn(**standin_args).start()
        path = standin.kubeconfig(directory / "kubeconfig")
        return cls(await KubeAPI.connect(str(path)), path, standin)

    def ns(self, name: str) -> str:
        """A namespace name private to this run."""
        return self.prefix + name

    async def namespace(self, name: str, labels: dict | None = None) -> str:
        name = self.ns(name)
        await self.apply(NAMESPACES, {"metadata": {"name": name, "labels": labels or {}}})
        return name

    async def apply(self, resource: Resource, obj: dict) -> dict:
        """Create, or replace what is there (like ``kubectl apply`` without the merging)."""
        obj = {"apiVersion": resource.api_version, "kind": resource.kind, **obj}
        meta = obj["metadata"]
        namespace = meta.get("namespace") if resource.namespaced else None
        try:
            created = await self.api.request("POST", resource.path(namespace), body=obj)
            if resource in (NAMESPACES, CCNPS):
                self.created.append((resource, None, meta["name"]))
            return created
        except KubeError as exc:
            if exc.code != 409:
                raise
        current = await self.api.request("GET", resource.path(namespace, meta["name"]))
        obj["metadata"] = {**meta, "resourceVersion": current["metadata"]["resourceVersion"]}
        return await self.api.request("PUT", resource.path(namespace, meta["name"]), body=obj)

    async def delete(self, resource: Resource, namespace: str | None, name: str) -> None:
        await self.api.request("DELETE", resource.path(namespace, name))

    async def close(self) -> None:
        for resource, namespace, name in reversed(self.created):
            try:
                await self.delete(resource, namespace, name)
            except KubeError:
                pass
        await self.api.close()
        if self.standin is not None:
            await self.standin.stop()
