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

WORK IN PROGRESS (issue 19). IPv6 does not load yet. nft 1.0.6's text grammar refuses
``frag id`` inside ``meta mark set <concatenation> map @m`` (those rules go through the JSON
API, :func:`fragment_rules`), and its linearizer aborts the process (assertion ``dreg <
ctx->reg_low``) on ``update @m { ip6 saddr . ip6 daddr . frag id . meta l4proto : meta mark }``
— the IPv6 first-fragment record needs another shape (or a newer nftables).
"""

TABLE = "meshagent"
FAMILY = "netdev"
REASONS = ("forwarded", "policy_deny", "policy_default", "spoofed", "frag_tiny",
           "frag_unknown", "malformed", "unsupported_l3")
DIRS = {"ingress": "in", "egress": "out"}  # the pod's policy direction
TIMEOUT = "60s"
FRAG_KEY = "ip saddr . ip daddr . ip id . meta l4proto"
FRAG_KEY6 = "ip6 saddr . ip6 daddr . frag id . meta l4proto"
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
        "frag frag-off", "ip6 saddr . ip6 daddr . frag id . meta l4proto",
        "ipcache6", 10),
}
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
  chain allowedlater{fed} {{ }}
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
    {first} meta mark set th sport map @p2m
    {first} update @fsm{sfx} {{ {key} : meta mark }}
    {first} meta mark set th dport map @p2m
    {first} update @fdm{sfx} {{ {key} : meta mark }}
    {first} meta priority set th sport map @p2c
    {first} update @fsc{sfx} {{ {key} : meta priority }}
    {first} meta priority set th dport map @p2c
    {first} update @fdc{sfx} {{ {key} : meta priority }}
    meta mark set th sport map @p2m
    meta priority set th dport map @p2c
    goto judge{fed}
  }}
  chain later{fed} {{ }}
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
        control = "\n".join(f"    exthdr frag missing {c}{within} counter name r_forwarded accept"
                            for c in LINK_CONTROL)
        hooks.append(f"""
  chain ep{e}{hook} {{ type filter hook {hook} device "{device}" priority 0; policy accept;
    meta protocol arp counter name r_forwarded accept
    meta protocol ip meta l4proto 0-255 goto v4{ed}
    meta protocol ip6 meta l4proto 0-255 goto v6{ed}
    meta protocol {{ ip, ip6 }} counter name r_malformed drop
    counter name r_unsupported_l3 drop
  }}
  chain v4{ed} {{
    {spoof4}
    goto l4{ed}
  }}
  chain v6{ed} {{
{control}
    {spoof6}
    goto l46{ed}
  }}""")
    return f"table {FAMILY} {TABLE} {{" + "".join(parts) + "".join(hooks) + "\n}"


def _key_json(family: int) -> dict:
    ip = "ip" if family == 4 else "ip6"
    third = {"payload": {"protocol": "ip", "field": "id"}} if family == 4 else \
        {"exthdr": {"name": "frag", "field": "id"}}
    return {"concat": [{"payload": {"protocol": ip, "field": "saddr"}},
                       {"payload": {"protocol": ip, "field": "daddr"}}, third,
                       {"meta": {"key": "l4proto"}}]}


def _set_from_fragment(meta: str, family: int, name: str) -> dict:
    return {"mangle": {"key": {"meta": {"key": meta}},
                       "value": {"map": {"key": _key_json(family), "data": f"@{name}"}}}}


def fragment_rules(endpoint_id: int) -> list:
    """The rules that take a later fragment's ports from its first fragment, as libnftables
    JSON commands ("text" for those its text grammar takes): the text grammar refuses the
    IPv6 fragment header's ``frag id`` in a map-lookup assignment."""
    out: list = []
    for d in DIRS.values():
        back = "out" if d == "in" else "in"
        for family in (4, 6):
            sfx, ip, _, _, _, units, _, _, _ = FAMILIES[family]
            fed = f"{sfx}{endpoint_id}{d}"
            t = f"add rule {FAMILY} {TABLE}"

            def rule(chain: str, *expr) -> dict:
                return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain,
                                         "expr": list(expr)}}}
            out += [
                f"{t} later{fed} meta l4proto tcp {units} < 3 counter name r_frag_tiny drop",
                f"{t} later{fed} meta l4proto sctp {units} < 2 counter name r_frag_tiny drop",
                rule(f"later{fed}", _set_from_fragment("mark", family, f"fsm{sfx}")),
                rule(f"later{fed}", _set_from_fragment("priority", family, f"fdc{sfx}"),
                     {"goto": {"target": f"judge{fed}"}}),
                f"{t} later{fed} counter name r_frag_unknown drop",
                rule(f"allowedlater{fed}", _set_from_fragment("mark", family, f"fdm{sfx}")),
                rule(f"allowedlater{fed}", _set_from_fragment("priority", family, f"fsc{sfx}")),
                f"{t} allowedlater{fed} update @rep{sfx}{endpoint_id}{back} {{ {ip} daddr . {ip}"
                f" saddr . meta l4proto . meta mark . meta priority }}",
                f"{t} allowedlater{fed} counter name r_forwarded accept",
            ]
    return out
