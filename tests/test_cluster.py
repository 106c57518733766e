"""Cluster name and id rules (Cilium's), with messages naming option, value and rule."""

import pytest

from meshagent.errors import UsageError
from meshagent.model.cluster import ClusterInfo


@pytest.mark.parametrize("name", ["cluster1", "c", "a-b-1", "x" * 32])
def test_valid_names(name):
    assert ClusterInfo(name, 101).name == name


@pytest.mark.parametrize("name, rule", [
    ("Cluster1", "lower-case"),
    ("-c1", "lower-case"),
    ("c1-", "lower-case"),
    ("c_1", "lower-case"),
    ("", "lower-case"),
    ("x" * 33, "longer than 32"),
    ("default", "unique name"),
])
def test_invalid_names_say_why(name, rule):
    with pytest.raises(UsageError) as info:
        ClusterInfo(name, 101)
    message = str(info.value)
    assert "--cluster-name" in message and repr(name) in message and rule in message


def test_default_name_is_fine_outside_a_mesh():
    assert ClusterInfo("default", 0).in_mesh is False


@pytest.mark.parametrize("cluster_id, max_clusters, ok", [
    (0, 255, True), (1, 255, True), (255, 255, True), (256, 255, False), (-1, 255, False),
    (511, 511, True), (512, 511, False),
])
def test_cluster_id_range(cluster_id, max_clusters, ok):
    if ok:
        ClusterInfo("c1", cluster_id, max_clusters)
    else:
        with pytest.raises(UsageError, match=rf"--cluster-id={cluster_id}: .*1\.\.{max_clusters}"):
            ClusterInfo("c1", cluster_id, max_clusters)


def test_max_connected_clusters_choices():
    with pytest.raises(UsageError, match=r"--max-connected-clusters=300: must be one of 255, 511"):
        ClusterInfo("c1", 1, 300)


def test_identity_range_follows_cluster_id():
    c = ClusterInfo("cluster1", 101)
    r = c.identity_range()
    # Cilium's MinimalAllocationIdentity: a cluster with an id owns its whole range
    assert (r.start, r.stop - 1) == (101 << 16, (101 << 16) | 0xFFFF)
    assert c.cluster_of_identity(r.start) == 101
    assert c.identity_range(102).start == 102 << 16
    assert ClusterInfo("default", 0).identity_range().start == 256  # no id: past the reserved
    wide = ClusterInfo("cluster1", 300, 511)
    assert (wide.identity_range().start, wide.identity_range().stop) == (300 << 15, 301 << 15)
    assert wide.cluster_of_identity((300 << 15) + 999) == 300
