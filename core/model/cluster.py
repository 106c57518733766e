"""Who this cluster is in the mesh: name, id, and the identity range the id owns.

The rules are Cilium's, so a name or id accepted here is accepted by a Cilium mesh too.
"""

import json
import re

import attrs

from meshagent.errors import UsageError
from meshagent.model.jsonfields import GoNames, field, load_object

CLUSTER_NAME_MAX_LENGTH = 32
CLUSTER_NAME_PATTERN = re.compile(r"^([a-z0-9][-a-z0-9]*)?[a-z0-9]$")
DEFAULT_CLUSTER_NAME = "default"
MAX_CONNECTED_CLUSTERS_CHOICES = (255, 511)

#: Identities below this number are reserved: a cluster without an id allocates from here.
MIN_LOCAL_IDENTITY = 256


def validate_cluster_name(name: str, cluster_id: int) -> None:
    """Raise UsageError naming the option, the value and the rule it breaks."""
    if len(name) > CLUSTER_NAME_MAX_LENGTH:
        raise UsageError(
            f"invalid --cluster-name={name!r}: longer than {CLUSTER_NAME_MAX_LENGTH} characters"
            f" ({len(name)})"
        )
    if not CLUSTER_NAME_PATTERN.match(name):
        raise UsageError(
            f"invalid --cluster-name={name!r}: must be lower-case letters, digits and '-',"
            f" starting and ending with a letter or digit ({CLUSTER_NAME_PATTERN.pattern})"
        )
    if name == DEFAULT_CLUSTER_NAME and cluster_id != 0:
        raise UsageError(
            f"invalid --cluster-name={name!r}: a cluster in a mesh (--cluster-id={cluster_id})"
            f" needs a unique name, not {DEFAULT_CLUSTER_NAME!r}"
        )


def validate_max_connected_clusters(value: int) -> None:
    if value not in MAX_CONNECTED_CLUSTERS_CHOICES:
        raise UsageError(
            f"invalid --max-connected-clusters={value}: must be one of"
            f" {', '.join(map(str, MAX_CONNECTED_CLUSTERS_CHOICES))}"
            " (and the same in every cluster of the mesh)"
        )


def validate_cluster_id(cluster_id: int, max_connected_clusters: int) -> None:
    if not 0 <= cluster_id <= max_connected_clusters:
        raise UsageError(
            f"invalid --cluster-id={cluster_id}: must be 0 (not in a mesh) or"
            f" 1..{max_connected_clusters} with --max-connected-clusters={max_connected_clusters}"
        )


def identity_shift(max_connected_clusters: int) -> int:
    """Bits of an identity left to the cluster's own allocations (Cilium: 16, or 15 for 511)."""
    return 15 if max_connected_clusters == 511 else 16


@attrs.frozen
class ClusterInfo:
    """This agent's cluster, validated on construction."""

    name: str = DEFAULT_CLUSTER_NAME
    id: int = 0
    max_connected_clusters: int = 255

    def __attrs_post_init__(self) -> None:
        validate_max_connected_clusters(self.max_connected_clusters)
        validate_cluster_id(self.id, self.max_connected_clusters)
        validate_cluster_name(self.name, self.id)

    @property
    def in_mesh(self) -> bool:
        return self.id != 0

    def identity_range(self, cluster_id: int | None = None) -> range:
        """Identities that cluster ``cluster_id`` (default: this one) may allocate, as Cilium
        computes them (``pkg/identity/numericidentity.go``, ``MinimalAllocationIdentity``: "for
        ClusterID > 0, the identity range just starts from cluster shift"): the whole of
        ``id << shift .. (id + 1) << shift - 1``; from 256 for cluster id 0."""
        cid = self.id if cluster_id is None else cluster_id
        shift = identity_shift(self.max_connected_clusters)
        base = cid << shift
        return range(base or MIN_LOCAL_IDENTITY, base + (1 << shift))

    def cluster_of_identity(self, identity: int) -> int:
        """The cluster id encoded in a numeric identity."""
        return identity >> identity_shift(self.max_connected_clusters)


@attrs.frozen
class ClusterConfig:
    """What a cluster says about itself at ``cilium/cluster-config/<name>`` (Cilium's
    ``CiliumClusterConfig``). ``cached``: written by KVStoreMesh, the cluster's state is read
    from the cache prefixes of the kvstore holding this config, not from ``cilium/state/``."""

    id: int
    synced_canaries: bool = False
    cached: bool = False
    max_connected_clusters: int = 0

    def to_json(self) -> bytes:
        """Cilium's JSON, fields left out when they are zero or false (``omitempty``)."""
        capabilities = {name: value for name, value in (
            ("syncedCanaries", self.synced_canaries), ("cached", self.cached),
            ("maxConnectedClusters", self.max_connected_clusters)) if value}
        body: dict = {"id": self.id}
        if capabilities:
            body["capabilities"] = capabilities
        return json.dumps(body).encode()


# Cilium's CiliumClusterConfig and its capabilities (pkg/clustermesh/types/types.go)
CONFIG_FIELDS = GoNames("id", "capabilities")
CAPABILITY_FIELDS = GoNames("syncedCanaries", "cached", "maxConnectedClusters")


def cluster_config_from_json(data: bytes) -> ClusterConfig:
    """Decoded as a Cilium agent does; raises ValueError naming the field that is wrong."""
    body = load_object(data, CONFIG_FIELDS)
    capabilities = CAPABILITY_FIELDS.match(
        field(body, "capabilities", dict, required=False, default={}))
    return ClusterConfig(
        id=field(body, "id", int),
        synced_canaries=field(capabilities, "syncedCanaries", bool, required=False,
                              default=False),
        cached=field(capabilities, "cached", bool, required=False, default=False),
        max_connected_clusters=field(capabilities, "maxConnectedClusters", int, required=False,
                                     default=0))
