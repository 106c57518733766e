"""contrib/kubernetes/meshagent.yaml: parses, and its mounts match the options it sets."""

from pathlib import Path

import yaml

from meshagent.runtime.config import add_core_options
from meshagent.runtime.options import Parser

MANIFEST = Path(__file__).resolve().parent.parent / "contrib" / "kubernetes" / "meshagent.yaml"


def test_manifest_documents_agree():
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Secret",
            "DaemonSet"} <= set(docs)
    container = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert "--config-dir=" + mounts["config-map"] in container["command"]
    config = docs["ConfigMap"]["data"]
    assert config["clustermesh-config"] == mounts["clustermesh"]
    parser = Parser()
    add_core_options(parser)
    core_and_plugins = set(parser.options) | {"etcd-config"}
    assert set(config) <= core_and_plugins  # every key names a real option
    secret = docs["Secret"]["stringData"]
    assert {"cluster2", "cluster2-etcd-client-ca.crt", "cluster2-etcd-client.crt",
            "cluster2-etcd-client.key"} <= set(secret)
    assert yaml.safe_load(secret["cluster2"])["ca-file"].startswith(mounts["clustermesh"])


def test_the_cluster_role_grants_what_the_k8s_plugin_reads():
    from meshagent.plugins.k8s.client import (
        CCNPS,
        CNPS,
        ENDPOINT_SLICES,
        NAMESPACES,
        PODS,
        SERVICES,
    )
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    assert "k8s" in docs["ConfigMap"]["data"]["plugins"].split(",")
    granted = {(group, resource) for rule in docs["ClusterRole"]["rules"]
               if {"get", "list", "watch"} <= set(rule["verbs"])
               for group in rule["apiGroups"] for resource in rule["resources"]}
    for read in (NAMESPACES, PODS, SERVICES, ENDPOINT_SLICES, CNPS, CCNPS):
        group = read.api_version.rpartition("/")[0]
        assert (group, read.plural) in granted, read
