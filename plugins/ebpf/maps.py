"""Userspace views of the pinned BPF maps: C structs as ctypes, map access by pinned path.

Access goes through libbcc's thin syscall wrappers on a pinned path, without compiling
anything, so ``meshagent bpf ...`` reads the maps while the agent is down.
"""

import ctypes as ct
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

from meshagent.errors import MeshagentError

u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64
IPv4Bytes = u8 * 4

DIR_INGRESS, DIR_EGRESS = 0, 1
VERDICT_ALLOW, VERDICT_DENY = 1, 2
REASONS = {0: "forwarded", 1: "policy denied (deny rule)", 2: "policy denied (by default)"}
PROTOCOL_NAMES = {0: "any", 1: "icmp", 6: "tcp", 17: "udp", 132: "sctp"}
MAP_NAMES = ("endpoints", "ipcache", "policy", "ct_tcp", "ct_any", "metrics", "lb_services",
             "lb_backends")


class EndpointInfo(ct.Structure):
    _fields_ = [("endpoint_id", u32), ("identity", u32), ("ipv4", IPv4Bytes), ("flags", u32)]


class IPCacheKey(ct.Structure):
    _fields_ = [("prefixlen", u32), ("ip", IPv4Bytes)]


class IPCacheValue(ct.Structure):
    _fields_ = [("identity", u32), ("flags", u32)]


class PolicyKey(ct.Structure):
    _fields_ = [("endpoint_id", u32), ("identity", u32), ("port", u16), ("protocol", u8),
                ("direction", u8)]


class PolicyValue(ct.Structure):
    _fields_ = [("verdict", u8), ("pad", u8 * 3)]


class CTKey(ct.Structure):
    _fields_ = [("saddr", IPv4Bytes), ("daddr", IPv4Bytes), ("sport", u16), ("dport", u16),
                ("protocol", u8), ("direction", u8), ("pad", u16), ("endpoint_id", u32)]


class CTValue(ct.Structure):
    _fields_ = [("last_seen_ns", u64), ("packets", u64)]


class MetricsValue(ct.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


class DropEvent(ct.Structure):
    _fields_ = [("time_ns", u64), ("reason", u32), ("endpoint_id", u32), ("saddr", IPv4Bytes),
                ("daddr", IPv4Bytes), ("sport", u16), ("dport", u16), ("protocol", u8),
                ("tcp_flags", u8), ("direction", u8), ("pad", u8), ("src_identity", u32),
                ("dst_identity", u32)]


class LBServiceKey(ct.Structure):
    _fields_ = [("vip", IPv4Bytes), ("port", u16), ("protocol", u8), ("pad", u8)]


class LBService(ct.Structure):
    _fields_ = [("service_id", u32), ("count", u32)]


class LBBackendKey(ct.Structure):
    _fields_ = [("service_id", u32), ("slot", u32)]


class LBBackend(ct.Structure):
    _fields_ = [("ip", IPv4Bytes), ("port", u16), ("pad", u16)]


TYPES = {
    "endpoints": (u32, EndpointInfo),
    "ipcache": (IPCacheKey, IPCacheValue),
    "policy": (PolicyKey, PolicyValue),
    "ct_tcp": (CTKey, CTValue),
    "ct_any": (CTKey, CTValue),
    "metrics": (u32, MetricsValue),
    "lb_services": (LBServiceKey, LBService),
    "lb_backends": (LBBackendKey, LBBackend),
}


def ip_bytes(address: ipaddress.IPv4Address | str) -> IPv4Bytes:
    return IPv4Bytes(*ipaddress.IPv4Address(address).packed)


def ip_text(raw: IPv4Bytes) -> str:
    return str(ipaddress.IPv4Address(bytes(raw)))


def _lib():
    from bcc.libbcc import lib  # Debian's python3-bpfcc
    return lib


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus
    return len(get_possible_cpus())


class PinnedMap:
    """One pinned map, opened by path, with typed get/put/delete/items."""

    def __init__(self, pin_dir: Path, name: str):
        self.name = name
        self.path = Path(pin_dir) / name
        self.key_type, self.value_type = TYPES[name]
        self.percpu = name == "metrics"
        lib = _lib()
        self._lib = lib
        self.fd = lib.bpf_obj_get(str(self.path).encode())
        if self.fd < 0:
            raise MeshagentError(f"cannot open pinned map {self.path}: "
                                 f"{os.strerror(ct.get_errno() or 2)} (is the ebpf datapath"
                                 " running, and --bpf-root right?)")
        self._ncpus = possible_cpus() if self.percpu else 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _value_buffer(self):
        return (self.value_type * self._ncpus)() if self.percpu else self.value_type()

    def get(self, key):
        value = self._value_buffer()
        if self._lib.bpf_lookup_elem(self.fd, ct.byref(key), ct.byref(value)) != 0:
            return None
        return value

    def put(self, key, value) -> None:
        if self._lib.bpf_update_elem(self.fd, ct.byref(key), ct.byref(value), 0) != 0:
            errno = ct.get_errno()
            raise MeshagentError(f"updating BPF map {self.name} failed: {os.strerror(errno)}"
                                 + (" (the map is full)" if errno == 7 else ""))

    def delete(self, key) -> bool:
        return self._lib.bpf_delete_elem(self.fd, ct.byref(key)) == 0

    def keys(self) -> Iterator:
        key, next_key = self.key_type(), self.key_type()
        first = True
        while True:
            result = self._lib.bpf_get_first_key(self.fd, ct.byref(next_key), ct.sizeof(
                self.key_type)) if first else self._lib.bpf_get_next_key(
                self.fd, ct.byref(key), ct.byref(next_key))
            if result != 0:
                return
            first = False
            yield self.key_type.from_buffer_copy(next_key)
            ct.memmove(ct.byref(key), ct.byref(next_key), ct.sizeof(self.key_type))

    def items(self) -> Iterator[tuple]:
        for key in list(self.keys()):
            value = self.get(key)
            if value is not None:
                yield key, value

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())


def open_maps(pin_dir: Path) -> dict[str, PinnedMap]:
    return {name: PinnedMap(pin_dir, name) for name in MAP_NAMES}
