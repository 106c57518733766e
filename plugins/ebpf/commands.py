"""``meshagent bpf ...``: the pinned maps, read directly (``meshagent monitor`` is the core's).

The ``bpf`` commands open the pinned maps directly, so they work while the agent is down.
"""

import argparse
import os
import time
from pathlib import Path

from meshagent.plugin import Command, host_port, print_rows
from meshagent.plugins.ebpf.maps import (
    CT_NAT_DST,
    CT_NAT_SRC,
    CT_REPLY,
    DIR_INGRESS,
    POLICY_PREFIX_STATIC,
    PROTOCOL_NAMES,
    REASONS,
    VERDICT_NAMES,
    PinnedMap,
    ip_text,
    read_metrics,
)
from meshagent.plugins.ebpf.policymap import Block


def _bpf_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bpf-root", type=Path,
                        default=Path(os.environ.get("MESHAGENT_EBPF_BPF_ROOT", "/sys/fs/bpf")),
                        help="bpffs the agent pins under [env MESHAGENT_EBPF_BPF_ROOT]")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")


def _pinned(args, name: str) -> PinnedMap:
    return PinnedMap(args.bpf_root / "meshagent", name)


def _bpf_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    ipc = sub.add_parser("ipcache", help="IP prefix -> identity (LPM)")
    ipc.add_argument("action", choices=("list",))
    pol = sub.add_parser("policy", help="one endpoint's policy entries (port prefixes)")
    pol.add_argument("action", choices=("get",))
    pol.add_argument("endpoint", type=int)
    ctp = sub.add_parser("ct", help="tracked connections")
    ctp.add_argument("action", choices=("list",))
    sub.add_parser("metrics", help="packets and bytes per verdict reason")
    for p in sub.choices.values():
        _bpf_root(p)


def _bpf(args: argparse.Namespace) -> int:
    if args.what == "ipcache":
        rows = [(f"{ip_text(k.ip)}/{k.prefixlen}", v.identity)
                for name in ("ipcache", "ipcache6")
                for k, v in sorted(_pinned(args, name).items(),
                                   key=lambda kv: (bytes(kv[0].ip), kv[0].prefixlen))]
        return print_rows(args.output, ("PREFIX", "IDENTITY"), [(p, str(i)) for p, i in rows],
                          [{"prefix": p, "identity": i} for p, i in rows])
    if args.what == "policy":
        rows = []
        for k, v in _pinned(args, "policy").items():
            if k.endpoint_id != args.endpoint:
                continue
            block = Block(k.prefixlen - POLICY_PREFIX_STATIC, k.protocol, k.port)
            ports = "any" if block.bits <= 8 else (
                block.first_port if block.first_port == block.last_port
                else f"{block.first_port}-{block.last_port}")
            rows.append({"direction": "ingress" if k.direction == DIR_INGRESS else "egress",
                         "identity": k.identity or "any",
                         "protocol": PROTOCOL_NAMES.get(k.protocol, k.protocol)
                         if block.bits else "any",
                         "port": ports,
                         "verdict": VERDICT_NAMES.get(v.verdict, str(v.verdict))})
        rows.sort(key=lambda r: (r["direction"], str(r["identity"]), str(r["port"])))
        columns = ("direction", "identity", "protocol", "port", "verdict")
        return print_rows(args.output, ("DIRECTION", "IDENTITY", "PROTO", "PORT", "VERDICT"),
                          [tuple(str(r[c]) for c in columns) for r in rows], rows)
    if args.what == "ct":
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        rows = []
        for name in ("ct_tcp", "ct_any", "ct6_tcp", "ct6_any"):
            for k, v in _pinned(args, name).items():
                nat = ""
                if v.flags & CT_NAT_DST:
                    nat = f"to {ip_text(v.nat_ip)}:{v.nat_port}"
                elif v.flags & CT_NAT_SRC:
                    nat = f"from {ip_text(v.nat_ip)}:{v.nat_port}"
                rows.append({"endpoint": k.endpoint_id,
                             "direction": "ingress" if k.direction == DIR_INGRESS else "egress",
                             "protocol": PROTOCOL_NAMES.get(k.protocol, k.protocol),
                             "source": host_port(ip_text(k.saddr), k.sport),
                             "destination": host_port(ip_text(k.daddr), k.dport),
                             "kind": "reply" if v.flags & CT_REPLY else "forward",
                             "nat": nat,
                             "idle_seconds": round((now - v.last_seen_ns) / 1e9, 1)})
        columns = ("endpoint", "direction", "protocol", "source", "destination", "kind", "nat",
                   "idle_seconds")
        return print_rows(args.output, ("ENDPOINT", "DIR", "PROTO", "SOURCE", "DESTINATION",
                                        "KIND", "NAT", "IDLE"),
                          [tuple(str(r[c]) for c in columns) for r in rows], rows)
    metrics = read_metrics(_pinned(args, "metrics"))
    rows = [{"reason": REASONS.get(r, str(r)), "packets": p, "bytes": b}
            for r, (p, b) in sorted(metrics.items()) if r in REASONS]
    return print_rows(args.output, ("REASON", "PACKETS", "BYTES"),
                      [(r["reason"], str(r["packets"]), str(r["bytes"])) for r in rows], rows)


COMMANDS = (
    Command("bpf", "read the pinned BPF maps directly (works while the agent is down)",
            _bpf_args, _bpf),
)
