"""A local workload (pod) the agent wired up and the datapath enforces policy for."""

import ipaddress
import json

import attrs

from meshagent.errors import UsageError
from meshagent.model.identity import CLUSTER_LABEL, LABEL_KEY, LABEL_VALUE

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"


@attrs.frozen
class Endpoint:
    id: int
    namespace: str
    labels: frozenset[str]
    ipv4: ipaddress.IPv4Address
    identity: int
    ifname: str = ""  # host-side veth
    ifindex: int = 0
    netns: str = ""
    pod_ifname: str = "eth0"
    container_id: str = ""
    pod_name: str = ""
    host_mac: str = ""
    pod_mac: str = ""
    plugin_labels: frozenset[str] = frozenset()  # the part of ``labels`` plugins supplied
    ipv6: ipaddress.IPv6Address | None = None  # with an IPv6 --pod-cidr (dual stack)
    #: in policy audit mode (the endpoint's own setting, else --policy-audit-mode): what the
    #: policy would drop passes, reported with verdict AUDIT
    policy_audit: bool = False
    #: the endpoint's own PolicyAuditMode (``meshagent endpoint config``); None: it follows
    #: --policy-audit-mode. Kept apart so a changed global reaches it after a restart.
    policy_audit_mode: bool | None = None

    @property
    def addresses(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        return (self.ipv4,) if self.ipv6 is None else (self.ipv4, self.ipv6)


def endpoint_to_json(endpoint: Endpoint) -> str:
    doc = attrs.asdict(endpoint)
    doc["labels"] = sorted(endpoint.labels)
    doc["plugin_labels"] = sorted(endpoint.plugin_labels)
    doc["ipv4"] = str(endpoint.ipv4)
    doc["ipv6"] = str(endpoint.ipv6) if endpoint.ipv6 is not None else None
    return json.dumps(doc, indent=2)


def endpoint_from_json(text: str) -> Endpoint:
    doc = json.loads(text)
    doc["labels"] = frozenset(doc["labels"])
    doc["plugin_labels"] = frozenset(doc.get("plugin_labels", ()))
    doc["ipv4"] = ipaddress.IPv4Address(doc["ipv4"])
    doc["ipv6"] = ipaddress.IPv6Address(doc["ipv6"]) if doc.get("ipv6") else None
    return Endpoint(**doc)


def endpoint_labels(user_labels: str | list[str], namespace: str, cluster: str) -> frozenset[str]:
    """Source-prefixed labels of a pod: the user's, its namespace's, and its cluster's.

    ``app=x,role=db`` (or a list) becomes ``k8s:app=x``, ``k8s:role=db``; a label that already
    has a source (``k8s:``, ``container:``) keeps it. UsageError names a label that is invalid.
    """
    words = user_labels.split(",") if isinstance(user_labels, str) else list(user_labels)
    labels = set()
    for word in (w.strip() for w in words):
        if not word:
            continue
        source, sep, rest = word.partition(":")
        if not sep or "=" in source:
            source, rest = "k8s", word
        key, _, value = rest.partition("=")
        if not LABEL_KEY.match(key) or not LABEL_VALUE.match(value) or len(value) > 63:
            raise UsageError(f"invalid label {word!r}: expected key=value in Kubernetes label"
                             " syntax (key: [prefix/]name, value: up to 63 of [A-Za-z0-9-_.])")
        if key in (NAMESPACE_LABEL, CLUSTER_LABEL):
            raise UsageError(f"label {key!r} is set by the agent (from --namespace and the"
                             " cluster name)")
        labels.add(f"{source}:{key}={value}")
    if not LABEL_VALUE.match(namespace) or not namespace:
        raise UsageError(f"invalid namespace {namespace!r}")
    labels.add(f"k8s:{NAMESPACE_LABEL}={namespace}")
    labels.add(f"k8s:{CLUSTER_LABEL}={cluster}")
    return frozenset(labels)
