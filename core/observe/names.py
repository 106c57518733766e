"""Naming a flow's ends: the ``flow.Endpoint`` Hubble shows for an address and an identity.

As Cilium's ``pkg/hubble/parser/common/endpoint.go`` (ResolveEndpoint) does it: an address of a
local endpoint is named from the endpoint (its id, namespace, pod name, labels); any other
from the ipcache (a pod of another node or cluster carries its namespace and pod name there,
as Cilium's IPIdentityPair ``K8sNamespace``/``K8sPodName``) and the identity's labels. The
identity is the datapath's, which judged the packet, not what the tables say now (when it
gave none: the endpoint's or the ipcache's). Labels are
sorted, ``source:key=value``; ``cluster_name`` is the identity's cluster label (a reserved
identity has none).

:meth:`Names.end` is what the observer asks for each event: the name of an end as the tables
say now, kept until they change it (an endpoint, an address's ipcache entry or an identity
changes), so that naming the ends of the next event costs two dictionary lookups.
"""

import ipaddress
from collections.abc import Callable

import attrs

from meshagent import hookimpl
from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.model.identity import CLUSTER_LABEL, Identity, ReservedIdentity, label_value
from meshagent.model.ipcache import IPCacheEntry, host_key, unpack_address
from meshagent.observe.api.flow import flow_pb2


_RESERVED = frozenset(int(r) for r in ReservedIdentity)
_NAMED_MAX = 65536  # identities whose labels are kept at hand
_ENDS_MAX = 4096  # addresses whose ends are kept named
_IDENTITIES_MAX = 16  # identities an address is named with


@attrs.frozen
class NamedEnd:
    """A flow's end as :meth:`Names.end` named it: the fields of Hubble's ``flow.Endpoint``
    (a few references, the labels shared by the ends of one identity)."""

    id: int  # the local endpoint's; 0 for any other
    identity: int
    cluster_name: str
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()

    def fill(self, message: flow_pb2.Endpoint) -> None:
        """Set ``message`` (an empty one, e.g. a flow's ``source``) to this end."""
        message.ID, message.identity = self.id, self.identity
        message.cluster_name, message.namespace = self.cluster_name, self.namespace
        message.pod_name = self.pod_name
        message.labels.extend(self.labels)
        message.SetInParent()

    def message(self) -> flow_pb2.Endpoint:
        message = flow_pb2.Endpoint()
        self.fill(message)
        return message


class Names:
    """Names ends from the local endpoints (kept current by the endpoint events: registered
    as plugin ``core.observe``), the identities (``identity``: number -> Identity or None)
    and the ipcache (``ipcache``: host key -> the entry in force or None)."""

    def __init__(self, cluster: str, identity: Callable[[int], Identity | None],
                 ipcache: Callable[[bytes], IPCacheEntry | None]):
        self.cluster = cluster
        self._identity = identity
        self._ipcache = ipcache
        self._local: dict[str, Endpoint] = {}  # address text -> endpoint
        self._named: dict[int, tuple[tuple[str, ...], str]] = {}  # identity -> labels, cluster
        # address text -> identity -> its end, as endpoint() names it
        self._ends: dict[str, dict[int, NamedEnd]] = {}

    @hookimpl
    def meshagent_endpoint_changed(self, kind: ChangeKind, endpoint: Endpoint) -> None:
        for address in endpoint.addresses:
            self._ends.pop(str(address), None)
            if kind is ChangeKind.UPSERT:
                self._local[str(address)] = endpoint
            elif self._local.get(str(address), endpoint).id == endpoint.id:
                self._local.pop(str(address), None)

    @hookimpl
    def meshagent_identity_changed(self, kind: ChangeKind, identity: Identity) -> None:
        self._named.pop(identity.id, None)  # its labels are looked up again
        self._ends.clear()

    @hookimpl
    def meshagent_ipcache_changes(self, changes: list[tuple[ChangeKind, IPCacheEntry]]) -> None:
        if not self._ends:
            return
        for _, entry in changes:
            if entry.is_host:  # only a host's entry names an end
                self._ends.pop(str(unpack_address(entry.packed)), None)

    def end(self, ip: str, identity: int) -> NamedEnd:
        """:meth:`endpoint`'s answer, the same until the tables change it."""
        ends = self._ends.get(ip)
        if ends is None:
            if len(self._ends) >= _ENDS_MAX:
                self._ends.clear()
            ends = self._ends[ip] = {}
        end = ends.get(identity)
        if end is None:
            if len(ends) >= _IDENTITIES_MAX:
                ends.clear()
            end = ends[identity] = self._name(ip, identity)
        return end

    def local(self, ip: str) -> Endpoint | None:
        return self._local.get(ip)

    def endpoint(self, ip: str, identity: int) -> flow_pb2.Endpoint:
        """The end as the tables name it now."""
        return self._name(ip, identity).message()

    def _name(self, ip: str, identity: int) -> NamedEnd:
        local = self._local.get(ip)
        if local is not None:
            number = identity or local.identity
            labels = self._labels(number)[0] or tuple(sorted(local.labels))
            return NamedEnd(local.id, number, self.cluster, local.namespace, local.pod_name,
                            labels)
        entry = self._entry(ip)
        if not identity and entry is not None:  # the datapath did not say: the ipcache's
            identity = entry.identity
        labels, cluster = self._labels(identity)
        if entry is None:
            return NamedEnd(0, identity, cluster, labels=labels)
        return NamedEnd(0, identity, cluster, entry.namespace, entry.pod_name, labels)

    def _labels(self, identity: int) -> tuple[tuple[str, ...], str]:
        """The identity's labels, sorted, and its cluster (a label of its own)."""
        named = self._named.get(identity)
        if named is None:
            known = self._identity(identity)
            if known is not None:
                labels = known.labels
            elif identity in _RESERVED:
                labels = frozenset({ReservedIdentity(identity).label})
            else:
                return (), ""  # not known yet: asked again next time
            if len(self._named) >= _NAMED_MAX:
                self._named.clear()
            named = self._named[identity] = (tuple(sorted(labels)),
                                             label_value(labels, CLUSTER_LABEL) or "")
        return named

    def _entry(self, ip: str) -> IPCacheEntry | None:
        try:
            return self._ipcache(host_key(ipaddress.ip_address(ip)))
        except ValueError:
            return None
