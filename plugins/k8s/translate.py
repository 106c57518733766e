"""Kubernetes objects as meshagent sees them: identity labels, policies, services.

Each function takes the objects as the API server sent them and raises an error naming the
object when one cannot be used; the caller refuses that object and keeps its last good version.
"""

import re

import attrs

from meshagent.plugin import Policy, PolicyError, Service, parse_document, services_from_documents
from meshagent.plugins.k8s.client import Resource

# Cilium's default identity-relevant label filter: a key that *starts* with one of these
# patterns says nothing about what a workload is (hashes, generations, indexes, the
# Kubernetes-owned namespaces) and is left out; ``io.cilium.k8s`` is the agent's own. Everything
# else counts, ``app.kubernetes.io/name`` included.
IGNORED = (r"io\.kubernetes", r"kubernetes\.io", r".*beta\.kubernetes\.io", r"k8s\.io",
           r"pod-template-generation", r"pod-template-hash", r"controller-revision-hash",
           r"annotation.*", r"etcd_node", r"statefulset\.kubernetes\.io/pod-name",
           r"apps\.kubernetes\.io/pod-index", r"batch\.kubernetes\.io/job-completion-index",
           r"io\.cilium\.k8s")
_IGNORED = re.compile("|".join(f"(?:{pattern})" for pattern in IGNORED))
NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT = "io.cilium.k8s.policy.serviceaccount"


def relevant(key: str) -> bool:
    return not _IGNORED.match(key)


def identity_labels(pod: dict, namespace: dict | None) -> frozenset[str]:
    """The labels a pod's identity is derived from, as Cilium derives them: its own relevant
    labels, its namespace's labels and its service account (the agent adds the namespace name
    and the cluster)."""
    meta = pod.get("metadata") or {}
    labels = {f"k8s:{k}={v}" for k, v in (meta.get("labels") or {}).items() if relevant(k)}
    ns_labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
    labels |= {f"k8s:{NAMESPACE_LABELS}{k}={v}" for k, v in ns_labels.items()}
    account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    labels.add(f"k8s:{SERVICE_ACCOUNT}={account}")
    return frozenset(labels)


def display(resource: Resource, obj: dict) -> str:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "?")
    return f"{resource.kind} {meta['namespace']}/{name}" if meta.get("namespace") \
        else f"{resource.kind} {name}"


def policy_from(resource: Resource, obj: dict) -> Policy:
    """A CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy; PolicyError names it."""
    meta = obj["metadata"]
    doc = {key: obj[key] for key in ("spec", "specs") if key in obj}
    doc.update(apiVersion=resource.api_version, kind=resource.kind,
               metadata={"name": meta["name"]})
    if resource.namespaced:
        doc["metadata"]["namespace"] = meta.get("namespace") or "default"
    try:
        return parse_document(doc, "k8s")
    except PolicyError as exc:  # say "field: problem"; the caller names the object
        raise PolicyError(str(exc).removeprefix(f"k8s ({resource.kind} {meta['name']}): ")) \
            from None


def service_from(service: dict, slices: list[dict], cluster: str) -> Service | None:
    """A Service with the EndpointSlices that name it; None for one meshagent does not
    balance (headless, ExternalName). ServiceError (or a TypeError/AttributeError on a
    malformed object) names it."""
    spec = service.get("spec") or {}
    if spec.get("type") == "ExternalName" or spec.get("clusterIP") in (None, "", "None"):
        return None
    meta = service["metadata"]
    docs = [{**service, "kind": "Service"}] + [{**s, "kind": "EndpointSlice"} for s in slices]
    names = [f"Service {meta['namespace']}/{meta['name']}"] + [
        f"EndpointSlice {s['metadata'].get('namespace')}/{s['metadata']['name']}" for s in slices]
    (parsed,) = services_from_documents(docs, cluster, names)
    return attrs.evolve(parsed, cluster=cluster)


def slice_owner(obj: dict) -> tuple[str, str] | None:
    meta = obj.get("metadata") or {}
    owner = (meta.get("labels") or {}).get("kubernetes.io/service-name")
    return (meta.get("namespace") or "", owner) if isinstance(owner, str) and owner else None
