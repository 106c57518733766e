"""Wiring a pod's network namespace to this node (netlink via pyroute2).

The pod gets ``eth0`` with its address as /32, a link route to 169.254.1.1 and a default route
through it; the node answers for 169.254.1.1 by proxy ARP on the pod's host-side veth, routes the
pod's /32 to that veth, and forwards. A dual-stack pod also gets its IPv6 address as /128 and a
default route via ``fe80::1``, the link-local address every host-side veth carries; the node
routes the pod's /128 to the veth and forwards IPv6. An IPv4-only pod has IPv6 turned off on
both ends. The agent runs in the node's network namespace: all host-side changes happen there.
These functions block (netlink), so callers run them in a thread. Each imports pyroute2 where it
uses it: the import costs some 0.1 s of CPU, which an agent starting without pods need not pay
before it is ready.

Inside a pod's namespace we work with ``setns`` on the calling thread, not with pyroute2's
``NetNS``: that one forks a helper, and a forked child shares asyncio's signal wake-up socket,
so a signal meant for the helper would stop the agent.
"""

import contextlib
import ctypes
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from socket import AF_INET6

from meshagent.errors import MeshagentError

GATEWAY = "169.254.1.1"
GATEWAY6 = "fe80::1"
RT_SCOPE_LINK = 253
IFA_F_NODAD = 0x02  # no duplicate address detection: the address works at once
NETNS_DIR = Path("/var/run/netns")


class PodNetworkError(MeshagentError):
    """The pod's network could not be set up (missing netns, interface clash, netlink error)."""


def netns_path(netns: str) -> Path:
    """A netns given by name (``ip netns``) or by path (``/proc/<pid>/ns/net``), checked."""
    path = Path(netns) if netns.startswith("/") else NETNS_DIR / netns
    if not path.exists():
        raise PodNetworkError(f"network namespace {netns!r} does not exist ({path})")
    return path


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def in_netns(path: Path) -> Iterator[None]:
    """Run the block with this thread in ``path``'s network namespace, then return."""
    with open("/proc/thread-self/ns/net") as own, open(path) as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(own.fileno())


def prepare_node() -> None:
    """Once per agent: the gateway address on lo, and forwarding on (IPv6 too, where the
    kernel has it)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        try:
            ipr.addr("add", index=lo, address=GATEWAY, prefixlen=32)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST
                raise
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    with contextlib.suppress(FileNotFoundError):
        Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1")


def create_pod_interface(netns: str, pod_ifname: str, host_ifname: str,
                         address: ipaddress.IPv4Address,
                         address6: ipaddress.IPv6Address | None = None) -> dict:
    """Make the veth pair and configure both ends (IPv6 too when ``address6`` is given); undo
    what was done if any step fails."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    path = str(netns_path(netns))
    peer_tmp = "tmp" + host_ifname[3:]
    try:
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=host_ifname):
                raise PodNetworkError(f"interface {host_ifname} already exists on the node")
            ipr.link("add", ifname=host_ifname, kind="veth",
                     peer={"ifname": peer_tmp, "net_ns_fd": path})
            host_index = ipr.link_lookup(ifname=host_ifname)[0]
            host_mac = ipr.get_links(host_index)[0].get_attr("IFLA_ADDRESS")
            Path(f"/proc/sys/net/ipv4/conf/{host_ifname}/proxy_arp").write_text("1")
            if address6 is None:
                _without_ipv6(host_ifname)
            else:
                ipr.addr("add", index=host_index, address=GATEWAY6, prefixlen=64,
                         flags=IFA_F_NODAD)
            ipr.link("set", index=host_index, state="up")
            ipr.route("replace", dst=f"{address}/32", oif=host_index, scope=RT_SCOPE_LINK)
            if address6 is not None:
                ipr.route("replace", dst=f"{address6}/128", oif=host_index, family=AF_INET6)
        with in_netns(path), IPRoute() as ns:
            if ns.link_lookup(ifname=pod_ifname):
                raise PodNetworkError(f"interface {pod_ifname} already exists in {netns}")
            index = ns.link_lookup(ifname=peer_tmp)[0]
            ns.link("set", index=index, ifname=pod_ifname)
            if address6 is None:
                _without_ipv6(pod_ifname)
            ns.addr("add", index=index, address=str(address), prefixlen=32)
            if address6 is not None:
                ns.addr("add", index=index, address=str(address6), prefixlen=128,
                        flags=IFA_F_NODAD)
            ns.link("set", index=index, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.route("add", dst=f"{GATEWAY}/32", oif=index, scope=RT_SCOPE_LINK)
            ns.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=index)
            if address6 is not None:
                ns.route("add", dst="::/0", gateway=GATEWAY6, oif=index, family=AF_INET6)
            pod_mac = ns.get_links(index)[0].get_attr("IFLA_ADDRESS")
    except BaseException as exc:
        remove_pod_interface(host_ifname)
        if isinstance(exc, NetlinkError):
            raise PodNetworkError(f"setting up {host_ifname} for {netns}: {exc}") from None
        raise
    return {"host_ifindex": host_index, "host_mac": host_mac, "pod_mac": pod_mac}


def _without_ipv6(ifname: str) -> None:
    """An IPv4-only pod: no link-local address, router solicitation or MLD report on either
    end (the datapath drops every frame it cannot judge, and they would be noise)."""
    with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")


def remove_pod_interface(host_ifname: str) -> bool:
    """Delete the host-side veth (its peer goes with it, and so does the /32 route)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=host_ifname)
        if found:
            ipr.link("del", index=found[0])
        return bool(found)


def host_interface(host_ifname: str) -> int | None:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=host_ifname)
        return found[0] if found else None


def pod_interface_present(netns: str, pod_ifname: str) -> bool:
    from pyroute2 import IPRoute
    try:
        with in_netns(netns_path(netns)), IPRoute() as ns:
            return bool(ns.link_lookup(ifname=pod_ifname))
    except (PodNetworkError, OSError):
        return False


def replace_route(cidr: str, via: str) -> None:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.route("replace", dst=cidr, gateway=via)


def delete_route(cidr: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    with IPRoute() as ipr:
        try:
            ipr.route("del", dst=cidr)
        except NetlinkError as exc:
            if exc.code != 3:  # ESRCH: already gone
                raise


