"""The nftables ruleset of the datapath: one ``netdev`` table, chains per endpoint.

Every endpoint gets two base chains on its host-side veth — ``ingress`` (packets leaving the
pod: its egress policy) and ``egress`` (packets entering it: its ingress policy) — running the
steps of docs/datapath.md: ARP passes, other ethertypes are dropped; a malformed packet is
dropped (nftables' own header validation leaves ``meta l4proto`` unset; a transport header
must be whole); the link's own ICMPv6 passes; the source check; fragments; replies; policy.

nftables has no scratch registers that live across rules, and a map lookup cannot be part of a
concatenation, so two packet fields the agent may overwrite carry values between rules:
``meta mark`` (the source port, then the peer's identity) and ``meta priority`` (the
destination port). Ports become those types through the constant maps ``p2m``/``p2c`` (port
-> mark, port -> classid). The peer's identity comes from an interval map (the ipcache
flattened into disjoint ranges); policy is two lookups, the peer's identity and any identity,
in verdict maps whose verdicts jump to small chains that combine them (deny beats allow). An
allowed packet adds its reverse to the opposite direction's reply set (nftables' conntrack
does not exist at netdev hooks). A later fragment takes its first fragment's ports from the
fragment maps through the shared chains ``fragports``/``fragreply``; the IPv6 ones are written
in netlink (:mod:`meshagent.plugins.nftables.netlink`) because nft 1.0.6 cannot say them.

Every drop is counted by reason and, at most ``log_rate`` a second per endpoint, direction and
reason, logged to an NFLOG group with the prefix ``ma:<endpoint>:<in|out>:<reason>``.
"""

import attrs

from meshagent.plugin import world_identity

FAMILY = "netdev"
LAYOUT = "layout_1"  # an empty chain naming the table's layout: another layout is replaced
REASONS = ("forwarded", "policy_deny", "policy_default", "spoofed", "frag_tiny",
           "frag_unknown", "malformed", "unsupported_l3")
DIRS = {"ingress": "in", "egress": "out"}  # the pod's policy direction
FRAG_TIMEOUT = "60s"
FRAG_KEY = "ip saddr . ip daddr . ip id . meta l4proto"
# nft 1.0.6 aborts (assertion ``dreg < ctx->reg_low``) writing a map from a concatenation with
# an element starting past its first 16 bytes; the IPv6 key therefore leads with the short
# fields and loads both addresses as one 32-byte raw payload (saddr . daddr).
FRAG_KEY6 = "meta l4proto . frag id . @nh,64,256"
PORTED = "{ tcp, udp, sctp }"
FRAGMENT_MAPS = ("fsm", "fdm", "fsc", "fdc")  # source/destination port as mark/classid
SENTINEL_MARK, SENTINEL_PRIORITY = "0xffffffff", "ffff:ffff"  # no port becomes these
SHARED_CHAINS = ("fragrecord", "fragports", "fragreply")
RECORDS = (("sport", "mark", "fsm"), ("dport", "mark", "fdm"),  # port, where to, map
           ("sport", "priority", "fsc"), ("dport", "priority", "fdc"))
LOOKUPS = {"fragports": (("mark", "fsm"), ("priority", "fdc")),  # as the policy steps want
           "fragreply": (("mark", "fdm"), ("priority", "fsc"))}  # the other way round
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
    log_rate: int = 50  # drop notices a second, per endpoint, direction and reason
    flow_timeout: int = 21600  # seconds a flow's replies stay allowed after its last packet

    @property
    def ref(self) -> str:
        return f"{FAMILY} {self.table}"

    def table_text(self) -> str:
        """The table and what every endpoint shares: reason counters, the ipcaches, the port
        conversion maps, the fragment maps and the (empty) shared chains."""
        counters = "\n".join(f"  counter r_{r} {{}}" for r in REASONS)
        frag = "\n".join(
            f"  map {name}{sfx} {{ typeof {key} : meta {'mark' if name[2] == 'm' else 'priority'};"
            f" flags dynamic, timeout; timeout {FRAG_TIMEOUT}; }}"
            for sfx, key in (("", FRAG_KEY), ("6", FRAG_KEY6)) for name in FRAGMENT_MAPS)
        chains = "\n".join(f"  chain {c}{sfx} {{ }}" for c in SHARED_CHAINS for sfx in ("", "6"))
        return f"""table {self.ref} {{
  comment "meshagent datapath (do not edit: the agent owns this table)"
  chain {LAYOUT} {{ }}
{counters}
  map ipcache4 {{ type ipv4_addr : mark; flags interval; }}
  map ipcache6 {{ type ipv6_addr : mark; flags interval; }}
  map p2m {{ typeof th dport : meta mark; size 65536; }}
  map p2c {{ typeof th dport : meta priority; size 65536; }}
{frag}
{chains}
}}"""

    def conversion_elements(self, first: int, last: int) -> str:
        """Ports ``first``..``last`` into both conversion maps."""
        marks = ", ".join(f"{p} : {p}" for p in range(first, last + 1))
        classids = ", ".join(f"{p} : 0:{p:x}" for p in range(first, last + 1))
        return f"add element {self.ref} p2m {{ {marks} }}\n" \
               f"add element {self.ref} p2c {{ {classids} }}"

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
                 ipv6: str | None) -> "EndpointRules":
        return EndpointRules(self, endpoint_id, device, ipv4, ipv6)


class EndpointRules:
    """One endpoint's chains, maps and sets: the text that makes them, and their names (what
    removing the endpoint deletes)."""

    def __init__(self, ruleset: Ruleset, e: int, device: str, ipv4: str, ipv6: str | None):
        self.ruleset, self.e = ruleset, e
        self.chains: list[str] = []
        self.maps: list[str] = []
        self.sets: list[str] = []
        self.parts: list[str] = []
        for direction, d in DIRS.items():
            for reason in REASONS[1:]:
                self._drop_chain(reason, d)
            self._chain(f"denied_{e}_{d}", f"    goto drop_policy_deny_{e}_{d}")
            for family in (4, 6):
                self._family(direction, d, family)
        for hook, d in (("ingress", "out"), ("egress", "in")):
            self._hook(hook, d, device, ipv4, ipv6)
        self.base_chains = [f"ep_{e}_{hook}" for hook in ("ingress", "egress")]

    def text(self) -> str:
        return f"table {self.ruleset.ref} {{" + "".join(self.parts) + "\n}"

    def spoof_chains_text(self, ipv4: str, ipv6: str | None) -> str:
        """Commands that rewrite only the source checks (a restored endpoint's addresses)."""
        r, e = self.ruleset.ref, self.e
        return "\n".join([f"flush chain {r} spoof4_{e}", f"flush chain {r} spoof6_{e}",
                          f"add rule {r} spoof4_{e} {_spoof4(e, ipv4)}",
                          f"add rule {r} spoof6_{e} {_spoof6(e, ipv6)}"])

    def _chain(self, name: str, body: str) -> None:
        self.chains.append(name)
        self.parts.append(f"\n  chain {name} {{\n{body}\n  }}")

    def _drop_chain(self, reason: str, d: str) -> None:
        rs = self.ruleset
        self._chain(f"drop_{reason}_{self.e}_{d}",
                    f"    limit rate over {rs.log_rate}/second counter name r_{reason} drop\n"
                    f"    counter name r_{reason} log prefix \"ma:{self.e}:{d}:{reason} \""
                    f" group {rs.log_group} drop")

    def _family(self, direction: str, d: str, family: int) -> None:
        sfx, ip, later, first, more, units, ipcache, world, fragment = FAMILIES[family]
        e, timeout = self.e, f"{self.ruleset.flow_timeout}s"
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
        for name, key in ((f"rep{fed}", f"{ip} saddr . {ip} daddr . meta l4proto . meta mark"
                                        " . meta priority"),
                          (f"repnp{fed}", f"{ip} saddr . {ip} daddr . meta l4proto")):
            self.sets.append(name)
            self.parts.append(f"\n  set {name} {{ typeof {key}; flags dynamic, timeout;"
                              f" timeout {timeout}; }}")
        reply = f"{ip} daddr . {ip} saddr . meta l4proto . meta mark . meta priority"
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
        self._chain(f"allowed{fed}", f"""    {later} goto allowedlater{fed}
    meta mark set th dport map @p2m
    meta priority set th sport map @p2c
    update @rep{family}_{e}_{back} {{ {reply} }}
    counter name r_forwarded accept""")
        self._chain(f"allowednp{fed}", f"""    update @repnp{family}_{e}_{back} {{ {ip} daddr . {ip} saddr . meta l4proto }}
    counter name r_forwarded accept""")
        self._chain(f"anyafter{fed}", f"""    meta l4proto . meta priority vmap @any{fed}
    goto allowed{fed}""")
        self._chain(f"anyonly{fed}", f"""    meta l4proto . meta priority vmap @any{fed}
    goto drop_policy_default{drop}""")
        self._chain(f"anyafternp{fed}", f"""    meta l4proto vmap @anynp{fed}
    goto allowednp{fed}""")
        self._chain(f"anyonlynp{fed}", f"""    meta l4proto vmap @anynp{fed}
    goto drop_policy_default{drop}""")
        self._chain(f"judge{fed}", f"""    {ip} saddr . {ip} daddr . meta l4proto . meta mark . meta priority @rep{fed} counter name r_forwarded accept
    meta mark set {world}
    meta mark set {ip} {peer} map @{ipcache}
    meta mark . meta l4proto . meta priority vmap @spec{fed}
    goto anyonly{fed}""")
        self._chain(f"judgenp{fed}", f"""    {ip} saddr . {ip} daddr . meta l4proto @repnp{fed} counter name r_forwarded accept
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
        self._chain(f"l4{fed}", f"""    meta l4proto != {PORTED} goto judgenp{fed}
    {later} goto later{fed}
    meta l4proto tcp @th,152,8 & 0 == 0 goto ported{fed}
    meta l4proto udp @th,56,8 & 0 == 0 goto ported{fed}
    meta l4proto sctp @th,88,8 & 0 == 0 goto ported{fed}
    {more} goto drop_frag_tiny{drop}
    goto drop_malformed{drop}""")

    def _hook(self, hook: str, d: str, device: str, ipv4: str, ipv6: str | None) -> None:
        e = self.e
        ed = f"_{e}_{d}"
        leaving = d == "out"
        within = " ip6 daddr { fe80::/10, ff02::/16 }" if leaving else ""
        control = "\n".join(f"    {whole} {c}{within} counter name r_forwarded accept"
                            for c in LINK_CONTROL for whole in UNFRAGMENTED)
        self.chains.append(f"ep_{e}_{hook}")
        self.parts.append(f"""
  chain ep_{e}_{hook} {{
    type filter hook {hook} device "{device}" priority 0; policy accept;
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
    goto l44{ed}""")
        self._chain(f"fragcut6{ed}", f"""    frag id 0-4294967295 return
    goto drop_malformed{ed}""")
        self._chain(f"v6{ed}", f"""    meta l4proto ah goto drop_malformed{ed}
    exthdr frag exists jump fragcut6{ed}
    jump whole6{ed}
{control}
    {f"jump spoof6_{e}" if leaving else ""}
    goto l46{ed}""")


def policy_map(kind: str, family: int, endpoint_id: int, d: str) -> str:
    """The name of one of an endpoint's policy maps (``spec``, ``any``, ``spnp``, ``anynp``)
    or of a chain their verdicts jump to."""
    return f"{kind}{family}_{endpoint_id}_{d}"


def _spoof4(e: int, ipv4: str) -> str:
    return f"ip saddr != {ipv4} goto drop_spoofed_{e}_out"


def _spoof6(e: int, ipv6: str | None) -> str:
    """A pod without an IPv6 address owns none: any IPv6 packet it sends is spoofed."""
    return f"ip6 saddr != {ipv6} goto drop_spoofed_{e}_out" if ipv6 else \
        f"meta protocol ip6 goto drop_spoofed_{e}_out"
