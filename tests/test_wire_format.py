"""Reading Cilium's values as Cilium reads them, without a kvstore: Go's encoding/json field
matching, how a node's address is picked, port names, the older ipcache layout during an
upgrade, and the options of a clustermesh file for clusters that announce no pod CIDR.

The end-to-end proof, against real etcd with values as Cilium writes them, is
tests/test_cilium_conformance.py."""

import ipaddress

import pytest

from meshagent.clustermesh.legacy import LegacyIPCache
from meshagent.clustermesh.mesh import ClusterConfigError, read_address_options
from meshagent.kvstore import keys as kvkeys
from meshagent.model.cluster import cluster_config_from_json
from meshagent.model.identity import check_endpoint_labels
from meshagent.model.ipcache import ipcache_from_json
from meshagent.model.jsonfields import GoNames
from meshagent.model.node import node_from_json
from meshagent.model.service import service_from_json

IP = ipaddress.ip_address


def test_go_matches_field_names_case_insensitively_and_ignores_unknown_ones():
    names = GoNames("IP", "HostIP")
    exact = {"IP": 1, "HostIP": 2}
    assert names.match(exact) is exact  # nothing to do: the common case costs nothing
    assert names.match({"ip": 1, "hostip": 2, "Zone": 3}) == {"IP": 1, "HostIP": 2}
    assert names.match({"IP": 1, "ip": 9}) == {"IP": 9}  # each key assigns: the last one wins


def test_values_with_other_spellings_and_absent_fields_decode_as_in_go():
    entry = ipcache_from_json(b'{"ip":"10.2.1.5","id":6685228,"hostIP":"10.99.2.1",'
                              b'"k8sNamespace":"ns","k8spodname":"p","Unknown":{"x":[1]}}',
                              "cluster2")
    assert (str(entry.address), entry.identity, str(entry.host_ip), entry.namespace,
            entry.pod_name) == ("10.2.1.5", 6685228, "10.99.2.1", "ns", "p")
    service = service_from_json(
        b'{"Cluster":"cluster2","NAMESPACE":"default","name":"db",'
        b'"frontends":{"10.96.0.10":{"redis":{"port":6379,"protocol":"TCP"}}},'
        b'"backends":{"10.2.1.5":{"redis":{"Port":6379}}},"includeexternal":true}')
    assert [(str(b.ip), b.port, b.protocol, b.name) for b in service.backends] == [
        ("10.2.1.5", 6379, "TCP", "redis")]
    # pkg/clustermesh/store/store.go: Shared is a plain bool, so absent means false
    assert service.global_ and not service.shared
    config = cluster_config_from_json(b'{"ID":102,"Capabilities":{"syncedcanaries":true}}')
    assert (config.id, config.synced_canaries) == (102, True)


def test_a_node_address_is_picked_as_cilium_picks_it():
    """pkg/node/types/node.go, GetNodeIP: the first InternalIP, else the last ExternalIP,
    else any other; never the CiliumInternalIP."""
    def node(*addresses):
        return node_from_json(('{"Name":"n","Cluster":"c","IPAddresses":[%s]}' % ",".join(
            '{"Type":"%s","IP":"%s"}' % a for a in addresses)).encode())
    assert node(("ExternalIP", "192.0.2.1")).ipv4 == IP("192.0.2.1")
    assert node(("ExternalIP", "192.0.2.1"), ("InternalIP", "10.0.0.1")).ipv4 == IP("10.0.0.1")
    assert node(("ExternalIP", "192.0.2.1"), ("ExternalIP", "192.0.2.2")).ipv4 == IP("192.0.2.2")
    assert node(("Hostname", "10.0.0.9"), ("ExternalIP", "192.0.2.1")).ipv4 == IP("192.0.2.1")
    assert node(("CiliumInternalIP", "10.2.1.1")).ipv4 is None
    dual = node(("ExternalIP", "192.0.2.1"), ("ExternalIP", "2001:db8::1"))
    assert (dual.ipv4, dual.ipv6) == (IP("192.0.2.1"), IP("2001:db8::1"))


def test_a_dual_stack_cluster_service_keeps_both_families():
    service = service_from_json(
        b'{"cluster":"c2","namespace":"default","name":"db","frontends":{"10.96.0.10":'
        b'{"redis":{"Protocol":"TCP","Port":6379}},"fd00:96::10":{"redis":{"Protocol":"TCP",'
        b'"Port":6379}}},"backends":{"10.2.1.5":{"redis":{"Protocol":"TCP","Port":6379}},'
        b'"fd00:2:1::5":{"redis":{"Protocol":"TCP","Port":6379}}},"shared":true}')
    assert [str(b.ip) for b in service.backends] == ["10.2.1.5", "fd00:2:1::5"]
    assert [str(f.ip) for f in service.frontends] == ["10.96.0.10", "fd00:96::10"]


def test_namespace_labels_with_long_keys_are_kubernetes_labels():
    check_endpoint_labels(frozenset({
        "k8s:io.cilium.k8s.policy.cluster=c2",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=istio-space",
        "k8s:io.cilium.k8s.namespace.labels." + "a" * 50 + "=x"}), "c2")
    with pytest.raises(ValueError, match="not a Kubernetes label"):
        check_endpoint_labels(frozenset({"k8s:io.cilium.k8s.policy.cluster=c2",
                                         "k8s:io.cilium.k8s.namespace.labels.=x"}), "c2")


class Follower:
    """What an ipcache follower holds: default key -> value."""

    def __init__(self):
        self.rows: dict[str, bytes] = {}
        self.legacy = LegacyIPCache("cluster2", self.apply, lambda key: key in self.rows)

    def apply(self, key, value):
        if value is None:
            self.rows.pop(key, None)
        else:
            self.rows[key] = value


DEFAULT = kvkeys.ipcache_key("10.2.1.5")
OLDER = kvkeys.legacy_ipcache_key("cluster2", "10.2.1.5")


def test_an_address_under_both_layouts_is_the_default_keys():
    f = Follower()
    f.legacy.apply(OLDER, b"old")
    assert f.rows == {DEFAULT: b"old"}  # seen under its default key
    f.legacy.apply(DEFAULT, b"new")
    f.legacy.apply(OLDER, b"old again")
    assert f.rows == {DEFAULT: b"new"}  # the default key wins, whatever comes later
    f.legacy.apply(OLDER, None)
    assert f.rows == {DEFAULT: b"new"}  # deleting the older key leaves the default in force
    f.legacy.apply(OLDER, b"old")
    f.legacy.apply(DEFAULT, None)
    assert f.rows == {DEFAULT: b"old"}  # the older key counts again once the default is gone
    assert f.legacy.keys() == [OLDER]
    f.legacy.apply(OLDER, None)
    assert f.rows == {}


def test_a_default_key_first_and_an_older_one_later():
    f = Follower()
    f.legacy.apply(DEFAULT, b"new")
    f.legacy.apply(OLDER, b"old")
    assert f.rows == {DEFAULT: b"new"}
    f.legacy.apply(DEFAULT, None)
    assert f.rows == {DEFAULT: b"old"}


def test_clustermesh_file_options_for_clusters_without_pod_cidrs(tmp_path):
    path = tmp_path / "cluster2"
    path.write_text("endpoints: [https://x:2379]\npod-cidrs: [10.2.0.0/16, fd00:2::/48]\n")
    assert read_address_options(path) == ((ipaddress.ip_network("10.2.0.0/16"),
                                           ipaddress.ip_network("fd00:2::/48")), False)
    path.write_text("endpoints: [https://x:2379]\ntrust-endpoints: true\n")
    assert read_address_options(path) == ((), True)
    path.write_text("endpoints: [https://x:2379]\npod-cidrs: [10.2.0.1/16]\n")
    with pytest.raises(ClusterConfigError, match="pod-cidrs.*has host bits set"):
        read_address_options(path)
    path.write_text("endpoints: [https://x:2379]\ntrust-endpoints: yes please\n")
    with pytest.raises(ClusterConfigError, match="trust-endpoints' must be true or false"):
        read_address_options(path)
