"""Reading the table's named counters straight from the kernel (one netlink dump).

libnftables lists an object only after fetching its whole table cache — every set element,
65,536 of them in each port conversion map — which takes most of a second; the counters
themselves are one ``NFT_MSG_GETOBJ`` dump away.
"""

import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETOBJ = 19
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFTA_COUNTER_PACKETS = 2
NFT_OBJECT_COUNTER = 1
FAMILIES = {"netdev": 5, "inet": 1}


def _attr(kind: int, data: bytes) -> bytes:
    raw = struct.pack("HH", 4 + len(data), kind) + data
    return raw + bytes(-len(raw) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out, offset = {}, 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def read_counters(family: str, table: str) -> dict[str, int]:
    """``{counter name: packets}`` of one table's named counters."""
    body = struct.pack("BBH", FAMILIES[family], 0, 0) + \
        _attr(NFTA_OBJ_TABLE, table.encode() + b"\0") + \
        _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
    header = struct.pack("IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ,
                         NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    out: dict[str, int] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.send(header + body)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("IHHII", data, offset)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("i", data, offset + 16)[0]
                    if code:
                        raise OSError(-code, f"reading nftables counters: errno {-code}")
                    return out
                attrs = _attrs(data[offset + 20:offset + length])
                name = attrs.get(NFTA_OBJ_NAME, b"").rstrip(b"\0").decode()
                counter = _attrs(attrs.get(NFTA_OBJ_DATA, b""))
                if name and NFTA_COUNTER_PACKETS in counter:
                    out[name] = struct.unpack("!Q", counter[NFTA_COUNTER_PACKETS])[0]
                offset += (length + 3) & ~3
