"""Carrying tracked connections across a change of the maps' layout (an agent upgrade).

When the programs of a new version need maps of another layout, the compile step starts them
afresh; the programs still attached keep the old maps, and the last agent's state in them,
until the first sync (datapath.py). Connections would then meet empty conntrack maps: the
replies of connections a pod opened would be judged by its ingress policy as if new, and
connections to service frontends would lose their backend. So the old conntrack and service
NAT maps are opened before the compile unpins them, and their connections are written into
the new maps just before the new programs take over: forward halves with generation 0 (judged
again on their next packet, as after any policy change), reply halves as replies.

Layouts known here: v1 — conntrack keys as now with values {last_seen_ns, packets}
(``packets`` 1 for the half that opened the connection, 0 for its reply), keyed after the
service DNAT, and the per-connection service NAT in ``lb_forward_nat``/``lb_reverse_nat``.
"""

import ctypes as ct
import logging
from pathlib import Path

import attrs

from meshagent.plugins.ebpf.maps import (
    CT_NAT_DST,
    CT_NAT_SRC,
    CT_REPLY,
    CT_SEEN,
    DIR_EGRESS,
    DIR_INGRESS,
    CTKey,
    CTValue,
    IPv4Bytes,
    PinnedMap,
    pinned_layout,
    u8,
    u16,
    u64,
)

log = logging.getLogger(__name__)

CT_MAPS = ("ct_tcp", "ct_any")
NAT_MAPS = ("lb_forward_nat", "lb_reverse_nat")


class V1CTValue(ct.Structure):
    _fields_ = [("last_seen_ns", u64), ("packets", u64)]


class V1NATKey(ct.Structure):
    _fields_ = [("client_ip", IPv4Bytes), ("other_ip", IPv4Bytes), ("client_port", u16),
                ("other_port", u16), ("protocol", u8), ("pad", u8 * 3)]


class V1NATValue(ct.Structure):
    _fields_ = [("ip", IPv4Bytes), ("port", u16), ("pad", u16)]


def _is_v1(path: Path) -> bool:
    layout = pinned_layout(path)
    return layout is not None and layout[1:3] == (ct.sizeof(CTKey), ct.sizeof(V1CTValue))


@attrs.define
class PreviousMaps:
    """The conntrack and NAT maps of the last agent, held open across the compile."""

    conntrack: dict[str, PinnedMap]
    nat: dict[str, PinnedMap]

    def close(self) -> None:
        for table in list(self.conntrack.values()) + list(self.nat.values()):
            table.close()


def open_previous(pin_dir: Path) -> PreviousMaps | None:
    """The v1 maps pinned in ``pin_dir``, if that is what is there (call before compiling)."""
    if not all(_is_v1(pin_dir / name) for name in CT_MAPS):
        return None
    conntrack = {name: PinnedMap(pin_dir, name, (CTKey, V1CTValue)) for name in CT_MAPS}
    nat = {name: PinnedMap(pin_dir, name, (V1NATKey, V1NATValue)) for name in NAT_MAPS
           if pinned_layout(pin_dir / name) is not None}
    return PreviousMaps(conntrack, nat)


def _nat(previous: PreviousMaps, name: str, client: IPv4Bytes, other: IPv4Bytes,
         client_port: int, other_port: int, protocol: int) -> V1NATValue | None:
    table = previous.nat.get(name)
    if table is None:
        return None
    return table.get(V1NATKey(client, other, client_port, other_port, protocol))


def carry(previous: PreviousMaps, maps: dict[str, PinnedMap]) -> int:
    """Write the last agent's connections into this version's conntrack maps; how many."""
    carried = 0
    for name in CT_MAPS:
        target = maps[name]
        for key, old in previous.conntrack[name].items():
            key = CTKey.from_buffer_copy(key)
            # established: its first packets were reported by the agent that saw them
            value = CTValue(last_seen_ns=old.last_seen_ns, generation=0, seen=CT_SEEN)
            if old.packets == 0:  # the reply half
                value.flags = CT_REPLY
                frontend = _nat(previous, "lb_reverse_nat", key.daddr, key.saddr, key.dport,
                                key.sport, key.protocol) if key.direction == DIR_INGRESS else None
                if frontend is not None:  # a reply from a backend: back to the frontend
                    value.flags |= CT_NAT_SRC
                    value.nat_ip, value.nat_port = frontend.ip, frontend.port
            elif key.direction == DIR_EGRESS:
                frontend = _nat(previous, "lb_reverse_nat", key.saddr, key.daddr, key.sport,
                                key.dport, key.protocol)
                if frontend is not None:  # now keyed by the frontend, rewritten to the backend
                    value.flags = CT_NAT_DST
                    value.nat_ip, value.nat_port = key.daddr, key.dport
                    key.daddr, key.dport = frontend.ip, frontend.port
            target.put(key, value)
            carried += 1
    return carried
