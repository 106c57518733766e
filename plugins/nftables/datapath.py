"""The nftables datapath (WORK IN PROGRESS, issue 19): keeps the ``netdev meshagent`` table equal
to what the agent resolved. Every change is one nftables transaction (atomic: a packet sees the
state before or after it, never a half-written one)."""

import ipaddress
import socket

from meshagent.events import ChangeKind
from meshagent.model.endpoint import Endpoint
from meshagent.plugins.nftables import ruleset
from meshagent.plugins.nftables.intervals import (
    DENY,
    PORT_PROTOCOLS,
    flatten_prefixes,
    policy_segments,
)
from meshagent.plugins.nftables.netlink import add_rules, read_counters

DIRECTIONS = {"ingress": "in", "egress": "out"}


class NftablesError(Exception):
    pass


class NftablesDatapath:
    """Meets :class:`meshagent.datapath.Datapath`."""

    def __init__(self, device_of=socket.if_indextoname):
        import nftables  # Debian's python3-nftables (libnftables)
        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)
        self.device_of = device_of
        self.endpoints: dict[int, Endpoint] = {}
        self.groups: dict[tuple[int, str, int], dict] = {}  # (ep, dir, identity) -> keys
        self.written: dict[tuple[int, str, int], list[str]] = {}  # -> elements written
        self.ipcache: dict[int, dict] = {4: {}, 6: {}}  # family -> {prefix: identity}
        self.ranges: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}  # as written

    def _run(self, text: str) -> str:
        rc, out, err = self.nft.cmd(text)
        if rc != 0:
            raise NftablesError(f"nftables refused: {err.strip()}")
        return out

    async def start(self) -> None:
        self._run(f"add table {ruleset.FAMILY} {ruleset.TABLE}")
        self._run(f"delete table {ruleset.FAMILY} {ruleset.TABLE}")
        self._run(ruleset.table_text())
        self._run(ruleset.shared_chains_text())
        for chain, rule in ruleset.shared_rules():
            if isinstance(rule, str):
                self._run(f"add rule {ruleset.FAMILY} {ruleset.TABLE} {chain} {rule}")
            else:
                add_rules(ruleset.FAMILY, ruleset.TABLE, [(chain, rule)])
        for first in range(0, 65536, 4096):
            self._run(ruleset.conversion_elements(first, first + 4095))

    async def stop(self) -> None:
        pass

    async def endpoint_added(self, endpoint: Endpoint) -> None:
        if endpoint.id in self.endpoints:  # TODO (issue 19): keep state across a restart
            await self.endpoint_removed(self.endpoints[endpoint.id])
        self.endpoints[endpoint.id] = endpoint
        self._run(ruleset.endpoint_text(endpoint.id, self.device_of(endpoint.ifindex),
                                        str(endpoint.ipv4),
                                        str(endpoint.ipv6) if endpoint.ipv6 else None))

    async def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.endpoints.pop(endpoint.id, None)
        for group in [g for g in self.groups if g[0] == endpoint.id]:
            self.groups.pop(group)
            self.written.pop(group, None)
        e, t = endpoint.id, f"{ruleset.FAMILY} {ruleset.TABLE}"
        chains = [f"ep{e}{h}" for h in ("ingress", "egress")]
        maps, sets = [], []
        for d in DIRECTIONS.values():
            chains += [f"v4{e}{d}", f"v6{e}{d}", f"denied{e}{d}"]
            for sfx in ("", "6"):
                fed = f"{sfx}{e}{d}"
                chains += [f"{c}{fed}" for c in (
                    "l4", "ported", "later", "judge", "judgenp", "anyonly", "anyafter",
                    "anyonlynp", "anyafternp", "allowed", "allowedlater", "allowednp")]
                maps += [f"{m}{fed}" for m in ("spec", "any", "spnp", "anynp")]
                sets += [f"{s}{fed}" for s in ("rep", "repnp")]
        # rules and map elements refer to chains and sets: empty the chains first
        commands = [f"flush chain {t} {c}" for c in chains]
        commands += [f"delete map {t} {m}" for m in maps]
        commands += [f"delete chain {t} {c}" for c in chains]
        commands += [f"delete set {t} {s}" for s in sets]
        self._run("\n".join(commands))

    # -- ipcache ------------------------------------------------------------------------------

    async def update_ipcache(self, changes) -> None:
        touched = set()
        for kind, entry in changes:
            rows = self.ipcache[entry.prefix.version]
            if kind is ChangeKind.DELETE:
                rows.pop(entry.prefix, None)
            else:
                rows[entry.prefix] = entry.identity
            touched.add(entry.prefix.version)
        self._write_ipcache(touched)

    def _write_ipcache(self, families) -> None:
        """Each family's flattened ipcache, old ranges out and new ones in, in one
        transaction."""
        t = f"{ruleset.FAMILY} {ruleset.TABLE}"
        commands = []
        for family in sorted(families):
            new = flatten_prefixes(self.ipcache[family].items())
            old = set(self.ranges[family]) - set(new)
            added = set(new) - set(self.ranges[family])
            if old:
                commands.append(f"delete element {t} ipcache{family} {{ "
                                + ", ".join(_ip_range(family, a, b) for a, b, _ in sorted(old))
                                + " }")
            if added:
                commands.append(f"add element {t} ipcache{family} {{ "
                                + ", ".join(f"{_ip_range(family, a, b)} : {i}"
                                            for a, b, i in sorted(added)) + " }")
            self.ranges[family] = new
        if commands:
            self._run("\n".join(commands))

    # -- policy -------------------------------------------------------------------------------

    async def update_policy(self, endpoint_id: int, changes) -> None:
        touched = set()
        for change in changes:
            group = (endpoint_id, DIRECTIONS[change.key.direction], change.key.identity)
            keys = self.groups.setdefault(group, {})
            if change.verdict is None:
                keys.pop(change.key, None)
            else:
                keys[change.key] = change.verdict
            touched.add(group)
        self._write_groups(touched)

    def _write_groups(self, groups) -> None:
        commands = []
        for group in sorted(groups):
            endpoint_id, d, identity = group
            wanted = self._elements(group) if group in self.groups else {}
            for name, elements in self.written.get(group, {}).items():
                if elements:
                    commands.append(f"delete element {ruleset.FAMILY} {ruleset.TABLE} {name}"
                                    f" {{ {', '.join(e.split(' : ')[0] for e in elements)} }}")
            for name, elements in wanted.items():
                if elements:
                    commands.append(f"add element {ruleset.FAMILY} {ruleset.TABLE} {name}"
                                    f" {{ {', '.join(elements)} }}")
            self.written[group] = wanted
            if not self.groups.get(group):
                self.groups.pop(group, None)
        if commands:
            self._run("\n".join(commands))

    def _elements(self, group) -> dict[str, list[str]]:
        """The map elements of one group: the peer's identity, or any (identity 0)."""
        endpoint_id, d, identity = group
        keys = [(k.protocol, k.port, k.end_port, v.value)
                for k, v in self.groups.get(group, {}).items()]
        e = endpoint_id
        ported, portless = ("spec", "spnp") if identity else ("any", "anynp")
        prefix = f"{identity} . " if identity else ""
        out: dict[str, list[str]] = {}
        then = "anyafter" if identity else "allowed"
        for sfx in ("", "6"):  # each family's maps jump to its own chains
            fed = f"{sfx}{e}{d}"
            to_ported = out.setdefault(f"{ported}{fed}", [])
            to_portless = out.setdefault(f"{portless}{fed}", [])
            for first, last, low, high, verdict in policy_segments(keys):
                target = f"goto denied{e}{d}" if verdict == DENY else f"goto {then}{fed}"
                target_np = f"goto denied{e}{d}" if verdict == DENY else f"goto {then}np{fed}"
                ports = f"0:{low:x}-0:{high:x}"  # nft 1.0.6 cannot delete a single-value one
                for protocol in PORT_PROTOCOLS:
                    if first <= protocol <= last:
                        to_ported.append(f"{prefix}{protocol} . {ports} : {target}")
                if low == 0:
                    for a, b in _without_port_protocols(first, last):
                        to_portless.append(f"{prefix}{_range(a, b)} : {target_np}")
        return out

    async def reconcile(self, policies, ipcache) -> None:
        groups = {}
        for endpoint_id, verdicts in policies.items():
            for key, verdict in verdicts.items():
                group = (endpoint_id, DIRECTIONS[key.direction], key.identity)
                groups.setdefault(group, {})[key] = verdict
        stale = set(self.groups) | set(self.written)
        self.groups = groups
        self._write_groups(stale | set(groups))
        self.ipcache = {family: {e.prefix: e.identity for e in ipcache
                                 if e.prefix.version == family} for family in (4, 6)}
        self._write_ipcache((4, 6))

    async def update_services(self, services) -> None:
        pass  # TODO (issue 19): refuse or balance

    def counters(self) -> dict[str, int]:
        return read_counters(ruleset.FAMILY, ruleset.TABLE)


def _range(a: int, b: int) -> str:
    """Always a range: nft 1.0.6 cannot delete a single-value element of an interval map."""
    return f"{a}-{b}"


def _without_port_protocols(first: int, last: int) -> list[tuple[int, int]]:
    out, start = [], first
    for protocol in PORT_PROTOCOLS:
        if first <= protocol <= last:
            if start < protocol:
                out.append((start, protocol - 1))
            start = protocol + 1
    if start <= last:
        out.append((start, last))
    return out


def _ip_range(family: int, a: int, b: int) -> str:
    address = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return f"{address(a)}-{address(b)}"
