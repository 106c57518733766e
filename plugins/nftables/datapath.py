"""The nftables datapath: keeps one ``netdev`` table equal to what the agent resolved.

Every batch's ipcache ranges and policy elements are one transaction of libnftables JSON
commands (atomic: a packet sees the state before or after it, never a half-written one);
chains, created once per endpoint, are nft text through the same library. A restarted agent
finds its table (by its layout chain) and keeps it, reply sets and all, until the first sync;
then it rewrites each map in one transaction and deletes what is stale. Flow events come back
from the table's NFLOG group and go to the agent's sink (:meth:`NftablesDatapath.describe`).
"""

import asyncio
import bisect
import errno
import ipaddress
import json
import logging
import re
import socket
import time

import attrs

from meshagent import hookimpl
from meshagent.plugin import (
    ProxyRoutes,
    REASON_TEXT,
    DatapathBatch,
    Endpoint,
    FlowEvent,
    FlowEvents,
    FlowEventSink,
    Health,
    StatusSection,
    verdict_metrics,
    world_identity,
)
from meshagent.plugins.nftables import netlink
from meshagent.plugins.nftables.intervals import (
    PORT_PROTOCOLS,
    TYPED_PROTOCOLS,
    flatten_prefixes,
    policy_segments,
)
from meshagent.plugins.nftables.ruleset import (
    DIRS,
    EVENTS,
    FAMILY,
    REASONS,
    UNLOGGED,
    Ruleset,
    judged_sets,
    policy_map,
    verdict_target,
)

log = logging.getLogger(__name__)

#: ``ma:<endpoint>:<in|out>:<event>:<reason>:<match>``, the table's log prefixes (ruleset.py)
PREFIX = re.compile(r"ma:([0-9]{1,10}):(in|out):([a-z]+):([a-z0-9_]+):([0-6])")
#: the reasons each event may carry
EVENT_REASONS = {"drop": set(REASON_TEXT) - {"forwarded"}, "verdict": {"forwarded"},
                 "redirect": {"forwarded"},
                 "audit": {"policy_deny", "policy_default"}, "trace": {"forwarded"},
                 "reply": {"forwarded"}}


class NftablesError(Exception):
    pass


@attrs.frozen
class NftablesSettings:
    table: str = "meshagent"
    log_group: int = 7
    flow_timeout: int = 21600
    flows: bool = True  # --enable-hubble: policy verdicts and traces too, not only drops
    event_rate: int = 1000
    drop_rate: int = 50

    @classmethod
    def from_config(cls, config) -> "NftablesSettings":
        return cls(config.get("nftables-table"), config.get("nftables-log-group"),
                   config.get("nftables-flow-timeout"), bool(config.get("enable-hubble")),
                   config.get("nftables-event-rate"), config.get("nftables-drop-rate"))


class NftablesDatapath:
    """Meets :class:`meshagent.datapath.Datapath`."""

    def __init__(self, settings: NftablesSettings = NftablesSettings(),
                 events: FlowEventSink | None = None, device_of=socket.if_indextoname,
                 proxy_routes=None):
        self.rules = Ruleset(settings.table, settings.log_group, log_rate=settings.drop_rate,
                             flow_timeout=settings.flow_timeout, flows=settings.flows,
                             event_rate=settings.event_rate)
        self.events = events if events is not None else FlowEvents()  # flow events go here
        self.device_of = device_of
        self.proxy_routes = proxy_routes or ProxyRoutes()  # packets marked for the DNS proxy
        self.nft = None
        self.endpoints: dict[int, Endpoint] = {}
        self.groups: dict[tuple[int, str, int], dict] = {}  # (ep, dir, identity) -> keys
        self.written: dict[tuple[int, str, int], dict[str, set[tuple]]] = {}  # -> elements
        self.ipcache: dict[int, dict] = {4: {}, 6: {}}  # family -> {prefix: identity}
        self.ranges: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}  # as written
        self.found: dict[int, str] = {}  # endpoint id -> device, of a table found at start
        self.adopted = False  # the table was found: maps are rewritten whole at the first sync
        self.dirty = False  # a write failed: maps are rewritten whole at the next reconcile
        self.synced = False
        self.started = False
        self.start_error = ""
        self.services = 0  # merged services asked for (not balanced here)
        self.proxy_port = 0  # where the DNS proxy listens (0: none; its packets drop)
        self.routed = False  # the to-proxy rule and table are installed
        self._log_socket: socket.socket | None = None
        self._next_seq = 0  # the NFLOG message expected next: a gap is messages lost
        self._unlogged = 0  # the table's count of events over the rate, as last reported
        self._unlogged_check: asyncio.TimerHandle | None = None
        self.lost_in_socket = 0  # events the kernel could not deliver (a full socket buffer)
        self.lost_to_rate = 0  # events over the rate, counted but not logged by the table

    def _run(self, text: str) -> str:
        rc, out, err = self.nft.cmd(text)
        if rc != 0:
            raise NftablesError(f"nftables refused: {err.strip()}")
        return out

    def _transaction(self, commands: list[dict]) -> None:
        """libnftables JSON commands, applied as one transaction."""
        if not commands:
            return
        rc, _, err = self.nft.json_cmd({"nftables": commands})
        if rc != 0:  # what the maps hold is no longer known: the next reconcile rewrites them
            self.dirty = True
            raise NftablesError(f"nftables refused: {err.strip()}")

    def _elements_command(self, verb: str, name: str, elements) -> dict:
        where = {"family": FAMILY, "table": self.rules.table, "name": name}
        return {verb: {"element": {**where, "elem": list(elements)}}}

    def _flush_command(self, name: str) -> dict:
        return {"flush": {"map": {"family": FAMILY, "table": self.rules.table, "name": name}}}

    def _json(self, text: str) -> list[dict]:
        return json.loads(self._run(text) or '{"nftables": []}')["nftables"]

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            import nftables  # Debian's python3-nftables (libnftables)
            self.nft = nftables.Nftables()
            self.nft.set_json_output(True)
            if not self._adopt():
                self._create()
            self._open_log()
            self.started = True
        except (ImportError, NftablesError, OSError) as exc:
            self.start_error = str(exc)
            log.error("nftables datapath NOT enforcing: %s", exc)
            raise

    def _adopt(self) -> bool:
        """Keep the table a previous agent left, if it has this layout."""
        tables = [o["table"] for o in self._json(f"list tables {FAMILY}") if "table" in o]
        mine = [t for t in tables if t["name"] == self.rules.table]
        if not mine:
            return False
        chains = [item["chain"] for item in self._json(f"list chains {FAMILY}")
                  if item.get("chain", {}).get("table") == self.rules.table]
        if self.rules.layout not in {chain["name"] for chain in chains}:
            log.warning("nftables: table %s has another layout; replacing it", self.rules.ref)
            self._run(f"delete table {self.rules.ref}")
            return False
        for chain in chains:
            name = chain["name"]
            if name.startswith("ep_") and name.endswith("_ingress"):
                self.found[int(name.split("_")[1])] = self._device(name)
        self.adopted = True
        log.info("nftables: kept table %s with %d endpoints until the first sync",
                 self.rules.ref, len(self.found))
        return True

    def _device(self, chain: str) -> str:
        """The device a base chain hooks (nft 1.0.6's JSON listing leaves it out)."""
        self.nft.set_json_output(False)
        try:
            text = self._run(f"list chain {self.rules.ref} {chain}")
        finally:
            self.nft.set_json_output(True)
        found = re.search(r'device "([^"]+)"', text)
        return found.group(1) if found else ""

    def _create(self) -> None:
        self._run(self.rules.table_text())
        for first in range(0, 65536, 8192):
            self._run(self.rules.conversion_elements(first, first + 8191))
        self._run(self.rules.icmp_elements())
        for chain, rule in self.rules.shared_rules():
            if isinstance(rule, str):
                self._run(f"add rule {self.rules.ref} {chain} {rule}")
            else:
                netlink.add_rules(FAMILY, self.rules.table, [(chain, rule)])

    async def stop(self) -> None:
        """Leave the table: a restarted agent keeps enforcing with it. Packets for the DNS
        proxy (which stops with the agent) are dropped from now on, and the proxy's table
        and host routing go: a rule left behind would misroute the next run's packets."""
        if self.started and (self.proxy_port or self.routed):
            await self._set_proxy_port(0)
        if self._unlogged_check is not None:
            self._unlogged_check.cancel()
            self._unlogged_check = None
        if self._log_socket is not None:
            asyncio.get_running_loop().remove_reader(self._log_socket.fileno())
            self._log_socket.close()
            self._log_socket = None

    # -- batches ------------------------------------------------------------------------------

    async def apply(self, batch: DatapathBatch) -> None:
        """The contract's order: endpoints added (their chains and maps made); the policy
        elements and the ipcache ranges together in one transaction, so a packet meets the
        state before the batch or after it, nothing between (with it, the judged sets of the
        endpoints whose verdicts may have changed, every endpoint's when the ipcache changed,
        are flushed: their connections are judged again); the services (counted, not
        balanced); endpoints removed. Until the first sync, an adopted table is left as the
        last agent wrote it: changes are kept and written by the reconcile."""
        touched = set()
        for endpoint in batch.added:
            touched |= self._add_endpoint(endpoint)
        for endpoint_id, changes in batch.policy.items():
            touched |= self._change_groups(endpoint_id, changes)
        families = self._change_ipcache(batch.ipcache_upserts, batch.ipcache_deletes)
        if (touched or families or batch.policy) and (self.synced or not self.adopted):
            groups, written = self._group_commands(touched)
            ranges, drawn = self._ipcache_commands(families)
            judged = self._judged_flushes(self.endpoints if families else batch.policy)
            self._transaction(groups + ranges + judged)
            self._committed(written, drawn)
        if batch.services is not None:
            self._count_services(batch.services)
        if batch.proxy_port is not None:
            await self._set_proxy_port(batch.proxy_port)
        for endpoint in batch.removed:
            self._remove_endpoint(endpoint)

    async def _set_proxy_port(self, port: int) -> None:
        """Where packets for the DNS proxy go: the host routing and the proxy table first,
        then the netdev table's shared chain marks them for it; without a proxy, that chain
        drops them first, then the rest goes."""
        ref = self.rules.ref
        proxy_table = f"inet {self.rules.table}_proxy"
        if port:
            if not self.routed:
                await asyncio.to_thread(self.proxy_routes.install)
                self.routed = True
            # (nft 1.0.6 has no "destroy": adding the table first makes the delete safe)
            self._run(f"add table {proxy_table}\ndelete table {proxy_table}\n"
                      + self.rules.proxy_table_text(port))
        self._run(f"flush chain {ref} toproxy\nadd rule {ref} toproxy"
                  f" {self.rules.toproxy_rule(port)}")
        if not port:
            self._run(f"add table {proxy_table}\ndelete table {proxy_table}")
            if self.routed:
                await asyncio.to_thread(self.proxy_routes.remove)
                self.routed = False
        self.proxy_port = port

    # -- connections (ReportsConnections) --------------------------------------------------

    async def connected_peers(self) -> dict[int, frozenset]:
        """Per endpoint, the peers of the connections it opened that are still tracked: the
        sources of the elements of its reply sets for packets entering it (``rep``,
        ``repnp``), which a connection's packets refresh and which expire with it."""
        peers: dict[int, set] = {}
        for endpoint_id in list(self.endpoints):
            for family in (4, 6):
                for kind in ("rep", "repnp"):
                    name = f"{kind}{family}_{endpoint_id}_in"
                    for item in self._json(f"list set {self.rules.ref} {name}"):
                        for element in item.get("set", {}).get("elem", []):
                            value = element.get("elem", {}).get("val", element) \
                                if isinstance(element, dict) else element
                            fields = value.get("concat", []) if isinstance(value, dict) else []
                            if fields:
                                peers.setdefault(endpoint_id, set()).add(
                                    ipaddress.ip_address(fields[0]))
        return {endpoint: frozenset(addresses) for endpoint, addresses in peers.items()}

    # -- endpoints ----------------------------------------------------------------------------

    def _add_endpoint(self, endpoint: Endpoint) -> set:
        """Make (or keep) an endpoint's chains, maps and sets; the policy groups to write
        again (a changed endpoint on another device got fresh, empty maps)."""
        device = self.device_of(endpoint.ifindex)
        ipv6 = str(endpoint.ipv6) if endpoint.ipv6 else None
        rules = self.rules.endpoint(endpoint.id, device, str(endpoint.ipv4), ipv6,
                                    endpoint.policy_audit)
        held = self.endpoints.get(endpoint.id)
        found = self.found.pop(endpoint.id, None)
        again: set = set()
        if found == device or (held is not None and self.device_of(held.ifindex) == device):
            # restored, or changed in place (a new identity, audit mode): keep its reply sets
            # and policy maps; its connections are judged again
            self._run(rules.kept_text(str(endpoint.ipv4), ipv6, endpoint.policy_audit))
        else:
            if held is not None or found is not None:
                self._delete(endpoint.id)
                again = {g for g in self.groups if g[0] == endpoint.id}
                for group in again:
                    self.written.pop(group, None)
            self._run(rules.text())
        self.endpoints[endpoint.id] = endpoint
        return again

    def _remove_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoints.pop(endpoint.id, None)
        for group in [g for g in self.groups if g[0] == endpoint.id]:
            self.groups.pop(group)
        for group in [g for g in self.written if g[0] == endpoint.id]:
            self.written.pop(group)
        self._delete(endpoint.id)

    def _delete(self, endpoint_id: int) -> None:
        """Remove one endpoint's objects: hooks first, then rules (they name maps and
        chains), then the maps, chains and sets."""
        rules = self.rules.endpoint(endpoint_id, "-", "0.0.0.0", None)
        t = self.rules.ref
        commands = [f"delete chain {t} {c}" for c in rules.base_chains]
        commands += [f"flush chain {t} {c}" for c in rules.chains if c not in rules.base_chains]
        commands += [f"delete map {t} {m}" for m in rules.maps]
        commands += [f"delete chain {t} {c}" for c in rules.chains if c not in rules.base_chains]
        commands += [f"delete set {t} {s}" for s in rules.sets]
        commands += [f"delete limit {t} {name}" for name in rules.limits]
        self._run("\n".join(commands))

    # -- ipcache ------------------------------------------------------------------------------

    def _change_ipcache(self, upserts, deletes) -> set[int]:
        """Take the changes into ``ipcache``; the families they touch."""
        for entry in deletes:
            self.ipcache[entry.version].pop(entry.prefix, None)
        for entry in upserts:
            self.ipcache[entry.version][entry.prefix] = entry.identity
        return {entry.version for entry in (*upserts, *deletes)}

    def _ipcache_commands(self, families, whole: bool = False) -> tuple[list[dict], dict]:
        """Commands that make each family's map hold its flattened ipcache: what changed, or
        (``whole``) the map flushed and written again; and the ranges written."""
        commands, written = [], {}
        for family in sorted(families):
            name = f"ipcache{family}"
            new = flatten_prefixes(self.ipcache[family].items())
            old, added = set(self.ranges[family]) - set(new), set(new) - set(self.ranges[family])
            if whole:
                commands.append(self._flush_command(name))
                old, added = set(), set(new)
            if old:
                commands.append(self._elements_command(
                    "delete", name, (_ip_range(family, a, b) for a, b, _ in sorted(old))))
            if added:
                commands.append(self._elements_command(
                    "add", name, ([_ip_range(family, a, b), i] for a, b, i in sorted(added))))
            written[family] = new
        return commands, written

    def identity_of(self, address: str) -> int:
        """The identity the table gives ``address`` (for drop notices)."""
        ip = ipaddress.ip_address(address)
        ranges, value = self.ranges[ip.version], int(ip)
        at = bisect.bisect_right(ranges, (value, float("inf"))) - 1
        if at >= 0 and ranges[at][0] <= value <= ranges[at][1]:
            return ranges[at][2]
        return int(world_identity(ip.version))

    # -- policy -------------------------------------------------------------------------------

    def _change_groups(self, endpoint_id: int, changes) -> set:
        """Take one endpoint's map changes into ``groups``; the groups they touch."""
        touched = set()
        for change in changes:
            group = (endpoint_id, DIRS[change.key.direction], change.key.identity)
            keys = self.groups.setdefault(group, {})
            if change.verdict is None:
                keys.pop(change.key, None)
            else:
                keys[change.key] = change.verdict
            touched.add(group)
        return touched

    def _group_commands(self, groups, flush: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
        """Commands for what changed in these groups' map elements (after flushing the maps
        in ``flush``), and the elements written."""
        commands = [self._flush_command(name) for name in flush]
        written: dict = {}
        for group in sorted(groups):
            wanted = self._elements(group) if self.groups.get(group) else {}
            had = {} if flush else self.written.get(group, {})
            for name in sorted(set(had) | set(wanted)):
                gone = had.get(name, set()) - wanted.get(name, set())
                new = wanted.get(name, set()) - had.get(name, set())
                if gone:
                    commands.append(self._elements_command(
                        "delete", name, (_element_key(e) for e in sorted(gone))))
                if new:
                    commands.append(self._elements_command(
                        "add", name, ([_element_key(e), {"goto": {"target": e[-1]}}]
                                      for e in sorted(new))))
            written[group] = wanted
        return commands, written

    def _committed(self, written: dict, ranges: dict) -> None:
        """What a transaction made of ``_group_commands`` and ``_ipcache_commands`` wrote."""
        for group, wanted in written.items():
            if wanted:
                self.written[group] = wanted
            else:
                self.written.pop(group, None)
                self.groups.pop(group, None)
        self.ranges.update(ranges)

    def _elements(self, group) -> dict[str, set[tuple]]:
        """The map elements of one group (the peer's identity, or any: identity 0), each
        ``(identity or None, protocol or protocol range, port range or None, chain)``; the
        chain names the verdict and the deciding entry's prefix length (or, for a deny, its
        match type)."""
        endpoint_id, d, identity = group
        keys = [(k.protocol, k.port, k.end_port, v.value)
                for k, v in self.groups.get(group, {}).items()]
        e = endpoint_id
        ported, portless = ("spec", "spnp") if identity else ("any", "anynp")
        peer = identity or None
        out: dict[str, set[tuple]] = {}
        for family in (4, 6):  # each family's maps jump to its own chains
            to_ported = out.setdefault(policy_map(ported, family, e, d), set())
            to_portless = out.setdefault(policy_map(portless, family, e, d), set())
            for first, last, low, high, verdict, prefix in policy_segments(keys):
                specific = bool(identity)
                target = verdict_target(verdict, specific, prefix, True, family, e, d)
                target_np = verdict_target(verdict, specific, prefix, False, family, e, d)
                for protocol in TYPED_PROTOCOLS:  # ICMP's port: its type
                    if first <= protocol <= last:
                        to_ported.add((peer, protocol, (low, high), target))
                if low == 0:
                    for a, b in _without_port_protocols(first, last):
                        to_portless.add((peer, (a, b), None, target_np))
        return {name: elements for name, elements in out.items() if elements}

    async def reconcile(self, policies, ipcache) -> None:
        groups: dict = {}
        for endpoint_id, verdicts in policies.items():
            for key, verdict in verdicts.items():
                group = (endpoint_id, DIRS[key.direction], key.identity)
                groups.setdefault(group, {})[key] = verdict
        stale = set(self.written)
        self.groups = groups
        flush: tuple[str, ...] = ()
        whole = (self.adopted and not self.synced) or self.dirty
        if whole:  # what the last agent (or a failed write) left is not known here
            flush = tuple(policy_map(kind, family, ep, d) for ep in self.endpoints
                          for d in DIRS.values() for family in (4, 6)
                          for kind in ("spec", "any", "spnp", "anynp"))
        commands, written = self._group_commands(stale | set(groups), flush)
        self.ipcache = {family: {e.prefix: e.identity for e in ipcache
                                 if e.version == family} for family in (4, 6)}
        ranges, drawn = self._ipcache_commands((4, 6), whole=whole)
        judged = self._judged_flushes(self.endpoints)
        self._transaction(commands + ranges + judged)  # one: the whole state in force at once
        self._committed(written, drawn)
        self.dirty = False
        for endpoint_id in list(self.found):  # endpoints the last agent had and this one not
            self._delete(endpoint_id)
            self.found.pop(endpoint_id)
        self.synced = True

    # -- services -----------------------------------------------------------------------------

    def _count_services(self, services) -> None:
        """Not balanced by this datapath (see docs/nftables.md): said in status and the log."""
        count = sum(1 for _ in services)
        if count and not self.services:
            log.warning("nftables datapath: %d global services are NOT load-balanced here;"
                        " use the ebpf datapath for services", count)
        self.services = count

    # -- flow events --------------------------------------------------------------------------

    def _judged_flushes(self, endpoint_ids) -> list[dict]:
        """Commands that forget which connections of these endpoints were judged: their next
        packets are judged (and reported) again under the state the same transaction writes."""
        where = {"family": FAMILY, "table": self.rules.table}
        return [{"flush": {"set": {**where, "name": name}}}
                for endpoint_id in sorted(endpoint_ids) if endpoint_id in self.endpoints
                for name in judged_sets(endpoint_id)]

    def _open_log(self) -> None:
        self._log_socket = netlink.open_nflog(self.rules.log_group)
        self._log_socket.setblocking(False)
        self._unlogged = self._read_unlogged()  # what an earlier agent's table counted is not ours
        asyncio.get_running_loop().add_reader(self._log_socket.fileno(), self.read_events)

    def read_events(self) -> None:
        """Publish every event the kernel has queued for the agent (called in the loop when
        the log socket is readable)."""
        while self._read_log():
            pass

    def _read_log(self) -> bool:
        """One message's events; False when none was waiting."""
        try:
            data = self._log_socket.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:  # ENOBUFS: messages were lost; the numbering's gap counts them
            if exc.errno != errno.ENOBUFS:
                log.warning("nflog: %s", exc)
            return True
        for seq, prefix, packet in netlink.nflog_packets(data):
            if seq is not None:
                missed = (seq - self._next_seq) & 0xFFFFFFFF
                if 0 < missed < 1 << 31:  # the kernel numbered messages we never got
                    self.lost_in_socket += missed
                    self.events.lost(missed)
                self._next_seq = (seq + 1) & 0xFFFFFFFF
            event = self.describe(prefix, packet)
            if event is not None:
                self.events.publish(event)
        if self._unlogged_check is None:  # events go over the rate only while events come
            self._unlogged_check = asyncio.get_running_loop().call_later(
                1.0, self._count_unlogged)
        return True

    def _read_unlogged(self) -> int:
        try:
            return netlink.read_counters(FAMILY, self.rules.table).get(UNLOGGED, 0)
        except OSError:
            return self._unlogged

    def _count_unlogged(self) -> None:
        """Events the table did not log (over the rate) are lost to the agent: reported as
        such a second after events came, and again while more are lost."""
        self._unlogged_check = None
        now = self._read_unlogged()
        if now > self._unlogged:
            self.lost_to_rate += now - self._unlogged
            self.events.lost(now - self._unlogged)
            self._unlogged_check = asyncio.get_running_loop().call_later(
                1.0, self._count_unlogged)
        self._unlogged = now

    def describe(self, prefix: str, packet: bytes) -> FlowEvent | None:
        """An event from a logged packet (its network header on) and its prefix
        ``ma:<endpoint>:<in|out>:<event>:<reason>:<match>``; None for what is not ours."""
        found = PREFIX.fullmatch(prefix.strip())
        if found is None or found[4] not in EVENT_REASONS.get(found[3], ()):
            return None  # another program's log in our group
        endpoint_id, d, reason, match = int(found[1]), found[2], found[4], int(found[5])
        kind, verdict, is_reply = EVENTS[found[3]]
        header = _headers(packet)
        src_ip = dst_ip = ""
        sport = dport = number = flag_bits = src_id = dst_id = 0
        if header is not None:
            (src_ip, sport), (dst_ip, dport), number, flag_bits = header
            endpoint = self.endpoints.get(endpoint_id)
            own = endpoint.identity if endpoint else 0
            src_id = own if d == "out" else self.identity_of(src_ip)
            dst_id = own if d == "in" else self.identity_of(dst_ip)
        return FlowEvent(time.time_ns(), kind, verdict, reason, endpoint_id,
                         "ingress" if d == "in" else "egress", src_ip, sport, dst_ip, dport,
                         number, flag_bits, src_id, dst_id, is_reply, match)

    # -- visibility ---------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Packets per reason (``forwarded`` too), from the table's named counters."""
        raw = netlink.read_counters(FAMILY, self.rules.table)
        return {reason: raw.get(f"r_{reason}", 0) for reason in REASONS}

    @hookimpl
    def meshagent_status(self, verbose):
        if not self.started:
            if self.start_error:
                return StatusSection("Datapath", Health.FAILURE,
                                     f"nftables: NOT enforcing: {self.start_error}")
            return StatusSection("Datapath", Health.WARNING, "nftables: starting")
        try:
            counts = self.counters()
        except OSError as exc:
            return StatusSection("Datapath", Health.FAILURE,
                                 f"nftables: table {self.rules.ref} unreadable: {exc}")
        drops = {REASON_TEXT[r]: n for r, n in counts.items() if r != "forwarded" and n}
        elements = sum(len(e) for group in self.written.values() for e in group.values())
        summary = (f"nftables: table {self.rules.ref} on {len(self.endpoints)} endpoints,"
                   f" {'synced' if self.synced else 'waiting for the agent to sync'};"
                   " drops: " + (", ".join(f"{n} {r}" for r, n in drops.items()) or "none"))
        details = [f"ipcache4: {len(self.ranges[4])} ranges",
                   f"ipcache6: {len(self.ranges[6])} ranges",
                   f"policy elements: {elements}", f"forwarded: {counts['forwarded']}",
                   "flow events: " + ("drops, policy verdicts and traces" if self.rules.flows
                                      else "drops only (--enable-hubble=false)")
                   + f"; lost: {self.lost_in_socket} (socket full),"
                     f" {self.lost_to_rate} (over the rate)"]
        audited = sorted(e.id for e in self.endpoints.values() if e.policy_audit)
        if audited:
            details.append("policy audit mode: endpoints " + ", ".join(map(str, audited)))
        health = Health.OK
        if self.services:
            health = Health.WARNING
            details.append(f"services: {self.services} NOT load-balanced (nftables datapath;"
                           " use ebpf for global services)")
        return StatusSection("Datapath", health, summary, details=details)



class NftablesMetrics:
    """Packets per verdict reason from the table's counters, when scraped."""

    def __init__(self, datapath: NftablesDatapath):
        self.datapath = datapath

    def collect(self):
        if not self.datapath.started:
            return
        yield from verdict_metrics((REASON_TEXT[reason], packets, None)
                                   for reason, packets in sorted(self.datapath.counters().items()))

    def describe(self):
        return []


def _headers(packet: bytes):
    """``((src, sport), (dst, dport), protocol, tcp flags)`` of an IP packet, or None. ICMP
    and ICMPv6 have no ports: the source port is their ``type << 8 | code`` (where the
    observer reads them, as the eBPF datapath reports them)."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        offset, protocol = (packet[0] & 0xF) * 4, packet[9]
        src, dst = socket.inet_ntop(socket.AF_INET, packet[12:16]), \
            socket.inet_ntop(socket.AF_INET, packet[16:20])
        later = int.from_bytes(packet[6:8], "big") & 0x1FFF
    elif version == 6 and len(packet) >= 40:
        offset, protocol, later = 40, packet[6], 0
        src, dst = socket.inet_ntop(socket.AF_INET6, packet[8:24]), \
            socket.inet_ntop(socket.AF_INET6, packet[24:40])
        while protocol in (0, 43, 60, 44) and offset + 8 <= len(packet):
            if protocol == 44:
                later = int.from_bytes(packet[offset + 2:offset + 4], "big") & 0xFFF8
                protocol, offset = packet[offset], offset + 8
            else:
                protocol, offset = packet[offset], offset + (packet[offset + 1] + 1) * 8
    else:
        return None
    sport = dport = flags = 0
    if protocol in (1, 58) and not later and offset + 2 <= len(packet):
        sport = packet[offset] << 8 | packet[offset + 1]
    if protocol in (6, 17, 132) and not later and offset + 4 <= len(packet):
        sport = int.from_bytes(packet[offset:offset + 2], "big")
        dport = int.from_bytes(packet[offset + 2:offset + 4], "big")
        if protocol == 6 and offset + 14 <= len(packet):
            flags = packet[offset + 13]
    return (src, sport), (dst, dport), protocol, flags


def _element_key(element: tuple):
    """A policy element's key in libnftables JSON: identity . protocol . ports (ports travel
    as classids; protocols and ports as ranges where they are ranges)."""
    identity, protocol, ports, _ = element
    parts: list = [] if identity is None else [identity]
    parts.append({"range": list(protocol)} if isinstance(protocol, tuple) else protocol)
    if ports is not None:
        parts.append({"range": [f"0:{ports[0]:x}", f"0:{ports[1]:x}"]})
    return {"concat": parts} if len(parts) > 1 else parts[0]


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


def _ip_range(family: int, a: int, b: int) -> dict:
    address = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return {"range": [str(address(a)), str(address(b))]}
