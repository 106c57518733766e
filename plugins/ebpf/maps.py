"""Userspace views of the pinned BPF maps: C structs as ctypes, map access by pinned path.

Access goes through bcc's thin syscall wrappers (libbcc_bpf) on a pinned path, without compiling
anything, so ``meshagent bpf ...`` reads the maps while the agent is down.
"""

import ctypes as ct
import errno
import functools
import ipaddress
import os
import time
from collections.abc import Iterator
from pathlib import Path

from meshagent.plugin import MeshagentError, PROTOCOL_NAMES as DROP_PROTOCOL_NAMES, REASON_TEXT

u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64
be16 = ct.c_uint16.__ctype_be__
IPv4Bytes = u8 * 4
IPv6Bytes = u8 * 16

DIR_INGRESS, DIR_EGRESS = 0, 1
VERDICT_ALLOW, VERDICT_DENY, VERDICT_REDIRECT = 1, 2, 3
VERDICT_NUMBERS = {"allow": VERDICT_ALLOW, "deny": VERDICT_DENY, "redirect": VERDICT_REDIRECT}
VERDICT_NAMES = {number: name for name, number in VERDICT_NUMBERS.items()}
REASON_FORWARDED, REASON_POLICY_DENY, REASON_POLICY_DEFAULT = 0, 1, 2
REASON_SPOOFED, REASON_FRAG_TINY, REASON_FRAG_UNKNOWN, REASON_MALFORMED = 3, 4, 5, 6
REASON_UNSUPPORTED_L3 = 7
REASON_REDIRECTED, REASON_PROXY_LOOKUP, REASON_PROXY_ASSIGN, REASON_PROXY_UNSUPPORTED = 8, 9, 10, 11
#: what the programs mark a packet for the proxy with (bpf/lib/common.h), under this mask
MARK_MAGIC_TO_PROXY, MARK_MAGIC_MASK = 0x0200, 0x0F00
REASONS = {  # the programs' reason numbers, named as every datapath names them
    REASON_FORWARDED: REASON_TEXT["forwarded"],
    REASON_POLICY_DENY: REASON_TEXT["policy_deny"],
    REASON_POLICY_DEFAULT: REASON_TEXT["policy_default"],
    REASON_SPOOFED: REASON_TEXT["spoofed"],
    REASON_FRAG_TINY: REASON_TEXT["frag_tiny"],
    REASON_FRAG_UNKNOWN: REASON_TEXT["frag_unknown"],
    REASON_MALFORMED: REASON_TEXT["malformed"],
    REASON_UNSUPPORTED_L3: REASON_TEXT["unsupported_l3"],
    REASON_REDIRECTED: REASON_TEXT["redirected"],
    REASON_PROXY_LOOKUP: REASON_TEXT["proxy_lookup"],
    REASON_PROXY_ASSIGN: REASON_TEXT["proxy_assign"],
    REASON_PROXY_UNSUPPORTED: REASON_TEXT["proxy_unsupported"],
}
#: the programs' reason numbers as flow events name them (keys of REASON_TEXT)
REASON_KEYS = {number: key for key, text in REASON_TEXT.items() for number, named
               in REASONS.items() if named == text}
PROTOCOL_NAMES = {0: "any", **DROP_PROTOCOL_NAMES}  # policy keys name protocol 0 "any"
POLICY_PREFIX_STATIC = 72  # endpoint_id, identity, direction: always matched whole
CT_REPLY, CT_NAT_DST, CT_NAT_SRC, CT_PROXY = 1, 2, 4, 8
CT_SEEN = 0x80  # ct_value.seen: a packet of this direction was reported
MAP_NAMES = ("endpoints", "local_ips", "ipcache", "ipcache6", "policy", "ct_tcp", "ct_any",
             "ct6_tcp", "ct6_any", "ipfrag", "ipfrag6", "metrics", "lb_services", "lb_backends",
             "generation", "proxy_port")


ENDPOINT_LOCAL_DELIVERY = 1
ENDPOINT_HAS_IPV6 = 2
ENDPOINT_POLICY_AUDIT = 4
#: flow_event's kind and verdict numbers (Cilium's monitor types, Hubble's verdicts)
FLOW_DROP, FLOW_TRACE, FLOW_POLICY_VERDICT = 1, 4, 5
FLOW_FORWARDED, FLOW_DROPPED, FLOW_AUDIT, FLOW_REDIRECTED = 1, 2, 4, 5
MAC = u8 * 6


class EndpointInfo(ct.Structure):
    _fields_ = [("endpoint_id", u32), ("identity", u32), ("ipv4", IPv4Bytes),
                ("generation", u32), ("ifindex", u32), ("pod_mac", MAC), ("host_mac", MAC),
                ("flags", u32), ("born", u32), ("ipv6", IPv6Bytes)]


class IPCacheKey(ct.Structure):
    _fields_ = [("prefixlen", u32), ("ip", IPv4Bytes)]


class IPCache6Key(ct.Structure):
    _fields_ = [("prefixlen", u32), ("ip", IPv6Bytes)]


class IPCacheValue(ct.Structure):
    _fields_ = [("identity", u32), ("flags", u32)]


class PolicyKey(ct.Structure):
    """LPM key: prefixlen counts bits from endpoint_id on (see bpf/lib/common.h)."""

    _fields_ = [("prefixlen", u32), ("endpoint_id", u32), ("identity", u32), ("direction", u8),
                ("protocol", u8), ("port", be16)]


class PolicyValue(ct.Structure):
    _fields_ = [("verdict", u8), ("prefix", u8), ("pad", u8 * 2)]


class CTKey(ct.Structure):
    _fields_ = [("saddr", IPv4Bytes), ("daddr", IPv4Bytes), ("sport", u16), ("dport", u16),
                ("protocol", u8), ("direction", u8), ("pad", u16), ("endpoint_id", u32)]


class CT6Key(ct.Structure):
    _fields_ = [("saddr", IPv6Bytes), ("daddr", IPv6Bytes), ("sport", u16), ("dport", u16),
                ("protocol", u8), ("direction", u8), ("pad", u16), ("endpoint_id", u32)]


class CTValue(ct.Structure):
    _fields_ = [("last_seen_ns", u64), ("generation", u32), ("nat_ip", IPv4Bytes),
                ("nat_port", u16), ("flags", u8), ("seen", u8), ("closing", u8),
                ("pad", u8 * 3)]


class IPFragKey(ct.Structure):
    _fields_ = [("saddr", IPv4Bytes), ("daddr", IPv4Bytes), ("id", be16), ("protocol", u8),
                ("pad", u8)]


class IPFrag6Key(ct.Structure):
    _fields_ = [("saddr", IPv6Bytes), ("daddr", IPv6Bytes), ("id", u8 * 4), ("protocol", u8),
                ("pad", u8 * 3)]


class IPFragPorts(ct.Structure):
    _fields_ = [("sport", u16), ("dport", u16)]


class MetricsValue(ct.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


class FlowEventRecord(ct.Structure):
    """``struct flow_event``: one reported packet, as the programs submit it."""

    _fields_ = [("time_ns", u64), ("reason", u32), ("endpoint_id", u32), ("saddr", IPv4Bytes),
                ("daddr", IPv4Bytes), ("sport", u16), ("dport", u16), ("protocol", u8),
                ("tcp_flags", u8), ("direction", u8), ("family", u8), ("src_identity", u32),
                ("dst_identity", u32), ("saddr6", IPv6Bytes), ("daddr6", IPv6Bytes),
                ("kind", u8), ("verdict", u8), ("is_reply", u8), ("match", u8), ("pad", u32)]


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
    "local_ips": (IPv4Bytes, u32),
    "ipcache": (IPCacheKey, IPCacheValue),
    "ipcache6": (IPCache6Key, IPCacheValue),
    "policy": (PolicyKey, PolicyValue),
    "ct_tcp": (CTKey, CTValue),
    "ct_any": (CTKey, CTValue),
    "ct6_tcp": (CT6Key, CTValue),
    "ct6_any": (CT6Key, CTValue),
    "ipfrag": (IPFragKey, IPFragPorts),
    "ipfrag6": (IPFrag6Key, IPFragPorts),
    "metrics": (u32, MetricsValue),
    "lb_services": (LBServiceKey, LBService),
    "lb_backends": (LBBackendKey, LBBackend),
    "generation": (u32, u32),
    "proxy_port": (u32, u32),
}


#: Every struct shared with the programs, by its C name in bpf/lib/common.h (checked against
#: what the compiler lays out by tests/test_datapath_layout.py).
C_STRUCTS = {
    "endpoint_info": EndpointInfo, "ipcache_key": IPCacheKey, "ipcache6_key": IPCache6Key,
    "ipcache_value": IPCacheValue, "policy_key": PolicyKey, "policy_value": PolicyValue,
    "ct_key": CTKey, "ct6_key": CT6Key, "ct_value": CTValue, "ipfrag_key": IPFragKey,
    "ipfrag6_key": IPFrag6Key, "ipfrag_ports": IPFragPorts, "metrics_value": MetricsValue,
    "flow_event": FlowEventRecord, "lb_service_key": LBServiceKey, "lb_service": LBService,
    "lb_backend_key": LBBackendKey, "lb_backend": LBBackend,
}

#: name -> (BPF map type, the C define sizing it, its default, map flags): what a pinned map
#: must be for the programs of this version to use it.
MAP_HASH, MAP_ARRAY, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_LPM_TRIE = 1, 2, 6, 9, 11
NO_PREALLOC = 1
MAP_SPECS = {
    "endpoints": (MAP_HASH, "ENDPOINTS_MAX", 4096, 0),
    "local_ips": (MAP_HASH, "ENDPOINTS_MAX", 4096, 0),
    "ipcache": (MAP_LPM_TRIE, "IPCACHE_MAX", 512000, NO_PREALLOC),
    "ipcache6": (MAP_LPM_TRIE, "IPCACHE_MAX", 512000, NO_PREALLOC),
    "policy": (MAP_LPM_TRIE, "POLICY_MAX", 262144, NO_PREALLOC),
    "ct_tcp": (MAP_LRU_HASH, "CT_TCP_MAX", 524288, 0),
    "ct_any": (MAP_LRU_HASH, "CT_ANY_MAX", 262144, 0),
    "ct6_tcp": (MAP_LRU_HASH, "CT6_TCP_MAX", 131072, 0),
    "ct6_any": (MAP_LRU_HASH, "CT6_ANY_MAX", 65536, 0),
    "ipfrag": (MAP_LRU_HASH, "IPFRAG_MAX", 8192, 0),
    "ipfrag6": (MAP_LRU_HASH, "IPFRAG_MAX", 8192, 0),
    "metrics": (MAP_PERCPU_ARRAY, "REASON_MAX", 12, 0),
    "lb_services": (MAP_HASH, "LB_SERVICES_MAX", 65536, 0),
    "lb_backends": (MAP_HASH, "LB_BACKENDS_MAX", 65536, 0),
    "generation": (MAP_ARRAY, "", 1, 0),
    "proxy_port": (MAP_ARRAY, "", 1, 0),
}


class MapInfo(ct.Structure):
    """The head of the kernel's struct bpf_map_info."""

    _fields_ = [("type", u32), ("id", u32), ("key_size", u32), ("value_size", u32),
                ("max_entries", u32), ("map_flags", u32)]


Layout = tuple[int, int, int, int, int]  # type, key size, value size, max entries, flags


def expected_layout(name: str, defines: dict) -> Layout:
    """The layout of map ``name`` for the programs compiled with ``defines``."""
    map_type, define, default, flags = MAP_SPECS[name]
    key_type, value_type = TYPES[name]
    return (map_type, ct.sizeof(key_type), ct.sizeof(value_type),
            int(defines.get(define, default)), flags)


def pinned_layout(path: Path) -> Layout | None:
    """The layout of the map pinned at ``path``, or None when there is none."""
    lib = bpf_lib()
    fd = lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        return None
    try:
        info = MapInfo()
        size = ct.c_uint32(ct.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
            return None
        return (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)
    finally:
        os.close(fd)


def ip_bytes(address: ipaddress.IPv4Address | str) -> IPv4Bytes:
    return IPv4Bytes(*ipaddress.IPv4Address(address).packed)


def ip6_bytes(address: ipaddress.IPv6Address | str | None) -> IPv6Bytes:
    """An IPv6 address as the struct field (all zero for none)."""
    return IPv6Bytes(*ipaddress.IPv6Address(address).packed) if address else IPv6Bytes()


def mac_bytes(text: str) -> "MAC":
    """``aa:bb:cc:dd:ee:ff`` as the struct field (all zero when unknown)."""
    return MAC(*bytes.fromhex(text.replace(":", ""))) if text else MAC()


def boot_offset_ns() -> int:
    """What turns the programs' clock (``bpf_ktime_get_ns``: CLOCK_MONOTONIC) into the wall
    clock; read each time, so a clock step is followed."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def ip_text(raw: IPv4Bytes | IPv6Bytes) -> str:
    return str(ipaddress.ip_address(bytes(raw)))


_SIGNATURES = {  # name: (result, arguments), as libbcc's Python binding declares them
    "bpf_obj_get": (ct.c_int, [ct.c_char_p]),
    "bpf_obj_pin": (ct.c_int, [ct.c_int, ct.c_char_p]),
    "bpf_obj_get_info_by_fd": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
    "bpf_lookup_elem": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
    "bpf_update_elem": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_ulonglong]),
    "bpf_delete_elem": (ct.c_int, [ct.c_int, ct.c_void_p]),
    "bpf_get_first_key": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_uint]),
    "bpf_get_next_key": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
    # BPF_MAP_UPDATE_BATCH (kernel >= 5.6): fd, keys, values, in: how many, out: how many done
    "bpf_update_batch": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32)]),
}
#: errno values of a kernel (or map type) without BPF_MAP_UPDATE_BATCH: EINVAL (an unknown
#: command), EOPNOTSUPP and the kernel's ENOTSUPP (524, a map type without batch ops)
_NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, 524)
#: elements per BPF_MAP_UPDATE_BATCH: bounds the key and value buffers built for one call
BATCH_SIZE = 65536


@functools.cache
def bpf_lib():
    """bcc's syscall wrappers without its compiler: libbcc_bpf (libbpf under it), not libbcc,
    whose LLVM and clang cost the agent some 55 MiB of resident pages. Only the short-lived
    compile child loads libbcc (Debian's python3-bpfcc)."""
    try:
        lib = ct.CDLL("libbcc_bpf.so.0", use_errno=True)
    except OSError:
        raise MeshagentError("libbcc_bpf.so.0 is not installed: apt-get install"
                             " libbpfcc") from None
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


@functools.cache  # fixed at boot
def possible_cpus() -> int:
    """As the kernel sizes per-CPU maps: /sys/devices/system/cpu/possible, e.g. ``0-3``."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


class PinnedMap:
    """One pinned map, opened by path, with typed get/put/delete/items (its types are this
    version's unless given: an earlier version's map can be read too)."""

    def __init__(self, pin_dir: Path, name: str, types: tuple[type, type] | None = None):
        self.name = name
        self.path = Path(pin_dir) / name
        self.key_type, self.value_type = types or TYPES[name]
        self.percpu = name == "metrics"
        lib = bpf_lib()
        self._lib = lib
        self.fd = lib.bpf_obj_get(str(self.path).encode())
        if self.fd < 0:
            raise MeshagentError(f"cannot open pinned map {self.path}: "
                                 f"{os.strerror(ct.get_errno() or 2)} (is the ebpf datapath"
                                 " running, and --bpf-root right?)")
        self._ncpus = possible_cpus() if self.percpu else 1
        self.batches = not self.percpu  # False: put_many writes one element a syscall

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
            self._failed(ct.get_errno())

    def _failed(self, error: int) -> None:
        raise MeshagentError(f"updating BPF map {self.name} failed: {os.strerror(error)}"
                             + (" (the map is full)" if error == errno.E2BIG else ""))

    def put_many(self, keys: list[bytes], values: list[bytes]) -> None:
        """``put`` of every key with its value (each the bytes of the map's key and value
        type), in order, BATCH_SIZE a syscall (BPF_MAP_UPDATE_BATCH) where the kernel and
        the map type take it, else one a syscall: a million ``put`` calls cost seconds."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        key_size, value_size = ct.sizeof(self.key_type), ct.sizeof(self.value_type)
        done = 0
        while done < len(keys) and self.batches:
            chunk_keys = b"".join(keys[done:done + BATCH_SIZE])
            chunk_values = b"".join(values[done:done + BATCH_SIZE])
            count = len(chunk_keys) // key_size
            if count * key_size != len(chunk_keys) or count * value_size != len(chunk_values):
                raise ValueError(f"keys or values of {self.name} of the wrong size")
            updated = ct.c_uint32(count)
            if self._lib.bpf_update_batch(self.fd, chunk_keys, chunk_values,
                                          ct.byref(updated)) != 0:
                error = ct.get_errno()
                if error not in _NO_BATCH:
                    self._failed(error)
                if updated.value == 0:  # refused outright: this kernel or map type has none
                    self.batches = False
                done += min(updated.value, count)
                break  # the rest one by one: an element the kernel refused raises there
            done += count
        for key, value in zip(keys[done:], values[done:]):
            if self._lib.bpf_update_elem(self.fd, key, value, 0) != 0:
                self._failed(ct.get_errno())

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


def read_metrics(table: PinnedMap) -> dict[int, tuple[int, int]]:
    """``{reason: (packets, bytes)}``, summed over CPUs."""
    out = {}
    for key, values in table.items():
        out[key.value] = (sum(v.packets for v in values), sum(v.bytes for v in values))
    return out


def open_maps(pin_dir: Path) -> dict[str, PinnedMap]:
    return {name: PinnedMap(pin_dir, name) for name in MAP_NAMES}
