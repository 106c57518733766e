"""Network namespaces for tests: per-run names, an underlay bridge, always cleaned up.

Nothing is linked to the root namespace: traffic stays between namespaces made here.
"""

import os
import secrets
import socket
import subprocess
from pathlib import Path


class NetLab:
    def __init__(self) -> None:
        self.prefix = "ma" + secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._links = 0

    def ns(self, name: str) -> str:
        """Make ``<prefix>-<name>`` with lo up; returns the full name."""
        full = f"{self.prefix}-{name}"
        subprocess.run(["ip", "netns", "add", full], check=True)
        self.namespaces.append(full)
        self.exec(full, "ip", "link", "set", "lo", "up")
        return full

    def exec(self, ns: str, *cmd: str, check: bool = True, timeout: float = 30,
             **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=check, timeout=timeout,
                              capture_output=True, text=True, **kwargs)

    def spawn(self, ns: str, *cmd: str, log: Path, env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def underlay(self, name: str = "underlay") -> str:
        """A namespace holding a bridge that nodes attach to."""
        full = self.ns(name)
        self.exec(full, "ip", "link", "add", "br0", "type", "bridge")
        self.exec(full, "ip", "link", "set", "br0", "up")
        return full

    def attach(self, ns: str, underlay: str, address: str, ifname: str = "uplink0") -> None:
        """Join ``ns`` to the underlay bridge with ``address`` (CIDR form) on ``ifname``."""
        self._links += 1
        outer = f"{self.prefix[:8]}u{self._links}"
        subprocess.run(["ip", "link", "add", outer, "netns", underlay, "type", "veth", "peer",
                        "name", ifname, "netns", ns], check=True)
        self.exec(underlay, "ip", "link", "set", outer, "master", "br0", "up")
        self.exec(ns, "ip", "addr", "add", address, "dev", ifname)
        self.exec(ns, "ip", "link", "set", ifname, "up")

    def bridge_address(self, underlay: str, address: str) -> None:
        self.exec(underlay, "ip", "addr", "add", address, "dev", "br0")

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()


def can_run() -> bool:
    return os.geteuid() == 0 and Path("/var/run/netns").parent.exists()


def listening_socket(netns: str | None, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A non-blocking listening TCP socket, made inside ``netns`` when given: a server in the
    test process can then answer agents that run in that namespace (the socket stays there).
    Blocking (setns on the calling thread): call it through ``asyncio.to_thread``."""
    from meshagent.endpoint import podnet

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock
    if netns is None:
        return make()
    with podnet.in_netns(podnet.netns_path(netns)):
        return make()


async def serve(runner, netns: str | None = None, host: str = "127.0.0.1", port: int = 0) -> str:
    """Have an aiohttp ``runner`` answer on ``host:port`` (a free port by default), inside
    ``netns`` if given; returns its ``http://`` URL. Stand-ins call it once per address."""
    import asyncio

    from aiohttp import web
    sock = await asyncio.to_thread(listening_socket, netns, host, port)
    await web.SockSite(runner, sock).start()
    return f"http://{host}:{sock.getsockname()[1]}"
