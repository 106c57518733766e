"""The optional plugins with the real datapath: ``--plugins etcd,k8s,ebpf`` and
``--plugins consul,ebpf`` start and report healthy against the stand-ins, and the seed's
policy, coming from a CiliumNetworkPolicy in the Kubernetes API, is enforced on pods whose
labels come from their Pod objects — also after those labels change.

Privileged: root, BPF, tc, ip netns. The agent runs in a node namespace; etcd runs there too,
and the in-process stand-ins get a listening socket inside it (nothing is linked to the root
namespace). The test's own blocking calls go through threads so the stand-ins keep answering.
"""

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from kube import REAL, KubeCluster
from test_endpoints import NodeAgent

from meshagent.plugins.k8s.client import CNPS, NAMESPACES, PODS
from meshagent_dev.consul import ConsulStandIn
from meshagent_dev.etcd import EtcdServer
from meshagent_dev.lab import REDIS_SERVER
from meshagent_dev.netlab import NetLab, can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root, ip netns and BPF")]

SEED_POLICY = Path(__file__).resolve().parent.parent / "contrib" / "seed" / "l4-policy.yaml"
NODE = ["--cluster-name", "cluster1", "--cluster-id", "1", "--node-name", "node1",
        "--pod-cidr", "10.1.1.0/24"]


@pytest.fixture
def lab():
    lab = NetLab()
    yield lab
    lab.cleanup()


async def start_agent(lab, node, short_tmp, *args) -> NodeAgent:
    return await asyncio.to_thread(NodeAgent, lab, node, short_tmp, *args)


async def cli(agent: NodeAgent, *args: str):
    return await asyncio.to_thread(agent.cli, *args)


async def assert_healthy(agent: NodeAgent, *sections: str) -> dict:
    result = await cli(agent, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((await cli(agent, "status", "-o", "json")).stdout)
    health = {s["name"]: s["health"] for s in report["sections"]}
    for name in sections:
        assert health.get(name) == "Ok", (name, result.stdout)
    return report


def pod(name: str, app: str) -> dict:
    return {"metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "redis"}]}}


async def ping(lab: NetLab, netns: str, address: str) -> str:
    result = await asyncio.to_thread(lab.exec, netns, "timeout", "2", "redis-cli", "-h", address,
                                     "-p", "6379", "ping", check=False)
    return result.stdout.strip() or "timeout"


@pytest.mark.skipif(bool(REAL), reason="the agent runs in a network namespace: stand-in only")
async def test_etcd_k8s_ebpf_enforce_the_seed_policy_from_kubernetes(lab, short_tmp, bpffs):
    node = lab.ns("node1")
    etcd = await asyncio.to_thread(EtcdServer("k8s", netns=node,
                                              workdir=short_tmp / "etcd").start)
    kube = await KubeCluster.start(short_tmp)
    try:
        kubeconfig = kube.standin.kubeconfig(short_tmp / "node-kubeconfig",
                                             await kube.standin.listen(netns=node))
        await kube.apply(NAMESPACES, {"metadata": {"name": "default"}})
        for name, app in (("protected-db", "protected-db"), ("employee", "employee"),
                          ("stranger", "stranger"), ("admin", "admin")):
            await kube.apply(PODS, pod(name, app))
        seed = yaml.safe_load(SEED_POLICY.read_text())
        seed["metadata"]["namespace"] = "default"
        await kube.apply(CNPS, seed)

        agent = await start_agent(
            lab, node, short_tmp, "--plugins", "etcd,k8s,ebpf", "--etcd-config",
            str(etcd.client_config(short_tmp / "etcd.yaml")), "--k8s-kubeconfig",
            str(kubeconfig), "--ebpf-bpf-root", str(bpffs), *NODE)
        report = await assert_healthy(agent, "Kubernetes", "KVStore", "Datapath", "Policy")
        assert report["ready"]

        # pods get their labels from Kubernetes, not from the command line
        netns, ips = {}, {}
        for name in ("protected-db", "employee", "stranger", "admin"):
            netns[name] = lab.ns(name)
            result = await cli(agent, "endpoint", "create", "--netns", netns[name],
                               "--namespace", "default", "--pod-name", name, "-o", "json")
            assert result.returncode == 0, result.stderr
            endpoint = json.loads(result.stdout)
            assert f"k8s:app={name}" in endpoint["labels"], endpoint
            ips[name] = endpoint["ipv4"]
        lab.spawn(netns["protected-db"], *REDIS_SERVER, log=short_tmp / "redis.log")
        for _ in range(50):
            if await ping(lab, netns["employee"], ips["protected-db"]) == "PONG":
                break
            await asyncio.sleep(0.1)

        db = ips["protected-db"]
        assert await ping(lab, netns["employee"], db) == "PONG"
        assert await ping(lab, netns["stranger"], db) == "timeout"
        assert await ping(lab, netns["admin"], db) == "timeout"

        # the stranger's Pod is relabelled in Kubernetes: new identity, now allowed
        before = {e["pod_name"]: e["identity"] for e in json.loads(
            (await cli(agent, "endpoint", "list", "-o", "json")).stdout)}
        await kube.apply(PODS, pod("stranger", "employee"))
        for _ in range(50):
            now = {e["pod_name"]: e["identity"] for e in json.loads(
                (await cli(agent, "endpoint", "list", "-o", "json")).stdout)}
            if now["stranger"] != before["stranger"]:
                break
            await asyncio.sleep(0.1)
        assert now["stranger"] == now["employee"]  # same labels, same identity
        await asyncio.sleep(0.3)
        assert await ping(lab, netns["stranger"], db) == "PONG"

        # the policy changes in Kubernetes: only admins now
        for peer in seed["spec"]["ingress"][0]["fromEndpoints"]:
            peer["matchLabels"]["app"] = "admin"
        await kube.apply(CNPS, seed)
        await asyncio.sleep(0.5)
        assert await ping(lab, netns["employee"], db) == "timeout"
        assert await ping(lab, netns["admin"], db) == "PONG"

        # the Namespace's labels change: every pod in it is relabelled
        await kube.apply(NAMESPACES, {"metadata": {"name": "default", "labels": {"team": "a"}}})
        label = "k8s:io.cilium.k8s.namespace.labels.team=a"
        for _ in range(50):
            endpoints = json.loads((await cli(agent, "endpoint", "list", "-o", "json")).stdout)
            if all(label in e["labels"] for e in endpoints):
                break
            await asyncio.sleep(0.1)
        assert all(label in e["labels"] for e in endpoints), endpoints
        assert await ping(lab, netns["admin"], db) == "PONG"
        await assert_healthy(agent, "Kubernetes", "Policy")
        await asyncio.to_thread(agent.stop)
    finally:
        await kube.close()
        await asyncio.to_thread(etcd.stop)


async def test_consul_ebpf_start_and_report_healthy(lab, short_tmp, bpffs):
    node = lab.ns("node1")
    consul = await ConsulStandIn().start()
    try:
        address = await consul.listen(netns=node)
        agent = await start_agent(lab, node, short_tmp, "--plugins", "consul,ebpf",
                                  "--consul-address", address, "--ebpf-bpf-root", str(bpffs),
                                  *NODE)
        report = await assert_healthy(agent, "KVStore", "Datapath")
        assert report["ready"]
        kvstore = next(s for s in report["sections"] if s["name"] == "KVStore")
        assert "consul" in kvstore["summary"].lower(), kvstore
        # the node and its identity-bearing keys went to Consul
        assert any(key.startswith("cilium/state/nodes/v1/cluster1/")
                   for key in consul.kv), sorted(consul.kv)
        await asyncio.to_thread(agent.stop)
    finally:
        await consul.stop()
