"""The nftables ruleset of the datapath: one ``netdev`` table, chains per endpoint.

Every endpoint gets two base chains on its host-side veth — ``ingress`` (packets leaving the
pod: its egress policy) and ``egress`` (packets entering it: its ingress policy) — running the
steps of docs/datapath.md. ARP passes, other ethertypes are dropped; a malformed header is
dropped (nftables' own header validation leaves ``meta l4proto`` unset); the source check;
fragments; replies; then policy.

nftables has no scratch registers that live across rules, and a map lookup cannot be part of a
concatenation, so two packet fields the agent may overwrite carry values between rules:
``meta mark`` (the source port, then the peer's identity) and ``meta priority`` (the
destination port). Ports become those types through the constant maps ``p2m``/``p2c`` (port
-> mark, port -> classid); a later fragment takes its first fragment's ports from the ``f*``
maps. The peer's identity comes from an interval map (the ipcache flattened into disjoint
ranges); policy is two lookups, the peer's identity and any identity, in verdict maps whose
verdicts jump to small chains that combine them (deny beats allow). An allowed packet adds its
reverse to the opposite direction's replies set (nftables' conntrack does not exist at netdev
hooks).

A later fragment takes its first fragment's ports from the fragment maps through the shared
chains ``fragports``/``fragreply``; the IPv6 lookups there are written in netlink
(:mod:`meshagent.plugins.nftables.netlink`) because nft 1.0.6 cannot say them.
"""

TABLE = "meshagent"
FAMILY = "netdev"
REASONS = ("forwarded", "policy_deny", "policy_default", "spoofed", "frag_tiny",
           "frag_unknown", "malformed", "unsupported_l3")
DIRS = {"ingress": "in", "egress": "out"}  # the pod's policy direction
TIMEOUT = "60s"
FRAG_KEY = "ip saddr . ip daddr . ip id . meta l4proto"
# nft 1.0.6 aborts (assertion ``dreg < ctx->reg_low``) writing a map from a concatenation with
# an element starting past its first 16 bytes; the IPv6 key therefore leads with the short
# fields and loads both addresses as one 32-byte raw payload (saddr . daddr).
FRAG_KEY6 = "meta l4proto . frag id . @nh,64,256"
PORTED = "{ tcp, udp, sctp }"


def table_text() -> str:
    """The table and what every endpoint shares: reason counters, the IPv4 ipcache, the
    port conversion maps and the fragment maps."""
    counters = "\n".join(f"  counter r_{r} {{}}" for r in REASONS)
    frag = "\n".join(
        f"  map {name}{sfx} {{ typeof {key} : meta {kind}; flags dynamic, timeout;"
        f" timeout {TIMEOUT}; }}"
        for sfx, key in (("", FRAG_KEY), ("6", FRAG_KEY6))
        for name, kind in (("fsm", "mark"), ("fdc", "priority"), ("fdm", "mark"),
                           ("fsc", "priority")))
    return f"""table {FAMILY} {TABLE} {{
{counters}
  map ipcache4 {{ type ipv4_addr : mark; flags interval; }}
  map ipcache6 {{ type ipv6_addr : mark; flags interval; }}
  map p2m {{ typeof th dport : meta mark; size 65536; }}
  map p2c {{ typeof th dport : meta priority; size 65536; }}
{frag}
}}"""


def conversion_elements(first: int, last: int) -> str:
    """Ports ``first``..``last`` into both conversion maps."""
    t = f"{FAMILY} {TABLE}"
    marks = ", ".join(f"{p} : {p}" for p in range(first, last + 1))
    classids = ", ".join(f"{p} : 0:{p:x}" for p in range(first, last + 1))
    return f"add element {t} p2m {{ {marks} }}\nadd element {t} p2c {{ {classids} }}"


FAMILIES = {
    # suffix, address, later fragment, first fragment, more fragments, fragment units,
    # fragment key, ipcache map, world identity
    4: ("", "ip", "ip frag-off & 0x1fff != 0", "ip frag-off & 0x3fff == 0x2000",
        "ip frag-off & 0x2000 != 0", "ip frag-off & 0x1fff", FRAG_KEY, "ipcache4", 2),
    6: ("6", "ip6", "frag frag-off != 0",
        "frag frag-off 0 frag more-fragments 1", "frag more-fragments 1",
        "frag frag-off", FRAG_KEY6,
        "ipcache6", 10),
}
UNFRAGMENTED = ("exthdr frag missing", "frag frag-off 0 frag more-fragments 0")
LINK_CONTROL = ("icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit,"
                " nd-neighbor-advert, nd-redirect } ip6 hoplimit 255",
                "icmpv6 type { mld-listener-query, mld-listener-report, mld-listener-done,"
                " mld2-listener-report } ip6 hoplimit 1")


def _family_text(e: int, direction: str, family: int) -> str:
    """One endpoint's chains and sets of one direction and family (policy maps are shared by
    both families: they name identities)."""
    sfx, ip, later, first, more, units, key, ipcache, world = FAMILIES[family]
    d = DIRS[direction]
    back = "out" if d == "in" else "in"
    peer = "saddr" if direction == "ingress" else "daddr"
    fed = f"{sfx}{e}{d}"
    return f"""
  map spec{fed} {{ typeof meta mark . meta l4proto . meta priority : verdict; flags interval; }}
  map any{fed} {{ typeof meta l4proto . meta priority : verdict; flags interval; }}
  map spnp{fed} {{ typeof meta mark . meta l4proto : verdict; flags interval; }}
  map anynp{fed} {{ typeof meta l4proto : verdict; flags interval; }}
  set rep{fed} {{ typeof {ip} saddr . {ip} daddr . meta l4proto . meta mark . meta priority;
                 flags dynamic, timeout; timeout {TIMEOUT}; }}
  set repnp{fed} {{ typeof {ip} saddr . {ip} daddr . meta l4proto; flags dynamic, timeout;
                   timeout {TIMEOUT}; }}
  chain allowedlater{fed} {{
    meta mark set {SENTINEL_MARK} meta priority set {SENTINEL_PRIORITY}
    jump fragreply{sfx}
    meta mark != {SENTINEL_MARK} meta priority != {SENTINEL_PRIORITY} update @rep{sfx}{e}{back} {{ {ip} daddr . {ip} saddr . meta l4proto . meta mark . meta priority }}
    counter name r_forwarded accept
  }}
  chain allowed{fed} {{
    {later} goto allowedlater{fed}
    meta mark set th dport map @p2m
    meta priority set th sport map @p2c
    update @rep{sfx}{e}{back} {{ {ip} daddr . {ip} saddr . meta l4proto . meta mark . meta priority }}
    counter name r_forwarded accept
  }}
  chain allowednp{fed} {{
    update @repnp{sfx}{e}{back} {{ {ip} daddr . {ip} saddr . meta l4proto }}
    counter name r_forwarded accept
  }}
  chain anyafter{fed} {{ meta l4proto . meta priority vmap @any{fed}; goto allowed{fed}; }}
  chain anyonly{fed} {{
    meta l4proto . meta priority vmap @any{fed}
    counter name r_policy_default drop
  }}
  chain anyafternp{fed} {{ meta l4proto vmap @anynp{fed}; goto allowednp{fed}; }}
  chain anyonlynp{fed} {{ meta l4proto vmap @anynp{fed}; counter name r_policy_default drop; }}
  chain judge{fed} {{
    {ip} saddr . {ip} daddr . meta l4proto . meta mark . meta priority @rep{fed} counter name r_forwarded accept
    meta mark set {world}
    meta mark set {ip} {peer} map @{ipcache}
    meta mark . meta l4proto . meta priority vmap @spec{fed}
    goto anyonly{fed}
  }}
  chain judgenp{fed} {{
    {ip} saddr . {ip} daddr . meta l4proto @repnp{fed} counter name r_forwarded accept
    meta mark set {world}
    meta mark set {ip} {peer} map @{ipcache}
    meta mark . meta l4proto vmap @spnp{fed}
    goto anyonlynp{fed}
  }}
  chain ported{fed} {{
    {first} jump fragrecord{sfx}
    meta mark set th sport map @p2m
    meta priority set th dport map @p2c
    goto judge{fed}
  }}
  chain later{fed} {{
    meta l4proto tcp {units} < 3 counter name r_frag_tiny drop
    meta l4proto sctp {units} < 2 counter name r_frag_tiny drop
    meta mark set {SENTINEL_MARK} meta priority set {SENTINEL_PRIORITY}
    jump fragports{sfx}
    meta mark != {SENTINEL_MARK} meta priority != {SENTINEL_PRIORITY} goto judge{fed}
    counter name r_frag_unknown drop
  }}
  chain l4{fed} {{
    meta l4proto != {PORTED} goto judgenp{fed}
    {later} goto later{fed}
    meta l4proto tcp @th,152,8 & 0 == 0 goto ported{fed}
    meta l4proto udp @th,56,8 & 0 == 0 goto ported{fed}
    meta l4proto sctp @th,88,8 & 0 == 0 goto ported{fed}
    {more} counter name r_frag_tiny drop
    counter name r_malformed drop
  }}"""


def endpoint_text(endpoint_id: int, device: str, ipv4: str, ipv6: str | None = None) -> str:
    """The chains, maps and sets of one endpoint on its host veth ``device``."""
    e = endpoint_id
    parts = []
    for direction, d in DIRS.items():
        ed = f"{e}{d}"
        parts.append(f"""
  chain denied{ed} {{ counter name r_policy_deny drop; }}""")
        parts += [_family_text(e, direction, family) for family in (4, 6)]
    hooks = []
    for hook, d in (("ingress", "out"), ("egress", "in")):
        ed = f"{e}{d}"
        leaving = d == "out"
        spoof4 = f"ip saddr != {ipv4} counter name r_spoofed drop" if leaving else ""
        spoof6 = ("ip6 saddr != " + ipv6 if ipv6 else "meta protocol ip6") + \
            " counter name r_spoofed drop" if leaving else ""
        within = " ip6 daddr { fe80::/10, ff02::/16 }" if leaving else ""
        control = "\n".join(f"    {whole} {c}{within} counter name r_forwarded accept"
                            for c in LINK_CONTROL for whole in UNFRAGMENTED)
        hooks.append(f"""
  chain ep{e}{hook} {{ type filter hook {hook} device "{device}" priority 0; policy accept;
    meta protocol arp counter name r_forwarded accept
    meta protocol ip meta l4proto 0-255 goto v4{ed}
    meta protocol ip6 meta l4proto 0-255 goto v6{ed}
    meta protocol {{ ip, ip6 }} counter name r_malformed drop
    counter name r_unsupported_l3 drop
  }}
  chain v4{ed} {{
    jump whole
    {spoof4}
    goto l4{ed}
  }}
  chain v6{ed} {{
    meta l4proto ah counter name r_malformed drop
    exthdr frag exists jump fragcut6
    jump whole6
{control}
    {spoof6}
    goto l46{ed}
  }}""")
    return f"table {FAMILY} {TABLE} {{" + "".join(parts) + "".join(hooks) + "\n}"


SENTINEL_MARK, SENTINEL_PRIORITY = "0xffffffff", "ffff:ffff"  # no port becomes these


SHARED_CHAINS = ("fragrecord", "fragports", "fragreply")
#: an IPv6 fragment header too short to hold its identification is malformed
FRAGCUT6 = "  chain fragcut6 { frag id 0-4294967295 return; counter name r_malformed drop; }"
#: a packet that is not a fragment must hold its whole transport header (before the source
#: check, as every malformed packet)
WHOLE = "\n".join(f"""  chain whole{sfx} {{
    meta l4proto != {{ tcp, udp, sctp }} return
{fragment}
    meta l4proto tcp @th,152,8 & 0 == 0 return
    meta l4proto udp @th,56,8 & 0 == 0 return
    meta l4proto sctp @th,88,8 & 0 == 0 return
    counter name r_malformed drop
  }}""" for sfx, fragment in (
    ("", "    ip frag-off & 0x3fff != 0 return"),
    ("6", "    frag frag-off != 0 return\n    frag more-fragments 1 return")))
RECORDS = (("sport", "mark", "fsm"), ("dport", "mark", "fdm"),  # port, where to, map
           ("sport", "priority", "fsc"), ("dport", "priority", "fdc"))
LOOKUPS = {"fragports": (("mark", "fsm"), ("priority", "fdc")),  # as the policy steps want
           "fragreply": (("mark", "fdm"), ("priority", "fsc"))}  # the other way round


def shared_chains_text() -> str:
    """The empty chains every endpoint jumps to for fragments: ``fragrecord`` writes a first
    fragment's ports under its fragment key; ``fragports`` and ``fragreply`` read them back
    for a later fragment, as the policy steps want them and the other way round."""
    chains = "\n".join(f"  chain {c}{sfx} {{ }}" for c in SHARED_CHAINS for sfx in ("", "6"))
    return f"table {FAMILY} {TABLE} {{\n{chains}\n{FRAGCUT6}\n{WHOLE}\n}}"


def shared_rules() -> list[tuple[str, str | list[bytes]]]:
    """The rules of :func:`shared_chains_text`, in order, each ``(chain, rule)``: a rule is
    nft text, or netlink expressions where nft 1.0.6 cannot say (or miscompiles) the IPv6 one."""
    from meshagent.plugins.nftables.netlink import fragment6_lookup, fragment6_update
    out: list[tuple[str, str | list[bytes]]] = []
    for port, meta, name in RECORDS:
        conversion = "p2m" if meta == "mark" else "p2c"
        for sfx in ("", "6"):
            out.append((f"fragrecord{sfx}", f"meta {meta} set th {port} map @{conversion}"))
        out.append(("fragrecord", f"update @{name} {{ {FRAG_KEY} : meta {meta} }}"))
        out.append(("fragrecord6", fragment6_update(meta, f"{name}6")))
    for chain, pairs in LOOKUPS.items():
        for meta, name in pairs:
            out.append((chain, f"meta {meta} set {FRAG_KEY} map @{name}"))
            out.append((f"{chain}6", fragment6_lookup(meta, f"{name}6")))
    return out
