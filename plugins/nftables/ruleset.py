"""The nftables ruleset of the datapath: one ``netdev`` table, chains per endpoint.

Every endpoint gets two base chains on its host-side veth — ``ingress`` (packets leaving the
pod: its egress policy) and ``egress`` (packets entering it: its ingress policy) — running the
steps of docs/datapath.md: ARP passes, other ethertypes are dropped; a malformed packet is
dropped (nftables' own header validation leaves ``meta l4proto`` unset; a transport header
must be whole); the link's own ICMPv6 passes; the source check; fragments; replies; policy.

nftables has no scratch registers that live across rules, and a map lookup cannot be part of a
concatenation, so two packet fields the agent may overwrite carry values between rules:
``meta mark`` (the source port, then the peer's identity, then one plus the prefix length of
the specific entry that allowed) and ``meta priority`` (the destination port). Ports become those types
through the constant maps ``p2m``/``p2c`` (port -> mark, port -> classid). The peer's identity
comes from an interval map (the ipcache flattened into disjoint ranges); policy is two
lookups, the peer's identity and any identity, in verdict maps whose verdicts jump to small
chains that combine them (deny beats allow; of two allows the peer's unless any identity's
prefix is longer, as Cilium 1.17+) and name the match type (Hubble's numbering). An
allowed packet adds its reverse to the opposite direction's reply set (nftables' conntrack does
not exist at netdev hooks) and its own tuple to the direction's *judged* set ``fsn``: until the
agent flushes that set (a policy, ipcache or audit change of the endpoint) its later packets
pass without a lookup, as a conntrack entry of the current generation does in the eBPF
datapath. A packet that found its connection judged (or its reply seen) adds its raw tuple to
the direction's *established* set ``est``, flushed with ``fsn``: a later packet of it with no
SYN, FIN or RST, not a fragment, passes by one lookup at the top of the base chain (the
packets the full walk would pass without an event). A connection that closes (a FIN both
ways, or an RST) has its elements expire ``CLOSE_TIMEOUT`` seconds later. A later fragment
takes its first fragment's ports from the fragment maps through the shared chains
``fragports``/``fragreply``; the IPv6 ones are written in netlink
(:mod:`meshagent.plugins.nftables.netlink`) because nft 1.0.6 cannot say them.

Flow events go to one NFLOG group with the prefix
``ma:<endpoint>:<in|out>:<event>:<reason>:<match>`` (:data:`EVENTS`): every drop, at most
``log_rate`` a second per endpoint, direction, reason and match type; and (unless the ruleset
logs drops only) the first judged packet of each connection and direction (``verdict``, or
``audit`` when the endpoint is in audit mode and policy would have dropped it), the first
packet of the reply direction (``reply``) and a TCP packet whose SYN, FIN or RST is new for its
connection and direction (``trace``, ``reply``: the sets ``syn``, ``fin``, ``rst`` remember
which it saw), at most ``event_rate`` a second per endpoint and direction. Those over a rate
are counted in the counter ``unlogged``.
"""

import attrs

from meshagent.plugin import match_of, world_identity

FAMILY = "netdev"
LAYOUT = "layout_6"  # an empty chain naming the table's layout: another layout is replaced
REASONS = ("forwarded", "policy_deny", "policy_default", "spoofed", "frag_tiny",
           "frag_unknown", "malformed", "unsupported_l3", "redirected", "proxy_lookup",
           "proxy_unsupported")
DROP_REASONS = tuple(r for r in REASONS[1:] if r != "redirected")  # each has drop chains
DIRS = {"ingress": "in", "egress": "out"}  # the pod's policy direction
#: A log prefix's event: (kind, verdict, is_reply) of meshagent.datapath.events
EVENTS = {"drop": ("drop", "dropped", False), "verdict": ("policy-verdict", "forwarded", False),
          "audit": ("policy-verdict", "audit", False), "trace": ("trace", "forwarded", False),
          "reply": ("trace", "forwarded", True),
          "redirect": ("policy-verdict", "redirected", False)}
#: Hubble's policy match types (meshagent.datapath.events.MATCH_*) as chain names say them
MATCH_NAMES = {1: "l3", 2: "l3l4", 3: "l4", 4: "all", 5: "l3proto", 6: "proto"}
SPECIFIC, ANY = (1, 2, 5), (3, 4, 6)  # the match types of an identity's entries, of any identity's
#: The prefix lengths a policy entry has in Cilium's LPM policy map (0 any protocol, 8 a
#: protocol, 9-24 a port block): which of two allows decides, and so the match type
PREFIXES = (0, 8, *range(9, 25))
PORTLESS_PREFIXES = (0, 8)
UNLOGGED = "unlogged"  # the counter of events over the rate
TCP_FLAGS = ("syn", "fin", "rst")  # the flags a trace reports once per connection and direction
CLOSE_TIMEOUT = 10  # seconds a closing TCP connection's elements live (Cilium's CT_CLOSE_TIMEOUT)
CLOSED = ("rep", "fsn", "rsn", "fin")  # the sets a closing connection leaves early (and est, fins)
FRAG_TIMEOUT = "60s"
FRAG_KEY = "ip saddr . ip daddr . ip id . meta l4proto"
# nft 1.0.6 aborts (assertion ``dreg < ctx->reg_low``) writing a map from a concatenation with
# an element starting past its first 16 bytes; the IPv6 key therefore leads with the short
# fields and loads both addresses as one 32-byte raw payload (saddr . daddr).
FRAG_KEY6 = "meta l4proto . frag id . @nh,64,256"
PORTED = "{ tcp, udp, sctp }"
#: ICMP per family: its protocol, its type expression, and the type every ICMP map is keyed by.
#: A message whose type the packet shows is judged and tracked as a ported one, its "ports"
#: those of meshagent.testing.packets.icmp_ports (the destination its type, the source its
#: echo partner's type or 0), converted by the constant maps ``i<family><what>`` (``s``: the
#: partner as mark, ``sc`` as classid; ``c``: the type as classid, ``m`` as mark); one without
#: a type (a later fragment, an empty header) is judged as a protocol without ports.
ICMP_FAMILIES = {4: ("icmp", "icmp type", "icmp_type", (8, 0)),
                 6: ("ipv6-icmp", "icmpv6 type", "icmpv6_type", (128, 129))}
ICMP_MAPS = (("s", "mark"), ("sc", "classid"), ("c", "classid"), ("m", "mark"))
TYPED = "@th,0,8 & 0 == 0"  # the transport header shows (at least) its first byte
#: Per ported protocol, what an established packet must show to pass at the top of its base
#: chain: its transport header whole (the last byte of it read), and for TCP no SYN, FIN or
#: RST (those are reported the first time a direction shows them: such a packet takes the
#: full walk). The raw TCP load is bytes 13-19: the flags, then up to the header's end.
ESTABLISHED = (("tcp", "@th,104,56 & 0x07000000000000 == 0"), ("udp", "@th,56,8 & 0 == 0"),
               ("sctp", "@th,88,8 & 0 == 0"))
FRAGMENT_MAPS = ("fsm", "fdm", "fsc", "fdc")  # source/destination port as mark/classid
SENTINEL_MARK, SENTINEL_PRIORITY = "0xffffffff", "ffff:ffff"  # no port becomes these
#: A packet for the DNS proxy leaves the netdev table with Cilium's to-proxy mark (0x200 under
#: 0xf00, the port above) and this priority, which no port conversion gives: the proxy table's
#: prerouting chain takes a mark that only looks like it (a port or an identity left in the
#: mark) for what it is, and clears it.
MARK_MAGIC_TO_PROXY, MARK_MAGIC_MASK = 0x0200, 0x0F00
PROXY_PRIORITY = "ffff:fffe"
PEER_REDIRECT = 100  # the mark's base while the peer's redirect (plus its prefix) waits
#: A redirect's chains need only the prefix lengths that name different match types: the
#: shortest of each class (0; 8; 9-24 as 24 for the peer's, as 9 for any identity's)
PEER_CLASSES, ANY_CLASSES = (0, 8, 24), (0, 8, 9)


def prefix_class(prefix: int, peer: bool) -> int:
    """The prefix length standing for ``prefix`` in a redirect's chains (same match type)."""
    if prefix <= 8:
        return prefix if prefix in (0, 8) else 8
    return 24 if peer else 9
SHARED_CHAINS = ("fragrecord", "fragports", "fragreply")
RECORDS = (("sport", "mark", "fsm"), ("dport", "mark", "fdm"),  # port, where to, map
           ("sport", "priority", "fsc"), ("dport", "priority", "fdc"))
LOOKUPS = {"fragports": (("mark", "fsm"), ("priority", "fdc")),  # as the policy steps want
           "fragreply": (("mark", "fdm"), ("priority", "fsc"))}  # the other way round
#: ICMPv4 fragmentation needed: it passes without policy (Cilium's ALLOW_ICMP_FRAG_NEEDED)
FRAG_NEEDED = "icmp type destination-unreachable icmp code frag-needed"
UNFRAGMENTED = ("exthdr frag missing", "frag frag-off 0 frag more-fragments 0")
LINK_CONTROL = ("icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit,"
                " nd-neighbor-advert, nd-redirect } ip6 hoplimit 255",
                "icmpv6 type { mld-listener-query, mld-listener-report, mld-listener-done,"
                " mld2-listener-report } ip6 hoplimit 1")
FAMILIES = {
    # suffix, address, later fragment, first fragment, more fragments, fragment units,
    # ipcache map, world identity, "not a fragment" rules (return when it is one)
    4: ("", "ip", "ip frag-off & 0x1fff != 0", "ip frag-off & 0x3fff == 0x2000",
        "ip frag-off & 0x2000 != 0", "ip frag-off & 0x1fff", "ipcache4", int(world_identity(4)),
        ("ip frag-off & 0x3fff != 0",)),
    6: ("6", "ip6", "frag frag-off != 0", "frag frag-off 0 frag more-fragments 1",
        "frag more-fragments 1", "frag frag-off", "ipcache6", int(world_identity(6)),
        ("frag frag-off != 0", "frag more-fragments 1")),
}


@attrs.frozen
class Ruleset:
    """The table's text, for one agent's settings."""

    table: str = "meshagent"
    log_group: int = 7
    log_rate: int = 50  # drop notices a second, per endpoint, direction, reason and match
    flow_timeout: int = 21600  # seconds a flow's replies stay allowed after its last packet
    flows: bool = True  # log policy verdicts and traces too (False: drops only)
    event_rate: int = 1000  # verdicts and traces logged a second, per endpoint and direction

    @property
    def ref(self) -> str:
        return f"{FAMILY} {self.table}"

    @property
    def established_timeout(self) -> int:
        """Seconds an established entry lives (not refreshed by the packets it passes): a
        tenth of the flow timeout, so that a long flow still takes the full walk, which
        refreshes its reply entry, at least that often."""
        return max(1, self.flow_timeout // 10)

    @property
    def layout(self) -> str:
        """The layout chain's name: a table logging another set of events is another layout."""
        return LAYOUT if self.flows else f"{LAYOUT}_drops"

    def table_text(self) -> str:
        """The table and what every endpoint shares: reason counters, the ipcaches, the port
        conversion maps, the fragment maps and the (empty) shared chains."""
        counters = "\n".join(f"  counter r_{r} {{}}" for r in REASONS)
        frag = "\n".join(
            f"  map {name}{sfx} {{ typeof {key} : meta {'mark' if name[2] == 'm' else 'priority'};"
            f" flags dynamic, timeout; timeout {FRAG_TIMEOUT}; }}"
            for sfx, key in (("", FRAG_KEY), ("6", FRAG_KEY6)) for name in FRAGMENT_MAPS)
        chains = "\n".join(f"  chain {c}{sfx} {{ }}" for c in SHARED_CHAINS for sfx in ("", "6"))
        icmp = "\n".join(f"  map i{family}{what} {{ type {key} : {data}; }}"
                         for family, (_, _, key, _) in ICMP_FAMILIES.items()
                         for what, data in ICMP_MAPS)
        return f"""table {self.ref} {{
  comment "meshagent datapath (do not edit: the agent owns this table)"
  chain {self.layout} {{ }}
{counters}
  counter {UNLOGGED} {{}}
  map ipcache4 {{ type ipv4_addr : mark; flags interval; }}
  map ipcache6 {{ type ipv6_addr : mark; flags interval; }}
  map p2m {{ typeof th dport : meta mark; size 65536; }}
  map p2c {{ typeof th dport : meta priority; size 65536; }}
{icmp}
{frag}
{chains}
  chain toproxy {{
    {self.toproxy_rule(0)}
  }}
}}"""

    def toproxy_rule(self, port: int) -> str:
        """The shared chain's rule that hands a packet to the DNS proxy on ``port`` (0: no
        proxy listens; the packet is dropped, counted)."""
        if not port:
            return "counter name r_proxy_lookup drop"
        mark = MARK_MAGIC_TO_PROXY | port << 16
        return f"meta mark set {mark:#x} meta priority set {PROXY_PRIORITY}" \
               " counter name r_redirected accept"

    def proxy_table_text(self, port: int) -> str:
        """The ``inet`` table whose prerouting chain delivers packets marked for the proxy to
        its socket on ``port`` (nftables' tproxy, as Cilium's iptables TPROXY rules): the
        connection's own socket, else the one listening; none: dropped."""
        return f"""table inet {self.table}_proxy {{
  comment "meshagent: packets for the DNS proxy (do not edit: the agent owns this table)"
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    meta mark & {MARK_MAGIC_MASK:#x} == {MARK_MAGIC_TO_PROXY:#x} meta priority != {PROXY_PRIORITY} meta mark set 0 return
    meta mark & {MARK_MAGIC_MASK:#x} != {MARK_MAGIC_TO_PROXY:#x} return
    meta nfproto ipv4 meta l4proto {{ tcp, udp }} tproxy ip to :{port} accept
    meta nfproto ipv6 meta l4proto {{ tcp, udp }} tproxy ip6 to :{port} accept
    drop
  }}
}}"""

    def conversion_elements(self, first: int, last: int) -> str:
        """Ports ``first``..``last`` into both conversion maps."""
        marks = ", ".join(f"{p} : {p}" for p in range(first, last + 1))
        classids = ", ".join(f"{p} : 0:{p:x}" for p in range(first, last + 1))
        return f"add element {self.ref} p2m {{ {marks} }}\n" \
               f"add element {self.ref} p2c {{ {classids} }}"

    def icmp_elements(self) -> str:
        """Every ICMP and ICMPv6 type into the ICMP conversion maps (:data:`ICMP_FAMILIES`)."""
        out = []
        for family, (_, _, _, (request, reply)) in ICMP_FAMILIES.items():
            partner = {request: reply, reply: request}
            for what, data in ICMP_MAPS:
                def value(kind: int) -> int:
                    return partner.get(kind, 0) if what in ("s", "sc") else kind
                items = ", ".join(f"{t} : {value(t)}" if data == "mark" else
                                  f"{t} : 0:{value(t):x}" for t in range(256))
                out.append(f"add element {self.ref} i{family}{what} {{ {items} }}")
        return "\n".join(out)

    def shared_rules(self) -> list[tuple[str, str | list[bytes]]]:
        """The shared chains' rules, in order, each ``(chain, rule)``: nft text, or netlink
        expressions where nft 1.0.6 cannot say (or miscompiles) the IPv6 one. ``fragrecord``
        writes a first fragment's ports under its key; ``fragports``/``fragreply`` read them
        back for a later fragment."""
        from meshagent.plugins.nftables.netlink import (
            NFT_DYNSET_OP_DELETE,
            NFT_DYNSET_OP_UPDATE,
            fragment6_lookup,
            fragment6_write,
        )
        out: list[tuple[str, str | list[bytes]]] = []
        for port, meta, name in RECORDS:
            conversion = "p2m" if meta == "mark" else "p2c"
            for sfx in ("", "6"):
                out.append((f"fragrecord{sfx}", f"meta {meta} set th {port} map @{conversion}"))
            # 'update' refreshes an element that exists and keeps its data: delete it first, so
            # the newest first fragment's ports win, as they do in Cilium's map (the kernel
            # takes a delete on a map only with a value register, which it ignores)
            out.append(("fragrecord", f"delete @{name} {{ {FRAG_KEY} : meta {meta} }}"))
            out.append(("fragrecord", f"update @{name} {{ {FRAG_KEY} : meta {meta} }}"))
            out.append(("fragrecord6", fragment6_write(meta, f"{name}6", NFT_DYNSET_OP_DELETE)))
            out.append(("fragrecord6", fragment6_write(meta, f"{name}6", NFT_DYNSET_OP_UPDATE)))
        for chain, pairs in LOOKUPS.items():
            for meta, name in pairs:
                out.append((chain, f"meta {meta} set {FRAG_KEY} map @{name}"))
                out.append((f"{chain}6", fragment6_lookup(meta, f"{name}6")))
        return out

    def endpoint(self, endpoint_id: int, device: str, ipv4: str,
                 ipv6: str | None, audit: bool = False) -> "EndpointRules":
        return EndpointRules(self, endpoint_id, device, ipv4, ipv6, audit)


class EndpointRules:
    """One endpoint's chains, maps, sets and limits: the text that makes them, and their names
    (what removing the endpoint deletes)."""

    def __init__(self, ruleset: Ruleset, e: int, device: str, ipv4: str, ipv6: str | None,
                 audit: bool = False):
        self.ruleset, self.e = ruleset, e
        self.chains: list[str] = []
        self.maps: list[str] = []
        self.sets: list[str] = []
        self.limits: list[str] = []
        self.parts: list[str] = []
        for direction, d in DIRS.items():
            self._events(d)
            for reason in DROP_REASONS:
                for match in (SPECIFIC + ANY if reason == "policy_deny" else (0,)):
                    self._chain(_drop_chain(reason, match, e, d),
                                self.policy_drop_body(reason, match, d, audit))
            for family in (4, 6):
                self._family(direction, d, family)
        for hook, d in (("ingress", "out"), ("egress", "in")):
            self._hook(hook, d, device, ipv4, ipv6)
        self.base_chains = [f"ep_{e}_{hook}" for hook in ("ingress", "egress")]

    def text(self) -> str:
        return f"table {self.ruleset.ref} {{" + "".join(self.parts) + "\n}"

    def kept_text(self, ipv4: str, ipv6: str | None, audit: bool) -> str:
        """Commands, one transaction, for an endpoint handed over again on its device (a
        restored or changed endpoint): its source checks and policy drops rewritten, and its
        judged sets flushed, so its connections are judged again under the new state."""
        r, e = self.ruleset.ref, self.e
        out = [f"flush chain {r} spoof4_{e}", f"flush chain {r} spoof6_{e}",
               f"add rule {r} spoof4_{e} {_spoof4(e, ipv4)}",
               f"add rule {r} spoof6_{e} {_spoof6(e, ipv6)}"]
        for d in DIRS.values():
            for reason, match in (("policy_default", 0),
                                  *(("policy_deny", m) for m in SPECIFIC + ANY)):
                chain = _drop_chain(reason, match, e, d)
                out.append(f"flush chain {r} {chain}")
                out += [f"add rule {r} {chain} {rule.strip()}" for rule in
                        self.policy_drop_body(reason, match, d, audit).splitlines()]
        out += [f"flush set {r} {name}" for name in judged_sets(e)]
        return "\n".join(out)

    def _chain(self, name: str, body: str) -> None:
        self.chains.append(name)
        self.parts.append(f"\n  chain {name} {{\n{body}\n  }}")

    def _log(self, d: str, event: str, reason: str, match: int) -> str:
        prefix = f"ma:{self.e}:{d}:{event}:{reason}:{match} "
        return f'log prefix "{prefix}" group {self.ruleset.log_group}'

    def policy_drop_body(self, reason: str, match: int, d: str, audit: bool) -> str:
        """A drop chain: count and log the drop; for a policy drop of an endpoint in audit
        mode: log an audit and pass the packet as allowed."""
        rs, e = self.ruleset, self.e
        if audit and reason in ("policy_deny", "policy_default"):
            if not rs.flows:
                return f"    goto okd_{e}_{d}"
            return (f'    limit name "ev_{e}_{d}" counter name {UNLOGGED} goto okd_{e}_{d}\n'
                    f"    {self._log(d, 'audit', reason, match)}\n"
                    f"    goto okd_{e}_{d}")
        # logged before it is counted: who sees the counter move finds the event queued
        return (f"    limit rate over {rs.log_rate}/second burst {rs.log_rate} packets"
                f" counter name r_{reason} counter name {UNLOGGED} drop\n"
                f"    {self._log(d, 'drop', reason, match)} counter name r_{reason} drop")

    def _events(self, d: str) -> None:
        """A direction's chains that name a policy verdict's match type, its event limit."""
        rs, e = self.ruleset, self.e
        self.limits.append(f"ev_{e}_{d}")
        self.parts.append(f"\n  limit ev_{e}_{d} {{ rate over {rs.event_rate}/second"
                          f" burst {rs.event_rate} packets; }}")
        for match in SPECIFIC + ANY:  # allowed, with this match type: logged, then tracked
            body = f"    goto okd_{e}_{d}"
            if rs.flows:
                body = (f'    limit name "ev_{e}_{d}" counter name {UNLOGGED} goto okd_{e}_{d}\n'
                        f"    {self._log(d, 'verdict', 'forwarded', match)}\n" + body)
            self._chain(f"ok_{MATCH_NAMES[match]}_{e}_{d}", body)
            # redirected to the DNS proxy, with this match type: only TCP and UDP leaving
            # the pod can go there (the others are dropped before any verdict is logged)
            body = f"    goto rdd_{e}_{d}"
            if rs.flows:
                body = (f'    limit name "ev_{e}_{d}" counter name {UNLOGGED} goto rdd_{e}_{d}\n'
                        f"    {self._log(d, 'redirect', 'forwarded', match)}\n" + body)
            unsupported = f"goto drop_proxy_unsupported_{e}_{d}"
            body = (f"    meta l4proto != {{ tcp, udp }} {unsupported}\n" + body if d == "out"
                    else f"    {unsupported}")
            self._chain(f"rdok_{MATCH_NAMES[match]}_{e}_{d}", body)
        # the peer's redirect waiting in the mark (PEER_REDIRECT + its prefix) beats any
        # identity's allow and redirect; it names its own match type
        peer_redirect = "\n".join(
            [f"    meta mark {PEER_REDIRECT + p} goto rdok_{MATCH_NAMES[match_of(True, p)]}_{e}_{d}"
             for p in PORTLESS_PREFIXES]
            + [f"    meta mark {PEER_REDIRECT + 9}-{PEER_REDIRECT + 24}"
               f" goto rdok_{MATCH_NAMES[match_of(True, 24)]}_{e}_{d}"])
        for prefix in ANY_CLASSES:  # any identity redirects: unless the peer's redirect waits
            self._chain(f"anyrd_{prefix}_{e}_{d}", peer_redirect + f"""
    goto rdok_{MATCH_NAMES[match_of(False, prefix)]}_{e}_{d}""")
        self._chain(f"rdd_{e}_{d}", f"""    meta protocol ip goto rdfirst4_{e}_{d}
    goto rdfirst6_{e}_{d}""")
        for prefix in PREFIXES:  # any identity allowed: the peer's allow (mark: its prefix + 1,
            # 0 if none) decides unless any identity's prefix is longer (Cilium 1.17+)
            longer = "0" if prefix == 0 else f"0-{prefix}"
            self._chain(f"anyok_{prefix}_{e}_{d}", "\n".join(
                [peer_redirect]
                + [f"    meta mark {longer} goto ok_{MATCH_NAMES[match_of(False, prefix)]}_{e}_{d}"]
                + [f"    meta mark {p + 1} goto ok_{MATCH_NAMES[match_of(True, p)]}_{e}_{d}"
                   for p in PORTLESS_PREFIXES]
                + [f"    goto ok_{MATCH_NAMES[match_of(True, 24)]}_{e}_{d}"]))
        self._chain(f"okd_{e}_{d}", f"""    meta protocol ip meta l4proto icmp goto okicmp4_{e}_{d}
    meta protocol ip6 meta l4proto ipv6-icmp goto okicmp6_{e}_{d}
    meta protocol ip meta l4proto {PORTED} goto first4_{e}_{d}
    meta protocol ip goto firstnp4_{e}_{d}
    meta l4proto {PORTED} goto first6_{e}_{d}
    goto firstnp6_{e}_{d}""")

    def _family(self, direction: str, d: str, family: int) -> None:
        sfx, ip, later, first, more, units, ipcache, world, fragment = FAMILIES[family]
        proto, icmp_type, _, _ = ICMP_FAMILIES[family]
        i = f"i{family}"
        rs, e, timeout = self.ruleset, self.e, f"{self.ruleset.flow_timeout}s"
        back = "out" if d == "in" else "in"
        peer = "saddr" if direction == "ingress" else "daddr"
        fed = f"{family}_{e}_{d}"
        drop = f"_{e}_{d}"
        for name, key in ((f"spec{fed}", "meta mark . meta l4proto . meta priority"),
                          (f"any{fed}", "meta l4proto . meta priority"),
                          (f"spnp{fed}", "meta mark . meta l4proto"),
                          (f"anynp{fed}", "meta l4proto")):
            self.maps.append(name)
            self.parts.append(f"\n  map {name} {{ typeof {key} : verdict; flags interval; }}")
        tuple_ = f"{ip} saddr . {ip} daddr . meta l4proto . meta mark . meta priority"
        tuple_np = f"{ip} saddr . {ip} daddr . meta l4proto"
        # prx: the judged connections whose packets go to the DNS proxy (flushed with fsn)
        sets = [("rep", tuple_), ("repnp", tuple_np), ("fsn", tuple_), ("fsnnp", tuple_np),
                ("prx", tuple_)]
        if rs.flows:
            # a set per flag: nft 1.0.6 aborts writing an IPv6 tuple with one more field
            sets += [("rsn", tuple_), ("rsnnp", tuple_np)] + [(flag, tuple_) for flag in TCP_FLAGS]
        for kind, key in sets:
            self.sets.append(f"{kind}{fed}")
            self.parts.append(f"\n  set {kind}{fed} {{ typeof {key}; flags dynamic, timeout;"
                              f" timeout {timeout}; }}")
        self.sets.append(f"est{fed}")
        self.parts.append(f"\n  set est{fed} {{ typeof {established_key(ip)}; flags dynamic,"
                          f" timeout; timeout {rs.established_timeout}s; }}")
        self.sets.append(f"fins{fed}")  # the FINs a TCP connection sent, to know when it closes
        self.parts.append(f"\n  set fins{fed} {{ typeof {established_key(ip)}; flags dynamic,"
                          f" timeout; timeout {timeout}; }}")
        # a packet that found its connection judged, or its reply seen: its connection is
        # established (a later fragment has no transport header: the add does not apply)
        establish = f"    add @est{fed} {{ {established_key(ip)} }}"
        reply = f"{ip} daddr . {ip} saddr . meta l4proto . meta mark . meta priority"
        self._close(ip, fed, f"{family}_{e}_{back}",
                    [kind for kind, key in sets if key == tuple_ and kind in CLOSED])
        # (close is jumped to with the ports in mark and priority as the judge put them)
        close = f"    tcp flags & (fin | rst) != 0 jump close{fed}"
        # a known connection's FIN or RST passes, perhaps closing it (not refreshing its reply
        # entry, which the connection's last packet on the full walk did)
        self._chain(f"closing{fed}", f"""    jump close{fed}
    counter name r_forwarded accept""")
        to_closing = f"    tcp flags & (fin | rst) != 0 goto closing{fed}"
        not_fragment = "\n".join(f"    {f} return" for f in fragment)
        self._chain(f"whole{fed}", f"""    meta l4proto != {PORTED} return
{not_fragment}
    meta l4proto tcp @th,152,8 & 0 == 0 return
    meta l4proto udp @th,56,8 & 0 == 0 return
    meta l4proto sctp @th,88,8 & 0 == 0 return
    goto drop_malformed{drop}""")
        self._chain(f"allowedlater{fed}", f"""    meta mark set {SENTINEL_MARK} meta priority set {SENTINEL_PRIORITY}
    jump fragreply{sfx}
    meta mark != {SENTINEL_MARK} meta priority != {SENTINEL_PRIORITY} update @rep{family}_{e}_{back} {{ {reply} }}
    counter name r_forwarded accept""")
        self._chain(f"allowedicmp{fed}", f"""    meta mark set {icmp_type} map @{i}m
    meta priority set {icmp_type} map @{i}sc
    update @rep{family}_{e}_{back} {{ {reply} }}
    counter name r_forwarded accept""")
        self._chain(f"allowed{fed}", f"""    meta l4proto {proto} goto allowedicmp{fed}
    {later} goto allowedlater{fed}
    meta mark set th dport map @p2m
    meta priority set th sport map @p2c
    update @rep{family}_{e}_{back} {{ {reply} }}
    counter name r_forwarded accept""")
        # to the DNS proxy: tracked as allowed (its reply passes), never established (each
        # packet takes the walk to be marked for the proxy)
        self._chain(f"redirectlater{fed}", f"""    meta mark set {SENTINEL_MARK} meta priority set {SENTINEL_PRIORITY}
    jump fragreply{sfx}
    meta mark != {SENTINEL_MARK} meta priority != {SENTINEL_PRIORITY} update @rep{family}_{e}_{back} {{ {reply} }}
    goto toproxy""")
        self._chain(f"redirect{fed}", f"""    {later} goto redirectlater{fed}
    meta mark set th dport map @p2m
    meta priority set th sport map @p2c
    update @rep{family}_{e}_{back} {{ {reply} }}
    goto toproxy""")
        self._chain(f"closingrd{fed}", f"""    jump close{fed}
    goto toproxy""")
        self._chain(f"allowednp{fed}", f"""    update @repnp{family}_{e}_{back} {{ {ip} daddr . {ip} saddr . meta l4proto }}
    counter name r_forwarded accept""")
        # first judged packet of a connection and direction (allowed or audited): tracked
        record = f"    jump trec{fed}" if rs.flows else ""
        self._chain(f"fwdports{fed}", f"""    meta l4proto {proto} meta mark set {icmp_type} map @{i}s return
    {later} goto fragports{sfx}
    meta mark set th sport map @p2m""")
        self._chain(f"first{fed}", f"""    jump fwdports{fed}
    add @fsn{fed} {{ {tuple_} }}
{record}
    goto allowed{fed}""")
        self._chain(f"rdfirst{fed}", f"""    jump fwdports{fed}
    add @fsn{fed} {{ {tuple_} }}
    add @prx{fed} {{ {tuple_} }}
{record}
    goto redirect{fed}""")
        self._chain(f"firstnp{fed}", f"""    add @fsnnp{fed} {{ {tuple_np} }}
    goto allowednp{fed}""")
        for prefix in PREFIXES:  # the peer's identity allowed: any identity's deny still wins
            m = MATCH_NAMES[match_of(True, prefix)]
            self._chain(f"anyafter_{prefix}_{fed}", f"""    meta mark set {prefix + 1}
    meta l4proto . meta priority vmap @any{fed}
    goto ok_{m}_{e}_{d}""")
        for prefix in PORTLESS_PREFIXES:
            m = MATCH_NAMES[match_of(True, prefix)]
            self._chain(f"anyafternp_{prefix}_{fed}", f"""    meta mark set {prefix + 1}
    meta l4proto vmap @anynp{fed}
    goto ok_{m}_{e}_{d}""")
        for prefix in PEER_CLASSES:  # the peer's identity redirects: any identity's deny wins
            m = MATCH_NAMES[match_of(True, prefix)]
            self._chain(f"anyafterrd_{prefix}_{fed}", f"""    meta mark set {PEER_REDIRECT + prefix}
    meta l4proto . meta priority vmap @any{fed}
    goto rdok_{m}_{e}_{d}""")
        for prefix in PORTLESS_PREFIXES:
            m = MATCH_NAMES[match_of(True, prefix)]
            self._chain(f"anyafterrdnp_{prefix}_{fed}", f"""    meta mark set {PEER_REDIRECT + prefix}
    meta l4proto vmap @anynp{fed}
    goto rdok_{m}_{e}_{d}""")
        self._chain(f"anyonly{fed}", f"""    meta mark set 0
    meta l4proto . meta priority vmap @any{fed}
    goto drop_policy_default{drop}""")
        self._chain(f"anyonlynp{fed}", f"""    meta mark set 0
    meta l4proto vmap @anynp{fed}
    goto drop_policy_default{drop}""")
        if rs.flows:
            on_reply, on_reply_np = f"goto reply{fed}", f"goto replynp{fed}"
            on_known = f"goto known{fed}"
            # a later fragment has no TCP header; nftables reads IPv6's payload as one
            self._chain(f"trec{fed}", f"    {later} return\n" + "\n".join(
                f"    tcp flags & {flag} != 0 add @{flag}{fed} {{ {tuple_} }}"
                for flag in TCP_FLAGS))
            self._chain(f"tflags{fed}", f"    {later} return\n" + "\n".join(
                f"    tcp flags & {flag} != 0 {tuple_} != @{flag}{fed} goto tnew{fed}"
                for flag in TCP_FLAGS))
            self._chain(f"tnew{fed}", f"""{record}
    limit name "ev_{e}_{d}" counter name {UNLOGGED} return
    {tuple_} @rep{fed} {self._log(d, 'reply', 'forwarded', 0)} return
    {self._log(d, 'trace', 'forwarded', 0)}""")
            self._chain(f"known{fed}", f"""    jump tflags{fed}
{establish}
{to_closing}
    goto allowed{fed}""")
            self._chain(f"knownrd{fed}", f"""    jump tflags{fed}
    tcp flags & (fin | rst) != 0 goto closingrd{fed}
    goto redirect{fed}""")
            self._chain(f"replied{fed}", f"""    jump tflags{fed}
{establish}
{close}
    counter name r_forwarded accept""")
            self._chain(f"reply{fed}", f"""    {tuple_} @rsn{fed} goto replied{fed}
    add @rsn{fed} {{ {tuple_} }}
{record}
{close}
    limit name "ev_{e}_{d}" counter name {UNLOGGED} counter name r_forwarded accept
    {self._log(d, 'reply', 'forwarded', 0)} counter name r_forwarded accept""")
            self._chain(f"replynp{fed}", f"""    {tuple_np} @rsnnp{fed} counter name r_forwarded accept
    add @rsnnp{fed} {{ {tuple_np} }}
    limit name "ev_{e}_{d}" counter name {UNLOGGED} counter name r_forwarded accept
    {self._log(d, 'reply', 'forwarded', 0)} counter name r_forwarded accept""")
        else:
            on_reply, on_reply_np = f"goto replied{fed}", "counter name r_forwarded accept"
            on_known = f"goto known{fed}"
            self._chain(f"known{fed}", f"""{establish}
{to_closing}
    goto allowed{fed}""")
            self._chain(f"knownrd{fed}", f"""    tcp flags & (fin | rst) != 0 goto closingrd{fed}
    goto redirect{fed}""")
            self._chain(f"replied{fed}", f"""{establish}
{close}
    counter name r_forwarded accept""")
        self._chain(f"judge{fed}", f"""    {tuple_} @rep{fed} {on_reply}
    {tuple_} @prx{fed} goto knownrd{fed}
    {tuple_} @fsn{fed} {on_known}
    meta mark set {world}
    meta mark set {ip} {peer} map @{ipcache}
    meta mark . meta l4proto . meta priority vmap @spec{fed}
    goto anyonly{fed}""")
        self._chain(f"judgenp{fed}", f"""    {tuple_np} @repnp{fed} {on_reply_np}
    {tuple_np} @fsnnp{fed} goto allowednp{fed}
    meta mark set {world}
    meta mark set {ip} {peer} map @{ipcache}
    meta mark . meta l4proto vmap @spnp{fed}
    goto anyonlynp{fed}""")
        self._chain(f"ported{fed}", f"""    {first} jump fragrecord{sfx}
    meta mark set th sport map @p2m
    meta priority set th dport map @p2c
    goto judge{fed}""")
        self._chain(f"later{fed}", f"""    meta l4proto tcp {units} < 3 goto drop_frag_tiny{drop}
    meta l4proto sctp {units} < 2 goto drop_frag_tiny{drop}
    meta mark set {SENTINEL_MARK} meta priority set {SENTINEL_PRIORITY}
    jump fragports{sfx}
    meta mark != {SENTINEL_MARK} meta priority != {SENTINEL_PRIORITY} goto judge{fed}
    goto drop_frag_unknown{drop}""")
        self._chain(f"icmp{fed}", f"""    meta mark set {icmp_type} map @{i}s
    meta priority set {icmp_type} map @{i}c
    goto judge{fed}""")
        # the kernel reads a later fragment's payload as its transport header: ask first
        self._chain(f"icmpcheck{fed}", f"""    {later} goto judgenp{fed}
    {TYPED} goto icmp{fed}
    goto judgenp{fed}""")
        self._chain(f"okicmp{fed}", f"""    {later} goto firstnp{fed}
    {TYPED} goto first{fed}
    goto firstnp{fed}""")
        self._chain(f"l4{fed}", f"""    meta l4proto {proto} goto icmpcheck{fed}
    meta l4proto != {PORTED} goto judgenp{fed}
    {later} goto later{fed}
    meta l4proto tcp @th,152,8 & 0 == 0 goto ported{fed}
    meta l4proto udp @th,56,8 & 0 == 0 goto ported{fed}
    meta l4proto sctp @th,88,8 & 0 == 0 goto ported{fed}
    {more} goto drop_frag_tiny{drop}
    goto drop_malformed{drop}""")

    def _close(self, ip: str, fed: str, back: str, kinds: list[str]) -> None:
        """The chain a passing TCP packet with a FIN or RST jumps to (its ports in mark and
        priority as the judge put them). Once both directions sent a FIN, or either an RST,
        the connection is closing, as in the eBPF datapath: its elements in this endpoint's
        sets (``kinds``, the established and FIN sets) expire CLOSE_TIMEOUT seconds later, so
        closed connections leave the sets. An update would add a missing element: a lookup
        guards each. (Ports are converted once here: two conversions more per chain doubled
        the kernel's time to add an endpoint, measured.)"""
        tuple_ = f"{ip} saddr . {ip} daddr . meta l4proto . meta mark . meta priority"
        reply = f"{ip} daddr . {ip} saddr . meta l4proto . meta mark . meta priority"
        raw, raw_reply = established_key(ip), \
            f"{ip} daddr . {ip} saddr . meta l4proto . th dport . th sport"

        def shorten(key: str, name: str) -> str:
            return f"    {key} @{name} update @{name} {{ {key} timeout {CLOSE_TIMEOUT}s }}"
        self._chain(f"close{fed}", "\n".join([
            f"    tcp flags & fin != 0 add @fins{fed} {{ {raw} }}",
            f"    tcp flags & rst == 0 {raw_reply} != @fins{back} return",
            *(shorten(tuple_, f"{kind}{fed}") for kind in kinds),
            shorten(raw, f"est{fed}"), shorten(raw, f"fins{fed}"),
            "    meta mark set th dport map @p2m meta priority set th sport map @p2c",
            *(shorten(reply, f"{kind}{back}") for kind in kinds),
            shorten(raw_reply, f"est{back}"), shorten(raw_reply, f"fins{back}")]))

    def _hook(self, hook: str, d: str, device: str, ipv4: str, ipv6: str | None) -> None:
        e = self.e
        ed = f"_{e}_{d}"
        leaving = d == "out"
        within = " ip6 daddr { fe80::/10, ff02::/16 }" if leaving else ""
        control = "\n".join(f"    {whole} {c}{within} counter name r_forwarded accept"
                            for c in LINK_CONTROL for whole in UNFRAGMENTED)
        self.chains.append(f"ep_{e}_{hook}")
        # a packet of an established connection passes at once, if it is no fragment (IPv6:
        # if it has no extension header)
        established = "\n".join(
            f"    meta protocol {ip} {proto_is.format(proto)}{whole}"
            f" {established_key(ip)} @est{family}{ed} counter name r_forwarded accept"
            for family, ip, proto_is in (
                (4, "ip", "meta l4proto {} ip frag-off & 0x3fff == 0 "),
                (6, "ip6", "ip6 nexthdr {} "))
            for proto, whole in ESTABLISHED)
        self.parts.append(f"""
  chain ep_{e}_{hook} {{
    type filter hook {hook} device "{device}" priority 0; policy accept;
{established}
    meta protocol arp counter name r_forwarded accept
    meta protocol ip meta l4proto 0-255 goto v4{ed}
    meta protocol ip6 meta l4proto 0-255 goto v6{ed}
    meta protocol {{ ip, ip6 }} goto drop_malformed{ed}
    goto drop_unsupported_l3{ed}
  }}""")
        if leaving:  # the source check: its own chains, rewritten alone for a restored pod
            self._chain(f"spoof4_{e}", f"    {_spoof4(e, ipv4)}")
            self._chain(f"spoof6_{e}", f"    {_spoof6(e, ipv6)}")
        self._chain(f"v4{ed}", f"""    jump whole4{ed}
    {f"jump spoof4_{e}" if leaving else ""}
    ip frag-off & 0x1fff == 0 {FRAG_NEEDED} counter name r_forwarded accept
    goto l44{ed}""")
        self._chain(f"fragcut6{ed}", f"""    frag id 0-4294967295 return
    goto drop_malformed{ed}""")
        self._chain(f"v6{ed}", f"""    meta l4proto ah goto drop_malformed{ed}
    exthdr frag exists jump fragcut6{ed}
    jump whole6{ed}
{control}
    {f"jump spoof6_{e}" if leaving else ""}
    goto l46{ed}""")


def established_key(ip: str) -> str:
    """The key of an established set: the packet's addresses, protocol and ports as read."""
    return f"{ip} saddr . {ip} daddr . meta l4proto . th sport . th dport"


def judged_sets(endpoint_id: int) -> list[str]:
    """An endpoint's sets of connections judged under the current state, and of connections
    established under it (flushed when the state changes)."""
    return [f"{kind}{family}_{endpoint_id}_{d}" for kind in ("fsn", "fsnnp", "est", "prx")
            for family in (4, 6) for d in DIRS.values()]


def policy_map(kind: str, family: int, endpoint_id: int, d: str) -> str:
    """The name of one of an endpoint's policy maps (``spec``, ``any``, ``spnp``, ``anynp``)."""
    return f"{kind}{family}_{endpoint_id}_{d}"


def verdict_target(verdict: str, peer: bool, prefix: int, ported: bool, family: int,
                   endpoint_id: int, d: str) -> str:
    """The chain a policy map element's verdict (``allow``, ``deny``, ``redirect``) jumps to,
    for an entry of the peer's identity (``peer``) or of any identity with a prefix of
    ``prefix`` bits: a deny drops (or audits) naming its match type; an allow or a redirect
    of the peer's identity looks any identity up next, whose deny (or, for an allow, redirect
    or longer allow) decides; an allow or a redirect of any identity is weighed against what
    the peer's lookup left in the mark (deny > redirect > allow)."""
    if verdict == "deny":
        return _drop_chain("policy_deny", match_of(peer, prefix), endpoint_id, d)
    np = "" if ported else "np"
    if verdict == "redirect":
        if peer:
            return f"anyafterrd{np}_{prefix_class(prefix, True)}_{family}_{endpoint_id}_{d}"
        return f"anyrd_{prefix_class(prefix, False)}_{endpoint_id}_{d}"
    if peer:
        return f"anyafter{np}_{prefix}_{family}_{endpoint_id}_{d}"
    return f"anyok_{prefix}_{endpoint_id}_{d}"


def _drop_chain(reason: str, match: int, e: int, d: str) -> str:
    if reason == "policy_deny":
        return f"drop_policy_deny_{MATCH_NAMES[match]}_{e}_{d}"
    return f"drop_{reason}_{e}_{d}"


def _spoof4(e: int, ipv4: str) -> str:
    return f"ip saddr != {ipv4} goto drop_spoofed_{e}_out"


def _spoof6(e: int, ipv6: str | None) -> str:
    """A pod without an IPv6 address owns none: any IPv6 packet it sends is spoofed."""
    return f"ip6 saddr != {ipv6} goto drop_spoofed_{e}_out" if ipv6 else \
        f"meta protocol ip6 goto drop_spoofed_{e}_out"
