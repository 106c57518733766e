"""The kernel enforces exactly what the resolver decides: random policies, identities, ipcache
rows and packets; every packet's verdict in the kernel must equal the reference model's
(meshagent.testing.datapath_model: the resolver's decision plus the packet rules).

The compiled tc programs run on synthetic frames with BPF_PROG_TEST_RUN (no namespaces); their
maps are filled by the real ebpf datapath plugin from the real resolver — a reconcile for a
scenario's first phase, incremental policy and ipcache changes after that. Failing scenarios
are written out as JSON; copy them into tests/datapath_cases/ to keep them as regression
cases. Run longer with MESHAGENT_DIFF_EXAMPLES=2000 (see docs/datapath.md).
"""

import asyncio
import ctypes as ct
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from meshagent.policy.resolver import EGRESS, INGRESS
from meshagent.testing import datapath_model as model
from meshagent.testing.packets import TCP, Packet
from meshagent.testing.scenarios import ResolvedWorld, Scenario, minimize, scenarios
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(not can_run(), reason="needs root and BPF")]

CASES_DIR = Path(__file__).parent / "datapath_cases"
EXAMPLES = int(os.environ.get("MESHAGENT_DIFF_EXAMPLES", "120"))
PROBES_PER_PHASE = 80
MIN_PROBES = 10_000
REASON_NAMES = {0: model.FORWARDED, 1: model.POLICY_DENY, 2: model.POLICY_DEFAULT,
                3: model.SPOOFED, 4: model.FRAG_TINY, 5: model.FRAG_UNKNOWN, 6: model.MALFORMED_PACKET}
PROGRAM = {INGRESS: "to_container", EGRESS: "from_container"}
probes_run = {"random": 0}
seen = {}  # outcome (and "redirected") -> how many random probes had it


class KernelHarness:
    """The ebpf plugin (attaching nothing) with its programs compiled and pinned on a private
    bpffs; runs scenarios through them."""

    def __init__(self, bpffs: Path):
        from meshagent.plugins.ebpf.datapath import EbpfDatapath, EbpfSettings
        from meshagent.plugins.ebpf.testrun import NoAttacher, ProgramRunner
        self.loop = asyncio.new_event_loop()
        settings = EbpfSettings(bpffs, ipcache_max=65536, policy_max=65536, ct_tcp_max=65536,
                                ct_any_max=65536)
        self.datapath = EbpfDatapath(settings, attacher=NoAttacher())
        self.loop.run_until_complete(self.datapath.start())
        self.runner = ProgramRunner(self.datapath.pin_dir)

    def close(self) -> None:
        self.runner.close()
        self.loop.run_until_complete(self.datapath.stop())
        self.loop.close()

    def _await(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def load(self, scenario: Scenario) -> None:
        """Forget the previous scenario: its endpoints, and every tracked connection."""
        from meshagent.model.endpoint import Endpoint
        for endpoint in list(self.datapath.endpoints.values()):
            self._await(self.datapath.endpoint_removed(endpoint))
        for name in ("ct_tcp", "ct_any", "ipfrag"):
            table = self.datapath.maps[name]
            for key in list(table.keys()):
                table.delete(key)
        import ipaddress
        for spec in scenario.endpoints:
            macs = dict(pod_mac=f"02:00:00:00:01:{spec.id:02x}",
                        host_mac=f"02:00:00:00:02:{spec.id:02x}") if spec.local_delivery else {}
            self._await(self.datapath.endpoint_added(Endpoint(
                spec.id, spec.namespace, frozenset(), ipaddress.IPv4Address(spec.ip),
                spec.identity, ifindex=100 + spec.id, **macs)))

    def enter(self, world: ResolvedWorld, phase, first: bool) -> None:
        ipcache_changes = world.enter(phase)
        changes = world.take_changes()
        if first:
            self._await(self.datapath.reconcile(world.verdicts(), list(world.ipcache.values())))
            return
        for endpoint_id, endpoint_changes in sorted(changes.items()):
            self._await(self.datapath.update_policy(endpoint_id, endpoint_changes))
        if ipcache_changes:
            self._await(self.datapath.update_ipcache(ipcache_changes))

    def run(self, endpoint_id: int, direction: str, frame: bytes):
        """The program of that hook, run on the frame as if at that endpoint's veth."""
        endpoint = self.datapath.endpoints[endpoint_id]
        table = self.datapath.maps["endpoints"]
        table.put(ct.c_uint32(1), table.get(ct.c_uint32(endpoint.ifindex)))  # the test device
        return self.runner.run(PROGRAM[direction], frame)

    def delivery(self, endpoint_id: int, direction: str, frame: bytes) -> tuple[str, bool]:
        """The program's outcome for the frame at this endpoint's hook, and whether it
        redirected the frame into a local pod."""
        from meshagent.plugins.ebpf.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT
        result = self.run(endpoint_id, direction, frame)
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


@pytest.fixture(scope="module")
def harness():
    tmp = Path(tempfile.mkdtemp(prefix="ma-diff-", dir="/tmp"))
    bpffs = tmp / "bpffs"
    bpffs.mkdir()
    os.system(f"mount -t bpf bpf {bpffs}")
    kernel = KernelHarness(bpffs)
    yield kernel
    kernel.close()
    os.system(f"umount -l {bpffs}")
    shutil.rmtree(tmp, ignore_errors=True)


def run_scenario(kernel: KernelHarness, scenario: Scenario, tally: dict | None = None
                 ) -> list[str]:
    """Every probe through the kernel and the model; the differences, described."""
    world = ResolvedWorld(scenario)
    kernel.load(scenario)
    differences = []
    for n, phase in enumerate(scenario.phases):
        kernel.enter(world, phase, first=n == 0)
        for i, probe in enumerate(phase.probes):
            frame = probe.packet.frame()
            expected = world.model.delivery(probe.endpoint, probe.direction, frame)
            got = kernel.delivery(probe.endpoint, probe.direction, frame)
            if tally is not None:
                tally[got[0]] = tally.get(got[0], 0) + 1
                tally["redirected"] = tally.get("redirected", 0) + got[1]
            if got != expected:
                differences.append(f"phase {n} probe {i}: endpoint {probe.endpoint}"
                                   f" {probe.direction} {probe.packet}: kernel {got},"
                                   f" resolver/model {expected}")
    return differences


def resolver_self_check(scenario: Scenario) -> list[str]:
    """The incremental map state agrees with ``policy trace``'s explanation from the rules."""
    world = ResolvedWorld(scenario)
    problems = []
    for phase in scenario.phases:
        world.enter(phase)
        for probe in phase.probes[:20]:
            p = probe.packet
            peer = p.src if probe.direction == INGRESS else p.dst
            identity = world.model.identity_of(peer)
            port = p.dport if p.protocol in (6, 17, 132) else 0
            explained = world.explained(probe.endpoint, probe.direction, identity, p.protocol,
                                        port)
            decided = world.decision(probe.endpoint, probe.direction, identity, p.protocol,
                                     port)[0]
            if explained is not None and explained != decided:
                problems.append(f"{probe}: map state {decided}, trace {explained}")
    return problems


def fail_with(kernel: KernelHarness, scenario: Scenario, differences: list[str]) -> None:
    """Save the smallest failing scenario found, and fail showing where it is."""
    def fails(candidate: Scenario) -> bool:
        try:
            return bool(run_scenario(kernel, candidate))
        except Exception:
            return False
    if run_scenario(kernel, scenario):  # the kernel disagrees (not the resolver's self-check)
        scenario = minimize(scenario, fails)
        differences = run_scenario(kernel, scenario)
    path = Path(tempfile.mkdtemp(prefix="ma-diff-case-")) / "case.json"
    path.write_text(scenario.to_json())
    shown = "\n".join(differences[:10])
    raise AssertionError(f"{len(differences)} verdicts differ; scenario saved to {path} (copy it"
                         f" into tests/datapath_cases/ to keep it):\n{shown}")


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(scenario=scenarios(probes_per_phase=PROBES_PER_PHASE))
def test_kernel_verdicts_equal_the_resolvers_on_random_worlds(harness, scenario):
    differences = run_scenario(harness, scenario, seen) + resolver_self_check(scenario)
    probes_run["random"] += scenario.probe_count
    if differences:
        fail_with(harness, scenario, differences)


def test_the_random_run_was_big_enough():
    if probes_run["random"] == 0:
        pytest.skip("the random differential test did not run")
    assert probes_run["random"] >= MIN_PROBES, probes_run
    # every outcome came up, and local delivery too: no path went untested
    assert set(REASON_NAMES.values()) <= set(seen) and seen["redirected"] > 0, seen


# -- the policy-semantics table, through the kernel ------------------------------------------------

def table_scenario(text: str, peer: str, port: int, proto: int, direction: str,
                   endpoint: str, flat: bool) -> Scenario:
    """One table case as a scenario: the table's identities at addresses of their own, its
    endpoint at 10.9.0.1, one packet between them."""
    import json

    import yaml
    from test_policy_semantics import IDS

    from meshagent.testing.scenarios import EndpointSpec, IdentitySpec, Phase, Probe
    pods = {name: i for name, i in IDS.items() if not i.reserved and not name.startswith("cidr")}
    addresses = {name: f"10.9.1.{n + 1}" for n, name in enumerate(pods)}
    addresses.update({"world": "198.18.0.1", "host": "10.9.0.254", "remote-node": "10.9.0.253",
                      "cidr-10-1": "10.1.200.1", "cidr-10-1-5": "10.1.5.1"})
    addresses[endpoint] = "10.9.0.1"
    ipcache = [(f"{addresses[name]}/32", i.id) for name, i in pods.items()]
    ipcache += [("10.9.0.254/32", 1), ("10.9.0.253/32", 6)]
    peer_ip = addresses[peer]
    src, dst = (peer_ip, "10.9.0.1") if direction == INGRESS else ("10.9.0.1", peer_ip)
    documents = tuple(json.dumps(d) for d in yaml.safe_load_all(text) if d)
    namespace = next(label.split("=", 1)[1] for label in IDS[endpoint].labels
                     if "io.kubernetes.pod.namespace=" in label)
    return Scenario(
        (EndpointSpec(1, "10.9.0.1", namespace, IDS[endpoint].id),),
        (Phase(tuple(IdentitySpec(i.id, tuple(sorted(i.labels)), i.cluster)
                     for i in pods.values()), tuple(ipcache), documents,
               (Probe(1, direction, Packet(src, dst, proto, 40000, port)),)),),
        default_local_cluster=not flat)


def table_cases():
    from test_policy_semantics import CASES, EGRESS_CASES, cnp
    for name, text, peer, port, proto, expected in CASES:
        flat = text.startswith("FLAT:")
        yield pytest.param(text.removeprefix("FLAT:"), peer, port, proto, INGRESS, "db", flat,
                           expected, id=name)
    for name, spec, peer, port, expected in EGRESS_CASES:
        text = cnp("endpointSelector: {matchLabels: {app: employee}}\n" + spec)
        yield pytest.param(text, peer, port, TCP, EGRESS, "employee", False, expected, id=name)


@pytest.mark.parametrize("text, peer, port, proto, direction, endpoint, flat, expected",
                         list(table_cases()))
def test_policy_semantics_table_through_the_kernel(harness, text, peer, port, proto, direction,
                                                   endpoint, flat, expected):
    scenario = table_scenario(text, peer, port, proto, direction, endpoint, flat)
    assert not run_scenario(harness, scenario)
    world = ResolvedWorld(scenario)
    harness.load(scenario)
    harness.enter(world, scenario.phases[0], first=True)
    probe = scenario.phases[0].probes[0]
    got = harness.outcome(1, direction, probe.packet.frame())
    assert (got == model.FORWARDED) == (expected == "allow"), got


@pytest.mark.parametrize("path", sorted(CASES_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_kept_cases(harness, path):
    scenario = Scenario.from_json(path.read_text())
    differences = run_scenario(harness, scenario)
    assert not differences, "\n".join(differences[:10])


# -- the reproductions, by name ---------------------------------------------------------

CLIENT, ECHO, ECHO2, REMOTE = "10.1.1.1", "10.1.1.2", "10.1.1.3", "10.2.1.5"
ALL_EGRESS = {"egress": [{"toEntities": ["all"]}]}


def named_scenario(specs: list[dict], probes: list[tuple]) -> Scenario:
    """client, echo and echo2 in cluster1 (endpoints 1-3), an employee of cluster2; policies
    given as specs (the client's when they name no endpointSelector); probes as (direction,
    packet) at the endpoint whose address the packet carries, or (direction, packet, endpoint)."""
    import json

    from meshagent.testing.scenarios import (
        EndpointSpec,
        IdentitySpec,
        Phase,
        Probe,
        labels_of,
    )
    apps = {"client": (CLIENT, 1), "echo": (ECHO, 2), "echo2": (ECHO2, 3)}
    identities = [IdentitySpec((101 << 16) + 256 + n, labels_of(app, "default", "cluster1", None),
                               "cluster1") for app, (_, n) in apps.items()]
    identities.append(IdentitySpec((102 << 16) + 256, labels_of("employee", "default", "cluster2",
                                                                None), "cluster2"))
    endpoints = tuple(EndpointSpec(n, ip, "default", identities[n - 1].id)
                      for ip, n in apps.values())
    ipcache = tuple((f"{ip}/32", identities[n - 1].id) for ip, n in apps.values()) + (
        (f"{REMOTE}/32", identities[-1].id),)
    documents = []
    for n, spec in enumerate(specs):
        spec = {"endpointSelector": {"matchLabels": {"app": "client"}}, **spec}
        documents.append(json.dumps({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                                     "metadata": {"name": f"p{n}"}, "spec": spec}))
    endpoint_of = {ip: n for ip, n in apps.values()}
    phase_probes = []
    for direction, packet, *at in probes:
        local = packet.src if direction == EGRESS else packet.dst
        phase_probes.append(Probe(at[0] if at else endpoint_of.get(local, 1), direction, packet))
    return Scenario(endpoints, (Phase(tuple(identities), ipcache, tuple(documents),
                                      tuple(phase_probes)),))


def outcomes(kernel: KernelHarness, scenario: Scenario) -> list[str]:
    """The kernel's outcome of every probe, after checking it equals the model's."""
    assert not run_scenario(kernel, scenario)
    world = ResolvedWorld(scenario)
    kernel.load(scenario)
    kernel.enter(world, scenario.phases[0], first=True)
    return [kernel.outcome(p.endpoint, p.direction, p.packet.frame())
            for p in scenario.phases[0].probes]


def tcp(dst: str, port: int, src: str = CLIENT) -> tuple[str, Packet]:
    return (EGRESS if src == CLIENT else INGRESS, Packet(src, dst, TCP, 40000, port))


def test_an_egress_deny_range_beats_allow_all(harness):
    deny = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [
        {"port": "4096", "endPort": 8191, "protocol": "TCP"}]}]}]}
    got = outcomes(harness, named_scenario([deny], [tcp(ECHO, p) for p in
                                                    (8080, 4096, 8191, 4095, 8192)]))
    assert got == [model.POLICY_DENY] * 3 + [model.FORWARDED] * 2


def test_wide_ranges_allow_and_deny_without_expansion(harness):
    allow = {"egress": [{"toEndpoints": [{"matchLabels": {"app": "echo"}}], "toPorts": [
        {"ports": [{"port": "30000", "endPort": 32767, "protocol": "TCP"}]}]}]}
    got = outcomes(harness, named_scenario([allow], [tcp(ECHO, p) for p in
                                                     (31000, 30000, 32767, 29999, 32768)]))
    assert got == [model.FORWARDED] * 3 + [model.POLICY_DEFAULT] * 2
    deny_1025 = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [
        {"port": "4096", "endPort": 5120, "protocol": "TCP"}]}]}]}
    got = outcomes(harness, named_scenario([deny_1025], [tcp(ECHO, p) for p in (5120, 5121)]))
    assert got == [model.POLICY_DENY, model.FORWARDED]
    deny_all_tcp = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [
        {"port": "1", "endPort": 65535, "protocol": "TCP"}]}]}]}
    got = outcomes(harness, named_scenario([deny_all_tcp], [
        tcp(ECHO, 1), tcp(ECHO, 65535), (EGRESS, Packet(CLIENT, ECHO, 17, 40000, 53))]))
    assert got == [model.POLICY_DENY, model.POLICY_DENY, model.FORWARDED]
    # 1-65535 is 16 prefixes, not 65,535 entries; the other 6 allow everything elsewhere
    assert harness.datapath.policy_entry_count() == 16 + 6


def test_an_ingress_deny_range_on_the_server(harness):
    spec = {"endpointSelector": {"matchLabels": {"app": "echo2"}},
            "ingress": [{"fromEntities": ["all"]}],
            "ingressDeny": [{"toPorts": [{"ports": [{"port": "4096", "endPort": 8191,
                                                     "protocol": "TCP"}]}]}]}
    got = outcomes(harness, named_scenario([spec], [tcp(ECHO2, 8080, src=ECHO),
                                                    tcp(ECHO2, 8192, src=ECHO)]))
    assert got == [model.POLICY_DENY, model.FORWARDED]


def test_fragments_tiny_overlapping_and_whole(harness):
    import attrs
    deny = {**ALL_EGRESS, "egressDeny": [{"toPorts": [{"ports": [
        {"port": "4096", "endPort": 8191, "protocol": "TCP"}]}]}]}
    syn = Packet(CLIENT, ECHO, TCP, 40000, 8080, ip_id=7)
    big = Packet(CLIENT, ECHO, 17, 40001, 5353, ip_id=8)
    denied = Packet(CLIENT, ECHO, TCP, 40002, 6000, ip_id=9)
    got = outcomes(harness, named_scenario([deny], [
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
        assert all(key.sport and key.dport for key in harness.datapath.maps[name].keys())


def test_a_pod_cannot_send_with_another_address(harness):
    from meshagent.testing.packets import ETH_ARP
    got = outcomes(harness, named_scenario([], [
        (EGRESS, Packet(ECHO, ECHO2, 17, 40000, 53), 1),  # the client sends as echo
        (EGRESS, Packet(REMOTE, ECHO2, TCP, 40000, 6379), 1),  # ... as cluster2's employee
        (EGRESS, Packet(CLIENT, ECHO2, TCP, 40000, 6379), 1),  # as itself
        (INGRESS, Packet(REMOTE, CLIENT, TCP, 6379, 40000), 1),  # anyone may reach it
        (EGRESS, Packet(ECHO, ECHO2, ethertype=ETH_ARP), 1),  # ARP passes
    ]))
    assert got == [model.SPOOFED, model.SPOOFED, model.FORWARDED, model.FORWARDED,
                   model.FORWARDED]


def test_a_new_endpoint_with_a_reused_id_inherits_no_connection(harness):
    """Endpoint ids are reused: conntrack entries of the pod that had the id before (here its
    address too) must not let traffic past the new pod's policy."""
    closed = {"endpointSelector": {"matchLabels": {"app": "client"}}, "ingress": [{}]}
    opened = Packet(CLIENT, ECHO, TCP, 40000, 8080)
    assert outcomes(harness, named_scenario([closed], [(EGRESS, opened)])) == [model.FORWARDED]
    reply = opened.reply().frame()
    assert harness.outcome(1, INGRESS, reply) == model.FORWARDED  # a reply of its connection
    old = harness.datapath.endpoints[1]
    harness._await(harness.datapath.endpoint_removed(old))
    harness._await(harness.datapath.endpoint_added(old))  # a new pod: same id, same address
    assert harness.outcome(1, INGRESS, reply) == model.POLICY_DEFAULT


def test_service_connections_are_judged_against_the_backend_and_keep_it(harness):
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
    world = ResolvedWorld(scenario)
    harness.load(scenario)
    harness.enter(world, scenario.phases[0], first=True)
    harness._await(harness.datapath.update_services([service(ECHO, 8080)]))
    first = Packet(CLIENT, vip, TCP, 40000, 80)
    name, redirected = harness.delivery(1, EGRESS, first.frame())
    assert (name, redirected) == (model.FORWARDED, True)  # to echo:8080, straight in
    result = harness.run(1, EGRESS, attrs.evolve(first, tcp_flags=0x10).frame())
    assert result.frame[30:34] == ipaddress.IPv4Address(ECHO).packed  # the same backend
    assert result.frame[36:38] == (8080).to_bytes(2, "big")
    # echo answers: the reply is rewritten back to the frontend on its way into the client
    reply = harness.run(2, EGRESS, Packet(ECHO, CLIENT, TCP, 8080, 40000, tcp_flags=0x12).frame())
    assert reply.action == 7 and reply.frame[26:30] == ipaddress.IPv4Address(vip).packed
    assert reply.frame[34:36] == (80).to_bytes(2, "big")
    assert checksum(reply.frame[14:34]) == 0 and reply.frame[22] == 63  # routed, and right
    # a backend port echo's ingress does not allow: judged against the backend, dropped there
    harness._await(harness.datapath.update_services([service(ECHO, 9090)]))
    denied = Packet(CLIENT, vip, TCP, 40001, 80)
    assert harness.delivery(1, EGRESS, denied.frame()) == (model.POLICY_DEFAULT, False)
