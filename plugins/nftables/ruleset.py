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

WORK IN PROGRESS (issue 19): IPv4 only.
"""

TABLE = "meshagent"
FAMILY = "netdev"
REASONS = ("forwarded", "policy_deny", "policy_default", "spoofed", "frag_tiny",
           "frag_unknown", "malformed", "unsupported_l3")
DIRS = {"ingress": "in", "egress": "out"}  # the pod's policy direction
TIMEOUT = "60s"
FRAG_KEY = "ip saddr . ip daddr . ip id . meta l4proto"
PORTED = "{ tcp, udp, sctp }"


def table_text() -> str:
    """The table and what every endpoint shares: reason counters, the IPv4 ipcache, the
    port conversion maps and the fragment maps."""
    counters = "\n".join(f"  counter r_{r} {{}}" for r in REASONS)
    frag = "\n".join(
        f"  map {name} {{ typeof {FRAG_KEY} : meta {kind}; flags dynamic, timeout;"
        f" timeout {TIMEOUT}; }}"
        for name, kind in (("fsm", "mark"), ("fdc", "priority"), ("fdm", "mark"),
                           ("fsc", "priority")))
    return f"""table {FAMILY} {TABLE} {{
{counters}
  map ipcache4 {{ type ipv4_addr : mark; flags interval; }}
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


def endpoint_text(endpoint_id: int, device: str, ipv4: str) -> str:
    """The chains, maps and sets of one endpoint on its host veth ``device``."""
    e = endpoint_id
    parts = []
    for direction, d in DIRS.items():
        back = "out" if d == "in" else "in"
        peer = "saddr" if direction == "ingress" else "daddr"
        ed = f"{e}{d}"
        parts.append(f"""
  map spec{ed} {{ typeof meta mark . meta l4proto . meta priority : verdict; flags interval; }}
  map any{ed} {{ typeof meta l4proto . meta priority : verdict; flags interval; }}
  map spnp{ed} {{ typeof meta mark . meta l4proto : verdict; flags interval; }}
  map anynp{ed} {{ typeof meta l4proto : verdict; flags interval; }}
  set rep{ed} {{ typeof ip saddr . ip daddr . meta l4proto . meta mark . meta priority;
                 flags dynamic, timeout; timeout {TIMEOUT}; }}
  set repnp{ed} {{ typeof ip saddr . ip daddr . meta l4proto; flags dynamic, timeout;
                   timeout {TIMEOUT}; }}
  chain denied{ed} {{ counter name r_policy_deny drop; }}
  chain allowed{ed} {{
    ip frag-off & 0x1fff != 0 meta mark set {FRAG_KEY} map @fdm
    ip frag-off & 0x1fff != 0 meta priority set {FRAG_KEY} map @fsc
    ip frag-off & 0x1fff == 0 meta mark set th dport map @p2m
    ip frag-off & 0x1fff == 0 meta priority set th sport map @p2c
    update @rep{e}{back} {{ ip daddr . ip saddr . meta l4proto . meta mark . meta priority }}
    counter name r_forwarded accept
  }}
  chain allowednp{ed} {{
    update @repnp{e}{back} {{ ip daddr . ip saddr . meta l4proto }}
    counter name r_forwarded accept
  }}
  chain anyafter{ed} {{ meta l4proto . meta priority vmap @any{ed}; goto allowed{ed}; }}
  chain anyonly{ed} {{
    meta l4proto . meta priority vmap @any{ed}
    counter name r_policy_default drop
  }}
  chain anyafternp{ed} {{ meta l4proto vmap @anynp{ed}; goto allowednp{ed}; }}
  chain anyonlynp{ed} {{ meta l4proto vmap @anynp{ed}; counter name r_policy_default drop; }}
  chain judge{ed} {{
    ip saddr . ip daddr . meta l4proto . meta mark . meta priority @rep{ed} counter name r_forwarded accept
    meta mark set 2
    meta mark set ip {peer} map @ipcache4
    meta mark . meta l4proto . meta priority vmap @spec{ed}
    goto anyonly{ed}
  }}
  chain judgenp{ed} {{
    ip saddr . ip daddr . meta l4proto @repnp{ed} counter name r_forwarded accept
    meta mark set 2
    meta mark set ip {peer} map @ipcache4
    meta mark . meta l4proto vmap @spnp{ed}
    goto anyonlynp{ed}
  }}
  chain ported{ed} {{
    ip frag-off & 0x3fff == 0x2000 meta mark set th sport map @p2m
    ip frag-off & 0x3fff == 0x2000 update @fsm {{ {FRAG_KEY} : meta mark }}
    ip frag-off & 0x3fff == 0x2000 meta mark set th dport map @p2m
    ip frag-off & 0x3fff == 0x2000 update @fdm {{ {FRAG_KEY} : meta mark }}
    ip frag-off & 0x3fff == 0x2000 meta priority set th sport map @p2c
    ip frag-off & 0x3fff == 0x2000 update @fsc {{ {FRAG_KEY} : meta priority }}
    ip frag-off & 0x3fff == 0x2000 meta priority set th dport map @p2c
    ip frag-off & 0x3fff == 0x2000 update @fdc {{ {FRAG_KEY} : meta priority }}
    meta mark set th sport map @p2m
    meta priority set th dport map @p2c
    goto judge{ed}
  }}
  chain later{ed} {{
    meta l4proto tcp ip frag-off & 0x1fff < 3 counter name r_frag_tiny drop
    meta l4proto sctp ip frag-off & 0x1fff < 2 counter name r_frag_tiny drop
    meta mark set {FRAG_KEY} map @fsm
    meta priority set {FRAG_KEY} map @fdc goto judge{ed}
    counter name r_frag_unknown drop
  }}""")
    hooks = []
    for hook, d in (("ingress", "out"), ("egress", "in")):
        ed = f"{e}{d}"
        spoof = f"    ip saddr != {ipv4} counter name r_spoofed drop\n" if d == "out" else ""
        hooks.append(f"""
  chain ep{e}{hook} {{ type filter hook {hook} device "{device}" priority 0; policy accept;
    meta protocol arp counter name r_forwarded accept
    meta protocol != ip counter name r_unsupported_l3 drop
    meta l4proto 0-255 goto v4{ed}
    counter name r_malformed drop
  }}
  chain v4{ed} {{
{spoof}    meta l4proto != {PORTED} goto judgenp{ed}
    ip frag-off & 0x1fff != 0 goto later{ed}
    meta l4proto tcp @th,152,8 & 0 == 0 goto ported{ed}
    meta l4proto udp @th,56,8 & 0 == 0 goto ported{ed}
    meta l4proto sctp @th,88,8 & 0 == 0 goto ported{ed}
    ip frag-off & 0x2000 != 0 counter name r_frag_tiny drop
    counter name r_malformed drop
  }}""")
    return f"table {FAMILY} {TABLE} {{" + "".join(parts) + "".join(hooks) + "\n}"
