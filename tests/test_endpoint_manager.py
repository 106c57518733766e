"""The endpoint manager on its own: built with fakes for the allocator, publisher and datapath
(its constructor takes what it uses), on real veths in namespaces made here.

A failed create or restore must leave nothing: no veth, no address taken, no identity
reference, no published entry, no saved state. The manager runs in a subprocess inside a
"host" namespace of the test's own (podnet works on the namespace it runs in), and reports
what it saw as JSON.
"""

import json
import subprocess
import sys
import textwrap

import pytest
from test_endpoints import lab  # noqa: F401 (the fixture)

from meshagent_dev.netlab import can_run

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(not can_run(), reason="needs root")]

SCRIPT = textwrap.dedent('''
    import asyncio, ipaddress, json, sys
    from pathlib import Path

    from meshagent.endpoint import podnet
    from meshagent.endpoint.manager import EndpointManager, EndpointRequest, host_interface_name
    from meshagent.model.identity import Identity

    pod_ns, state_dir = sys.argv[1], Path(sys.argv[2])

    class Allocator:
        def __init__(self):
            self.refs = {}
        async def allocate(self, labels):
            identity = Identity(1000 + len(sorted(labels)), labels, "c1")
            self.refs[identity.id] = self.refs.get(identity.id, 0) + 1
            return identity
        async def release(self, identity):
            self.refs[identity.id] -= 1
            return self.refs[identity.id] == 0
        def lookup(self, identity_id):
            return None
        async def close(self):
            pass

    class Publisher:
        def __init__(self):
            self.ipcache = {}
        def upsert_ipcache(self, entry):
            self.ipcache[str(entry.prefix)] = entry.identity
        def delete_ipcache(self, entry):
            self.ipcache.pop(str(entry.prefix), None)
        def endpoints_restored(self):
            pass

    class Datapath:
        fail = False
        def __init__(self):
            self.endpoints = {}
        async def endpoint_added(self, endpoint):
            if self.fail:
                raise RuntimeError("the datapath refused")
            self.endpoints[endpoint.id] = endpoint
        async def endpoint_removed(self, endpoint):
            self.endpoints.pop(endpoint.id, None)

    def manager(allocator, publisher, datapath):
        started = asyncio.Event()
        started.set()
        async def no_labels(namespace, pod):
            return frozenset()
        return EndpointManager(
            cluster_name="c1", node_ip="192.0.2.1", pod_cidrs=(ipaddress.IPv4Network("10.200.0.0/29"),),
            directory=state_dir, allocator=allocator, publisher=publisher, datapath=datapath,
            datapath_started=started, plugin_labels=no_labels, changed=lambda kind, e: None)

    class Handle:
        def ready(self):
            pass

    async def netlink(func, *args):  # pyroute2's sync API may not run inside the loop
        return await asyncio.to_thread(func, *args)

    async def leftovers(m, allocator, publisher, datapath, ifname):
        return {"veth": await netlink(podnet.host_interface, ifname) is not None,
                "pod_ifname": await netlink(podnet.pod_interface_present, pod_ns, "eth0"),
                "refs": sum(allocator.refs.values()), "ipcache": dict(publisher.ipcache),
                "datapath": sorted(datapath.endpoints), "endpoints": sorted(m.endpoints),
                "saved": sorted(p.name for p in state_dir.glob("*.json")),
                "ip_claimed": len(m.ipam.owners)}

    async def main():
        out = {}
        allocator, publisher, datapath = Allocator(), Publisher(), Datapath()
        m = manager(allocator, publisher, datapath)
        await m.restore(Handle())
        request = EndpointRequest(netns=pod_ns, namespace="default", labels="app=x",
                                  container_id="c0ffee")
        # 1. the datapath refuses the endpoint: the create fails and undoes every step
        datapath.fail = True
        try:
            await m.create(request)
            out["failed_create"] = "did not fail"
        except RuntimeError as exc:
            out["failed_create"] = str(exc)
        out["after_failed_create"] = await leftovers(m, allocator, publisher, datapath,
                                                     host_interface_name(request))
        # 2. the same request succeeds once the datapath takes it, with the first address
        datapath.fail = False
        endpoint = await m.create(request)
        out["created"] = {"ip": str(endpoint.ipv4), "identity": endpoint.identity}
        out["after_create"] = await leftovers(m, allocator, publisher, datapath, endpoint.ifname)
        # 3. a new manager (an agent restart) whose datapath refuses: the restore is undone
        allocator2, publisher2, datapath2 = Allocator(), Publisher(), Datapath()
        datapath2.fail = True
        m2 = manager(allocator2, publisher2, datapath2)
        try:
            await m2.restore(Handle())
            out["failed_restore"] = "did not fail"
        except RuntimeError as exc:
            out["failed_restore"] = str(exc)
        out["after_failed_restore"] = {"refs": sum(allocator2.refs.values()),
                                       "ipcache": dict(publisher2.ipcache),
                                       "endpoints": sorted(m2.endpoints),
                                       "ip_claimed": len(m2.ipam.owners),
                                       "veth_kept": await netlink(
                                           podnet.host_interface, endpoint.ifname) is not None}
        # 4. and when it takes it, the endpoint is back as it was
        datapath2.fail = False
        await m2.restore(Handle())
        back = m2.get(endpoint.id)
        out["restored"] = {"ip": str(back.ipv4), "refs": sum(allocator2.refs.values()),
                           "ipcache": dict(publisher2.ipcache)}
        # 5. delete: everything goes
        await m2.delete(endpoint.id)
        out["after_delete"] = await leftovers(m2, allocator2, publisher2, datapath2, endpoint.ifname)
        print(json.dumps(out))

    asyncio.run(main())
''')


def test_a_failed_create_or_restore_leaves_nothing_behind(lab, tmp_path):  # noqa: F811
    host, pod = lab.ns("host"), lab.ns("pod")
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    result = lab.exec(host, sys.executable, str(script), pod, str(tmp_path / "endpoints"),
                      check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["failed_create"] == "the datapath refused"
    nothing = {"veth": False, "pod_ifname": False, "refs": 0, "ipcache": {}, "datapath": [],
               "endpoints": [], "saved": [], "ip_claimed": 0}
    assert out["after_failed_create"] == nothing
    assert out["created"]["ip"] == "10.200.0.1"  # the failed create gave its address back
    assert out["after_create"]["veth"] and out["after_create"]["refs"] == 1
    assert out["after_create"]["ipcache"] == {"10.200.0.1/32": out["created"]["identity"]}
    assert out["after_create"]["saved"] == ["1.json"]
    assert out["failed_restore"] == "the datapath refused"
    assert out["after_failed_restore"] == {"refs": 0, "ipcache": {}, "endpoints": [],
                                           "ip_claimed": 0, "veth_kept": True}
    assert out["restored"] == {"ip": "10.200.0.1", "refs": 1,
                               "ipcache": {"10.200.0.1/32": out["created"]["identity"]}}
    assert out["after_delete"] == nothing


def test_the_script_runs_in_its_own_host_namespace(lab):  # noqa: F811
    """podnet works on the namespace it runs in: the test's veths never touch the root's."""
    host = lab.ns("host")
    inside = lab.exec(host, "readlink", "/proc/self/ns/net").stdout
    outside = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True,
                             text=True).stdout
    assert inside != outside
