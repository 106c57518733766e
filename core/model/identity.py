"""Numeric security identities and their labels.

An identity stands for a label set; policy is written against labels and enforced against
identities. Reserved identities (below 256) need no allocation.
"""

import enum
import re
import sys

import attrs


class ReservedIdentity(enum.IntEnum):
    """Cilium's reserved identities, the same number in every cluster."""

    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6
    KUBE_APISERVER = 7
    INGRESS = 8
    WORLD_IPV4 = 9  # Cilium's dual-stack split of the world; meshagent's IPv4 world stays 2
    WORLD_IPV6 = 10  # any IPv6 address no entry of the ipcache covers

    @property
    def label(self) -> str:
        """Its one label, as Cilium spells it: ``reserved:world-ipv6``."""
        return f"reserved:{self.name.lower().replace('_', '-')}"


#: The reserved identities that stand for "outside": the entity ``world`` selects them all.
WORLD_IDENTITIES = frozenset({ReservedIdentity.WORLD, ReservedIdentity.WORLD_IPV4,
                              ReservedIdentity.WORLD_IPV6})
WORLD_LABELS = frozenset(r.label for r in WORLD_IDENTITIES)


def world_identity(version: int) -> ReservedIdentity:
    """The identity of an address of that IP version no ipcache entry covers."""
    return ReservedIdentity.WORLD_IPV6 if version == 6 else ReservedIdentity.WORLD


#: The label every endpoint carries with its cluster's name.
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
#: The prefix of the labels that carry a pod's namespace's labels (``…labels.team=a``).
NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels."

# Kubernetes label syntax: optional DNS-subdomain prefix, a name, and a value.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
LABEL_VALUE = re.compile(rf"^({_NAME})?$")
#: Label sources an endpoint identity may carry (Cilium's: pod and namespace labels are k8s:).
ENDPOINT_LABEL_SOURCES = frozenset({"k8s", "container", "unspec", "cilium-generated"})
MAX_LABELS = 128  # per identity: far more than any pod carries


@attrs.frozen
class Identity:
    """A numeric identity, the source-prefixed labels it stands for (``k8s:app=db``), and the
    cluster it came from."""

    id: int
    labels: frozenset[str]
    cluster: str = ""

    @property
    def reserved(self) -> bool:
        return self.id < 256


def format_labels(labels: frozenset[str]) -> str:
    """Cilium's sorted label list, the value of ``cilium/state/identities/v1/id/<id>``."""
    return "".join(f"{label};" for label in sorted(labels))


def parse_labels(text: str) -> frozenset[str]:
    """The inverse of :func:`format_labels`; ValueError names the bad label. Labels are
    interned: most are in every identity of a namespace or cluster (60,000 of a remote's)."""
    labels = frozenset(sys.intern(part) for part in text.split(";") if part)
    if not labels:
        raise ValueError("empty label set")
    for label in labels:
        source, sep, rest = label.partition(":")
        if not sep or not source or not rest or rest.startswith("="):
            raise ValueError(f"label {label!r} is not source:key[=value]")
    return labels


def check_endpoint_labels(labels: frozenset[str], cluster: str) -> None:
    """An endpoint identity's labels as a remote cluster may publish them: a known source, a
    Kubernetes label key and value each, at most MAX_LABELS, and exactly one cluster label,
    naming ``cluster``. ValueError says what is wrong."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels, more than {MAX_LABELS}")
    clusters = []
    for label in sorted(labels):
        source, _, rest = label.partition(":")
        key, _, value = rest.partition("=")
        if source not in ENDPOINT_LABEL_SOURCES:
            raise ValueError(f"label {label[:80]!r}: source {source[:40]!r} is not one of"
                             f" {', '.join(sorted(ENDPOINT_LABEL_SOURCES))}")
        # a namespace's labels come as one key each behind Cilium's prefix
        # (pkg/k8s/apis/cilium.io/const.go, PodNamespaceMetaLabels): the rest is their key
        plain = key.removeprefix(NAMESPACE_LABELS)
        if not plain or not LABEL_KEY.match(plain) or not LABEL_VALUE.match(value):
            raise ValueError(f"label {label[:80]!r} is not a Kubernetes label (key=value)")
        if key == CLUSTER_LABEL:
            clusters.append(value)
    if len(clusters) != 1:
        raise ValueError(f"{len(clusters)} cluster labels ({CLUSTER_LABEL}), not exactly one")
    if clusters[0] != cluster:
        raise ValueError(f"cluster label names {clusters[0]!r}, not {cluster!r}")


def label_value(labels: frozenset[str], key: str) -> str | None:
    """The value of ``key`` whatever its source prefix, or None."""
    for label in labels:
        name, _, value = label.partition(":")[2].partition("=")
        if name == key:
            return value
    return None


