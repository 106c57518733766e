"""WORK IN PROGRESS (issue 19): the nftables datapath against the datapath contract, packets
sent through veths in a private network namespace (BPF_PROG_TEST_RUN does not apply)."""

import asyncio
import os
import socket
import subprocess
import time
import uuid

import pytest

from meshagent.plugins.nftables import ruleset
from meshagent.testing import datapath_model as model
from meshagent.testing.datapath_contract import DatapathContract
from meshagent.testing.packets import KERNEL_WALK
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not can_run(), reason="needs root")]

REASONS = {"r_forwarded": model.FORWARDED, "r_policy_deny": model.POLICY_DENY,
           "r_policy_default": model.POLICY_DEFAULT, "r_spoofed": model.SPOOFED,
           "r_frag_tiny": model.FRAG_TINY, "r_frag_unknown": model.FRAG_UNKNOWN,
           "r_malformed": model.MALFORMED_PACKET, "r_unsupported_l3": model.UNSUPPORTED_L3}


class NamespaceJudge:
    """The nftables datapath in a private netns with a veth pair per endpoint (h<ifindex> on
    the host side, p<ifindex> in the "pod"); frames are sent on one end and judged by the
    reason counters."""

    def __init__(self):
        from pyroute2 import netns as pynetns

        from meshagent.plugins.nftables.datapath import NftablesDatapath
        self.name = f"ma-nft-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        # no IPv6 of its own on the veths (router solicitations, MLD): only the test's frames
        subprocess.run(["ip", "netns", "exec", self.name, "sysctl", "-q", "-w",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        for ifindex in range(101, 104):
            subprocess.run(["ip", "-n", self.name, "link", "add", f"h{ifindex}", "type", "veth",
                            "peer", "name", f"p{ifindex}"], check=True)
            for dev in (f"h{ifindex}", f"p{ifindex}"):
                subprocess.run(["ip", "-n", self.name, "link", "set", dev, "up"], check=True)
        self.sockets: dict[str, socket.socket] = {}
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)
        pynetns.setns(self.name)
        self.loop = asyncio.new_event_loop()
        self.datapath = NftablesDatapath(device_of=lambda ifindex: f"h{ifindex}")
        self.call(self.datapath.start())

    def close(self) -> None:
        from pyroute2 import netns as pynetns
        for sock in self.sockets.values():
            sock.close()
        self.loop.close()
        pynetns.setns(self.home)
        os.close(self.home)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def call(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def forget_connections(self) -> None:
        """Fresh endpoint chains (and their reply sets), and no fragment records."""
        import nftables
        for endpoint in list(self.datapath.endpoints.values()):
            self.call(self.datapath.endpoint_removed(endpoint))
        t = f"{ruleset.FAMILY} {ruleset.TABLE}"
        rc, _, err = nftables.Nftables().cmd("\n".join(
            f"flush map {t} {name}{sfx}" for name in ("fsm", "fdm", "fsc", "fdc")
            for sfx in ("", "6")))
        assert rc == 0, err

    def delivery(self, endpoint_id: int, direction: str, frame: bytes) -> tuple[str, bool]:
        ifindex = 100 + endpoint_id
        device = f"p{ifindex}" if direction == model.EGRESS else f"h{ifindex}"
        before = self.datapath.counters()
        if device not in self.sockets:  # kept open: closing a packet socket waits for RCU
            self.sockets[device] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            self.sockets[device].bind((device, 0))
        try:
            self.sockets[device].send(frame)
        except OSError:  # ENOBUFS: the egress hook dropped it
            pass
        deadline = time.monotonic() + 1.0
        while True:  # a frame sent into a veth is judged on the other end, a moment later
            after = self.datapath.counters()
            moved = [REASONS[name] for name in after if after[name] != before.get(name)]
            if moved or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        return (moved[0] if len(moved) == 1 else f"counters moved: {moved}"), False


@pytest.fixture(scope="module")
def judge():
    judge = NamespaceJudge()
    yield judge
    judge.close()


class TestNftablesDatapathContract(DatapathContract):
    expects_local_delivery = False
    ipv6_walk = KERNEL_WALK
