"""Endpoints for real: network namespaces as node and pods, an agent inside the node's netns.

Privileged: needs root and ``ip netns``. Every namespace carries a per-run prefix and is
removed afterwards; nothing is linked to the root namespace.
"""

import json
import signal
import time

import pytest
from conftest import MESHAGENT, clean_env, run_cli

from meshagent_dev.etcd import EtcdServer
from meshagent_dev.netlab import NetLab, can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root and ip netns")]


@pytest.fixture
def lab():
    lab = NetLab()
    yield lab
    lab.cleanup()


class NodeAgent:
    command: tuple[str, ...] = (MESHAGENT,)  # what runs the agent

    def __init__(self, lab: NetLab, node_ns: str, workdir, *args: str):
        self.lab, self.ns, self.args = lab, node_ns, args
        self.socket = workdir / f"{node_ns}.sock"
        self.state = workdir / f"{node_ns}-state"
        self.log = workdir / f"{node_ns}.log"
        self.proc = None
        self.start()

    def start(self):
        self.proc = self.lab.spawn(self.ns, *self.command, "--socket-path", str(self.socket),
                                   "--state-dir", str(self.state), *self.args, log=self.log,
                                   env=clean_env())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            result = run_cli("status", "-o", "json", "--socket-path", str(self.socket))
            if result.returncode in (0, 1) and result.stdout and json.loads(result.stdout)["ready"]:
                return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"agent in {self.ns} not ready: {self.log.read_text()}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0, self.log.read_text()

    def cli(self, *args: str):
        return run_cli(*args, "--socket-path", str(self.socket))

    def create(self, netns: str, labels: str = "app=x", namespace: str = "default") -> dict:
        result = self.cli("endpoint", "create", "--netns", netns, "--namespace", namespace,
                          "--labels", labels, "-o", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def endpoints(self) -> list[dict]:
        return json.loads(self.cli("endpoint", "list", "-o", "json").stdout)

    def links(self) -> list[str]:
        out = self.lab.exec(self.ns, "ip", "-o", "link", "show").stdout
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def ping(lab: NetLab, from_ns: str, address: str) -> bool:
    return lab.exec(from_ns, "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


def single_node(lab, short_tmp, *args):
    node = lab.ns("node1")
    agent = NodeAgent(lab, node, short_tmp, "--plugins", "memory", "--cluster-name", "cluster1",
                      "--cluster-id", "101", "--node-name", "node1", *args)
    return node, agent


def test_create_ping_delete_on_one_node(lab, short_tmp):
    node, agent = single_node(lab, short_tmp, "--pod-cidr", "10.1.1.0/24")
    pod1, pod2 = lab.ns("pod1"), lab.ns("pod2")
    ep1 = agent.create(pod1, "app=employee")
    ep2 = agent.create(pod2, "app=protected-db")
    assert (ep1["ipv4"], ep2["ipv4"]) == ("10.1.1.1", "10.1.1.2")
    assert ep1["identity"] != ep2["identity"]
    assert 101 << 16 <= ep1["identity"] < (102 << 16)
    assert set(ep1["labels"]) == {"k8s:app=employee", "k8s:io.kubernetes.pod.namespace=default",
                                  "k8s:io.cilium.k8s.policy.cluster=cluster1"}
    listed = agent.endpoints()
    assert [(e["id"], e["ipv4"], e["ifname"]) for e in listed] == [
        (ep1["id"], "10.1.1.1", ep1["ifname"]), (ep2["id"], "10.1.1.2", ep2["ifname"])]
    assert "10.1.1.1/32" in lab.exec(pod1, "ip", "-4", "addr", "show", "eth0").stdout
    assert ping(lab, pod1, "10.1.1.2") and ping(lab, pod2, "10.1.1.1")
    # the ipcache entry went to the kvstore and came back through the local sync
    ips = json.loads(agent.cli("ip", "list", "-o", "json").stdout)
    assert {(e["prefix"], e["identity"]) for e in ips} == {
        ("10.1.1.1/32", ep1["identity"]), ("10.1.1.2/32", ep2["identity"])}

    result = agent.cli("endpoint", "delete", str(ep2["id"]))
    assert result.returncode == 0, result.stderr
    assert ep2["ifname"] not in agent.links()
    assert not ping(lab, pod1, "10.1.1.2")
    assert agent.create(lab.ns("pod3"))["ipv4"] == "10.1.1.2"  # the address was released
    missing = agent.cli("endpoint", "get", "99")
    assert missing.returncode == 1 and "404: no endpoint 99" in missing.stderr


def test_bad_requests_leave_nothing_behind(lab, short_tmp):
    node, agent = single_node(lab, short_tmp, "--pod-cidr", "10.1.1.0/30")  # two addresses
    links_before = agent.links()
    no_netns = agent.cli("endpoint", "create", "--netns", f"{lab.prefix}-nosuch",
                         "--namespace", "default", "--labels", "app=x")
    assert no_netns.returncode == 1 and "does not exist" in no_netns.stderr
    bad_label = agent.cli("endpoint", "create", "--netns", lab.ns("podx"), "--namespace",
                          "default", "--labels", "app=no spaces allowed")
    assert bad_label.returncode == 1 and "invalid label 'app=no spaces allowed'" in bad_label.stderr
    assert agent.links() == links_before and agent.endpoints() == []
    agent.create(lab.ns("pod1"))
    agent.create(lab.ns("pod2"))
    links_full = agent.links()
    exhausted = agent.cli("endpoint", "create", "--netns", lab.ns("pod3"), "--namespace",
                          "default", "--labels", "app=x")
    assert exhausted.returncode == 1 and "10.1.1.0/30 is exhausted" in exhausted.stderr
    assert agent.links() == links_full and len(agent.endpoints()) == 2


def test_endpoints_survive_an_agent_restart(lab, short_tmp):
    node, agent = single_node(lab, short_tmp, "--pod-cidr", "10.1.1.0/24")
    pod1, pod2 = lab.ns("pod1"), lab.ns("pod2")
    agent.create(pod1)
    agent.create(pod2, "app=other")
    before = [(e["id"], e["ipv4"], e["ifname"], e["netns"]) for e in agent.endpoints()]
    agent.stop()
    assert ping(lab, pod1, "10.1.1.2")  # the pod network does not depend on the agent process
    agent.start()
    after = agent.endpoints()
    assert [(e["id"], e["ipv4"], e["ifname"], e["netns"]) for e in after] == before
    assert ping(lab, pod1, "10.1.1.2")
    assert agent.create(lab.ns("pod3"))["ipv4"] == "10.1.1.3"  # restored addresses stay taken
    assert agent.cli("endpoint", "delete", str(after[0]["id"])).returncode == 0
    assert after[0]["ifname"] not in agent.links()


def test_pods_on_two_nodes_reach_each_other(lab, short_tmp):
    underlay = lab.underlay()
    lab.bridge_address(underlay, "10.99.0.1/24")
    etcd = EtcdServer("lab", netns=underlay, host="10.99.0.1", workdir=short_tmp / "etcd").start()
    try:
        config = etcd.client_config(short_tmp / "etcd.yaml")
        agents, pods = [], []
        for n in (1, 2):
            node = lab.ns(f"node{n}")
            lab.attach(node, underlay, f"10.99.0.1{n}/24")
            agents.append(NodeAgent(
                lab, node, short_tmp, "--plugins", "etcd", "--etcd-config", str(config),
                "--cluster-name", "cluster1", "--cluster-id", "101", "--node-name", f"node{n}",
                "--node-ip", f"10.99.0.1{n}", "--pod-cidr", f"10.1.{n}.0/24",
                "--auto-direct-node-routes", "--node-route-delete-grace", "2"))
            pods.append(lab.ns(f"pod{n}"))
        ep1 = agents[0].create(pods[0], "app=employee")
        ep2 = agents[1].create(pods[1], "app=protected-db")
        deadline = time.monotonic() + 10
        while not ping(lab, pods[0], ep2["ipv4"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ping(lab, pods[0], ep2["ipv4"]) and ping(lab, pods[1], ep1["ipv4"])
        route = lab.exec(agents[0].ns, "ip", "route", "show", "10.1.2.0/24").stdout
        assert "via 10.99.0.12" in route
        # each node knows the other's endpoints (ipcache) and identity
        ips = {e["prefix"]: e for e in json.loads(agents[0].cli("ip", "list", "-o",
                                                                "json").stdout)}
        assert ips[f"{ep2['ipv4']}/32"]["identity"] == ep2["identity"]
        assert ips[f"{ep2['ipv4']}/32"]["host_ip"] == "10.99.0.12"
        # node2 goes away cleanly: its lease is revoked; node1 keeps the route for the grace
        # period (an agent restart must not cut its pods off), then removes it
        agents[1].stop()
        time.sleep(1)
        assert "10.1.2.0/24" in lab.exec(agents[0].ns, "ip", "route").stdout
        deadline = time.monotonic() + 10
        while "10.1.2.0/24" in lab.exec(agents[0].ns, "ip", "route").stdout:
            assert time.monotonic() < deadline, "route to node2's pods not removed"
            time.sleep(0.1)
    finally:
        etcd.stop()


CNI = str(__import__("pathlib").Path(MESHAGENT).with_name("meshagent-cni"))


def cni(command: str, config: dict | str, container: str = "c0ffee", netns: str = "",
        ifname: str = "eth0", args: str = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=employee-0",
        env_extra: dict | None = None):
    """Call the plugin exactly as a runtime does: config on stdin, parameters in CNI_*."""
    import subprocess
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns,
           "CNI_IFNAME": ifname, "CNI_ARGS": args, "CNI_PATH": "/opt/cni/bin",
           "PATH": "/usr/bin:/bin", **(env_extra or {})}
    stdin = config if isinstance(config, str) else json.dumps(config)
    result = subprocess.run([CNI], input=stdin, capture_output=True, text=True, env=env,
                            timeout=30)
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else None


def test_cni_add_check_del_as_a_runtime_calls_it(lab, short_tmp):
    node, agent = single_node(lab, short_tmp, "--pod-cidr", "10.1.1.0/24")
    pod = lab.ns("pod1")
    config = {"cniVersion": "1.0.0", "name": "meshagent", "type": "meshagent-cni",
              "socketPath": str(agent.socket),
              "runtimeConfig": {"labels": {"app": "employee"}},
              "args": {"cni": {"labels": [{"key": "tier", "value": "client"}]}}}
    netns = f"/var/run/netns/{pod}"

    code, version = cni("VERSION", "")
    assert code == 0 and version["supportedVersions"][-1] == "1.0.0"

    code, result = cni("ADD", config, netns=netns)
    assert code == 0, result
    assert result["cniVersion"] == "1.0.0"
    assert result["ips"] == [{"address": "10.1.1.1/32", "gateway": "169.254.1.1",
                              "interface": 1}]
    assert result["interfaces"][1] == {"name": "eth0", "mac": result["interfaces"][1]["mac"],
                                       "sandbox": netns}
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    (endpoint,) = agent.endpoints()
    assert endpoint["container_id"] == "c0ffee" and endpoint["pod_name"] == "employee-0"
    assert {"k8s:app=employee", "k8s:tier=client"} <= set(endpoint["labels"])
    assert "10.1.1.1/32" in lab.exec(pod, "ip", "-4", "addr", "show", "eth0").stdout

    code, again = cni("ADD", config, netns=netns)  # a retried ADD answers the same
    assert code == 0 and again["ips"] == result["ips"] and len(agent.endpoints()) == 1

    code, out = cni("CHECK", {**config, "prevResult": result}, netns=netns)
    assert (code, out) == (0, None)
    code, out = cni("CHECK", {**config, "prevResult": result}, container="unknown")
    assert code == 1 and out["code"] == 3

    code, out = cni("DEL", config, netns=netns)
    assert (code, out) == (0, None) and agent.endpoints() == []
    assert endpoint["ifname"] not in agent.links()
    code, out = cni("DEL", config, netns=netns)  # DEL of something gone still succeeds
    assert (code, out) == (0, None)


def test_cni_errors_are_cni_error_json(lab, short_tmp):
    node, agent = single_node(lab, short_tmp, "--pod-cidr", "10.1.1.0/24")
    pod = lab.ns("pod1")
    good = {"cniVersion": "1.0.0", "name": "meshagent", "type": "meshagent-cni",
            "socketPath": str(agent.socket)}
    netns = f"/var/run/netns/{pod}"
    cases = [
        (dict(config="{broken"), 6, "not valid JSON"),
        (dict(config={**good, "cniVersion": "9.9.9"}), 1, "not supported"),
        (dict(config={k: v for k, v in good.items() if k != "name"}), 7, "no name"),
        (dict(config=good, netns=""), 4, "CNI_NETNS is not set"),
        (dict(config=good, netns=f"/var/run/netns/{lab.prefix}-nosuch"), 3, "does not exist"),
        (dict(config={**good, "socketPath": str(short_tmp / "none.sock")}, netns=netns), 11,
         "not reachable"),
        (dict(config={**good, "runtimeConfig": {"labels": {"bad key!": "x"}}}, netns=netns),
         100, "invalid label"),
    ]
    for kwargs, code, message in cases:
        rc, out = cni("ADD", **kwargs)
        assert rc == 1 and out["code"] == code, (kwargs, out)
        assert message in out["msg"] + out["details"], out
        assert out["cniVersion"] == "1.0.0"
    assert agent.endpoints() == []
    assert [link for link in agent.links() if link.startswith("lxc")] == []
