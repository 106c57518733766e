"""The kernel enforces exactly what the resolver decides: random policies, identities, ipcache
rows and packets; every packet's verdict in the kernel must equal the reference model's
(meshagent.testing.datapath_model: the resolver's decision plus the packet rules).

The datapath contract suite (meshagent.testing.datapath_contract) drives the real ebpf
datapath plugin from the real resolver, through the datapath contract only: a reconcile for a
scenario's first phase, incremental policy and ipcache changes after that. The judge here runs
the compiled tc programs on synthetic frames with BPF_PROG_TEST_RUN (no namespaces) and checks
what a redirect into a pod delivers. Failing scenarios are written out as JSON; copy them into
tests/datapath_cases/ to keep them as regression cases. Run longer with
MESHAGENT_DIFF_EXAMPLES=2000 (see docs/datapath.md).
"""

import asyncio
import contextlib
import ctypes as ct
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from meshagent.datapath.feed import BatchFeed
from meshagent.policy.resolver import EGRESS, INGRESS
from meshagent.testing import datapath_model as model
from meshagent.testing.datapath_contract import DatapathContract, ScenarioDriver
from meshagent.testing.packets import TCP, Packet
from meshagent.testing.scenarios import (
    ALL_EGRESS,
    CLIENT,
    CLIENT6,
    ECHO,
    ECHO2,
    ECHO6,
    REMOTE,
    REMOTE6,
    Scenario,
    named_scenario,
    tcp,
)
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root and BPF")]

CASES_DIR = Path(__file__).parent / "datapath_cases"
REASON_NAMES = {0: model.FORWARDED, 1: model.POLICY_DENY, 2: model.POLICY_DEFAULT,
                3: model.SPOOFED, 4: model.FRAG_TINY, 5: model.FRAG_UNKNOWN, 6: model.MALFORMED_PACKET,
                7: model.UNSUPPORTED_L3, 8: model.REDIRECTED, 9: "proxy-lookup-failed",
                10: "proxy-assign-failed", 11: model.PROXY_UNSUPPORTED}
REASON_PROXY_ASSIGN = 10
PROGRAM = {INGRESS: "to_container", EGRESS: "from_container"}


class KernelJudge:
    """The ebpf plugin (attaching nothing) with its programs compiled and pinned on a private
    bpffs: a :class:`~meshagent.testing.datapath_contract.DatapathJudge`."""

    def __init__(self, bpffs: Path, **settings):
        from meshagent.datapath.events import FlowEvents
        from meshagent.plugins.ebpf.datapath import EbpfDatapath, EbpfSettings
        from meshagent.plugin import NoProxyRoutes
        from meshagent.plugins.ebpf.testrun import NoAttacher, ProgramRunner
        self.loop = asyncio.new_event_loop()
        settings = EbpfSettings(bpffs, **{"ipcache_max": 65536, "policy_max": 65536,
                                          "ct_tcp_max": 65536, "ct_any_max": 65536, **settings})
        self.sink = sink = FlowEvents()
        self.reported: list = []
        sink.subscribe(self.reported.append)
        self.datapath = EbpfDatapath(settings, sink, attacher=NoAttacher(),
                                     proxy_routes=NoProxyRoutes())
        self.feed = BatchFeed(self.datapath)
        self.unassigned = 0  # proxy packets whose socket assign test runs refuse (delivery)
        self.loop.run_until_complete(self.datapath.start())
        self.runner = ProgramRunner(self.datapath.pin_dir)

    def close(self) -> None:
        self.runner.close()
        self.loop.run_until_complete(self.datapath.stop())
        self.loop.close()

    def call(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def forget_connections(self) -> None:
        for name in ("ct_tcp", "ct_any", "ct6_tcp", "ct6_any", "ipfrag", "ipfrag6"):
            table = self.datapath.maps[name]
            for key in list(table.keys()):
                table.delete(key)

    def run(self, endpoint_id: int, direction: str, frame: bytes):
        """The program of that hook, run on the frame as if at that endpoint's veth."""
        endpoint = self.datapath.endpoints[endpoint_id]
        table = self.datapath.maps["endpoints"]
        table.put(ct.c_uint32(1), table.get(ct.c_uint32(endpoint.ifindex)))  # the test device
        return self.runner.run(PROGRAM[direction], frame)

    def delivery(self, endpoint_id: int, direction: str, frame: bytes) -> tuple[str, bool]:
        """The program's outcome for the frame at this endpoint's hook, and whether it
        redirected the frame into a local pod.

        BPF_PROG_TEST_RUN does not run a program at tc ingress, the only place where the
        kernel lets it assign a socket (bpf_sk_assign says EOPNOTSUPP): a packet for the DNS
        proxy whose program found the proxy's socket and marked it for the proxy
        (MARK_MAGIC_TO_PROXY with the port) counts as redirected here, and the drop event
        the refused assign adds after its policy verdict is left out. tests/test_dns_redirect_lab.py
        sees the assign work on a real veth."""
        from meshagent.plugins.ebpf.maps import MARK_MAGIC_TO_PROXY
        from meshagent.plugins.ebpf.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT
        result = self.run(endpoint_id, direction, frame)
        if result.reason == REASON_PROXY_ASSIGN and result.action == TC_ACT_SHOT:
            self.unassigned += 1
            if result.mark == MARK_MAGIC_TO_PROXY | (self.datapath.proxy_port << 16):
                return model.REDIRECTED, False
            return f"{model.REDIRECTED} with mark {result.mark:#x}", False
        name = REASON_NAMES.get(result.reason, f"reason {result.reason}")
        if name != model.FORWARDED and result.action != TC_ACT_SHOT:
            name = f"{name} but action {result.action}"
        if name == model.FORWARDED and result.action not in (TC_ACT_OK, TC_ACT_REDIRECT):
            name = f"{name} but action {result.action}"
        if result.action == TC_ACT_REDIRECT:
            name += redirect_problems(self.datapath, frame, result.frame)
        return name, result.action == TC_ACT_REDIRECT

    def outcome(self, endpoint_id: int, direction: str, frame: bytes) -> str:
        return self.delivery(endpoint_id, direction, frame)[0]

    def events(self) -> list:
        """What the programs reported since the last call: read out of the perf buffers
        (without the drops of a refused socket assign: see :meth:`delivery`)."""
        self.datapath.read_events()
        out, self.reported[:] = list(self.reported), []
        if self.unassigned:
            out = [e for e in out if e.reason != "proxy_assign"]
            self.unassigned = 0
        return out


def redirect_problems(datapath, sent: bytes, delivered: bytes) -> str:
    """What is wrong with a frame redirected into a local pod ("" if nothing): it must be
    addressed to the pod's eth0 from its host veth, with the TTL one lower and the IPv4 header
    checksum right; the rest unchanged."""
    from meshagent.testing.packets import checksum
    problems = []
    target = next((e for e in datapath.endpoints.values()
                   if e.ipv4.packed == delivered[30:34]), None)
    if target is None:
        return " (redirected, to no endpoint)"
    if delivered[0:6] != bytes.fromhex(target.pod_mac.replace(":", "")) or \
            delivered[6:12] != bytes.fromhex(target.host_mac.replace(":", "")):
        problems.append("MAC addresses")
    if delivered[22] != sent[22] - 1:
        problems.append(f"TTL {sent[22]} -> {delivered[22]}")
    ihl = (delivered[14] & 0xF) * 4
    if checksum(delivered[14:14 + ihl]) != 0:
        problems.append("IPv4 header checksum")
    rewritten = delivered[26:30] != sent[26:30] or delivered[30:34] != sent[30:34]
    if not rewritten and (delivered[12:22] != sent[12:22] or delivered[23:24] != sent[23:24]
                          or delivered[26:] != sent[26:]):
        problems.append("other bytes changed")  # (a service's NAT rewrites, checked apart)
    return f" (redirected with wrong {', '.join(problems)})" if problems else ""


@contextlib.contextmanager
def kernel_judge(**settings):
    """A KernelJudge on a bpffs of its own (``settings``: EbpfSettings fields)."""
    tmp = Path(tempfile.mkdtemp(prefix="ma-diff-", dir="/tmp"))
    bpffs = tmp / "bpffs"
    bpffs.mkdir()
    os.system(f"mount -t bpf bpf {bpffs}")
    try:
        kernel = KernelJudge(bpffs, **settings)
        try:
            yield kernel
        finally:
            kernel.close()
    finally:
        os.system(f"umount -l {bpffs}")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def judge():
    with kernel_judge() as kernel:
        yield kernel


@pytest.fixture
def driver(judge) -> ScenarioDriver:
    return ScenarioDriver(judge)


class TestEbpfDatapathContract(DatapathContract):
    """The datapath contract suite, on the eBPF datapath: random worlds and the policy table."""

    kept_cases = CASES_DIR


# -- the reproductions, by name ---------------------------------------------------------

def outcomes(driver: ScenarioDriver, scenario: Scenario) -> list[str]:
    """The kernel's outcome of every probe, after checking it equals the model's."""
    assert not driver.run(scenario)
    driver.start(scenario)
    return [driver.judge.outcome(p.endpoint, p.direction, p.packet.frame())
            for p in scenario.phases[0].probes]


def test_an_egress_deny_range_beats_allow_all(driver):
    deny = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [
        {"port": "4096", "endPort": 8191, "protocol": "TCP"}]}]}]}
    got = outcomes(driver, named_scenario([deny], [tcp(ECHO, p) for p in
                                                    (8080, 4096, 8191, 4095, 8192)]))
    assert got == [model.POLICY_DENY] * 3 + [model.FORWARDED] * 2


def test_wide_ranges_allow_and_deny_without_expansion(judge, driver):
    allow = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}], "toPorts": [
        {"ports": [{"port": "30000", "endPort": 32767, "protocol": "TCP"}]}]}]}
    got = outcomes(driver, named_scenario([allow], [tcp(ECHO, p) for p in
                                                     (31000, 30000, 32767, 29999, 32768)]))
    assert got == [model.FORWARDED] * 3 + [model.POLICY_DEFAULT] * 2
    deny_1025 = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [
        {"port": "4096", "endPort": 5120, "protocol": "TCP"}]}]}]}
    got = outcomes(driver, named_scenario([deny_1025], [tcp(ECHO, p) for p in (5120, 5121)]))
    assert got == [model.POLICY_DENY, model.FORWARDED]
    deny_all_tcp = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [
        {"port": "1", "endPort": 65535, "protocol": "TCP"}]}]}]}
    got = outcomes(driver, named_scenario([deny_all_tcp], [
        tcp(ECHO, 1), tcp(ECHO, 65535), (EGRESS, Packet(CLIENT, ECHO, 17, 40000, 53))]))
    assert got == [model.POLICY_DENY, model.POLICY_DENY, model.FORWARDED]
    # 1-65535 is 16 prefixes, not 65,535 entries; the other 6 allow everything elsewhere
    assert judge.datapath.policy_entry_count() == 16 + 6


def test_an_ingress_deny_range_on_the_server(driver):
    spec = {"endpointSelector": {"matchLabels": {"app": "echo2"}},
            "ingress": [{"fromEntities": ["all"]}],
            "ingressDeny": [{"toPorts": [{"ports": [{"port": "4096", "endPort": 8191,
                                                     "protocol": "TCP"}]}]}]}
    got = outcomes(driver, named_scenario([spec], [tcp(ECHO2, 8080, src=ECHO),
                                                    tcp(ECHO2, 8192, src=ECHO)]))
    assert got == [model.POLICY_DENY, model.FORWARDED]


def test_fragments_tiny_overlapping_and_whole(judge, driver):
    import attrs
    deny = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [
        {"port": "4096", "endPort": 8191, "protocol": "TCP"}]}]}]}
    syn = Packet(CLIENT, ECHO, TCP, 40000, 8080, ip_id=7)
    big = Packet(CLIENT, ECHO, 17, 40001, 5353, ip_id=8)
    denied = Packet(CLIENT, ECHO, TCP, 40002, 6000, ip_id=9)
    got = outcomes(driver, named_scenario([deny], [
        (EGRESS, attrs.evolve(syn, more_fragments=True, transport_bytes=16)),  # RFC 1858
        (EGRESS, attrs.evolve(syn, frag_offset=16, payload=8)),  # overlaps the TCP header
        (EGRESS, attrs.evolve(big, more_fragments=True, payload=1472)),  # a 4,000-byte datagram
        (EGRESS, attrs.evolve(big, more_fragments=True, frag_offset=1480, payload=1480)),
        (EGRESS, attrs.evolve(big, frag_offset=2960, payload=1048)),
        (EGRESS, attrs.evolve(denied, more_fragments=True, payload=1460)),
        (EGRESS, attrs.evolve(denied, frag_offset=1480, payload=100)),  # follows its first
        (EGRESS, attrs.evolve(big, ip_id=99, frag_offset=1480, payload=100)),  # no first
    ]))
    assert got == [model.FRAG_TINY, model.FRAG_TINY, model.FORWARDED, model.FORWARDED,
                   model.FORWARDED, model.POLICY_DENY, model.POLICY_DENY, model.FRAG_UNKNOWN]
    for name in ("ct_tcp", "ct_any"):  # conntrack never keeps an entry without real ports
        assert all(key.sport and key.dport for key in judge.datapath.maps[name].keys())


def test_a_pod_cannot_send_with_another_address(driver):
    from meshagent.testing.packets import ETH_ARP
    got = outcomes(driver, named_scenario([], [
        (EGRESS, Packet(ECHO, ECHO2, 17, 40000, 53), 1),  # the client sends as echo
        (EGRESS, Packet(REMOTE, ECHO2, TCP, 40000, 6379), 1),  # ... as cluster2's employee
        (EGRESS, Packet(CLIENT, ECHO2, TCP, 40000, 6379), 1),  # as itself
        (INGRESS, Packet(REMOTE, CLIENT, TCP, 6379, 40000), 1),  # anyone may reach it
        (EGRESS, Packet(ECHO, ECHO2, ethertype=ETH_ARP), 1),  # ARP passes
    ]))
    assert got == [model.SPOOFED, model.SPOOFED, model.FORWARDED, model.FORWARDED,
                   model.FORWARDED]


def test_a_new_endpoint_with_a_reused_id_inherits_no_connection(judge, driver):
    """Endpoint ids are reused: conntrack entries of the pod that had the id before (here its
    address too) must not let traffic past the new pod's policy."""
    closed = {"endpointSelector": {"matchLabels": {"app": "client"}}, "ingress": [{}]}
    opened = Packet(CLIENT, ECHO, TCP, 40000, 8080)
    assert outcomes(driver, named_scenario([closed], [(EGRESS, opened)])) == [model.FORWARDED]
    reply = opened.reply().frame()
    assert judge.outcome(1, INGRESS, reply) == model.FORWARDED  # a reply of its connection
    old = judge.datapath.endpoints[1]
    # a new pod: same id, same address (the feed hands the removal over first)
    driver.replay([lambda feed: feed.endpoint_removed(old), lambda feed: feed.endpoint_added(old)])
    assert judge.outcome(1, INGRESS, reply) == model.POLICY_DEFAULT


def test_service_connections_are_judged_against_the_backend_and_keep_it(judge, driver):
    """Service NAT in the conntrack entry, with local delivery and policy (the random worlds
    have no services: the backend is picked at random, so one backend here)."""
    import ipaddress

    import attrs

    from meshagent.model.service import Backend, Frontend, MergedService, Service
    from meshagent.testing.packets import checksum
    vip = "10.96.0.10"

    def service(backend: str, port: int) -> MergedService:
        svc = Service("default", "echo", "cluster1", (Frontend(ipaddress.IPv4Address(vip), 80),))
        return MergedService(svc, (Backend(ipaddress.IPv4Address(backend), port, "cluster1"),),
                             0)
    echo_closed = {"endpointSelector": {"matchLabels": {"app": "echo"}}, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"app": "client"}}],
         "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}
    client_egress = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}]}]}
    scenario = named_scenario([echo_closed, client_egress], [])
    driver.start(scenario)
    driver.replay([lambda feed: feed.services_changed([service(ECHO, 8080)])])
    first = Packet(CLIENT, vip, TCP, 40000, 80)
    name, redirected = judge.delivery(1, EGRESS, first.frame())
    assert (name, redirected) == (model.FORWARDED, True)  # to echo:8080, straight in
    result = judge.run(1, EGRESS, attrs.evolve(first, tcp_flags=0x10).frame())
    assert result.frame[30:34] == ipaddress.IPv4Address(ECHO).packed  # the same backend
    assert result.frame[36:38] == (8080).to_bytes(2, "big")
    # echo answers: the reply is rewritten back to the frontend on its way into the client
    reply = judge.run(2, EGRESS, Packet(ECHO, CLIENT, TCP, 8080, 40000, tcp_flags=0x12).frame())
    assert reply.action == 7 and reply.frame[26:30] == ipaddress.IPv4Address(vip).packed
    assert reply.frame[34:36] == (80).to_bytes(2, "big")
    assert checksum(reply.frame[14:34]) == 0 and reply.frame[22] == 63  # routed, and right
    # a backend port echo's ingress does not allow: judged against the backend, dropped there
    driver.replay([lambda feed: feed.services_changed([service(ECHO, 9090)])])
    denied = Packet(CLIENT, vip, TCP, 40001, 80)
    assert judge.delivery(1, EGRESS, denied.frame()) == (model.POLICY_DEFAULT, False)


# -- IPv6 ----------------------------------------------------------------------------------------

def test_the_connectivity_test_allow_all_egress_opens_each_familys_world(driver):
    """Cilium's connectivity-test policy: ``toCIDR: [0.0.0.0/0, ::/0]``; each prefix is its
    family's world, and neither selects cluster endpoints."""
    both = {"egress": [{"toCIDR": ["0.0.0.0/0", "::/0"]}]}
    world4, world6 = "198.18.0.1", "2a00:1::1"
    got = outcomes(driver, named_scenario([both], [
        tcp(world4, 443), tcp(world6, 443, src=CLIENT6), tcp(ECHO, 80), tcp(ECHO6, 80, CLIENT6)]))
    assert got == [model.FORWARDED, model.FORWARDED, model.POLICY_DEFAULT, model.POLICY_DEFAULT]
    only6 = {"egress": [{"toCIDR": ["::/0"]}]}
    got = outcomes(driver, named_scenario([only6], [tcp(world4, 443),
                                                    tcp(world6, 443, src=CLIENT6)]))
    assert got == [model.POLICY_DEFAULT, model.FORWARDED]


def test_ipv6_ports_are_found_behind_extension_headers(driver):
    import attrs

    from meshagent.testing.packets import AUTH, DEST_OPTIONS, HOP_BY_HOP, ROUTING
    deny = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [
        {"port": "4096", "endPort": 8191, "protocol": "TCP"}]}]}]}
    _, syn = tcp(ECHO6, 8080, src=CLIENT6)
    _, other = tcp(ECHO6, 9000, src=CLIENT6)
    got = outcomes(driver, named_scenario([deny], [
        (EGRESS, attrs.evolve(syn, ext_headers=(HOP_BY_HOP, DEST_OPTIONS, ROUTING))),
        (EGRESS, attrs.evolve(other, ext_headers=(HOP_BY_HOP, AUTH))),
        (EGRESS, attrs.evolve(other, ext_headers=(DEST_OPTIONS,) * 5)),  # more than 4
        (EGRESS, attrs.evolve(other, ext_headers=(HOP_BY_HOP, ROUTING), truncate=30)),
    ]))
    assert got == [model.POLICY_DENY, model.FORWARDED, model.MALFORMED_PACKET,
                   model.MALFORMED_PACKET]


def test_ipv6_fragments_take_their_first_fragments_ports(driver):
    import attrs
    deny = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [{"port": "53",
                                                                   "protocol": "UDP"}]}]}]}
    dns = Packet(CLIENT6, ECHO6, 17, 40000, 53, ip_id=0x12345678)
    other = Packet(CLIENT6, ECHO6, 17, 40001, 5353, ip_id=0x12345679)
    got = outcomes(driver, named_scenario([deny], [
        (EGRESS, attrs.evolve(dns, more_fragments=True, payload=1400)),
        (EGRESS, attrs.evolve(dns, frag_offset=1408, payload=100)),
        (EGRESS, attrs.evolve(other, more_fragments=True, payload=1400)),
        (EGRESS, attrs.evolve(other, frag_offset=1408, payload=100)),
        (EGRESS, attrs.evolve(other, ip_id=7, frag_offset=1408, payload=100)),  # no first
        (EGRESS, attrs.evolve(other, more_fragments=True, transport_bytes=4)),  # tiny
    ]))
    assert got == [model.POLICY_DENY, model.POLICY_DENY, model.FORWARDED, model.FORWARDED,
                   model.FRAG_UNKNOWN, model.FRAG_TINY]


def test_neighbour_discovery_passes_a_closed_pod_and_nothing_else_does(driver):
    """Under default deny both ways, the link's ND and MLD pass (as ARP does); an echo, an ND
    message that was routed (hop limit below 255), or one leaving for a routed address is
    judged — and dropped. The pod's own link-local or unspecified source is fine for ND only."""
    import attrs

    from meshagent.testing.packets import HOP_BY_HOP, ICMPV6
    closed = {"ingress": [{}], "egress": [{}]}  # select nothing: both directions closed
    ns = Packet(CLIENT6, "ff02::1:ff00:1", ICMPV6, icmp_type=135, hop_limit=255)
    got = outcomes(driver, named_scenario([closed], [
        (EGRESS, ns),
        (EGRESS, attrs.evolve(ns, src="::")),  # duplicate address detection
        (EGRESS, attrs.evolve(ns, src="fe80::2", dst="fe80::1", icmp_type=136)),
        (INGRESS, attrs.evolve(ns, src="fe80::1", dst=CLIENT6)),
        (EGRESS, attrs.evolve(ns, icmp_type=143, dst="ff02::16", hop_limit=1,
                              ext_headers=(HOP_BY_HOP,))),  # an MLD report
        (EGRESS, attrs.evolve(ns, dst=ECHO6)),  # ND to a routed address
        (INGRESS, attrs.evolve(ns, src=REMOTE6, dst=CLIENT6, hop_limit=254)),  # routed
        (EGRESS, attrs.evolve(ns, icmp_type=128, dst=ECHO6, hop_limit=64)),  # a ping
        (EGRESS, attrs.evolve(ns, icmp_type=128, src="fe80::2", dst="fe80::1")),
    ]))
    assert got == [model.FORWARDED] * 5 + [model.POLICY_DEFAULT] * 3 + [model.SPOOFED]


# -- the one door: batches of net changes, in the contract's order -------------------------------

class WriteLog:
    """Stands in for some of the datapath's pinned maps: every call goes on to the map; each
    write is logged as (map, "put"/"delete", what it names) and followed by ``after()``."""

    def __init__(self, datapath, names: tuple[str, ...], after=lambda: None):
        self.datapath, self.names, self.after = datapath, names, after
        self.writes: list[tuple[str, str, object]] = []

    def __enter__(self) -> "WriteLog":
        self.real = {name: self.datapath.maps[name] for name in self.names}
        for name, table in self.real.items():
            self.datapath.maps[name] = _Logged(self, name, table)
        return self

    def __exit__(self, *exc) -> None:
        self.datapath.maps.update(self.real)


class _Logged:
    def __init__(self, log: WriteLog, name: str, table):
        self.log, self.name, self.table = log, name, table

    def __getattr__(self, attr):
        return getattr(self.table, attr)

    def put(self, key, value) -> None:
        self.table.put(key, value)
        self._logged("put", key)

    def delete(self, key) -> bool:
        deleted = self.table.delete(key)
        self._logged("delete", key)
        return deleted

    def _logged(self, op: str, key) -> None:
        what = {"endpoints": lambda: key.value, "policy": lambda: key.endpoint_id,
                "ipcache": lambda: bytes(key.ip), "ipcache6": lambda: bytes(key.ip)}
        self.log.writes.append((self.name, op, what.get(self.name, lambda: None)()))
        self.log.after()


def ipcache_rows(judge) -> dict[str, int]:
    import ipaddress
    return {f"{ipaddress.IPv4Address(bytes(key.ip))}/{key.prefixlen}": value.identity
            for key, value in judge.datapath.maps["ipcache"].items()}


def test_an_address_deleted_and_reused_in_one_batch_keeps_its_entry(judge, driver):
    """Issue 30's lost entry: a pod deleted and its address reused before the feed ran make
    the raw stream [DELETE 10.2.0.5/32, UPSERT 10.2.0.5/32]. Handed over as it came, the eBPF
    datapath wrote every upsert, then every delete: no entry at all for the address. The feed
    folds it into one upsert of the new entry."""
    import ipaddress

    from meshagent.events import ChangeKind
    from meshagent.model.ipcache import IPCacheEntry
    driver.start(named_scenario([], []))
    prefix = ipaddress.ip_network("10.2.0.5/32")
    old = IPCacheEntry(prefix, 70001, "cluster1", pod_name="deleted")
    new = IPCacheEntry(prefix, 70002, "cluster1", pod_name="reused")
    driver.replay([lambda feed: feed.ipcache_changed(ChangeKind.UPSERT, old)])
    assert ipcache_rows(judge)["10.2.0.5/32"] == 70001
    driver.replay([lambda feed: feed.ipcache_changed(ChangeKind.DELETE, old),
                   lambda feed: feed.ipcache_changed(ChangeKind.UPSERT, new)])
    assert ipcache_rows(judge).get("10.2.0.5/32") == 70002


def test_a_batch_is_written_in_the_contracts_order(judge, driver):
    """Endpoints added, then their entries; ipcache upserts before deletes; the services
    after policy and ipcache; removed endpoints last."""
    import ipaddress

    from meshagent.events import ChangeKind
    from meshagent.model.endpoint import Endpoint
    from meshagent.model.ipcache import IPCacheEntry
    from meshagent.model.service import Backend, Frontend, MergedService, Service
    from meshagent.policy.contract import MapChange, MapKey, Verdict
    driver.start(named_scenario([ALL_EGRESS], []))
    added = Endpoint(4, "default", frozenset(), ipaddress.IPv4Address("10.1.1.4"), 70004,
                     ifindex=104)
    gone = judge.datapath.endpoints[3]
    reused = IPCacheEntry(ipaddress.ip_network("10.2.0.5/32"), 70005, "cluster1")
    stale = IPCacheEntry(ipaddress.ip_network(f"{REMOTE}/32"), (102 << 16) + 256, "cluster2")
    service = MergedService(Service("default", "echo", "cluster1", (
        Frontend(ipaddress.IPv4Address("10.96.0.10"), 80),)),
        (Backend(ipaddress.IPv4Address(ECHO), 8080, "cluster1"),), 0)
    allow = MapChange(ChangeKind.UPSERT, MapKey(INGRESS, 0, 6, 80, 80), Verdict.ALLOW)
    names = ("endpoints", "policy", "ipcache", "lb_services", "lb_backends")
    with WriteLog(judge.datapath, names) as log:
        driver.replay([lambda feed: feed.endpoint_removed(gone),
                       lambda feed: feed.ipcache_changed(ChangeKind.DELETE, stale),
                       lambda feed: feed.services_changed([service]),
                       lambda feed: feed.endpoint_added(added),
                       lambda feed: feed.policy_changed({4: [allow]}),
                       lambda feed: feed.ipcache_changed(ChangeKind.UPSERT, reused)])
    writes = log.writes

    def at(predicate) -> list[int]:
        return [i for i, write in enumerate(writes) if predicate(*write)]
    assert at(lambda m, op, what: m == "endpoints" and op == "put" and what == 104)[0] < \
        at(lambda m, op, what: m == "policy" and what == 4)[0]
    assert max(at(lambda m, op, what: m == "ipcache" and op == "put")) < \
        min(at(lambda m, op, what: m == "ipcache" and op == "delete"))
    services = at(lambda m, op, what: m.startswith("lb_"))
    assert max(at(lambda m, op, what: m == "ipcache" or (m == "policy" and what == 4))) < \
        min(services)
    removal = at(lambda m, op, what: op == "delete" and (m, what) in (("endpoints", 103),
                                                                       ("policy", 3)))
    assert removal and max(services) < min(removal)
    assert set(judge.datapath.endpoints) == {1, 2, 4}
    driver.replay([lambda feed: feed.services_changed([])])


def test_no_packet_both_states_deny_passes_while_a_batch_is_written(judge, driver):
    """An address moves to another identity in the batch that changes which of the two its
    endpoint may reach: before, 10.2.0.5 is A and only B is allowed; after, it is B and only
    A is. Both states deny the client's packet to it; after every single map write of the
    batch the kernel must deny it too (the ipcache first, or the policy first, would let it
    pass for a moment)."""
    import ipaddress

    from meshagent.events import ChangeKind
    from meshagent.model.ipcache import IPCacheEntry
    from meshagent.policy.contract import MapChange, MapKey, Verdict
    driver.load(named_scenario([], []))
    a, b = 70010, 70011
    prefix = ipaddress.ip_network("10.2.0.5/32")
    port80 = {identity: MapKey(EGRESS, identity, 6, 80, 80) for identity in (a, b)}
    judge.call(judge.feed.reconcile({1: {port80[b]: Verdict.ALLOW}},
                                    [IPCacheEntry(prefix, a, "cluster1")], ()))
    driver.replay([])
    frame = Packet(CLIENT, "10.2.0.5", TCP, 40000, 80).frame()

    def probe() -> str:
        outcome = judge.outcome(1, EGRESS, frame)
        judge.forget_connections()
        return outcome
    assert probe() == model.POLICY_DEFAULT
    seen: list[str] = []
    with WriteLog(judge.datapath, ("policy", "ipcache"), after=lambda: seen.append(probe())):
        driver.replay([
            lambda feed: feed.ipcache_changed(ChangeKind.UPSERT, IPCacheEntry(prefix, b,
                                                                               "cluster1")),
            lambda feed: feed.policy_changed({1: [
                MapChange(ChangeKind.DELETE, port80[b], None),
                MapChange(ChangeKind.UPSERT, port80[a], Verdict.ALLOW)]})])
    assert len(seen) >= 3, seen  # the allow of B out, the row, the allow of A in
    assert model.FORWARDED not in seen, seen
    assert probe() == model.POLICY_DEFAULT


def test_every_address_resolves_to_its_old_or_new_identity_while_the_ipcache_changes(
        judge, driver):
    """A /32 goes and the /24 around it comes, with another identity: written upserts
    first, the address never falls through to world on the way."""
    import ipaddress

    from meshagent.events import ChangeKind
    from meshagent.model.ipcache import IPCacheEntry
    from meshagent.plugins.ebpf.maps import IPCacheKey, IPv4Bytes
    driver.start(named_scenario([], []))
    host = IPCacheEntry(ipaddress.ip_network(f"{REMOTE}/32"), (102 << 16) + 256, "cluster2")
    wide = IPCacheEntry(ipaddress.ip_network("10.2.1.0/24"), 70020, "cluster2")
    probe = IPCacheKey(32, IPv4Bytes.from_buffer_copy(ipaddress.IPv4Address(REMOTE).packed))
    seen: list = []

    def lookup() -> None:
        value = judge.datapath.maps["ipcache"].get(probe)
        seen.append(value.identity if value is not None else None)
    with WriteLog(judge.datapath, ("ipcache",), after=lookup) as log:
        driver.replay([lambda feed: feed.ipcache_changed(ChangeKind.DELETE, host),
                       lambda feed: feed.ipcache_changed(ChangeKind.UPSERT, wide)])
    assert [op for _, op, _ in log.writes] == ["put", "delete"]
    assert seen == [host.identity, wide.identity]
