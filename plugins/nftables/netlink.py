"""What the datapath says to the kernel in netlink itself, not through libnftables.

* Reading the table's named counters: libnftables lists an object only after fetching its
  whole table cache — every set element, 65,536 of them in each port conversion map — which
  takes most of a second; the counters themselves are one ``NFT_MSG_GETOBJ`` dump away.
* The rules that write and read an IPv6 fragment's first-fragment record: the kernel takes
  them, but nft 1.0.6 cannot say them. Its text grammar and its JSON parser both refuse the
  fragment header's ``frag id`` inside a map lookup whose result is assigned, and for a map
  update with a key longer than 16 bytes it loads the value into a register inside the key
  (``--debug=netlink`` shows it), so the record is written under a corrupted key.
* Flow events: the packets the table logs to its NFLOG group (libnftables cannot read them),
  numbered by the kernel so that the ones it could not deliver (a full socket buffer) are
  counted exactly from the gaps.
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
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFT_MSG_NEWRULE = 6
NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x4, 0x400, 0x800
NLA_F_NESTED = 0x8000
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFT_REG_1, NFT_REG32_00 = 1, 8
NFT_META_PRIORITY, NFT_META_MARK, NFT_META_L4PROTO = 2, 3, 16
NFT_PAYLOAD_NETWORK_HEADER = 1
IPPROTO_FRAGMENT = 44
NFT_DYNSET_OP_UPDATE = 1
NFT_DYNSET_OP_DELETE = 2
META_KEYS = {"mark": NFT_META_MARK, "priority": NFT_META_PRIORITY}


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


def _u32(value: int) -> bytes:
    return struct.pack("!I", value)


def _nested(kind: int, data: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, data)


def _expression(name: str, *attrs: tuple[int, bytes]) -> bytes:
    data = b"".join(_attr(kind, value) for kind, value in attrs)
    return _nested(NFTA_LIST_ELEM, _attr(NFTA_EXPR_NAME, name.encode() + b"\0")
                   + _nested(NFTA_EXPR_DATA, data))


def _fragment6_key() -> list[bytes]:
    """``meta l4proto . frag id . @nh,64,256`` (ruleset.FRAG_KEY6) into registers 32_00..32_09."""
    r = NFT_REG32_00
    return [
        _expression("meta", (2, _u32(NFT_META_L4PROTO)), (1, _u32(r))),
        _expression("exthdr", (1, _u32(r + 1)), (2, bytes([IPPROTO_FRAGMENT])),
                    (3, _u32(4)), (4, _u32(4)), (6, _u32(0))),
        _expression("payload", (1, _u32(r + 2)), (2, _u32(NFT_PAYLOAD_NETWORK_HEADER)),
                    (3, _u32(8)), (4, _u32(32))),
    ]


def fragment6_lookup(meta: str, map_name: str) -> list[bytes]:
    """``meta <meta> set <FRAG_KEY6> map @<map_name>``; a packet without a record, or without
    a fragment header, leaves ``meta <meta>`` as it was."""
    return _fragment6_key() + [
        _expression("lookup", (1, map_name.encode() + b"\0"), (2, _u32(NFT_REG32_00)),
                    (3, _u32(NFT_REG_1))),
        _expression("meta", (2, _u32(META_KEYS[meta])), (3, _u32(NFT_REG_1))),
    ]


def fragment6_write(meta: str, map_name: str, op: int) -> list[bytes]:
    """``update`` (or ``delete``) ``@<map_name> { <FRAG_KEY6> : meta <meta> }``, the value in a
    register past the key's ten."""
    value = NFT_REG32_00 + 10
    return _fragment6_key() + [
        _expression("meta", (2, _u32(META_KEYS[meta])), (1, _u32(value))),
        _expression("dynset", (1, map_name.encode() + b"\0"), (3, _u32(op)),
                    (4, _u32(NFT_REG32_00)), (5, _u32(value))),
    ]


def _message(kind: int, flags: int, seq: int, family: int, body: bytes, res_id: int = 0):
    payload = struct.pack("BBH", family, 0, socket.htons(res_id)) + body
    return struct.pack("IHHII", 16 + len(payload), kind, NLM_F_REQUEST | flags, seq, 0) + payload


def add_rules(family: str, table: str, rules: list[tuple[str, list[bytes]]]) -> None:
    """Append ``(chain, expressions)`` rules in one transaction; raises OSError if refused."""
    number = FAMILIES[family]
    messages = [_message(NFNL_MSG_BATCH_BEGIN, 0, 1, 0, b"", NFNL_SUBSYS_NFTABLES)]
    for seq, (chain, expressions) in enumerate(rules, start=2):
        body = _attr(NFTA_RULE_TABLE, table.encode() + b"\0") + \
            _attr(NFTA_RULE_CHAIN, chain.encode() + b"\0") + \
            _nested(NFTA_RULE_EXPRESSIONS, b"".join(expressions))
        messages.append(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
                                 NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND, seq, number, body))
    messages.append(_message(NFNL_MSG_BATCH_END, 0, len(rules) + 2, 0, b"",
                             NFNL_SUBSYS_NFTABLES))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.send(b"".join(messages))
        acked = 0
        while acked < len(rules):
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("IHHII", data, offset)
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("i", data, offset + 16)[0]
                    if code:
                        raise OSError(-code, f"nf_tables refused a rule: errno {-code}")
                    acked += 1
                offset += (length + 3) & ~3


NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH, NFULA_CFG_FLAGS = 1, 2, 5, 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x0001
NFULA_PACKET_HDR, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_SEQ = 1, 9, 10, 12
NF_NETDEV_EGRESS = 1
COPY_RANGE = 128  # enough for the IP and transport headers an event names
# one netlink message per logged packet, sent as it is logged (the default batches up to 100
# for up to a second): an event's time is when it happened, and whoever saw the packet judged
# (a counter moved after its log rule) finds its event queued
QUEUE_THRESHOLD = 1
RECEIVE_BUFFER = 4 << 20  # bytes of messages the kernel may queue for the agent
SO_RCVBUFFORCE = 33  # Linux's; Python's socket module does not name it


def open_nflog(group: int) -> socket.socket:
    """A netlink socket bound to NFLOG ``group``, copying the first bytes of each packet and
    numbering the messages."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        try:  # past net.core.rmem_max (as root): a burst waits here rather than being lost
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((0, 0))
        kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        for attr in (_attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])),
                     _attr(NFULA_CFG_MODE, struct.pack("!IBx", COPY_RANGE, NFULNL_COPY_PACKET)),
                     _attr(NFULA_CFG_QTHRESH, struct.pack("!I", QUEUE_THRESHOLD)),
                     _attr(NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ))):
            sock.send(_message(kind, NLM_F_ACK, 1, socket.AF_UNSPEC, attr, group))
            data = sock.recv(4096)
            if struct.unpack_from("H", data, 4)[0] == NLMSG_ERROR:
                code = struct.unpack_from("i", data, 16)[0]
                if code:
                    raise OSError(-code, f"binding NFLOG group {group}: errno {-code}")
    except BaseException:
        sock.close()
        raise
    return sock


def nflog_packets(data: bytes):
    """``(sequence number or None, prefix, packet from its network header)`` of each logged
    packet in ``data``."""
    offset = 0
    while offset + 20 <= len(data):
        length, kind, _, _, _ = struct.unpack_from("IHHII", data, offset)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            attrs = _attrs(data[offset + 20:offset + length])
            prefix = attrs.get(NFULA_PREFIX, b"").rstrip(b"\0").decode(errors="replace")
            packet = attrs.get(NFULA_PAYLOAD, b"")
            header = attrs.get(NFULA_PACKET_HDR, b"")
            if len(header) >= 3 and header[2] == NF_NETDEV_EGRESS:
                packet = packet[14:]  # the egress hook logs from the Ethernet header
            seq = attrs.get(NFULA_SEQ, b"")
            yield (struct.unpack("!I", seq)[0] if len(seq) == 4 else None), prefix, packet
        offset += (length + 3) & ~3
