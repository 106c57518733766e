"""An agent upgrade that changes the maps' layout keeps tracked connections: the last version's
conntrack and service NAT maps (v1) are carried into the new ones before the new programs take
over — replies still pass a closed ingress, a service connection keeps its backend."""

import asyncio
import ctypes as ct
import ipaddress
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from meshagent.datapath import DatapathBatch
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCacheEntry
from meshagent.policy.api import parse_policies
from meshagent.policy.resolver import PolicyEndpoint, Resolver
from meshagent.testing.packets import ACK, TCP, Packet
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not can_run(), reason="needs root and BPF")]

CLIENT, BACKEND, VIP = "10.1.1.1", "10.1.1.2", "10.96.0.10"
V1_MAPS = r"""
#include <uapi/linux/bpf.h>
struct ct_key { u32 saddr; u32 daddr; u16 sport; u16 dport; u8 protocol; u8 direction; u16 pad;
                u32 endpoint_id; };
struct v1_ct_value { u64 last_seen_ns; u64 packets; };
struct v1_nat_key { u32 client_ip; u32 other_ip; u16 client_port; u16 other_port; u8 protocol;
                    u8 pad[3]; };
struct v1_nat_value { u32 ip; u16 port; u16 pad; };
struct v1_endpoint_info { u32 endpoint_id; u32 identity; u32 ipv4; u32 flags; };
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct v1_ct_value, ct_tcp, 1024, "DIR/ct_tcp");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct v1_ct_value, ct_any, 1024, "DIR/ct_any");
BPF_TABLE_PINNED("lru_hash", struct v1_nat_key, struct v1_nat_value, lb_forward_nat, 1024,
                 "DIR/lb_forward_nat");
BPF_TABLE_PINNED("lru_hash", struct v1_nat_key, struct v1_nat_value, lb_reverse_nat, 1024,
                 "DIR/lb_reverse_nat");
BPF_TABLE_PINNED("hash", u32, struct v1_endpoint_info, endpoints, 4096, "DIR/endpoints");
int nothing(struct __sk_buff *skb) { return 0; }
"""


def ip(text: str):
    from meshagent.plugins.ebpf.maps import ip_bytes
    return ip_bytes(text)


def raw(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def v1_state(pin_dir: Path) -> None:
    """What the last version left: a plain connection and a service connection of endpoint 1
    (conntrack keyed after the DNAT, the NAT in the lb_*_nat maps)."""
    from bcc import BPF

    from meshagent.plugins.ebpf.maps import DIR_EGRESS, DIR_INGRESS, CTKey, PinnedMap
    from meshagent.plugins.ebpf.migrate import V1CTValue, V1NATKey, V1NATValue
    BPF(text=V1_MAPS.replace("DIR", str(pin_dir)).encode())
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # what bpf_ktime_get_ns() reads
    ct_tcp = PinnedMap(pin_dir, "ct_tcp", (CTKey, V1CTValue))
    for sport, (dst, dport) in ((40000, (BACKEND, 7000)), (40001, (BACKEND, 6379))):
        ct_tcp.put(CTKey(ip(CLIENT), ip(dst), sport, dport, TCP, DIR_EGRESS, 0, 1),
                   V1CTValue(now, 1))
        ct_tcp.put(CTKey(ip(dst), ip(CLIENT), dport, sport, TCP, DIR_INGRESS, 0, 1),
                   V1CTValue(now, 0))
    PinnedMap(pin_dir, "lb_forward_nat", (V1NATKey, V1NATValue)).put(
        V1NATKey(ip(CLIENT), ip(VIP), 40001, 6379, TCP), V1NATValue(ip(BACKEND), 6379))
    PinnedMap(pin_dir, "lb_reverse_nat", (V1NATKey, V1NATValue)).put(
        V1NATKey(ip(CLIENT), ip(BACKEND), 40001, 6379, TCP), V1NATValue(ip(VIP), 6379))


CLOSED = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: closed}
spec:
  endpointSelector: {}
  ingress:
  - {}
  egress:
  - toEntities: [all]
"""


@pytest.fixture
def pin_dir():
    tmp = Path(tempfile.mkdtemp(prefix="ma-upg-", dir="/tmp"))
    (tmp / "bpffs").mkdir()
    os.system(f"mount -t bpf bpf {tmp / 'bpffs'}")
    (tmp / "bpffs" / "meshagent").mkdir()
    yield tmp / "bpffs" / "meshagent"
    os.system(f"umount -l {tmp / 'bpffs'}")
    shutil.rmtree(tmp, ignore_errors=True)


def test_an_upgrade_across_a_layout_change_keeps_connections(pin_dir):
    from meshagent.plugins.ebpf.datapath import EbpfDatapath, EbpfSettings
    from meshagent.plugins.ebpf.maps import CT_NAT_DST, CT_NAT_SRC, CT_REPLY
    from meshagent.plugins.ebpf.testrun import TC_ACT_SHOT, NoAttacher, ProgramRunner
    v1_state(pin_dir)
    loop = asyncio.new_event_loop()
    datapath = EbpfDatapath(EbpfSettings(pin_dir.parent, ipcache_max=1024, policy_max=1024,
                                         ct_tcp_max=1024, ct_any_max=1024),
                            attacher=NoAttacher())  # says the old programs are attached
    try:
        loop.run_until_complete(datapath.start())
        assert {"ct_tcp", "ct_any", "endpoints"} <= set(datapath.replaced_maps)
        resolver = Resolver("cluster1")
        for policy in parse_policies(CLOSED):
            resolver.upsert_policy(policy)
        labels = frozenset({"k8s:io.kubernetes.pod.namespace=default",
                            "k8s:io.cilium.k8s.policy.cluster=cluster1"})
        for n, address in ((1, CLIENT), (2, BACKEND)):
            resolver.set_endpoint(PolicyEndpoint(n, "default", labels | {f"k8s:app=a{n}"}))
            loop.run_until_complete(datapath.apply(DatapathBatch(added=(Endpoint(
                n, "default", labels, ipaddress.IPv4Address(address), 70000 + n,
                ifindex=100 + n),))))
        assert datapath.deferred == {1, 2}  # the old programs go on until the first sync
        ipcache = [IPCacheEntry(ipaddress.IPv4Network(f"{a}/32"), 70000 + n, "cluster1")
                   for n, a in ((1, CLIENT), (2, BACKEND))]
        loop.run_until_complete(datapath.reconcile(
            {n: resolver.verdicts(n) for n in (1, 2)}, ipcache))
        entries = {(bytes(k.saddr), k.sport, bytes(k.daddr), k.dport, k.direction): v
                   for k, v in datapath.maps["ct_tcp"].items()}
        forward = entries[(raw(CLIENT), 40001, raw(VIP), 6379, 1)]  # keyed by the frontend now
        assert forward.flags == CT_NAT_DST and bytes(forward.nat_ip) == raw(BACKEND)
        assert forward.generation == 0  # judged again on its next packet
        reply = entries[(raw(BACKEND), 6379, raw(CLIENT), 40001, 0)]
        assert reply.flags == CT_REPLY | CT_NAT_SRC and bytes(reply.nat_ip) == raw(VIP)
        assert entries[(raw(BACKEND), 7000, raw(CLIENT), 40000, 0)].flags == CT_REPLY

        runner = ProgramRunner(datapath.pin_dir)
        table = datapath.maps["endpoints"]
        table.put(ct.c_uint32(1), table.get(ct.c_uint32(101)))  # the test device is the client
        try:
            # the backend's reply passes the client's closed ingress, as from the frontend
            result = runner.run("to_container", Packet(BACKEND, CLIENT, TCP, 6379, 40001,
                                                       tcp_flags=ACK).frame())
            assert result.reason == 0 and result.frame[26:30] == ipaddress.IPv4Address(VIP).packed
            assert runner.run("to_container", Packet(BACKEND, CLIENT, TCP, 7000, 40000,
                                                     tcp_flags=ACK).frame()).reason == 0
            # the client's next packet to the frontend still goes to the same backend
            result = runner.run("from_container", Packet(CLIENT, VIP, TCP, 40001, 6379,
                                                         tcp_flags=ACK).frame())
            assert result.reason == 0 and result.frame[30:34] == \
                ipaddress.IPv4Address(BACKEND).packed
            # and a packet of no tracked connection meets the closed ingress
            result = runner.run("to_container", Packet(BACKEND, CLIENT, TCP, 7000, 40099,
                                                       tcp_flags=ACK).frame())
            assert result.action == TC_ACT_SHOT
        finally:
            runner.close()
    finally:
        loop.run_until_complete(datapath.stop())
        loop.close()
