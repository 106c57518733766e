"""Remote updates as the eBPF datapath gets them, one small batch after another: each writes
what it holds, and the endpoints' generation moves only when there are flows to judge again."""

import asyncio
import ctypes as ct
import ipaddress
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from meshagent.datapath import DatapathBatch
from meshagent.model.endpoint import Endpoint
from meshagent.model.ipcache import IPCacheEntry
from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not can_run(), reason="needs root and BPF")]

LABELS = frozenset({"k8s:io.kubernetes.pod.namespace=default",
                    "k8s:io.cilium.k8s.policy.cluster=cluster1"})


@pytest.fixture
def bpf_root():
    tmp = Path(tempfile.mkdtemp(prefix="ma-stream-", dir="/tmp"))
    (tmp / "bpffs").mkdir()
    os.system(f"mount -t bpf bpf {tmp / 'bpffs'}")
    yield tmp / "bpffs"
    os.system(f"umount -l {tmp / 'bpffs'}")
    shutil.rmtree(tmp, ignore_errors=True)


def remote(n: int) -> IPCacheEntry:
    return IPCacheEntry(ipaddress.IPv4Network(f"10.210.0.{n}/32"), (102 << 16) + 256 + n,
                        "cluster2")


def test_remote_updates_bump_the_generation_only_where_endpoints_are(bpf_root):
    from meshagent.plugins.ebpf.datapath import EbpfDatapath, EbpfSettings
    from meshagent.plugins.ebpf.testrun import NoAttacher
    loop = asyncio.new_event_loop()
    datapath = EbpfDatapath(EbpfSettings(bpf_root, ipcache_max=1024, policy_max=1024,
                                         ct_tcp_max=1024, ct_any_max=1024),
                            attacher=NoAttacher())

    def generation() -> int:
        return datapath.maps["generation"].get(ct.c_uint32(0)).value

    def identity_of(n: int) -> int | None:
        from meshagent.plugins.ebpf.maps import IPCacheKey, IPv4Bytes
        value = datapath.maps["ipcache"].get(IPCacheKey(
            32, IPv4Bytes.from_buffer_copy(ipaddress.IPv4Address(f"10.210.0.{n}").packed)))
        return None if value is None else value.identity

    try:
        loop.run_until_complete(datapath.start())
        loop.run_until_complete(datapath.reconcile({}, []))
        start = generation()
        for n in (1, 2, 3):  # no endpoint here: the rows alone
            loop.run_until_complete(datapath.apply(DatapathBatch(ipcache_upserts=(remote(n),))))
        assert [identity_of(n) for n in (1, 2, 3)] == [remote(n).identity for n in (1, 2, 3)]
        assert generation() == start

        endpoint = Endpoint(1, "default", LABELS, ipaddress.IPv4Address("10.1.1.1"), 70001,
                            ifindex=101)
        loop.run_until_complete(datapath.apply(DatapathBatch(added=(endpoint,))))
        added = generation()
        loop.run_until_complete(datapath.apply(DatapathBatch(ipcache_deletes=(remote(2),))))
        assert identity_of(2) is None and identity_of(1) is not None
        assert generation() == added + 1  # the endpoint's flows are judged again
        assert datapath.maps["endpoints"].get(ct.c_uint32(101)).generation == added + 1
    finally:
        loop.run_until_complete(datapath.stop())
        loop.close()
